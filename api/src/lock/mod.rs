//! Distributed mutual exclusion with fencing tokens.
//!
//! [`DistributedLock::acquire`] waits (bounded by
//! [`LockOptions::wait_timeout`], and by cancellation: dropping the future
//! leaves nothing behind) and returns a [`LockGuard`]. Every backend's guard
//! is a [`LeasedGuard`]: the lock is a [`Lease`](crate::lease::Lease), renewed
//! in the background while the guard lives, with a local deadline on this
//! host's monotonic clock. The guard's [`lost`](LockGuard::lost) token is
//! cancelled when the server says the lock is gone *and* when the deadline
//! passes without a successful renewal — so a holder cut off from its server
//! learns it lost the lock before any other process can acquire it. Every
//! acquisition of a key carries a [fencing token](LockGuard::fencing_token)
//! larger than the one before, to hand to the resource being protected so it
//! can reject a stale holder.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use im_infra::lock::{DistributedLock, LockExt, LockOptions};
//!
//! async fn settle(locks: Arc<dyn DistributedLock>) -> im_infra::Result<()> {
//!     // Scoped: acquire, run, release.
//!     let total = locks
//!         .with_lock("ledger:7", LockOptions::new(Duration::from_secs(10)), || async { 40 + 2 })
//!         .await?;
//!     assert_eq!(total, 42);
//!
//!     // Manual, with a fencing token and the lost-lock signal.
//!     let guard = locks.acquire("ledger:7", LockOptions::new(Duration::from_secs(10))).await?;
//!     let token = guard.fencing_token();
//!     let lost = guard.lost();
//!     tokio::select! {
//!         _ = lost.cancelled() => println!("lock lost, stop writing"),
//!         _ = async { /* write with `token` */ } => {}
//!     }
//!     guard.release().await
//! }
//! ```

pub mod attempts;
mod leased;

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind, Result};
use crate::lease::LeaseOptions;

pub use leased::LeasedGuard;

/// How to acquire a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockOptions {
    /// How long the lock lives without renewal.
    pub ttl: Duration,
    /// How long [`DistributedLock::acquire`] waits before failing with
    /// `LockNotAcquired` (ignored by `try_acquire`). `Duration::MAX` (or any wait too
    /// long to be represented as an instant) waits without limit.
    pub wait_timeout: Duration,
    /// Renew the lock in the background (every `ttl / 3`) while the guard
    /// lives. Without it the lock expires after `ttl` unless refreshed.
    pub auto_renew: bool,
    /// Stop renewing after this many background renewals; the lock then
    /// ends at its deadline. `None`: renew while the guard lives.
    pub max_renewals: Option<u64>,
}

impl LockOptions {
    /// Default wait bound of [`LockOptions::new`].
    pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

    /// A lock of `ttl`, waiting up to 30 s, renewed automatically.
    pub fn new(ttl: Duration) -> Self {
        LockOptions {
            ttl,
            wait_timeout: Self::DEFAULT_WAIT,
            auto_renew: true,
            max_renewals: None,
        }
    }

    /// Sets the wait bound (`Duration::MAX`: wait without limit).
    #[must_use]
    pub fn wait(mut self, wait_timeout: Duration) -> Self {
        self.wait_timeout = wait_timeout;
        self
    }

    /// Disables background renewal.
    #[must_use]
    pub fn no_renewal(mut self) -> Self {
        self.auto_renew = false;
        self
    }

    /// Bounds the number of background renewals.
    #[must_use]
    pub fn max_renewals(mut self, n: u64) -> Self {
        self.max_renewals = Some(n);
        self
    }

    /// Checks the TTL (positive, ≥ 1 ms, at most ten years).
    pub fn validate(&self) -> Result<()> {
        crate::validate::ttl(self.ttl)?;
        if self.ttl < Duration::from_millis(1) {
            return Err(Error::invalid_argument("lock ttl must be at least 1 ms"));
        }
        Ok(())
    }

    /// When a wait that starts at `start` gives up; `None` when the wait is
    /// too long to be represented (it then waits without limit).
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// use im_infra::lock::LockOptions;
    ///
    /// let now = Instant::now();
    /// let opts = LockOptions::new(Duration::from_secs(5));
    /// assert_eq!(opts.wait_deadline(now), Some(now + LockOptions::DEFAULT_WAIT));
    /// assert_eq!(opts.wait(Duration::MAX).wait_deadline(now), None);
    /// ```
    pub fn wait_deadline(&self, start: Instant) -> Option<Instant> {
        start.checked_add(self.wait_timeout)
    }

    /// The lease options of a lock acquired with these options on `backend`,
    /// whose server granted `ttl` (at least [`LockOptions::ttl`]).
    pub fn lease_options(&self, backend: &'static str, ttl: Duration) -> LeaseOptions {
        let mut opts = LeaseOptions::new(ttl)
            .auto_renew(self.auto_renew)
            .labels(backend, "lock");
        opts.max_extensions = self.max_renewals;
        opts
    }
}

/// What a lock backend offers beyond the required operations.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockCapabilities {
    /// Waiters acquire in the order they started waiting.
    pub fair: bool,
    /// [`DistributedLock::info`] is supported.
    pub info: bool,
    /// Fencing tokens strictly increase per key across acquisitions (and
    /// across processes).
    pub fencing: bool,
    /// The shortest TTL the backend honours; shorter TTLs are rounded up
    /// (etcd leases, for one, are granted in whole seconds, at least 2 s).
    pub min_ttl: Duration,
}

/// Nothing beyond the required operations; TTLs honoured to the
/// millisecond.
impl Default for LockCapabilities {
    fn default() -> Self {
        LockCapabilities {
            fair: false,
            info: false,
            fencing: false,
            min_ttl: Duration::from_millis(1),
        }
    }
}

impl LockCapabilities {
    /// Waiters acquire in the order they started waiting.
    ///
    /// ```
    /// use im_infra::lock::LockCapabilities;
    /// let caps = LockCapabilities::default().with_fair().with_info().with_fencing();
    /// assert!(caps.fair && caps.info && caps.fencing);
    /// ```
    #[must_use]
    pub fn with_fair(mut self) -> Self {
        self.fair = true;
        self
    }

    /// [`DistributedLock::info`] is supported.
    #[must_use]
    pub fn with_info(mut self) -> Self {
        self.info = true;
        self
    }

    /// Fencing tokens strictly increase per key.
    #[must_use]
    pub fn with_fencing(mut self) -> Self {
        self.fencing = true;
        self
    }

    /// Sets the shortest TTL honoured.
    #[must_use]
    pub fn with_min_ttl(mut self, min_ttl: Duration) -> Self {
        self.min_ttl = min_ttl;
        self
    }
}

/// Who holds a lock, as reported by [`DistributedLock::info`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    /// The lock key.
    pub key: String,
    /// An opaque identifier of the holder.
    pub owner: String,
    /// The holder's fencing token.
    pub fencing_token: u64,
    /// Remaining lifetime, when the backend knows it.
    pub ttl: Option<Duration>,
    /// When the holder acquired the lock, when the backend knows it.
    pub acquired_at: Option<SystemTime>,
}

/// A held lock. Dropping it without [`release`](LockGuard::release) stops
/// renewal and releases in the background (best effort).
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait LockGuard: Send + Sync {
    /// The lock key.
    fn key(&self) -> &str;
    /// Strictly larger than the token of every earlier holder of this key.
    fn fencing_token(&self) -> u64;
    /// The TTL the lock was acquired (or last refreshed) with.
    fn ttl(&self) -> Duration;
    /// Whether the lock is still held: before its local deadline (the send
    /// time of the last successful renewal + TTL − a safety margin, on this
    /// host's monotonic clock), not found gone by the server, not released.
    fn is_held(&self) -> bool;
    /// Time left before the local deadline; `None` once not held (the
    /// seed's `TTL`).
    fn remaining(&self) -> Option<Duration>;
    /// Cancelled as soon as the lock is no longer held: the deadline passed
    /// without a successful renewal (even while a renewal is still
    /// outstanding), the server found it gone, or it was released.
    fn lost(&self) -> CancellationToken;
    /// Extends the lock to `ttl` from now. `LockNotHeld` if it was lost.
    async fn refresh(&self, ttl: Duration) -> Result<()>;
    /// Releases the lock. `LockNotHeld` if it had expired, was taken over,
    /// or was already released. The lock stops being held here at once;
    /// when the server could not be asked (an error such as a timeout, or
    /// this call dropped midway), calling `release` again asks it again,
    /// and so does dropping the guard. A retry after a first attempt the
    /// server applied but whose answer was lost answers `LockNotHeld`.
    async fn release(&self) -> Result<()>;
}

/// A distributed lock service.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait DistributedLock: Send + Sync + 'static {
    /// What this backend offers.
    fn capabilities(&self) -> LockCapabilities;

    /// Waits until `key` is acquired, or fails with `LockNotAcquired`
    /// (code 4001, see [`not_acquired`]) after `opts.wait_timeout`.
    async fn acquire(&self, key: &str, opts: LockOptions) -> Result<Box<dyn LockGuard>>;

    /// Acquires `key` if free; `Ok(None)` when another holder has it.
    async fn try_acquire(&self, key: &str, opts: LockOptions)
        -> Result<Option<Box<dyn LockGuard>>>;

    /// Whether anyone holds `key`.
    async fn is_locked(&self, key: &str) -> Result<bool>;

    /// The current holder of `key` (`Unsupported` unless
    /// [`LockCapabilities::info`]).
    async fn info(&self, key: &str) -> Result<Option<LockInfo>>;
}

/// Conveniences for every [`DistributedLock`].
#[async_trait]
pub trait LockExt: DistributedLock {
    /// Acquires `key`, runs `f`, releases. If the lock was lost before the
    /// release, returns `LockNotHeld` (the work may have overlapped another
    /// holder), otherwise `f`'s output.
    async fn with_lock<F, Fut, T>(&self, key: &str, opts: LockOptions, f: F) -> Result<T>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = T> + Send,
        T: Send,
    {
        let guard = self.acquire(key, opts).await?;
        let out = f().await;
        match guard.release().await {
            Ok(()) => Ok(out),
            Err(e) if e.kind() == ErrorKind::LockNotHeld => Err(Error::new(
                ErrorKind::LockNotHeld,
                format!("lock {key:?} was lost before release; the work may have overlapped another holder"),
            )
            .with_operation("lock.with_lock")),
            Err(e) => Err(e),
        }
    }

    /// [`acquire`](DistributedLock::acquire) with default options and `ttl`.
    async fn lock(&self, key: &str, ttl: Duration) -> Result<Box<dyn LockGuard>> {
        self.acquire(key, LockOptions::new(ttl)).await
    }

    /// [`try_acquire`](DistributedLock::try_acquire) with default options
    /// and `ttl`, for callers that treat a held lock as an error:
    /// `LockAlreadyHeld` (code 4003, retryable) when another holder has it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use im_infra::lock::{DistributedLock, LockExt};
    /// use im_infra::ErrorKind;
    ///
    /// async fn once_per_cluster(locks: &dyn DistributedLock) -> im_infra::Result<()> {
    ///     match locks.try_lock("nightly-report", Duration::from_secs(60)).await {
    ///         Ok(guard) => guard.release().await,
    ///         Err(e) if e.kind() == ErrorKind::LockAlreadyHeld => Ok(()), // another node runs it
    ///         Err(e) => Err(e),
    ///     }
    /// }
    /// ```
    async fn try_lock(&self, key: &str, ttl: Duration) -> Result<Box<dyn LockGuard>> {
        self.try_acquire(key, LockOptions::new(ttl))
            .await?
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::LockAlreadyHeld,
                    format!("lock {key:?} is held by another holder"),
                )
                .with_operation("lock.try_lock")
            })
    }
}

/// The error of an acquisition that waited its whole bound:
/// `LockNotAcquired` (code 4001, retryable), naming the key and the bound.
/// Every backend's `acquire` gives up with it.
///
/// ```
/// use std::time::Duration;
/// use im_infra::{lock::not_acquired, ErrorKind};
/// let e = not_acquired("ledger:7", Duration::from_millis(300));
/// assert_eq!(e.kind(), ErrorKind::LockNotAcquired);
/// assert_eq!(e.code(), 4001);
/// assert!(e.is_retryable());
/// ```
pub fn not_acquired(key: &str, wait: Duration) -> Error {
    Error::new(
        ErrorKind::LockNotAcquired,
        format!("lock {key:?} not acquired within {wait:?}"),
    )
}

impl<L: DistributedLock + ?Sized> LockExt for L {}
