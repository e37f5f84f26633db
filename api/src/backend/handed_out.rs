//! [`HandedOut`]: what a backend handed out that it must close with itself.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result};
use crate::telemetry::OpMetrics;

/// Something a backend handed out that holds resources beyond the
/// backend's own connections: a registry's registrations (deregistered),
/// a consumer (shut down, offsets committed), a producer (flushed).
#[async_trait]
pub trait Closable: Send + Sync {
    /// Releases what it holds. Called once, when its backend closes.
    async fn close(&self) -> Result<()>;
}

/// The handles a backend handed out, closed together by
/// [`close_all`](HandedOut::close_all) — the one close path every backend's
/// [`Backend::close`](super::Backend::close) takes, run once
/// ([`close_once`](HandedOut::close_once)) as one operation of the backend
/// (`backend.close`: one span, counted). Handles are held weakly: one
/// dropped by its user is simply gone.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicBool, Ordering};
/// use async_trait::async_trait;
/// use im_infra::backend::{Closable, HandedOut};
///
/// struct Consumer(AtomicBool);
///
/// #[async_trait]
/// impl Closable for Consumer {
///     async fn close(&self) -> im_infra::Result<()> {
///         self.0.store(true, Ordering::SeqCst);
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> im_infra::Result<()> {
/// let handed_out = HandedOut::new("memory");
/// let consumer = Arc::new(Consumer(AtomicBool::new(false)));
/// handed_out.track(&consumer)?;
/// handed_out.close_all().await?;
/// assert!(consumer.0.load(Ordering::SeqCst));
/// # Ok(()) }
/// ```
pub struct HandedOut {
    items: Mutex<Items>,
    /// The result of the backend's close, once it ran.
    closed: tokio::sync::OnceCell<Result<()>>,
    /// The telemetry of that close.
    close_op: OpMetrics,
}

#[derive(Default)]
struct Items {
    live: Vec<Weak<dyn Closable>>,
    /// Set by the first `close_all`: nothing is tracked afterwards.
    closing: bool,
}

impl std::fmt::Debug for HandedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandedOut")
            .field("backend", &self.close_op.backend())
            .field("live", &self.live().len())
            .finish()
    }
}

impl HandedOut {
    /// Nothing handed out yet by `backend` (its name, for the close's
    /// telemetry).
    pub fn new(backend: &'static str) -> Self {
        HandedOut {
            items: Mutex::default(),
            closed: tokio::sync::OnceCell::new(),
            close_op: OpMetrics::new(backend, "backend", "backend.close"),
        }
    }

    fn items(&self) -> parking_lot::MutexGuard<'_, Items> {
        self.items.lock()
    }

    /// Remembers `item`, to close it with the backend; `Closed` once the
    /// backend's close has begun (the caller drops `item`, so nothing
    /// handed out during a close outlives it).
    pub fn track<T: Closable + 'static>(&self, item: &Arc<T>) -> Result<()> {
        let weak: Weak<dyn Closable> = Arc::downgrade(item) as Weak<dyn Closable>;
        let mut items = self.items();
        if items.closing {
            return Err(Error::new(ErrorKind::Closed, "the backend was closed"));
        }
        items.live.retain(|w| w.strong_count() > 0);
        items.live.push(weak);
        Ok(())
    }

    fn live(&self) -> Vec<Arc<dyn Closable>> {
        self.items().live.iter().filter_map(Weak::upgrade).collect()
    }

    /// Closes every handle still alive, each once and all at the same
    /// time (so the slowest, not the sum, bounds the close); a failure is
    /// logged and the first one returned after all were tried. From its
    /// start on, [`track`](Self::track) refuses.
    pub async fn close_all(&self) -> Result<()> {
        let live: Vec<Arc<dyn Closable>> = {
            let mut items = self.items();
            items.closing = true;
            std::mem::take(&mut items.live)
                .iter()
                .filter_map(Weak::upgrade)
                .collect()
        };
        let results = futures::future::join_all(live.iter().map(|item| item.close())).await;
        let mut first = None;
        for e in results.into_iter().filter_map(|r| r.err()) {
            tracing::warn!(error = %e, "closing a handle of the backend failed");
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }

    /// The backend's close, run once: the first call runs `close` (which
    /// calls [`close_all`](Self::close_all) and releases the backend's
    /// own connections) as the operation `backend.close`; concurrent calls
    /// wait for it, and every call, then and later, returns its result
    /// (counted once, by the call that ran it).
    ///
    /// ```
    /// use im_infra::backend::HandedOut;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> im_infra::Result<()> {
    /// let handed_out = HandedOut::new("memory");
    /// let close = || handed_out.close_once(async {
    ///     handed_out.close_all().await?;
    ///     println!("connections released"); // once
    ///     Ok(())
    /// });
    /// close().await?;
    /// close().await?;
    /// # Ok(()) }
    /// ```
    pub async fn close_once<F>(&self, close: F) -> Result<()>
    where
        F: std::future::Future<Output = Result<()>>,
    {
        self.closed
            .get_or_init(|| self.close_op.run(close))
            .await
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Counted(Arc<AtomicUsize>, bool);

    #[async_trait]
    impl Closable for Counted {
        async fn close(&self) -> Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            if self.1 {
                Err(Error::new(ErrorKind::Unavailable, "down"))
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn every_live_handle_is_closed_once_and_a_failure_does_not_stop_the_rest() {
        let n = Arc::new(AtomicUsize::new(0));
        let h = HandedOut::new("test");
        let a = Arc::new(Counted(n.clone(), true));
        let b = Arc::new(Counted(n.clone(), false));
        let dropped = Arc::new(Counted(n.clone(), false));
        h.track(&a).unwrap();
        h.track(&b).unwrap();
        h.track(&dropped).unwrap();
        drop(dropped);
        let err = h.close_all().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        assert_eq!(
            n.load(Ordering::SeqCst),
            2,
            "the two live ones, the dropped one not"
        );
        h.close_all().await.unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 2, "each once");
    }

    #[tokio::test]
    async fn nothing_is_tracked_once_the_close_began() {
        let n = Arc::new(AtomicUsize::new(0));
        let h = HandedOut::new("test");
        h.close_all().await.unwrap();
        let late = Arc::new(Counted(n.clone(), false));
        let err = h.track(&late).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Closed);
        h.close_all().await.unwrap();
        assert_eq!(n.load(Ordering::SeqCst), 0, "refused, so never closed");
    }

    #[tokio::test]
    async fn the_close_runs_once_and_every_caller_gets_its_result() {
        let runs = Arc::new(AtomicUsize::new(0));
        let h = HandedOut::new("test");
        let close = || {
            h.close_once(async {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Err(Error::new(ErrorKind::Unavailable, "flush failed"))
            })
        };
        let (first, second) = tokio::join!(close(), close());
        let third = close().await;
        for r in [first, second, third] {
            assert_eq!(r.unwrap_err().kind(), ErrorKind::Unavailable);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
