//! [`Shutdown`]: whether a backend (or its connection) was closed, and the
//! signal its background work stops on.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// The closed state of a backend or of one of its connections: a flag
/// every call checks ([`check_open`](Self::check_open), one atomic load on
/// the hot path) and a [`CancellationToken`] its background tasks (watches,
/// probes, keep-alives) stop on. [`close`](Self::close) sets both, and
/// is idempotent; [`refuse`](Self::refuse) only the first. Dropping it
/// cancels nothing: what a backend's handles keep running after the
/// backend value is dropped is the backend's decision.
///
/// ```
/// use im_infra::backend::Shutdown;
/// use im_infra::ErrorKind;
///
/// let shutdown = Shutdown::new("redis");
/// let task = shutdown.token().clone();
/// shutdown.check_open().unwrap();
/// shutdown.close();
/// assert!(task.is_cancelled());
/// let e = shutdown.check_open().unwrap_err();
/// assert_eq!((e.kind(), e.backend()), (ErrorKind::Closed, Some("redis")));
/// ```
#[derive(Debug)]
pub struct Shutdown {
    backend: &'static str,
    closed: AtomicBool,
    token: CancellationToken,
}

impl Shutdown {
    /// Open, for `backend` (named in its `Closed` errors).
    pub fn new(backend: &'static str) -> Self {
        Shutdown {
            backend,
            closed: AtomicBool::new(false),
            token: CancellationToken::new(),
        }
    }

    /// `Closed` ([`closed`](super::closed)) once [`close`](Self::close)
    /// was called.
    #[inline]
    pub fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            Err(super::closed(self.backend))
        } else {
            Ok(())
        }
    }

    /// Whether [`close`](Self::close) was called.
    #[inline]
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Refuses every later call; background work goes on until
    /// [`close`](Self::close). For a backend whose handed-out handles must
    /// stop taking new work before they are closed, while its background
    /// tasks still run (the in-process backend). A backend whose handles
    /// close through its connection (a registry deregistering) closes
    /// them first and calls neither until then.
    pub fn refuse(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Refuses every later call and stops the background work.
    pub fn close(&self) {
        self.refuse();
        self.token.cancel();
    }

    /// The token background work stops on: clone it, or take a
    /// [`child_token`](CancellationToken::child_token) to stop one task
    /// on its own as well.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}
