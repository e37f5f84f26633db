//! Null lock, config center, registry, discovery and worker ids.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, StreamExt};
use im_infra::config::{ConfigCapabilities, ConfigCenter, Versioned, WatchOptions, WatchStream};
use im_infra::lock::{DistributedLock, LockCapabilities, LockGuard, LockInfo, LockOptions};
use im_infra::registry::{
    RegisterOptions, RegistryCapabilities, ServiceDiscovery, ServiceEventStream, ServiceInfo,
    ServiceInstance, ServiceRegistry,
};
use im_infra::uid::{WorkerIdAllocator, WorkerLease};
use im_infra::{Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use crate::NAME;

/// A lock that is always granted at once. Fencing tokens increase within
/// one `NoopLock` only.
#[derive(Debug, Default)]
pub struct NoopLock {
    fencing: Arc<AtomicU64>,
}

impl NoopLock {
    fn guard(&self, key: &str, opts: LockOptions) -> Box<dyn LockGuard> {
        Box::new(NoopLockGuard {
            key: key.to_owned(),
            fencing: self.fencing.fetch_add(1, Ordering::Relaxed) + 1,
            ttl: opts.ttl,
            released: AtomicBool::new(false),
            lost: CancellationToken::new(),
        })
    }
}

#[async_trait]
impl DistributedLock for NoopLock {
    fn capabilities(&self) -> LockCapabilities {
        LockCapabilities::default()
    }

    async fn acquire(&self, key: &str, opts: LockOptions) -> Result<Box<dyn LockGuard>> {
        Ok(self.guard(key, opts))
    }

    async fn try_acquire(
        &self,
        key: &str,
        opts: LockOptions,
    ) -> Result<Option<Box<dyn LockGuard>>> {
        Ok(Some(self.guard(key, opts)))
    }

    async fn is_locked(&self, _key: &str) -> Result<bool> {
        Ok(false)
    }

    async fn info(&self, _key: &str) -> Result<Option<LockInfo>> {
        Err(Error::unsupported("lock.info").with_backend(NAME))
    }
}

/// The guard of a [`NoopLock`]: held until released.
#[derive(Debug)]
pub struct NoopLockGuard {
    key: String,
    fencing: u64,
    ttl: Duration,
    released: AtomicBool,
    lost: CancellationToken,
}

#[async_trait]
impl LockGuard for NoopLockGuard {
    fn key(&self) -> &str {
        &self.key
    }

    fn fencing_token(&self) -> u64 {
        self.fencing
    }

    fn ttl(&self) -> Duration {
        self.ttl
    }

    fn is_held(&self) -> bool {
        !self.released.load(Ordering::Acquire)
    }

    /// The TTL it was acquired with, until released (nothing expires).
    fn remaining(&self) -> Option<Duration> {
        self.is_held().then_some(self.ttl)
    }

    fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    async fn refresh(&self, _ttl: Duration) -> Result<()> {
        if self.is_held() {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::LockNotHeld, "the lock was released").with_backend(NAME))
        }
    }

    async fn release(&self) -> Result<()> {
        self.lost.cancel();
        if self.released.swap(true, Ordering::AcqRel) {
            Err(
                Error::new(ErrorKind::LockNotHeld, "the lock was already released")
                    .with_backend(NAME),
            )
        } else {
            Ok(())
        }
    }
}

/// An empty config center: stores nothing, watches never fire.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopConfigCenter;

#[async_trait]
impl ConfigCenter for NoopConfigCenter {
    fn capabilities(&self) -> ConfigCapabilities {
        let mut caps = ConfigCapabilities::full(usize::MAX);
        caps.compare_and_set = false;
        caps
    }

    async fn get_with_version(&self, _key: &str) -> Result<Option<Versioned>> {
        Ok(None)
    }

    async fn set(&self, _key: &str, _value: Bytes) -> Result<u64> {
        Ok(0)
    }

    async fn delete(&self, _key: &str) -> Result<bool> {
        Ok(false)
    }

    async fn list(&self, _prefix: &str) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    async fn compare_and_set(&self, _key: &str, _value: Bytes, _expected: u64) -> Result<u64> {
        Err(Error::unsupported("config.compare_and_set").with_backend(NAME))
    }

    async fn watch(&self, _key: &str, _opts: WatchOptions) -> Result<WatchStream> {
        Ok(stream::pending().boxed())
    }

    async fn watch_prefix(&self, _prefix: &str, _opts: WatchOptions) -> Result<WatchStream> {
        Ok(stream::pending().boxed())
    }
}

/// A registry that drops registrations.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopRegistry;

#[async_trait]
impl ServiceRegistry for NoopRegistry {
    async fn register_with(
        &self,
        _instance: &ServiceInstance,
        _opts: RegisterOptions,
    ) -> Result<()> {
        Ok(())
    }

    async fn deregister(&self, _service: &str, _id: &str) -> Result<()> {
        Ok(())
    }

    async fn update(&self, _instance: &ServiceInstance) -> Result<()> {
        Ok(())
    }

    async fn list_services(&self) -> Result<Vec<ServiceInfo>> {
        Ok(Vec::new())
    }
}

/// Discovery that finds nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopDiscovery;

#[async_trait]
impl ServiceDiscovery for NoopDiscovery {
    fn capabilities(&self) -> RegistryCapabilities {
        RegistryCapabilities::default().with_watch()
    }

    async fn instances(&self, _service: &str) -> Result<Vec<ServiceInstance>> {
        Ok(Vec::new())
    }

    async fn watch(&self, _service: &str) -> Result<ServiceEventStream> {
        Ok(stream::pending().boxed())
    }
}

/// Always hands out the same worker id.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopWorkerIds {
    id: u64,
}

impl NoopWorkerIds {
    /// An allocator that always returns `id`.
    pub fn new(id: u64) -> Self {
        NoopWorkerIds { id }
    }
}

#[async_trait]
impl WorkerIdAllocator for NoopWorkerIds {
    async fn allocate(&self, max_worker_id: u64, _ttl: Duration) -> Result<WorkerLease> {
        Ok(WorkerLease::fixed(self.id.min(max_worker_id)))
    }
}
