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
    /// The lease the registration is on, where the backend has leases
    /// (etcd). Filled in by discovery; ignored when registering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<i64>,
    /// The TTL the instance was registered with. Filled in by discovery
    /// (every registry backend records it); ignored when registering.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde"
    )]
    pub ttl: Option<Duration>,
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
            lease_id: None,
            ttl: None,
        }
    }

    /// The instance without what discovery fills in (lease id and TTL): the
    /// value as it was registered, to compare with another.
    ///
    /// ```
    /// use std::time::Duration;
    /// use im_infra::registry::ServiceInstance;
    /// let registered = ServiceInstance::new("svc", "1", "10.0.0.1:80");
    /// let mut found = registered.clone();
    /// found.ttl = Some(Duration::from_secs(10));
    /// assert_eq!(found.registered(), registered);
    /// ```
    #[must_use]
    pub fn registered(&self) -> ServiceInstance {
        ServiceInstance {
            lease_id: None,
            ttl: None,
            ..self.clone()
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
    /// The registry puts an instance on a lease of the caller's
    /// ([`RegisterOptions::lease_id`]); without it such a registration is
    /// `Unsupported`.
    pub caller_leases: bool,
    /// The shortest registration TTL the backend keeps alive; a shorter one
    /// is raised to it, as lock and idempotency TTLs are, and discovery
    /// reports the raised TTL. etcd grants leases of at least 2 s (and in
    /// whole seconds, rounded up); Redis renews every third of a TTL and
    /// needs 100 ms; the in-process backend 50 ms.
    pub min_ttl: Duration,
}

/// Nothing beyond the required operations; TTLs kept down to the
/// millisecond.
impl Default for RegistryCapabilities {
    fn default() -> Self {
        RegistryCapabilities {
            watch: false,
            caller_leases: false,
            min_ttl: Duration::from_millis(1),
        }
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

    /// Instances can be put on a lease of the caller's.
    ///
    /// ```
    /// use im_infra::registry::RegistryCapabilities;
    /// assert!(RegistryCapabilities::default().with_caller_leases().caller_leases);
    /// assert!(!RegistryCapabilities::default().caller_leases);
    /// ```
    #[must_use]
    pub fn with_caller_leases(mut self) -> Self {
        self.caller_leases = true;
        self
    }

    /// Sets the shortest TTL kept alive.
    ///
    /// ```
    /// use std::time::Duration;
    /// use im_infra::registry::RegistryCapabilities;
    /// let caps = RegistryCapabilities::default().with_min_ttl(Duration::from_secs(2));
    /// assert_eq!(caps.min_ttl, Duration::from_secs(2));
    /// ```
    #[must_use]
    pub fn with_min_ttl(mut self, min_ttl: Duration) -> Self {
        self.min_ttl = min_ttl;
        self
    }
}

/// How to register an instance: its TTL (the backend's default when none
/// is given: the etcd setting `default_ttl`, [`DEFAULT_TTL`] elsewhere) and,
/// on etcd, an existing lease to put it on.
///
/// ```
/// use std::time::Duration;
/// use im_infra::registry::RegisterOptions;
///
/// let opts = RegisterOptions::default().ttl(Duration::from_secs(10));
/// assert_eq!(opts.ttl, Some(Duration::from_secs(10)));
/// assert_eq!(RegisterOptions::default().lease_id(0x7a).lease_id, Some(0x7a));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegisterOptions {
    /// The registration's TTL; `None`: the backend's default.
    pub ttl: Option<Duration>,
    /// Put the instance on this existing lease (etcd only, the seed's
    /// `WithLeaseID`; elsewhere `Unsupported`). The lease stays the
    /// caller's: the registry renews it while the instance is registered
    /// and never revokes it. If that lease ends, the instance is registered
    /// again on a lease of the registry's own.
    pub lease_id: Option<i64>,
}

impl RegisterOptions {
    /// Sets the TTL.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Registers on an existing lease (etcd).
    #[must_use]
    pub fn lease_id(mut self, id: i64) -> Self {
        self.lease_id = Some(id);
        self
    }
}

/// A service and its live instances, as [`ServiceRegistry::list_services`]
/// returns them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// The service name.
    pub name: String,
    /// Its live instances, sorted by id, each with its address and metadata.
    pub instances: Vec<ServiceInstance>,
}

impl ServiceInfo {
    /// Groups instances by service: sorted by name, each service's
    /// instances sorted by id.
    ///
    /// ```
    /// use im_infra::registry::{ServiceInfo, ServiceInstance};
    /// let all = vec![
    ///     ServiceInstance::new("b", "2", "h:2"),
    ///     ServiceInstance::new("a", "1", "h:1"),
    ///     ServiceInstance::new("b", "1", "h:3"),
    /// ];
    /// let services = ServiceInfo::group(all);
    /// assert_eq!(services.len(), 2);
    /// assert_eq!(services[1].name, "b");
    /// assert_eq!(services[1].instances[0].id, "1");
    /// ```
    pub fn group(instances: impl IntoIterator<Item = ServiceInstance>) -> Vec<ServiceInfo> {
        let mut by_name: BTreeMap<String, Vec<ServiceInstance>> = BTreeMap::new();
        for i in instances {
            by_name.entry(i.service.clone()).or_default().push(i);
        }
        by_name
            .into_iter()
            .map(|(name, mut instances)| {
                instances.sort_by(|a, b| a.id.cmp(&b.id));
                instances.dedup_by(|a, b| a.id == b.id);
                ServiceInfo { name, instances }
            })
            .collect()
    }
}

/// Registers this process's instances.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait ServiceRegistry: Send + Sync + 'static {
    /// Registers `instance` with a lease of `ttl`, kept alive in the
    /// background and re-established (forever, with backoff) if lost.
    /// Registering the same service and id again replaces it once the new
    /// registration is on the server; if that fails, the earlier one stays
    /// registered and kept. A `ttl` under
    /// the backend's [`RegistryCapabilities::min_ttl`] is raised to it; a
    /// zero `ttl` is `InvalidArgument`. An id names one instance: two
    /// registries (two processes) registering the same service and id take
    /// it from each other at every renewal, each noticing its loss and
    /// registering again.
    async fn register(&self, instance: &ServiceInstance, ttl: Duration) -> Result<()> {
        self.register_with(instance, RegisterOptions::default().ttl(ttl))
            .await
    }

    /// [`register`](Self::register) with options: the backend's default TTL
    /// when none is given, and on etcd an existing lease.
    async fn register_with(&self, instance: &ServiceInstance, opts: RegisterOptions) -> Result<()>;

    /// Removes an instance registered by this registry and stops keeping it
    /// alive. `NotRegistered` (code 2002) if it is not registered here. It
    /// is no longer kept from the start of the call: if the server cannot
    /// be reached (a retryable error), the instance stays there until its
    /// TTL ends, and calling `deregister` again (or closing the backend)
    /// tries again to remove it.
    async fn deregister(&self, service: &str, id: &str) -> Result<()>;

    /// Changes the address or metadata of a registered instance, keeping
    /// its lease. From the handle that registered it, the new value is also
    /// the one registered again after a loss (`LeaseLost` if its
    /// registration was lost: it is being registered again, with the new
    /// value). From any other handle, the value on the server is replaced
    /// while the instance is registered (keeping its lease and recorded
    /// TTL; if the registration is later lost, its owner registers its own
    /// last value again); `NotRegistered` (code 2002) if it is registered
    /// nowhere.
    async fn update(&self, instance: &ServiceInstance) -> Result<()>;

    /// The services with at least one live instance, sorted by name, each
    /// with its live instances (address and metadata).
    async fn list_services(&self) -> Result<Vec<ServiceInfo>>;
}

/// A shared registry is a registry (a backend keeps one handle to close it
/// and hands out the other).
#[async_trait]
impl<R: ServiceRegistry + ?Sized> ServiceRegistry for std::sync::Arc<R> {
    async fn register(&self, instance: &ServiceInstance, ttl: Duration) -> Result<()> {
        (**self).register(instance, ttl).await
    }
    async fn register_with(&self, instance: &ServiceInstance, opts: RegisterOptions) -> Result<()> {
        (**self).register_with(instance, opts).await
    }
    async fn deregister(&self, service: &str, id: &str) -> Result<()> {
        (**self).deregister(service, id).await
    }
    async fn update(&self, instance: &ServiceInstance) -> Result<()> {
        (**self).update(instance).await
    }
    async fn list_services(&self) -> Result<Vec<ServiceInfo>> {
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
