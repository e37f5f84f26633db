//! The layers of [`ServiceRegistry`] and [`ServiceDiscovery`].

use async_trait::async_trait;

use crate::error::Result;
use crate::registry::{
    RegisterOptions, RegistryCapabilities, ServiceDiscovery, ServiceEventStream, ServiceInfo,
    ServiceInstance, ServiceRegistry,
};
use crate::validate;

ops!(RegistryOps, "registry" {
    register => "registry.register",
    deregister => "registry.deregister",
    update => "registry.update",
    list_services => "registry.list_services",
});

ops!(DiscoveryOps, "registry" {
    instances => "discovery.instances",
    watch => "discovery.watch",
});

/// Argument checks ([`ServiceInstance::validate`], TTLs, names) and
/// telemetry (`registry.*`) around a registry.
///
/// ```
/// use std::sync::Arc;
/// use im_infra::layer::ObservedRegistry;
/// use im_infra::registry::ServiceRegistry;
///
/// fn hand_out<R: ServiceRegistry>(raw: R) -> Arc<dyn ServiceRegistry> {
///     Arc::new(ObservedRegistry::new("etcd", raw))
/// }
/// ```
pub struct ObservedRegistry<R> {
    inner: R,
    ops: RegistryOps,
}

impl<R: ServiceRegistry> ObservedRegistry<R> {
    /// `inner`, observed as the registry of `backend`.
    pub fn new(backend: &'static str, inner: R) -> Self {
        ObservedRegistry {
            inner,
            ops: RegistryOps::new(backend),
        }
    }

    /// The inner registry.
    pub fn inner(&self) -> &R {
        &self.inner
    }
}

impl<R> std::fmt::Debug for ObservedRegistry<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedRegistry").finish_non_exhaustive()
    }
}

#[async_trait]
impl<R: ServiceRegistry> ServiceRegistry for ObservedRegistry<R> {
    async fn register_with(&self, instance: &ServiceInstance, opts: RegisterOptions) -> Result<()> {
        self.ops
            .register
            .run(async {
                instance.validate()?;
                validate::opt_ttl(opts.ttl)?;
                self.inner.register_with(instance, opts).await
            })
            .await
    }

    async fn deregister(&self, service: &str, id: &str) -> Result<()> {
        self.ops
            .deregister
            .run(async {
                validate::name("service name", service)?;
                validate::name("instance id", id)?;
                self.inner.deregister(service, id).await
            })
            .await
    }

    async fn update(&self, instance: &ServiceInstance) -> Result<()> {
        self.ops
            .update
            .run(async {
                instance.validate()?;
                self.inner.update(instance).await
            })
            .await
    }

    async fn list_services(&self) -> Result<Vec<ServiceInfo>> {
        self.ops.list_services.run(self.inner.list_services()).await
    }
}

/// Argument checks (service names) and telemetry (`discovery.*`) around a
/// discovery service.
///
/// ```
/// use std::sync::Arc;
/// use im_infra::layer::ObservedDiscovery;
/// use im_infra::registry::ServiceDiscovery;
///
/// fn hand_out<D: ServiceDiscovery>(raw: D) -> Arc<dyn ServiceDiscovery> {
///     Arc::new(ObservedDiscovery::new("etcd", raw))
/// }
/// ```
pub struct ObservedDiscovery<D> {
    inner: D,
    ops: DiscoveryOps,
}

impl<D: ServiceDiscovery> ObservedDiscovery<D> {
    /// `inner`, observed as the discovery of `backend`.
    pub fn new(backend: &'static str, inner: D) -> Self {
        ObservedDiscovery {
            inner,
            ops: DiscoveryOps::new(backend),
        }
    }

    /// The inner discovery service.
    pub fn inner(&self) -> &D {
        &self.inner
    }
}

impl<D> std::fmt::Debug for ObservedDiscovery<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedDiscovery").finish_non_exhaustive()
    }
}

#[async_trait]
impl<D: ServiceDiscovery> ServiceDiscovery for ObservedDiscovery<D> {
    fn capabilities(&self) -> RegistryCapabilities {
        self.inner.capabilities()
    }

    async fn instances(&self, service: &str) -> Result<Vec<ServiceInstance>> {
        self.ops
            .instances
            .run(async {
                validate::name("service name", service)?;
                self.inner.instances(service).await
            })
            .await
    }

    async fn watch(&self, service: &str) -> Result<ServiceEventStream> {
        self.ops
            .watch
            .run(async {
                validate::name("service name", service)?;
                self.inner.watch(service).await
            })
            .await
    }
}
