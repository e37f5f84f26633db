//! Service registration and discovery.
//!
//! A service registers its instances with a TTL; the registry keeps each one
//! alive (a lease, a heartbeat) and, if the lease is lost anyway, registers
//! it again, forever, with backoff, until it is deregistered. Discovery lists
//! the live instances of a service, filters them by metadata and watches
//! them change.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use futures::StreamExt;
//! use im_infra::registry::{ServiceDiscovery, ServiceInstance, ServiceRegistry};
//!
//! async fn demo(reg: Arc<dyn ServiceRegistry>, disc: Arc<dyn ServiceDiscovery>) -> im_infra::Result<()> {
//!     let me = ServiceInstance::new("im-logic", "logic-1", "10.0.0.7:9000")
//!         .with_metadata("version", "1.2.0");
//!     reg.register(&me, Duration::from_secs(10)).await?;
//!     let live = disc.instances("im-logic").await?;
//!     assert!(live.iter().any(|i| i.id == "logic-1"));
//!     let mut changes = disc.watch("im-logic").await?; // starts with an Add per live instance
//!     let first = changes.next().await.unwrap()?;
//!     println!("{:?} {}", first.kind, first.instance.address);
//!     reg.deregister("im-logic", "logic-1").await
//! }
//! ```

#[cfg(feature = "grpc")]
pub mod grpc;
mod keeper;
pub mod watch;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use keeper::{RegistrationBackend, RegistrationLease, Registrations};

/// One instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInstance {
    /// The service name (`im-logic`).
    pub service: String,
    /// Unique id of the instance within the service.
    pub id: String,
    /// Where it listens: `host:port`.
    pub address: String,
    /// Free-form labels (version, region, weight, ...).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl ServiceInstance {
    /// An instance without metadata.
    pub fn new(
        service: impl Into<String>,
        id: impl Into<String>,
        address: impl Into<String>,
    ) -> Self {
        ServiceInstance {
            service: service.into(),
            id: id.into(),
            address: address.into(),
            metadata: BTreeMap::new(),
        }
    }

    /// Adds a metadata label.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Checks service name, id (names without `/` or spaces) and address
    /// (non-empty `host:port` with a numeric port).
    pub fn validate(&self) -> Result<()> {
        crate::validate::name("service name", &self.service)?;
        crate::validate::name("instance id", &self.id)?;
        let port_ok = self
            .address
            .rsplit_once(':')
            .map(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            .unwrap_or(false);
        if !port_ok {
            return Err(Error::invalid_argument(format!(
                "address {:?} is not host:port",
                self.address
            )));
        }
        Ok(())
    }

    /// Whether every label of `filter` is present with the same value.
    pub fn matches(&self, filter: &BTreeMap<String, String>) -> bool {
        filter
            .iter()
            .all(|(k, v)| self.metadata.get(k).is_some_and(|m| m == v))
    }
}

/// What happened to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ServiceEventKind {
    /// A new instance (or an existing one when a watch starts).
    Add,
    /// An instance changed its address or metadata.
    Update,
    /// An instance was deregistered or its lease expired.
    Delete,
}

/// One change of a service's instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEvent {
    /// Add, update or delete.
    pub kind: ServiceEventKind,
    /// The instance (for a delete, as last known).
    pub instance: ServiceInstance,
}

/// A stream of instance changes.
pub type ServiceEventStream = BoxStream<'static, Result<ServiceEvent>>;

/// What a registry backend offers beyond the required operations.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryCapabilities {
    /// [`ServiceDiscovery::watch`] delivers changes.
    pub watch: bool,
}

/// Nothing beyond the required operations.
impl Default for RegistryCapabilities {
    fn default() -> Self {
        RegistryCapabilities { watch: false }
    }
}

impl RegistryCapabilities {
    /// [`ServiceDiscovery::watch`] delivers changes.
    ///
    /// ```
    /// use im_infra::registry::RegistryCapabilities;
    /// assert!(RegistryCapabilities::default().with_watch().watch);
    /// ```
    #[must_use]
    pub fn with_watch(mut self) -> Self {
        self.watch = true;
        self
    }
}

/// Registers this process's instances.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait ServiceRegistry: Send + Sync + 'static {
    /// Registers `instance` with a lease of `ttl`, kept alive in the
    /// background and re-established (forever, with backoff) if lost.
    /// Registering the same service and id again replaces it.
    async fn register(&self, instance: &ServiceInstance, ttl: Duration) -> Result<()>;

    /// Removes an instance registered by this registry and stops keeping it
    /// alive. `NotRegistered` (code 2002) if it is not registered here.
    async fn deregister(&self, service: &str, id: &str) -> Result<()>;

    /// Changes the address or metadata of an instance registered here.
    /// `NotRegistered` (code 2002) if it is not registered here; `LeaseLost`
    /// if its registration was lost (it is being registered again, with the
    /// new value).
    async fn update(&self, instance: &ServiceInstance) -> Result<()>;

    /// Names of the services with at least one live instance, sorted.
    async fn list_services(&self) -> Result<Vec<String>>;
}

/// A shared registry is a registry (a backend keeps one handle to close it
/// and hands out the other).
#[async_trait]
impl<R: ServiceRegistry + ?Sized> ServiceRegistry for std::sync::Arc<R> {
    async fn register(&self, instance: &ServiceInstance, ttl: Duration) -> Result<()> {
        (**self).register(instance, ttl).await
    }
    async fn deregister(&self, service: &str, id: &str) -> Result<()> {
        (**self).deregister(service, id).await
    }
    async fn update(&self, instance: &ServiceInstance) -> Result<()> {
        (**self).update(instance).await
    }
    async fn list_services(&self) -> Result<Vec<String>> {
        (**self).list_services().await
    }
}

/// Finds live instances.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait ServiceDiscovery: Send + Sync + 'static {
    /// What this backend offers.
    fn capabilities(&self) -> RegistryCapabilities;

    /// The live instances of `service`, sorted by id (empty if none).
    async fn instances(&self, service: &str) -> Result<Vec<ServiceInstance>>;

    /// Changes of `service`: first an `Add` for every live instance, then
    /// every change as it happens.
    async fn watch(&self, service: &str) -> Result<ServiceEventStream>;
}

/// Conveniences for every [`ServiceDiscovery`].
#[async_trait]
pub trait ServiceDiscoveryExt: ServiceDiscovery {
    /// The live instances whose metadata contains every label of `filter`;
    /// `NoInstances` when none matches.
    async fn resolve(
        &self,
        service: &str,
        filter: &BTreeMap<String, String>,
    ) -> Result<Vec<ServiceInstance>> {
        let found: Vec<_> = self
            .instances(service)
            .await?
            .into_iter()
            .filter(|i| i.matches(filter))
            .collect();
        if found.is_empty() {
            return Err(Error::new(
                crate::ErrorKind::NoInstances,
                format!("no live instance of {service:?} matches {filter:?}"),
            ));
        }
        Ok(found)
    }

    /// The addresses of the live instances of `service`.
    async fn endpoints(&self, service: &str) -> Result<Vec<String>> {
        Ok(self
            .instances(service)
            .await?
            .into_iter()
            .map(|i| i.address)
            .collect())
    }
}

impl<D: ServiceDiscovery + ?Sized> ServiceDiscoveryExt for D {}

/// The default TTL of a registration when a backend config gives none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
