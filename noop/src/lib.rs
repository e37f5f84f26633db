//! # im-infra-noop
//!
//! Null implementations of every im-infra trait, for services that run
//! without a capability (a local tool, a test of something else) without
//! `Option` plumbing. They keep no state, never fail on valid or invalid
//! input (inputs are not checked), and never panic:
//!
//! | trait | behaviour |
//! |---|---|
//! | `Cache` | every read misses; writes are dropped; `incr_by` returns `delta`; `set_nx` returns `true` |
//! | `Limiter` | every request is allowed |
//! | `DistributedLock` | every acquisition succeeds at once; `is_locked` is `false`; `info` is `Unsupported` |
//! | `ConfigCenter` | empty; `set` returns version 0 and stores nothing; CAS is `Unsupported`; watches never fire |
//! | `ServiceRegistry` / `ServiceDiscovery` | registrations are dropped; no service has instances; watches never fire |
//! | `Once` | the work always runs; no outcome is stored |
//! | `Producer` / `Consumer` | messages are dropped (offset -1); the consumer never delivers and returns on shutdown |
//! | `WorkerIdAllocator` | always the same fixed id |
//!
//! Unlike every other backend, [`NoopBackend`] hands out its handles bare,
//! not inside the [`im_infra::layer`] layers: a call checks no argument,
//! opens no span, updates no metric and reads no clock, so it costs next to
//! nothing. `health_check` and `close` do nothing either (the noop handles
//! hold nothing to close).
//!
//! ```
//! use bytes::Bytes;
//! use im_infra::prelude::*;
//! use im_infra_noop::NoopBackend;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> im_infra::Result<()> {
//! let backend = NoopBackend::new();
//! let cache = backend.cache().await?;
//! cache.set("k", Bytes::from_static(b"v"), None).await?;
//! assert_eq!(cache.get("k").await?, None);
//! assert!(backend.limiter(Rules::single("r", Rule::per_second(1))?).await?.allow("r", "k").await);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod coordination;
mod data;
mod messaging;
#[cfg(feature = "testing")]
pub mod testing;

use std::sync::Arc;

use async_trait::async_trait;
use im_infra::backend::{Backend, Capability};
use im_infra::cache::Cache;
use im_infra::config::ConfigCenter;
use im_infra::layer::{
    ObservedCache, ObservedConfigCenter, ObservedConsumer, ObservedDiscovery, ObservedLimiter,
    ObservedLock, ObservedOnce, ObservedProducer, ObservedRegistry, ObservedWorkerIds,
};
use im_infra::lock::DistributedLock;
use im_infra::mq::{Consumer, ConsumerSettings, Producer};
use im_infra::once::Once;
use im_infra::ratelimit::{Limiter, Rules};
use im_infra::registry::{ServiceDiscovery, ServiceRegistry};
use im_infra::uid::WorkerIdAllocator;
use im_infra::Result;

pub use coordination::{
    NoopConfigCenter, NoopDiscovery, NoopLock, NoopLockGuard, NoopRegistry, NoopWorkerIds,
};
pub use data::{NoopCache, NoopLimiter, NoopOnce};
pub use messaging::{NoopConsumer, NoopProducer};

/// The backend name used in errors.
pub const NAME: &str = "noop";

/// The null backend: every capability, none of them doing anything. The
/// handles check their arguments and are observed like every backend's.
///
/// Constructing one logs a warning: its locks grant every caller at once and
/// its `Once` runs the work every time, so nothing that relies on mutual
/// exclusion or idempotency is safe on it.
#[derive(Debug, Clone, Copy)]
pub struct NoopBackend {
    worker_id: u64,
}

/// [`NoopBackend::new`].
impl Default for NoopBackend {
    fn default() -> Self {
        NoopBackend::with_worker_id(0)
    }
}

impl NoopBackend {
    /// A null backend whose worker-id allocator hands out id 0.
    pub fn new() -> Self {
        NoopBackend::default()
    }

    /// A null backend whose worker-id allocator hands out `worker_id`.
    pub fn with_worker_id(worker_id: u64) -> Self {
        tracing::warn!(
            backend = NAME,
            "the noop backend provides neither mutual exclusion (every lock is granted to every caller) nor idempotency (Once runs the work every time)"
        );
        NoopBackend { worker_id }
    }
}

const ALL: &[Capability] = &Capability::ALL;

#[async_trait]
impl Backend for NoopBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> &'static [Capability] {
        ALL
    }

    async fn cache(&self) -> Result<Arc<dyn Cache>> {
        Ok(Arc::new(ObservedCache::new(NAME, NoopCache)))
    }

    async fn limiter(&self, _rules: Rules) -> Result<Arc<dyn Limiter>> {
        Ok(Arc::new(ObservedLimiter::new(NAME, NoopLimiter)))
    }

    async fn lock(&self) -> Result<Arc<dyn DistributedLock>> {
        Ok(Arc::new(ObservedLock::new(NAME, NoopLock::default())))
    }

    async fn config(&self) -> Result<Arc<dyn ConfigCenter>> {
        Ok(Arc::new(ObservedConfigCenter::new(NAME, NoopConfigCenter)))
    }

    async fn registry(&self) -> Result<Arc<dyn ServiceRegistry>> {
        Ok(Arc::new(ObservedRegistry::new(NAME, NoopRegistry)))
    }

    async fn discovery(&self) -> Result<Arc<dyn ServiceDiscovery>> {
        Ok(Arc::new(ObservedDiscovery::new(NAME, NoopDiscovery)))
    }

    async fn once(&self) -> Result<Arc<dyn Once>> {
        Ok(Arc::new(ObservedOnce::new(NAME, NoopOnce)))
    }

    async fn producer(&self) -> Result<Arc<dyn Producer>> {
        Ok(Arc::new(ObservedProducer::new(NAME, NoopProducer)))
    }

    async fn consumer(&self, _settings: ConsumerSettings) -> Result<Arc<dyn Consumer>> {
        Ok(Arc::new(ObservedConsumer::new(
            NAME,
            NoopConsumer::default(),
        )))
    }

    async fn worker_ids(&self) -> Result<Arc<dyn WorkerIdAllocator>> {
        Ok(Arc::new(ObservedWorkerIds::new(
            NAME,
            NoopWorkerIds::new(self.worker_id),
        )))
    }

    async fn health_check(&self) -> Result<()> {
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn construction_warns_once_that_nothing_is_exclusive_or_idempotent() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let backend = tracing::subscriber::with_default(subscriber, NoopBackend::new);
        let _copy = backend;
        let log = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(log.matches("WARN").count(), 1, "{log}");
        assert!(log.contains("neither mutual exclusion"), "{log}");
        assert!(log.contains("nor idempotency"), "{log}");
    }

    #[tokio::test]
    async fn bad_input_is_refused_as_on_every_backend() {
        let backend = NoopBackend::new();
        let err = backend.cache().await.unwrap().get("").await.unwrap_err();
        assert_eq!(err.kind(), im_infra::ErrorKind::InvalidArgument);
        assert_eq!(
            (err.operation(), err.backend()),
            (Some("cache.get"), Some(NAME))
        );
        let locks = backend.lock().await.unwrap();
        let options = im_infra::lock::LockOptions::new(std::time::Duration::from_secs(1));
        let Err(err) = locks.try_acquire("", options).await else {
            panic!("an empty lock key was accepted");
        };
        assert_eq!(err.kind(), im_infra::ErrorKind::InvalidArgument);
    }
}
