//! One backend, every capability it offers: the composition root's view.
//!
//! A service's `main` picks a backend from configuration and hands each part
//! of the business code the trait object it needs. What the backend does
//! not offer answers `Unsupported`, so a misconfiguration fails at start-up
//! with a clear error rather than later.
//!
//! ```
//! use std::sync::Arc;
//! use im_infra::backend::{Backend, Capability};
//!
//! async fn wire(backend: Arc<dyn Backend>) -> im_infra::Result<()> {
//!     println!("{} offers {:?}", backend.name(), backend.capabilities());
//!     let cache = backend.cache().await?;
//!     if backend.supports(Capability::Lock) {
//!         let _locks = backend.lock().await?;
//!     }
//!     drop(cache);
//!     backend.close().await
//! }
//! ```

mod handed_out;
mod maintenance;
mod shutdown;

use std::sync::Arc;

use async_trait::async_trait;

use crate::cache::Cache;
use crate::config::ConfigCenter;
use crate::error::{Error, Result};
use crate::lock::DistributedLock;
use crate::mq::{Consumer, ConsumerSettings, Producer};
use crate::once::Once;
use crate::ratelimit::{Limiter, Rules};
use crate::registry::{ServiceDiscovery, ServiceRegistry};
use crate::uid::WorkerIdAllocator;

/// A capability a backend may offer.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    /// [`Cache`].
    Cache,
    /// [`Limiter`].
    Limiter,
    /// [`DistributedLock`].
    Lock,
    /// [`ConfigCenter`].
    Config,
    /// [`ServiceRegistry`] and [`ServiceDiscovery`].
    Registry,
    /// [`Once`].
    Once,
    /// [`Producer`] and [`Consumer`].
    Messaging,
    /// [`WorkerIdAllocator`].
    WorkerIds,
}

impl Capability {
    /// Every capability.
    pub const ALL: [Capability; 8] = [
        Capability::Cache,
        Capability::Limiter,
        Capability::Lock,
        Capability::Config,
        Capability::Registry,
        Capability::Once,
        Capability::Messaging,
        Capability::WorkerIds,
    ];

    /// The module name of the capability (`"cache"`, `"lock"`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            Capability::Cache => "cache",
            Capability::Limiter => "ratelimit",
            Capability::Lock => "lock",
            Capability::Config => "config",
            Capability::Registry => "registry",
            Capability::Once => "once",
            Capability::Messaging => "mq",
            Capability::WorkerIds => "uid",
        }
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub use handed_out::{Closable, HandedOut};
pub use shutdown::Shutdown;

/// `Closed`: the backend `backend` was closed — what every operation on it,
/// or on anything it handed out, answers afterwards.
///
/// ```
/// let e = im_infra::backend::closed("redis");
/// assert_eq!(e.kind(), im_infra::ErrorKind::Closed);
/// assert_eq!(e.backend(), Some("redis"));
/// ```
pub fn closed(backend: &'static str) -> Error {
    Error::new(
        crate::ErrorKind::Closed,
        format!("the {backend} backend was closed"),
    )
    .with_backend(backend)
}

/// The state of a backend behind `weak`, held by background work (a watch)
/// that must not keep the backend alive; `Closed` once the backend was
/// dropped.
///
/// ```
/// use std::sync::Arc;
///
/// let shared = Arc::new(7);
/// let weak = Arc::downgrade(&shared);
/// assert_eq!(*im_infra::backend::upgrade(&weak, "memory").unwrap(), 7);
/// drop(shared);
/// let e = im_infra::backend::upgrade(&weak, "memory").unwrap_err();
/// assert_eq!(e.kind(), im_infra::ErrorKind::Closed);
/// assert_eq!(e.backend(), Some("memory"));
/// ```
pub fn upgrade<T>(weak: &std::sync::Weak<T>, backend: &'static str) -> Result<Arc<T>> {
    weak.upgrade().ok_or_else(|| {
        Error::new(
            crate::ErrorKind::Closed,
            format!("the {backend} backend was dropped"),
        )
        .with_backend(backend)
    })
}

pub use maintenance::{Maintenance, RawMaintenance};

/// A backend (memory, etcd, Redis, MySQL, Kafka, noop) seen as a whole.
///
/// Every accessor of a capability the backend does not claim in
/// [`capabilities`](Self::capabilities) returns `Unsupported`; the
/// conformance suite checks both directions.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The backend's name (`"redis"`).
    fn name(&self) -> &'static str;

    /// The capabilities this backend offers.
    fn capabilities(&self) -> &'static [Capability];

    /// Whether `capability` is offered.
    fn supports(&self, capability: Capability) -> bool {
        self.capabilities().contains(&capability)
    }

    /// The cache.
    async fn cache(&self) -> Result<Arc<dyn Cache>> {
        Err(Error::unsupported("backend.cache").with_backend(self.name()))
    }

    /// A limiter deciding under `rules`.
    async fn limiter(&self, rules: Rules) -> Result<Arc<dyn Limiter>> {
        let _ = rules;
        Err(Error::unsupported("backend.limiter").with_backend(self.name()))
    }

    /// The lock service.
    async fn lock(&self) -> Result<Arc<dyn DistributedLock>> {
        Err(Error::unsupported("backend.lock").with_backend(self.name()))
    }

    /// The config center.
    async fn config(&self) -> Result<Arc<dyn ConfigCenter>> {
        Err(Error::unsupported("backend.config").with_backend(self.name()))
    }

    /// The service registry.
    async fn registry(&self) -> Result<Arc<dyn ServiceRegistry>> {
        Err(Error::unsupported("backend.registry").with_backend(self.name()))
    }

    /// Service discovery.
    async fn discovery(&self) -> Result<Arc<dyn ServiceDiscovery>> {
        Err(Error::unsupported("backend.discovery").with_backend(self.name()))
    }

    /// Idempotency.
    async fn once(&self) -> Result<Arc<dyn Once>> {
        Err(Error::unsupported("backend.once").with_backend(self.name()))
    }

    /// A producer.
    async fn producer(&self) -> Result<Arc<dyn Producer>> {
        Err(Error::unsupported("backend.producer").with_backend(self.name()))
    }

    /// A consumer-group member.
    async fn consumer(&self, settings: ConsumerSettings) -> Result<Arc<dyn Consumer>> {
        let _ = settings;
        Err(Error::unsupported("backend.consumer").with_backend(self.name()))
    }

    /// The worker-id allocator.
    async fn worker_ids(&self) -> Result<Arc<dyn WorkerIdAllocator>> {
        Err(Error::unsupported("backend.worker_ids").with_backend(self.name()))
    }

    /// Checks that the backend answers.
    async fn health_check(&self) -> Result<()>;

    /// Closes everything the backend handed out (registered instances are
    /// deregistered, consumers shut down, producers flushed: see
    /// [`HandedOut`]), stops background work and disconnects. Idempotent.
    async fn close(&self) -> Result<()>;
}
