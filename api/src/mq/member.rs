//! [`MemberState`]: the lifecycle every [`Consumer`](super::Consumer) shares.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind, Result};

/// What a consumer-group member tracks around its receive loop, the same
/// on every backend: one `run` at a time, none after `shutdown`, a
/// `shutdown` that returns once `run` has ended, and a pause flag the loop
/// watches. Dropping it stops a `run` still going.
///
/// ```
/// use im_infra::mq::MemberState;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> im_infra::Result<()> {
/// let member = MemberState::new("memory");
/// {
///     let _running = member.begin()?;
///     // A second run while the first is going is refused.
///     assert!(member.begin().is_err());
///     // ... the receive loop, until `member.stop()` is cancelled ...
/// }
/// member.shutdown().await;
/// assert_eq!(member.begin().unwrap_err().kind(), im_infra::ErrorKind::Closed);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct MemberState {
    backend: &'static str,
    stop: CancellationToken,
    running: AtomicBool,
    /// `true` while `run` is active.
    active: watch::Sender<bool>,
    paused: watch::Sender<bool>,
}

/// A `run` in progress; its end (in any way, cancellation included) lets
/// the next `run` start and `shutdown` return.
#[derive(Debug)]
#[must_use = "the run ends when this guard is dropped"]
pub struct Running<'a>(&'a MemberState);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.store(false, Ordering::Release);
        self.0.active.send_replace(false);
    }
}

impl MemberState {
    /// A member of a consumer of `backend` (its name, for errors), not
    /// running, not paused.
    pub fn new(backend: &'static str) -> Self {
        Self::with_stop(backend, CancellationToken::new())
    }

    /// [`new`](Self::new), stopped by `stop` too (a child of the backend's
    /// shutdown token, say).
    pub fn with_stop(backend: &'static str, stop: CancellationToken) -> Self {
        MemberState {
            backend,
            stop,
            running: AtomicBool::new(false),
            active: watch::channel(false).0,
            paused: watch::channel(false).0,
        }
    }

    /// Starts a `run`: `Closed` after [`shutdown`](Self::shutdown),
    /// `InvalidState` while another `run` is going.
    pub fn begin(&self) -> Result<Running<'_>> {
        if self.stop.is_cancelled() {
            return Err(Error::new(ErrorKind::Closed, "the consumer was shut down")
                .with_backend(self.backend));
        }
        if self.running.swap(true, Ordering::AcqRel) {
            return Err(
                Error::new(ErrorKind::InvalidState, "the consumer is already running")
                    .with_backend(self.backend),
            );
        }
        self.active.send_replace(true);
        Ok(Running(self))
    }

    /// Cancelled by [`shutdown`](Self::shutdown) (and on drop): the loop
    /// ends when it sees it.
    pub fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    /// Stops the member and waits until its `run` (if any) has ended.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let mut active = self.active.subscribe();
        while *active.borrow_and_update() {
            if active.changed().await.is_err() {
                break;
            }
        }
    }

    /// Asks the loop to pause (`true`) or resume (`false`).
    pub fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    /// The pause flag, for the loop to watch.
    pub fn paused(&self) -> watch::Receiver<bool> {
        self.paused.subscribe()
    }
}

impl Drop for MemberState {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_the_run_to_end() {
        let member = std::sync::Arc::new(MemberState::new("test"));
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let run = tokio::spawn({
            let member = member.clone();
            async move {
                let _running = member.begin().unwrap();
                started_tx.send(()).unwrap();
                member.stop().cancelled().await;
                // Work after the stop still counts as running.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        started.await.unwrap();
        let begun = tokio::time::Instant::now();
        member.shutdown().await;
        assert!(begun.elapsed() >= Duration::from_secs(1));
        run.await.unwrap();
    }

    #[test]
    fn one_run_at_a_time_and_none_after_shutdown() {
        let member = MemberState::new("test");
        let first = member.begin().unwrap();
        let again = member.begin().unwrap_err();
        assert_eq!(again.kind(), ErrorKind::InvalidState);
        assert_eq!(again.backend(), Some("test"));
        drop(first);
        drop(member.begin().unwrap());
        member.stop().cancel();
        assert_eq!(member.begin().unwrap_err().kind(), ErrorKind::Closed);
    }

    #[test]
    fn the_pause_flag_reaches_the_loop() {
        let member = MemberState::new("test");
        let mut paused = member.paused();
        assert!(!*paused.borrow_and_update());
        member.set_paused(true);
        assert!(paused.has_changed().unwrap());
        assert!(*paused.borrow_and_update());
    }
}
