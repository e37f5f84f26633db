//! # im-infra-memory
//!
//! The in-process implementation of every im-infra capability: the embedded
//! default for development, tests and single-process deployments, and the
//! reference implementation of the contract (it passes every conformance
//! case).
//!
//! All handles obtained from one [`MemoryBackend`] share its state, the way
//! processes share a Redis or etcd: two limiters share one budget, two lock
//! handles exclude each other, a watch sees every write. Clone the backend
//! to share it; build another one for an isolated world.
//!
//! ```
//! use std::time::Duration;
//! use bytes::Bytes;
//! use im_infra::prelude::*;
//! use im_infra_memory::MemoryBackend;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> im_infra::Result<()> {
//! let backend = MemoryBackend::new();
//!
//! let cache = backend.cache().await?;
//! cache.set("k", Bytes::from_static(b"v"), Some(Duration::from_secs(5))).await?;
//! assert_eq!(cache.get("k").await?.as_deref(), Some(&b"v"[..]));
//!
//! let limiter = backend.limiter(Rules::single("login", Rule::per_second(2))?).await?;
//! assert!(limiter.allow("login", "alice").await);
//!
//! let locks = backend.lock().await?;
//! let guard = locks.lock("job", Duration::from_secs(5)).await?;
//! assert!(guard.fencing_token() > 0);
//! guard.release().await?;
//!
//! backend.close().await
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod cache;
mod config_center;
mod limiter;
mod lock;
mod mq;
#[cfg(feature = "near-cache")]
mod near;
mod once;
mod registry;
mod settings;
#[cfg(feature = "testing")]
pub mod testing;
mod worker_id;

use std::sync::{Arc, OnceLock, Weak};

use async_trait::async_trait;
use im_infra::backend::{Backend, Capability, HandedOut, RawMaintenance, Shutdown};
use im_infra::cache::Cache;
use im_infra::config::ConfigCenter;
use im_infra::layer::{
    ObservedCache, ObservedConfigCenter, ObservedConsumer, ObservedDiscovery, ObservedLimiter,
    ObservedLock, ObservedOnce, ObservedProducer, ObservedRegistry, ObservedWorkerIds,
};
use im_infra::lock::DistributedLock;
use im_infra::mq::{Consumer, ConsumerSettings, Producer};
use im_infra::once::Once;
use im_infra::ratelimit::{BucketStore, Limiter, Rules};
use im_infra::registry::{ServiceDiscovery, ServiceRegistry};
use im_infra::telemetry::OpMetrics;
use im_infra::uid::WorkerIdAllocator;
use im_infra::{Error, Result};
use tokio_util::sync::CancellationToken;

use cache::MemoryCache;
use config_center::MemoryConfigCenter;
use limiter::MemoryLimiter;
use lock::MemoryLock;
use mq::{MemoryConsumer, MemoryProducer};
use once::MemoryOnce;
use registry::MemoryDiscovery;
pub use settings::MemorySettings;
use worker_id::MemoryWorkerIds;

/// The backend name used in metrics, spans and errors.
pub const NAME: &str = "memory";

/// Every capability: the memory backend offers them all.
pub const CAPABILITIES: &[Capability] = &[
    Capability::Cache,
    Capability::Limiter,
    Capability::Lock,
    Capability::Config,
    Capability::Registry,
    Capability::Once,
    Capability::Messaging,
    Capability::WorkerIds,
];

/// State shared by every handle of one backend.
#[derive(Debug)]
pub(crate) struct Shared {
    settings: MemorySettings,
    shutdown: Shutdown,
    /// Registries and consumers handed out, closed with the backend.
    handed_out: HandedOut,
    health_check: OpMetrics,
    tasks_started: OnceLock<()>,
    cache: cache::CacheStore,
    limiter: Arc<BucketStore>,
    locks: lock::LockStore,
    configs: config_center::ConfigStore,
    registry: registry::RegistryStore,
    once: once::OnceStore,
    mq: mq::MqStore,
    workers: worker_id::WorkerStore,
}

impl Shared {
    #[inline]
    pub(crate) fn check_open(&self) -> Result<()> {
        self.shutdown.check_open()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.shutdown.is_closed()
    }

    /// Cancelled on close: the background tasks and watches stop.
    pub(crate) fn stop(&self) -> &CancellationToken {
        self.shutdown.token()
    }
}

/// The last handle gone: the background tasks and watches stop.
impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown.close();
    }
}

/// Builds a [`MemoryBackend`].
#[derive(Debug, Clone, Default)]
pub struct MemoryBackendBuilder {
    settings: MemorySettings,
}

impl MemoryBackendBuilder {
    /// Uses `settings`.
    #[must_use]
    pub fn settings(mut self, settings: MemorySettings) -> Self {
        self.settings = settings;
        self
    }

    /// Largest cache or config value, in bytes.
    #[must_use]
    pub fn max_value_bytes(mut self, n: usize) -> Self {
        self.settings.max_value_bytes = n;
        self
    }

    /// How many config changes are kept for resuming watches.
    #[must_use]
    pub fn config_history(mut self, n: usize) -> Self {
        self.settings.config_history = n;
        self
    }

    /// Partitions of a topic created on first use.
    #[must_use]
    pub fn default_partitions(mut self, n: u32) -> Self {
        self.settings.default_partitions = n;
        self
    }

    /// Builds the backend; `InvalidConfig` for bad settings.
    pub fn build(self) -> Result<MemoryBackend> {
        self.settings.validate()?;
        Ok(MemoryBackend {
            shared: Arc::new(Shared {
                settings: self.settings,
                shutdown: Shutdown::new(NAME),
                handed_out: HandedOut::new(NAME),
                health_check: OpMetrics::new(NAME, "backend", "backend.health_check"),
                tasks_started: OnceLock::new(),
                cache: Default::default(),
                limiter: Default::default(),
                locks: Default::default(),
                configs: Default::default(),
                registry: Default::default(),
                once: Default::default(),
                mq: Default::default(),
                workers: Default::default(),
            }),
        })
    }
}

/// The in-process backend. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("settings", &self.shared.settings)
            .field("closed", &self.shared.is_closed())
            .finish()
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        MemoryBackend::new()
    }
}

impl MemoryBackend {
    /// The invalidations of this backend's cache for a
    /// [`NearCache`](im_infra::cache::near::NearCache): every write is
    /// reported before it returns (feature `near-cache`).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> im_infra::Result<()> {
    /// use im_infra::backend::Backend;
    /// use im_infra::cache::near::NearCache;
    /// use im_infra::cache::Cache;
    /// let memory = im_infra_memory::MemoryBackend::new();
    /// let cache = memory.cache().await?;
    /// let near = NearCache::builder(cache.clone())
    ///     .invalidation(memory.invalidations())
    ///     .build()
    ///     .await?;
    /// cache.set("k", "v1".into(), None).await?;
    /// assert_eq!(near.get("k").await?.as_deref(), Some(&b"v1"[..]));
    /// cache.set("k", "v2".into(), None).await?; // another handle's write
    /// assert_eq!(near.get("k").await?.as_deref(), Some(&b"v2"[..]));
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "near-cache")]
    pub fn invalidations(&self) -> Arc<dyn im_infra::cache::near::InvalidationSource> {
        Arc::new(near::MemoryInvalidations {
            shared: self.shared.clone(),
        })
    }

    /// A backend with default settings.
    pub fn new() -> Self {
        MemoryBackendBuilder::default()
            .build()
            .unwrap_or_else(|_| unreachable!("the default configuration is valid"))
    }

    /// A builder.
    pub fn builder() -> MemoryBackendBuilder {
        MemoryBackendBuilder::default()
    }

    /// The settings in force.
    pub fn settings(&self) -> &MemorySettings {
        &self.shared.settings
    }

    /// Starts the purge and expiry tasks once, on the current Tokio runtime.
    fn start_tasks(&self) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        self.shared.tasks_started.get_or_init(|| {
            let weak: Weak<Shared> = Arc::downgrade(&self.shared);
            tokio::spawn(registry::RegistryStore::reaper(weak.clone()));
            tokio::spawn(purge_loop(weak));
        });
    }

    /// The cache, as [`Backend::cache`] hands it out (arguments checked,
    /// observed), without the `Arc<dyn Cache>`.
    fn observed_cache(&self) -> ObservedCache<MemoryCache> {
        self.start_tasks();
        ObservedCache::new(NAME, MemoryCache::new(self.shared.clone()))
    }

    /// A limiter under `rules`, as [`Backend::limiter`] hands it out
    /// (arguments checked, observed), without the `Arc<dyn Limiter>`.
    fn observed_limiter(&self, rules: Rules) -> ObservedLimiter<MemoryLimiter> {
        self.start_tasks();
        ObservedLimiter::new(NAME, MemoryLimiter::new(self.shared.clone(), rules))
    }

    /// The config center, as [`Backend::config`] hands it out (arguments
    /// checked, observed), without the `Arc<dyn ConfigCenter>`.
    fn observed_config_center(&self) -> ObservedConfigCenter<MemoryConfigCenter> {
        ObservedConfigCenter::new(NAME, MemoryConfigCenter::new(self.shared.clone()))
    }

    /// Creates a topic with an explicit partition count (topics are
    /// otherwise created on first use), as Kafka's `create_topic` does (see
    /// [`TopicSpec`](im_infra::mq::TopicSpec)): `Ok(true)` if created,
    /// `Ok(false)` if it already existed with that count, `AlreadyExists`
    /// if it exists with another; `Closed` once the backend is closed. The
    /// replication factor is not used: the backend keeps one copy.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> im_infra::Result<()> {
    /// use im_infra::mq::TopicSpec;
    /// let backend = im_infra_memory::MemoryBackend::new();
    /// assert!(backend.create_topic(&TopicSpec::new("orders", 12)).await?);
    /// assert!(!backend.create_topic(&TopicSpec::new("orders", 12)).await?);
    /// # Ok(()) }
    /// ```
    pub async fn create_topic(&self, spec: &im_infra::mq::TopicSpec) -> Result<bool> {
        self.shared.check_open()?;
        spec.validate()?;
        self.shared.mq.create_topic(spec)
    }

    /// The committed offset (next offset to read) of a group on a partition.
    pub fn committed_offset(&self, group: &str, topic: &str, partition: i32) -> Option<i64> {
        self.shared.mq.committed(group, topic, partition)
    }
}

/// Fault injection (see [`Maintenance`](im_infra::backend::Maintenance)).
#[async_trait]
impl RawMaintenance for MemoryBackend {
    /// None: the backend's state is its own, in this process.
    fn namespace(&self) -> Option<&str> {
        None
    }

    /// `Unsupported`: the state lives and dies with the backend; build a
    /// new one instead.
    async fn purge_namespace(&self) -> Result<u64> {
        Err(Error::unsupported("maintenance.purge_namespace"))
    }

    /// Removes a registered instance as if its lease had expired. Its
    /// registry notices and registers it again.
    async fn revoke_registration(&self, service: &str, id: &str) -> Result<bool> {
        Ok(self.shared.registry.remove(service, id, None))
    }

    /// Revokes a worker-id lease as if it had expired.
    async fn revoke_worker_id(&self, id: u64) -> Result<bool> {
        Ok(self.shared.workers.revoke(id))
    }

    /// Forgets the config change history: watches resuming from an older
    /// version resynchronise from the current entries.
    async fn compact_config_history(&self) -> Result<()> {
        self.shared.configs.compact();
        Ok(())
    }
}

async fn purge_loop(shared: Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let interval = s.settings.purge_interval;
        let stop = s.stop().clone();
        s.cache.purge();
        s.limiter.purge();
        s.once.purge();
        drop(s);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> &'static [Capability] {
        CAPABILITIES
    }

    async fn cache(&self) -> Result<Arc<dyn Cache>> {
        self.shared.check_open()?;
        Ok(Arc::new(self.observed_cache()))
    }

    async fn limiter(&self, rules: Rules) -> Result<Arc<dyn Limiter>> {
        self.shared.check_open()?;
        Ok(Arc::new(self.observed_limiter(rules)))
    }

    async fn lock(&self) -> Result<Arc<dyn DistributedLock>> {
        self.shared.check_open()?;
        self.start_tasks();
        Ok(Arc::new(ObservedLock::new(
            NAME,
            MemoryLock::new(self.shared.clone()),
        )))
    }

    async fn config(&self) -> Result<Arc<dyn ConfigCenter>> {
        self.shared.check_open()?;
        Ok(Arc::new(self.observed_config_center()))
    }

    async fn registry(&self) -> Result<Arc<dyn ServiceRegistry>> {
        self.shared.check_open()?;
        self.start_tasks();
        let registry = Arc::new(registry::registry(self.shared.clone()));
        self.shared
            .handed_out
            .track(&registry)
            .map_err(|e| e.with_backend(NAME))?;
        Ok(Arc::new(ObservedRegistry::new(NAME, registry)))
    }

    async fn discovery(&self) -> Result<Arc<dyn ServiceDiscovery>> {
        self.shared.check_open()?;
        self.start_tasks();
        Ok(Arc::new(ObservedDiscovery::new(
            NAME,
            MemoryDiscovery::new(self.shared.clone()),
        )))
    }

    async fn once(&self) -> Result<Arc<dyn Once>> {
        self.shared.check_open()?;
        self.start_tasks();
        Ok(Arc::new(ObservedOnce::new(
            NAME,
            MemoryOnce::new(self.shared.clone()),
        )))
    }

    async fn producer(&self) -> Result<Arc<dyn Producer>> {
        self.shared.check_open()?;
        // Holds nothing beyond the backend's state: not tracked.
        Ok(Arc::new(ObservedProducer::new(
            NAME,
            MemoryProducer::new(self.shared.clone()),
        )))
    }

    async fn consumer(&self, settings: ConsumerSettings) -> Result<Arc<dyn Consumer>> {
        self.shared.check_open()?;
        let consumer = Arc::new(MemoryConsumer::new(self.shared.clone(), settings)?);
        self.shared
            .handed_out
            .track(&consumer)
            .map_err(|e| e.with_backend(NAME))?;
        Ok(Arc::new(ObservedConsumer::new(NAME, consumer)))
    }

    async fn worker_ids(&self) -> Result<Arc<dyn WorkerIdAllocator>> {
        self.shared.check_open()?;
        Ok(Arc::new(ObservedWorkerIds::new(
            NAME,
            MemoryWorkerIds::new(self.shared.clone()),
        )))
    }

    async fn health_check(&self) -> Result<()> {
        self.shared
            .health_check
            .run_sync(|| self.shared.check_open())
    }

    /// Refuses new work (every handle answers `Closed` from now on), closes
    /// what the backend handed out (registries deregister their instances;
    /// consumers finish their in-flight message and leave their group, each
    /// within 10 s), then stops the background tasks and ends the watches.
    /// Concurrent and later calls wait for the first and answer what it
    /// answered.
    async fn close(&self) -> Result<()> {
        let shared = &self.shared;
        shared
            .handed_out
            .close_once(async {
                shared.shutdown.refuse();
                #[cfg(feature = "near-cache")]
                shared.cache.listeners.closed();
                let handed_out = shared.handed_out.close_all().await;
                shared.shutdown.close();
                handed_out
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use im_infra::mq::{handler_fn, ConsumerSettings, Message, TopicSpec};
    use im_infra::registry::ServiceInstance;
    use im_infra::ErrorKind;

    use super::*;

    #[tokio::test]
    async fn committed_offset_follows_what_the_group_handled() {
        let backend = MemoryBackend::new();
        backend.create_topic(&TopicSpec::new("t", 1)).await.unwrap();
        assert_eq!(backend.committed_offset("g", "t", 0), None);
        let producer = backend.producer().await.unwrap();
        for i in 0..3u8 {
            producer.produce(Message::new("t", vec![i])).await.unwrap();
        }
        let consumer = backend
            .consumer(ConsumerSettings::new("g", ["t"]))
            .await
            .unwrap();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let run = tokio::spawn({
            let consumer = consumer.clone();
            async move {
                let handler = handler_fn(move |_| {
                    let seen_tx = seen_tx.clone();
                    async move {
                        let _ = seen_tx.send(());
                        Ok(())
                    }
                });
                consumer.run(handler).await
            }
        });
        for _ in 0..3 {
            tokio::time::timeout(Duration::from_secs(5), seen.recv())
                .await
                .unwrap();
        }
        // Committed after each handler returns: poll briefly for the last.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while backend.committed_offset("g", "t", 0) != Some(3) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "offset stayed at {:?}",
                backend.committed_offset("g", "t", 0)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(backend.committed_offset("other", "t", 0), None);
        consumer.shutdown().await.unwrap();
        run.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn close_deregisters_and_shuts_consumers_down_once() {
        let backend = MemoryBackend::new();
        let registry = backend.registry().await.unwrap();
        let ttl = Duration::from_secs(60);
        for id in ["a", "b"] {
            let instance = ServiceInstance::new("svc", id, "127.0.0.1:1");
            registry.register(&instance, ttl).await.unwrap();
        }
        let consumer = backend
            .consumer(ConsumerSettings::new("g", ["t"]))
            .await
            .unwrap();
        let run = tokio::spawn({
            let consumer = consumer.clone();
            async move { consumer.run(handler_fn(|_| async { Ok(()) })).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(backend.shared.registry.live("svc").len(), 2);

        backend.close().await.unwrap();
        assert!(
            backend.shared.registry.live("svc").is_empty(),
            "deregistered, not left to expire"
        );
        assert!(
            run.is_finished(),
            "the consumer left its group before close returned"
        );
        run.await.unwrap().unwrap();
        backend.close().await.unwrap();
        let err = consumer
            .run(handler_fn(|_| async { Ok(()) }))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Closed);
        assert_eq!(err.operation(), Some("mq.run"));
        let err = backend.health_check().await.unwrap_err();
        assert_eq!(
            (err.kind(), err.operation()),
            (ErrorKind::Closed, Some("backend.health_check"))
        );
    }

    #[tokio::test]
    async fn a_lock_waiter_answers_closed_when_the_backend_closes() {
        use im_infra::lock::LockOptions;
        let backend = MemoryBackend::new();
        let locks = backend.lock().await.unwrap();
        let _held = locks
            .acquire("k", LockOptions::new(Duration::from_secs(30)))
            .await
            .unwrap();
        let waiter = tokio::spawn({
            let locks = locks.clone();
            async move {
                locks
                    .acquire("k", LockOptions::new(Duration::from_secs(30)))
                    .await
                    .map(|g| g.fencing_token())
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        backend.close().await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("the waiter is woken by the close")
            .unwrap();
        assert_eq!(answer.unwrap_err().kind(), ErrorKind::Closed);
    }

    #[tokio::test]
    async fn a_lock_that_expired_before_its_release_leaves_no_entry() {
        use im_infra::lock::LockOptions;
        let backend = MemoryBackend::new();
        let locks = backend.lock().await.unwrap();
        for i in 0..100 {
            let guard = locks
                .acquire(
                    &format!("job:{i}"),
                    LockOptions::new(Duration::from_millis(100)).no_renewal(),
                )
                .await
                .unwrap();
            drop(guard);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Released after their TTL (or dropped): nothing to keep.
        let guard = locks
            .acquire(
                "late",
                LockOptions::new(Duration::from_millis(100)).no_renewal(),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(guard.release().await.is_err(), "expired before the release");
        assert_eq!(backend.shared.locks.len(), 0, "no entry left");
    }

    #[tokio::test]
    async fn a_closed_producer_refuses_batches_and_flushes() {
        let backend = MemoryBackend::new();
        let producer = backend.producer().await.unwrap();
        producer.close().await.unwrap();
        let batch = producer.produce_batch(vec![Message::new("t", "x")]).await;
        assert_eq!(batch.unwrap_err().kind(), ErrorKind::Closed);
        let flush = producer.flush(Duration::from_secs(1)).await;
        assert_eq!(flush.unwrap_err().kind(), ErrorKind::Closed);
    }
}
