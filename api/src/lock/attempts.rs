//! The acquisition loop of a lock taken by owner token, written once: the
//! Redis and MySQL locks supply one attempt ("take the key with my token,
//! or tell me how long the holder's lease has left") and, where the server
//! can announce releases, a wake-up; [`acquire`] and [`try_acquire`] do the
//! rest.
//!
//! What the loop guarantees:
//! - every attempt of one acquisition uses the same token, so an attempt
//!   the server applied but whose answer was lost (a timeout) is found the
//!   caller's on the next try;
//! - an attempt that fails or whose future is dropped leaves its
//!   [`PendingLease`] armed, so what it may have taken is released in the
//!   background instead of staying locked for its whole TTL;
//! - a retryable failure is retried until the wait deadline, then returned;
//!   a held lock is waited for until a release is announced or a jittered
//!   backoff (10 ms doubling to 250 ms) passes, never past the holder's
//!   remaining TTL or the deadline, after which the answer is `LockNotAcquired`;
//! - a backend closed while waiting ends the wait with `Closed`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{LeasedGuard, LockGuard, LockOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::{LeaseBackend, PendingLease, Tick};

/// First fallback delay between attempts on a held lock.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// Largest fallback delay between attempts on a held lock.
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// What one acquisition attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Taken (or found already the caller's), with this fencing token.
    Acquired(u64),
    /// Held by another owner whose lease has about this much left.
    Held(Duration),
}

/// Wakes a waiter when a release of its key may have happened (a hint:
/// the loop tries again either way). Dropping it unregisters the waiter.
pub struct ReleaseWatch {
    notify: Arc<Notify>,
    _unregister: Box<dyn Send + Sync>,
}

impl ReleaseWatch {
    /// A watch woken through `notify`; `unregister` is dropped with it
    /// (put the unregistration in its `Drop`).
    pub fn new(notify: Arc<Notify>, unregister: impl Send + Sync + 'static) -> Self {
        ReleaseWatch {
            notify,
            _unregister: Box::new(unregister),
        }
    }
}

/// A lock service whose acquisition is one token attempt at a time.
///
/// ```
/// use std::time::Duration;
/// use im_infra::lock::attempts::{Attempt, TokenLock};
/// use im_infra::lease::LeaseBackend;
/// # struct Held;
/// # #[async_trait::async_trait]
/// # impl LeaseBackend for Held {
/// #     fn describe(&self) -> String { "a lock".into() }
/// #     async fn extend(&self, _: Duration) -> im_infra::Result<bool> { Ok(true) }
/// #     async fn release(&self) -> im_infra::Result<bool> { Ok(true) }
/// # }
/// struct MyLock { closed: tokio_util::sync::CancellationToken }
///
/// #[async_trait::async_trait]
/// impl TokenLock for MyLock {
///     type Held = Held;
///     fn backend(&self) -> &'static str { "mine" }
///     fn holder(&self, _key: &str) -> Held { Held }
///     async fn attempt(&self, _held: &Held, _ttl: Duration) -> im_infra::Result<Attempt> {
///         Ok(Attempt::Acquired(1))
///     }
///     fn closed(&self) -> &tokio_util::sync::CancellationToken { &self.closed }
/// }
/// ```
#[async_trait]
pub trait TokenLock: Send + Sync {
    /// A holder of one key with one token, as the lease core keeps it.
    type Held: LeaseBackend;

    /// The backend's name (lease labels, errors).
    fn backend(&self) -> &'static str;

    /// A holder of `key` with a fresh owner token.
    fn holder(&self, key: &str) -> Self::Held;

    /// One attempt to take `held`'s key with its token for `ttl`.
    async fn attempt(&self, held: &Self::Held, ttl: Duration) -> Result<Attempt>;

    /// Cancelled when the backend is closed.
    fn closed(&self) -> &CancellationToken;

    /// A wake-up on releases of `key`, where the server announces them.
    fn releases(&self, key: &str) -> Option<ReleaseWatch> {
        let _ = key;
        None
    }
}

/// One attempt with `pending`'s token: left armed unless the lock was found
/// held, so an attempt whose answer is lost is undone.
async fn attempt_with<L: TokenLock + ?Sized>(
    lock: &L,
    pending: &mut PendingLease<L::Held>,
    ttl: Duration,
) -> Result<(Attempt, Tick)> {
    let sent = Tick::now();
    pending.arm();
    let attempt = lock.attempt(pending.backend(), ttl).await?;
    if let Attempt::Held(_) = attempt {
        pending.disarm();
    }
    Ok((attempt, sent))
}

fn guard<L: TokenLock + ?Sized>(
    lock: &L,
    key: &str,
    pending: PendingLease<L::Held>,
    fence: u64,
    opts: &LockOptions,
    sent: Tick,
) -> Box<dyn LockGuard>
where
    L::Held: 'static,
{
    let lease = pending.start(opts.lease_options(lock.backend(), opts.ttl), sent);
    Box::new(LeasedGuard::new(key, fence, lease))
}

/// [`DistributedLock::acquire`](super::DistributedLock::acquire) of a
/// [`TokenLock`]: attempts until the lock is taken or the wait deadline
/// passes (see the module docs).
pub async fn acquire<L: TokenLock + ?Sized>(
    lock: &L,
    key: &str,
    opts: LockOptions,
) -> Result<Box<dyn LockGuard>>
where
    L::Held: 'static,
{
    let deadline = opts.wait_deadline(Instant::now());
    let past_deadline = || deadline.is_some_and(|d| Instant::now() >= d);
    let watch = lock.releases(key);
    let mut pending = PendingLease::new(lock.holder(key));
    let mut backoff = FIRST_BACKOFF;
    loop {
        // Enabled before the attempt, so a release announced while it runs
        // is not missed.
        let released = watch.as_ref().map(|w| w.notify.notified());
        tokio::pin!(released);
        if let Some(r) = released.as_mut().as_pin_mut() {
            r.enable();
        }
        let left = match attempt_with(lock, &mut pending, opts.ttl).await {
            Ok((Attempt::Acquired(fence), sent)) => {
                return Ok(guard(lock, key, pending, fence, &opts, sent))
            }
            Ok((Attempt::Held(left), _)) => left,
            Err(e) if e.is_retryable() && !past_deadline() => backoff,
            Err(e) => return Err(e),
        };
        if past_deadline() {
            return Err(super::not_acquired(key, opts.wait_timeout));
        }
        let mut wait = backoff.mul_f64(0.5 + fastrand::f64() / 2.0).min(left);
        if let Some(d) = deadline {
            wait = wait.min(d.saturating_duration_since(Instant::now()));
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        let released = async {
            match released.as_mut().as_pin_mut() {
                Some(r) => r.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = released => {}
            _ = tokio::time::sleep(wait) => {}
            _ = lock.closed().cancelled() => {
                return Err(Error::new(
                    ErrorKind::Closed,
                    format!("the {} backend was closed", lock.backend()),
                ))
            }
        }
    }
}

/// [`DistributedLock::try_acquire`](super::DistributedLock::try_acquire) of
/// a [`TokenLock`]: one attempt.
pub async fn try_acquire<L: TokenLock + ?Sized>(
    lock: &L,
    key: &str,
    opts: LockOptions,
) -> Result<Option<Box<dyn LockGuard>>>
where
    L::Held: 'static,
{
    let mut pending = PendingLease::new(lock.holder(key));
    Ok(match attempt_with(lock, &mut pending, opts.ttl).await? {
        (Attempt::Acquired(fence), sent) => Some(guard(lock, key, pending, fence, &opts, sent)),
        (Attempt::Held(_), _) => None,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

    use super::*;

    /// Held for `held_for` attempts, then taken; the first attempt fails
    /// retryably after the "server" applied it when `lose_first` is set.
    struct Scripted {
        attempts: AtomicU32,
        held_for: u32,
        lose_first: bool,
        tokens: parking_lot::Mutex<Vec<String>>,
        released: Arc<AtomicUsize>,
        closed: CancellationToken,
    }

    struct Held {
        token: String,
        released: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl LeaseBackend for Held {
        fn describe(&self) -> String {
            "a scripted lock".into()
        }
        async fn extend(&self, _: Duration) -> Result<bool> {
            Ok(true)
        }
        async fn release(&self) -> Result<bool> {
            self.released.fetch_add(1, Ordering::SeqCst);
            Ok(true)
        }
    }

    #[async_trait]
    impl TokenLock for Scripted {
        type Held = Held;
        fn backend(&self) -> &'static str {
            "scripted"
        }
        fn holder(&self, _: &str) -> Held {
            Held {
                token: fastrand::u64(..).to_string(),
                released: self.released.clone(),
            }
        }
        async fn attempt(&self, held: &Held, _: Duration) -> Result<Attempt> {
            self.tokens.lock().push(held.token.clone());
            let n = self.attempts.fetch_add(1, Ordering::SeqCst);
            if self.lose_first && n == 0 {
                return Err(Error::new(ErrorKind::Unavailable, "answer lost"));
            }
            Ok(if n < self.held_for {
                Attempt::Held(Duration::from_millis(5))
            } else {
                Attempt::Acquired(u64::from(n) + 1)
            })
        }
        fn closed(&self) -> &CancellationToken {
            &self.closed
        }
    }

    fn scripted(held_for: u32, lose_first: bool) -> Scripted {
        Scripted {
            attempts: AtomicU32::new(0),
            held_for,
            lose_first,
            tokens: parking_lot::Mutex::new(Vec::new()),
            released: Arc::new(AtomicUsize::new(0)),
            closed: CancellationToken::new(),
        }
    }

    fn opts(wait: Duration) -> LockOptions {
        LockOptions::new(Duration::from_secs(5))
            .wait(wait)
            .no_renewal()
    }

    #[tokio::test]
    async fn every_attempt_of_one_acquisition_uses_one_token() {
        let lock = scripted(3, true);
        let Ok(g) = acquire(&lock, "k", opts(Duration::from_secs(5))).await else {
            panic!("not acquired");
        };
        assert_eq!(g.fencing_token(), 4, "a lost answer, two held, then taken");
        let tokens = lock.tokens.lock().clone();
        assert_eq!(tokens.len(), 4);
        assert!(tokens.iter().all(|t| *t == tokens[0]), "{tokens:?}");
    }

    #[tokio::test]
    async fn a_held_lock_times_out_at_the_deadline_and_nothing_is_released() {
        let lock = scripted(u32::MAX, false);
        let start = Instant::now();
        let Err(err) = acquire(&lock, "k", opts(Duration::from_millis(100))).await else {
            panic!("acquired a held lock");
        };
        assert_eq!(err.kind(), ErrorKind::LockNotAcquired);
        assert!(start.elapsed() < Duration::from_millis(400));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(lock.released.load(Ordering::SeqCst), 0, "never taken");
    }

    #[tokio::test]
    async fn a_lost_answer_at_the_deadline_is_returned_and_undone() {
        let lock = scripted(0, true);
        let Err(err) = acquire(&lock, "k", opts(Duration::ZERO)).await else {
            panic!("acquired after a lost answer with no time left");
        };
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            lock.released.load(Ordering::SeqCst),
            1,
            "what the lost attempt may have taken is released"
        );
    }

    #[tokio::test]
    async fn closing_ends_a_wait() {
        let lock = Arc::new(scripted(u32::MAX, false));
        let l = lock.clone();
        let waiting =
            tokio::spawn(async move { acquire(&*l, "k", opts(Duration::from_secs(30))).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        lock.closed.cancel();
        let Err(err) = waiting.await.unwrap() else {
            panic!("acquired a held lock");
        };
        assert_eq!(err.kind(), ErrorKind::Closed);
    }

    #[tokio::test]
    async fn try_acquire_makes_one_attempt() {
        let lock = scripted(1, false);
        assert!(try_acquire(&lock, "k", opts(Duration::ZERO))
            .await
            .unwrap()
            .is_none());
        assert!(try_acquire(&lock, "k", opts(Duration::ZERO))
            .await
            .unwrap()
            .is_some());
        assert_eq!(lock.attempts.load(Ordering::SeqCst), 2);
    }
}
