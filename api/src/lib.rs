//! # im-infra
//!
//! Infrastructure for microservices, as traits. Business code depends on
//! this crate only, holds `Arc<dyn Trait>` objects handed to it at start-up,
//! and unit-tests with the mocks of `im-infra-mocks`. The composition root
//! picks the implementation: the in-process default (`im-infra-memory`),
//! etcd, Redis, MySQL, Kafka, or the null implementation (`im-infra-noop`);
//! one conformance suite proves they honour the same contract.
//!
//! | module | traits | for |
//! |---|---|---|
//! | [`cache`] | [`Cache`](cache::Cache), [`CacheExt`](cache::CacheExt) | key-value caching with TTLs, read-through with single flight |
//! | [`ratelimit`] | [`Limiter`](ratelimit::Limiter) | GCRA rate limiting with per-resource rules and a failure policy |
//! | [`lock`] | [`DistributedLock`](lock::DistributedLock), [`LockGuard`](lock::LockGuard) | mutual exclusion with fencing tokens and renewal |
//! | [`config`] | [`ConfigCenter`](config::ConfigCenter), [`ConfigManager`](config::ConfigManager) | versioned configuration, CAS, watches, hot reload |
//! | [`registry`] | [`ServiceRegistry`](registry::ServiceRegistry), [`ServiceDiscovery`](registry::ServiceDiscovery) | service instances with leases, discovery, watches |
//! | [`lease`] | [`Lease`](lease::Lease), [`LeaseBackend`](lease::LeaseBackend) | the one lease keeper under locks, worker ids, registrations and once-claims |
//! | [`coord`] | [`Coordinator`](coord::Coordinator) | the coordinator facade (lock, registry, discovery, config) |
//! | [`once`] | [`Once`](once::Once), [`OnceExt`](once::OnceExt) | run work at most once per key |
//! | [`mq`] | [`Producer`](mq::Producer), [`Consumer`](mq::Consumer) | messaging with consumer groups, at-least-once |
//! | [`uid`] | [`IdGenerator`](uid::IdGenerator), [`WorkerIdAllocator`](uid::WorkerIdAllocator) | Snowflake ids on leased worker ids |
//! | [`layer`] | `Observed…` | argument checks and telemetry around a backend's raw operations, written once |
//! | [`backend`] | [`Backend`](backend::Backend) | one backend with every capability it offers |
//!
//! Every operation returns [`Result`] with one [`Error`] type whose
//! [`ErrorKind`] is part of the contract; [`RetrySettings`] retries the
//! retryable ones. Observability goes through [`tracing`] and the
//! [`metrics`] facade ([`telemetry`]): silent until the application installs
//! a subscriber or recorder.
//!
//! ## A service that depends on traits only
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use im_infra::cache::{Cache, CacheExt};
//! use im_infra::ratelimit::{Limiter, LimiterExt};
//!
//! pub struct Profiles {
//!     cache: Arc<dyn Cache>,
//!     limiter: Arc<dyn Limiter>,
//! }
//!
//! impl Profiles {
//!     pub fn new(cache: Arc<dyn Cache>, limiter: Arc<dyn Limiter>) -> Self {
//!         Profiles { cache, limiter }
//!     }
//!
//!     pub async fn name(&self, user: &str) -> im_infra::Result<Option<String>> {
//!         if !self.limiter.allow("profile.read", user).await {
//!             return Ok(None);
//!         }
//!         self.cache.get_json(&format!("profile:{user}")).await
//!     }
//!
//!     pub async fn rename(&self, user: &str, name: &str) -> im_infra::Result<()> {
//!         self.cache
//!             .set_json(&format!("profile:{user}"), &name, Some(Duration::from_secs(600)))
//!             .await
//!     }
//! }
//! ```
//!
//! Each module's documentation has an example of its capability.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod backend;
pub mod cache;
pub mod config;
pub mod coord;
mod error;
mod error_category;
pub mod layer;
pub mod lease;
pub mod lock;
pub mod mq;
pub mod once;
pub mod ratelimit;
pub mod registry;
mod retry;
pub mod secret;
pub mod settings;
mod short_bytes;
pub mod telemetry;
pub mod uid;
pub mod validate;

pub use error::{Error, ErrorKind, Result};
pub use error_category::ErrorCategory;
pub use retry::RetrySettings;

/// Re-exports for implementors and users.
pub mod prelude {
    pub use crate::backend::{Backend, Capability};
    pub use crate::cache::{Cache, CacheExt, KeyTtl};
    pub use crate::config::{ConfigCenter, ConfigCenterExt, ConfigManager, HotReloadable};
    pub use crate::lock::{DistributedLock, LockExt, LockGuard, LockOptions};
    pub use crate::mq::{Consumer, Handler, Message, Producer};
    pub use crate::once::{Once, OnceExt};
    pub use crate::ratelimit::{Limiter, LimiterExt, Rule, Rules};
    pub use crate::registry::{ServiceDiscovery, ServiceDiscoveryExt, ServiceRegistry};
    pub use crate::uid::{IdGenerator, WorkerIdAllocator};
    pub use crate::{Error, ErrorKind, Result, RetrySettings};
}

// Keep the dependency used by doc examples visible to rustdoc.
#[doc(hidden)]
pub use bytes;
