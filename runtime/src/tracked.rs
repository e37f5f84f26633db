//! The handles the runtime gives out and undoes at shutdown: the instances
//! a service registered (deregistered) and the locks it holds (released).

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use im_infra::lock::{DistributedLock, LockCapabilities, LockGuard, LockInfo, LockOptions};
use im_infra::registry::{RegisterOptions, ServiceInfo, ServiceInstance, ServiceRegistry};
use im_infra::Result;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// A registry that remembers what was registered through it.
pub(crate) struct TrackedRegistry {
    inner: Arc<dyn ServiceRegistry>,
    live: Mutex<BTreeSet<(String, String)>>,
    /// Deregistered by the runtime at shutdown: the service's own
    /// deregistration of one of them, arriving later, succeeds.
    gone: Mutex<BTreeSet<(String, String)>>,
}

impl TrackedRegistry {
    pub(crate) fn new(inner: Arc<dyn ServiceRegistry>) -> Self {
        TrackedRegistry {
            inner,
            live: Mutex::new(BTreeSet::new()),
            gone: Mutex::new(BTreeSet::new()),
        }
    }

    /// Deregisters every instance still registered through it, all at once;
    /// the first failure is returned after all were tried. One found gone
    /// already (its lease lost) counts as deregistered. One that failed, or
    /// whose deregistration was cut off (the call dropped), stays for the
    /// next call to try again.
    pub(crate) async fn deregister_all(&self) -> Result<usize> {
        let live: Vec<_> = self.live.lock().iter().cloned().collect();
        let results = futures::future::join_all(live.iter().map(|(service, id)| async move {
            let res = already_gone_is_ok(self.inner.deregister(service, id).await);
            if res.is_ok() {
                let key = (service.clone(), id.clone());
                self.live.lock().remove(&key);
                self.gone.lock().insert(key);
            }
            res
        }))
        .await;
        let n = live.len();
        results.into_iter().collect::<Result<Vec<()>>>().map(|_| n)
    }
}

#[async_trait]
impl ServiceRegistry for TrackedRegistry {
    async fn register_with(&self, instance: &ServiceInstance, opts: RegisterOptions) -> Result<()> {
        self.inner.register_with(instance, opts).await?;
        let key = (instance.service.clone(), instance.id.clone());
        self.gone.lock().remove(&key);
        self.live.lock().insert(key);
        Ok(())
    }

    async fn deregister(&self, service: &str, id: &str) -> Result<()> {
        let key = (service.to_owned(), id.to_owned());
        match self.inner.deregister(service, id).await {
            Ok(()) => {
                self.live.lock().remove(&key);
                Ok(())
            }
            // The runtime deregistered it as shutdown began.
            Err(e)
                if e.kind() == im_infra::ErrorKind::NotRegistered
                    && self.gone.lock().contains(&key) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn update(&self, instance: &ServiceInstance) -> Result<()> {
        self.inner.update(instance).await
    }

    async fn list_services(&self) -> Result<Vec<ServiceInfo>> {
        self.inner.list_services().await
    }
}

/// `NotRegistered` means there is nothing left to deregister.
fn already_gone_is_ok(res: Result<()>) -> Result<()> {
    match res {
        Err(e) if e.kind() == im_infra::ErrorKind::NotRegistered => Ok(()),
        other => other,
    }
}

/// A lock service that remembers the guards it handed out.
pub(crate) struct TrackedLocks {
    inner: Arc<dyn DistributedLock>,
    held: Mutex<Vec<Weak<dyn LockGuard>>>,
}

impl TrackedLocks {
    pub(crate) fn new(inner: Arc<dyn DistributedLock>) -> Self {
        TrackedLocks {
            inner,
            held: Mutex::new(Vec::new()),
        }
    }

    fn track(&self, guard: Box<dyn LockGuard>) -> Box<dyn LockGuard> {
        let shared: Arc<dyn LockGuard> = Arc::from(guard);
        let mut held = self.held.lock();
        held.retain(|g| g.strong_count() > 0);
        held.push(Arc::downgrade(&shared));
        Box::new(SharedGuard(shared))
    }

    /// Releases every lock still held through it, all at once; returns how
    /// many were released.
    pub(crate) async fn release_all(&self) -> usize {
        let live: Vec<Arc<dyn LockGuard>> = std::mem::take(&mut *self.held.lock())
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|g| g.is_held())
            .collect();
        let results = futures::future::join_all(live.iter().map(|g| g.release())).await;
        let mut released = 0;
        for (guard, res) in live.iter().zip(results) {
            match res {
                Ok(()) => released += 1,
                Err(e) => {
                    tracing::warn!(key = guard.key(), error = %e, "releasing a lock at shutdown failed")
                }
            }
        }
        released
    }
}

#[async_trait]
impl DistributedLock for TrackedLocks {
    fn capabilities(&self) -> LockCapabilities {
        self.inner.capabilities()
    }

    async fn acquire(&self, key: &str, opts: LockOptions) -> Result<Box<dyn LockGuard>> {
        Ok(self.track(self.inner.acquire(key, opts).await?))
    }

    async fn try_acquire(
        &self,
        key: &str,
        opts: LockOptions,
    ) -> Result<Option<Box<dyn LockGuard>>> {
        Ok(self
            .inner
            .try_acquire(key, opts)
            .await?
            .map(|g| self.track(g)))
    }

    async fn is_locked(&self, key: &str) -> Result<bool> {
        self.inner.is_locked(key).await
    }

    async fn info(&self, key: &str) -> Result<Option<LockInfo>> {
        self.inner.info(key).await
    }
}

/// A guard shared with the runtime (which may release it at shutdown).
struct SharedGuard(Arc<dyn LockGuard>);

#[async_trait]
impl LockGuard for SharedGuard {
    fn key(&self) -> &str {
        self.0.key()
    }
    fn fencing_token(&self) -> u64 {
        self.0.fencing_token()
    }
    fn ttl(&self) -> Duration {
        self.0.ttl()
    }
    fn is_held(&self) -> bool {
        self.0.is_held()
    }
    fn remaining(&self) -> Option<Duration> {
        self.0.remaining()
    }
    fn lost(&self) -> CancellationToken {
        self.0.lost()
    }
    async fn refresh(&self, ttl: Duration) -> Result<()> {
        self.0.refresh(ttl).await
    }
    async fn release(&self) -> Result<()> {
        self.0.release().await
    }
}
