//! The layer of [`DistributedLock`].

use async_trait::async_trait;

use crate::error::Result;
use crate::lock::{DistributedLock, LockCapabilities, LockGuard, LockInfo, LockOptions};
use crate::validate;

ops!(LockOps, "lock" {
    acquire => "lock.acquire",
    try_acquire => "lock.try_acquire",
    is_locked => "lock.is_locked",
    info => "lock.info",
});

/// Argument checks (key, [`LockOptions::validate`]) and telemetry
/// (`lock.*`) around a lock service. The guards it hands out are the
/// inner service's; their renewals and releases are the lease core's
/// `lease.*` operations.
///
/// ```
/// use std::sync::Arc;
/// use im_infra::layer::ObservedLock;
/// use im_infra::lock::DistributedLock;
///
/// fn hand_out<L: DistributedLock>(raw: L) -> Arc<dyn DistributedLock> {
///     Arc::new(ObservedLock::new("etcd", raw))
/// }
/// ```
pub struct ObservedLock<L> {
    inner: L,
    ops: LockOps,
}

impl<L: DistributedLock> ObservedLock<L> {
    /// `inner`, observed as the lock service of `backend`.
    pub fn new(backend: &'static str, inner: L) -> Self {
        ObservedLock {
            inner,
            ops: LockOps::new(backend),
        }
    }

    /// The inner lock service.
    pub fn inner(&self) -> &L {
        &self.inner
    }
}

impl<L> std::fmt::Debug for ObservedLock<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedLock").finish_non_exhaustive()
    }
}

#[async_trait]
impl<L: DistributedLock> DistributedLock for ObservedLock<L> {
    fn capabilities(&self) -> LockCapabilities {
        self.inner.capabilities()
    }

    async fn acquire(&self, key: &str, opts: LockOptions) -> Result<Box<dyn LockGuard>> {
        self.ops
            .acquire
            .run(async {
                validate::key(key)?;
                opts.validate()?;
                self.inner.acquire(key, opts).await
            })
            .await
    }

    async fn try_acquire(
        &self,
        key: &str,
        opts: LockOptions,
    ) -> Result<Option<Box<dyn LockGuard>>> {
        self.ops
            .try_acquire
            .run(async {
                validate::key(key)?;
                opts.validate()?;
                self.inner.try_acquire(key, opts).await
            })
            .await
    }

    async fn is_locked(&self, key: &str) -> Result<bool> {
        self.ops
            .is_locked
            .run(async {
                validate::key(key)?;
                self.inner.is_locked(key).await
            })
            .await
    }

    async fn info(&self, key: &str) -> Result<Option<LockInfo>> {
        self.ops
            .info
            .run(async {
                validate::key(key)?;
                self.inner.info(key).await
            })
            .await
    }
}
