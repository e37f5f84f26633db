//! # A backend of one's own
//!
//! [`CountingBackend`] wraps any [`Backend`] and counts the handles it hands
//! out per capability: a small backend written against the `im-infra` trait
//! crate alone, the way a team would add one outside this workspace. Its
//! `tests/conformance.rs` proves it interchangeable with every other backend
//! by depending on the contract crate (`im-infra-conformance`) and nothing
//! else of the project:
//!
//! ```text
//! cargo test -p im-infra-example-wrapped-backend --test conformance
//! ```
//!
//! ```
//! use std::sync::Arc;
//! use im_infra::backend::{Backend, Capability};
//! use im_infra_example_wrapped_backend::CountingBackend;
//!
//! # async fn demo(inner: Arc<dyn Backend>) -> im_infra::Result<()> {
//! let backend = CountingBackend::new(inner);
//! let _cache = backend.cache().await?;
//! assert_eq!(backend.handed_out(Capability::Cache), 1);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use im_infra::backend::{Backend, Capability};
use im_infra::cache::Cache;
use im_infra::config::ConfigCenter;
use im_infra::lock::DistributedLock;
use im_infra::mq::{Consumer, ConsumerSettings, Producer};
use im_infra::once::Once;
use im_infra::ratelimit::{Limiter, Rules};
use im_infra::registry::{ServiceDiscovery, ServiceRegistry};
use im_infra::uid::WorkerIdAllocator;
use im_infra::Result;

/// Every capability, in the order of [`CountingBackend::handed_out`]'s
/// counters.
const COUNTED: [Capability; 8] = [
    Capability::Cache,
    Capability::Limiter,
    Capability::Lock,
    Capability::Config,
    Capability::Registry,
    Capability::Once,
    Capability::Messaging,
    Capability::WorkerIds,
];

/// A backend that hands out its inner backend's handles and counts them.
#[derive(Clone)]
pub struct CountingBackend {
    inner: Arc<dyn Backend>,
    counts: Arc<[AtomicU64; COUNTED.len()]>,
}

impl CountingBackend {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Backend>) -> Self {
        CountingBackend {
            inner,
            counts: Arc::new(Default::default()),
        }
    }

    /// How many handles of `capability` were handed out successfully.
    pub fn handed_out(&self, capability: Capability) -> u64 {
        COUNTED
            .iter()
            .position(|c| *c == capability)
            .map_or(0, |i| self.counts[i].load(Ordering::Relaxed))
    }

    fn count<T>(&self, capability: Capability, handle: Result<T>) -> Result<T> {
        if handle.is_ok() {
            if let Some(i) = COUNTED.iter().position(|c| *c == capability) {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        handle
    }
}

#[async_trait]
impl Backend for CountingBackend {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> &'static [Capability] {
        self.inner.capabilities()
    }

    async fn cache(&self) -> Result<Arc<dyn Cache>> {
        self.count(Capability::Cache, self.inner.cache().await)
    }

    async fn limiter(&self, rules: Rules) -> Result<Arc<dyn Limiter>> {
        self.count(Capability::Limiter, self.inner.limiter(rules).await)
    }

    async fn lock(&self) -> Result<Arc<dyn DistributedLock>> {
        self.count(Capability::Lock, self.inner.lock().await)
    }

    async fn config(&self) -> Result<Arc<dyn ConfigCenter>> {
        self.count(Capability::Config, self.inner.config().await)
    }

    async fn registry(&self) -> Result<Arc<dyn ServiceRegistry>> {
        self.count(Capability::Registry, self.inner.registry().await)
    }

    async fn discovery(&self) -> Result<Arc<dyn ServiceDiscovery>> {
        self.count(Capability::Registry, self.inner.discovery().await)
    }

    async fn once(&self) -> Result<Arc<dyn Once>> {
        self.count(Capability::Once, self.inner.once().await)
    }

    async fn producer(&self) -> Result<Arc<dyn Producer>> {
        self.count(Capability::Messaging, self.inner.producer().await)
    }

    async fn consumer(&self, settings: ConsumerSettings) -> Result<Arc<dyn Consumer>> {
        self.count(Capability::Messaging, self.inner.consumer(settings).await)
    }

    async fn worker_ids(&self) -> Result<Arc<dyn WorkerIdAllocator>> {
        self.count(Capability::WorkerIds, self.inner.worker_ids().await)
    }

    async fn health_check(&self) -> Result<()> {
        self.inner.health_check().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_the_handles_handed_out_and_not_the_refusals() {
        let inner = im_infra_memory::MemoryBackend::new();
        let backend = CountingBackend::new(Arc::new(inner));
        backend.cache().await.unwrap();
        backend.cache().await.unwrap();
        backend.lock().await.unwrap();
        backend.close().await.unwrap();
        assert!(backend.cache().await.is_err(), "a closed backend refuses");
        assert_eq!(backend.handed_out(Capability::Cache), 2);
        assert_eq!(backend.handed_out(Capability::Lock), 1);
        assert_eq!(backend.handed_out(Capability::Once), 0);
    }
}
