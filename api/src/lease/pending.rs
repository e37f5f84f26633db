//! [`PendingLease`]: what an acquisition may have taken, until it is known.

use super::{Lease, LeaseBackend, LeaseOptions, Tick};

/// A lease being acquired. Arm it just before sending a request that may
/// take the lease on the server; if the acquisition then ends without
/// [`start`](PendingLease::start) — an error, a timeout, a dropped future,
/// a panic — dropping it releases on the server whatever the request may
/// have taken (in the background, best effort). A definite "held by someone
/// else" answer [disarms](PendingLease::disarm) it.
///
/// The backend's release must be safe when nothing was taken (it checks the
/// owner token), and the acquire request must recognise a lease that is
/// already the caller's, so that a retry after a lost answer succeeds.
///
/// ```
/// use std::time::Duration;
/// use async_trait::async_trait;
/// use im_infra::lease::{LeaseBackend, LeaseOptions, PendingLease, Tick};
///
/// struct Row;
/// #[async_trait]
/// impl LeaseBackend for Row {
///     fn describe(&self) -> String { "row".into() }
///     async fn extend(&self, _: Duration) -> im_infra::Result<bool> { Ok(true) }
///     async fn release(&self) -> im_infra::Result<bool> { Ok(true) }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let mut pending = PendingLease::new(Row);
/// let sent = Tick::now();
/// pending.arm();
/// // ... the server answered "taken" ...
/// let lease = pending.start(LeaseOptions::new(Duration::from_secs(5)), sent);
/// assert!(lease.is_held());
/// # }
/// ```
pub struct PendingLease<B: LeaseBackend> {
    backend: Option<B>,
    armed: bool,
}

impl<B: LeaseBackend> PendingLease<B> {
    /// Nothing sent yet.
    pub fn new(backend: B) -> Self {
        PendingLease {
            backend: Some(backend),
            armed: false,
        }
    }

    /// A request that may take the lease is about to be sent.
    pub fn arm(&mut self) {
        self.armed = true;
    }

    /// The server answered that the lease is not ours: nothing to release.
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// The backend side of the lease.
    pub fn backend(&self) -> &B {
        self.backend
            .as_ref()
            .expect("the backend is only taken by start")
    }

    /// The acquisition completed: hands the backend over (to be kept by a
    /// [`Lease`], possibly wrapped) without releasing anything.
    pub fn into_backend(mut self) -> B {
        self.armed = false;
        self.backend.take().expect("the backend is only taken once")
    }

    /// The server granted the lease to a request sent at `sent`: keep it.
    pub fn start(mut self, opts: LeaseOptions, sent: Tick) -> Lease {
        self.armed = false;
        let backend = self
            .backend
            .take()
            .expect("the backend is only taken by start");
        Lease::start(backend, opts, sent)
    }
}

impl<B: LeaseBackend> Drop for PendingLease<B> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (Some(backend), Ok(rt)) = (self.backend.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        rt.spawn(async move {
            match backend.release().await {
                Ok(true) => tracing::debug!(
                    lease = %backend.describe(),
                    "released what an unfinished acquisition had taken"
                ),
                Ok(false) => {}
                Err(e) => tracing::debug!(
                    lease = %backend.describe(),
                    error = %e,
                    "could not release what an unfinished acquisition may have taken; it will expire"
                ),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;

    struct Counting(Arc<AtomicU32>);

    #[async_trait]
    impl LeaseBackend for Counting {
        fn describe(&self) -> String {
            "counting".into()
        }
        async fn extend(&self, _: Duration) -> crate::Result<bool> {
            Ok(true)
        }
        async fn release(&self) -> crate::Result<bool> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(true)
        }
    }

    #[tokio::test]
    async fn an_armed_pending_lease_is_released_when_dropped_and_only_then() {
        let released = Arc::new(AtomicU32::new(0));
        drop(PendingLease::new(Counting(released.clone())));
        let mut p = PendingLease::new(Counting(released.clone()));
        p.arm();
        p.disarm();
        drop(p);
        tokio::task::yield_now().await;
        assert_eq!(
            released.load(Ordering::SeqCst),
            0,
            "never armed, or disarmed"
        );

        let mut p = PendingLease::new(Counting(released.clone()));
        p.arm();
        drop(p);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(released.load(Ordering::SeqCst), 1, "armed and dropped");

        // A dropped acquisition future drops its pending lease too.
        let r = released.clone();
        let task = tokio::spawn(async move {
            let mut p = PendingLease::new(Counting(r));
            p.arm();
            std::future::pending::<()>().await;
            drop(p);
        });
        tokio::task::yield_now().await;
        task.abort();
        let _ = task.await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(released.load(Ordering::SeqCst), 2, "cancelled mid-call");

        let mut p = PendingLease::new(Counting(released.clone()));
        p.arm();
        let lease = p.start(LeaseOptions::new(Duration::from_secs(5)), Tick::now());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            released.load(Ordering::SeqCst),
            2,
            "started: the lease owns it"
        );
        assert!(lease.is_held());
    }
}
