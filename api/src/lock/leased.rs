//! [`LeasedGuard`]: the lock guard of every backend, a lock key on a lease.

use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::LockGuard;
use crate::error::{Error, ErrorKind, Result};
use crate::lease::Lease;

/// A held lock: its key, its fencing token and the [`Lease`] that keeps it.
/// Backends build it when their server granted the lock; everything else —
/// renewal, the local deadline, the lost signal, refresh and release — is
/// the lease's.
///
/// ```
/// use std::time::Duration;
/// use im_infra::lease::Lease;
/// use im_infra::lock::{LeasedGuard, LockGuard};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> im_infra::Result<()> {
/// let guard = LeasedGuard::new("orders:7", 42, Lease::unbounded("lock \"orders:7\""));
/// assert_eq!(guard.fencing_token(), 42);
/// assert!(guard.is_held());
/// guard.release().await?;
/// assert!(guard.release().await.is_err(), "LockNotHeld the second time");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LeasedGuard {
    key: String,
    fencing_token: u64,
    lease: Lease,
}

impl LeasedGuard {
    /// The guard of `key`, acquired with `fencing_token`, kept by `lease`.
    pub fn new(key: impl Into<String>, fencing_token: u64, lease: Lease) -> Self {
        LeasedGuard {
            key: key.into(),
            fencing_token,
            lease,
        }
    }

    /// The lease that keeps the lock.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    fn not_held(&self) -> Error {
        Error::new(
            ErrorKind::LockNotHeld,
            format!(
                "lock {:?} is not held any more (expired, lost, taken over or released)",
                self.key
            ),
        )
    }
}

#[async_trait]
impl LockGuard for LeasedGuard {
    fn key(&self) -> &str {
        &self.key
    }

    fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    fn ttl(&self) -> Duration {
        self.lease.ttl()
    }

    fn is_held(&self) -> bool {
        self.lease.is_held()
    }

    fn remaining(&self) -> Option<Duration> {
        self.lease.remaining()
    }

    fn lost(&self) -> CancellationToken {
        self.lease.lost()
    }

    async fn refresh(&self, ttl: Duration) -> Result<()> {
        if self.lease.refresh(ttl).await? {
            Ok(())
        } else {
            Err(self.not_held())
        }
    }

    async fn release(&self) -> Result<()> {
        if self.lease.release().await? {
            Ok(())
        } else {
            Err(self.not_held())
        }
    }
}
