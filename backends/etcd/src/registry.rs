//! Service registry and discovery on etcd: one key per instance on a lease,
//! kept alive, registered again after a lost lease, watched by prefix.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use im_infra::backend::Closable;
use im_infra::lease::{LeaseBackend, PendingLease};
use im_infra::registry::watch::{spawn_watch, InstanceBatch, InstanceChange, InstanceHistory};
use im_infra::registry::{
    RegistrationBackend, RegistrationLease, Registrations, RegistryCapabilities, ServiceDiscovery,
    ServiceEventStream, ServiceInstance, ServiceRegistry,
};
use im_infra::{Error, ErrorKind, Result};

use crate::connection::ConnectionManager;
use crate::lease::EtcdLease;

/// `<namespace><service_prefix>/<service>/`.
fn service_dir(conn: &ConnectionManager, service: &str) -> String {
    conn.settings()
        .key(&format!("{}/{service}/", conn.settings().service_prefix))
}

fn instance_key(conn: &ConnectionManager, service: &str, id: &str) -> String {
    format!("{}{id}", service_dir(conn, service))
}

fn parse(raw: &[u8]) -> Result<ServiceInstance> {
    serde_json::from_slice(raw).map_err(|e| Error::serialization("service instance", e))
}

/// Live instances of a service and the revision they were read at.
async fn read(conn: &ConnectionManager, service: &str) -> Result<(i64, Vec<ServiceInstance>)> {
    let dir = service_dir(conn, service);
    let r = conn
        .call("discovery.instances", |mut c| async move {
            c.get(dir, Some(GetOptions::new().with_prefix())).await
        })
        .await?;
    let rev = r.header().map_or(0, |h| h.revision());
    let mut out = Vec::new();
    for kv in r.kvs() {
        match parse(kv.value()) {
            Ok(i) => out.push(i),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable instance ignored")
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((rev, out))
}

/// The registry of an [`EtcdBackend`](crate::EtcdBackend).
///
/// An instance is JSON at `<service_prefix>/<service>/<id>` on a lease of
/// its TTL (whole seconds), kept by a [`Lease`](im_infra::lease::Lease)
/// (renewed every third of the TTL, with a local deadline). When the lease
/// is lost (expired during a partition, revoked), the instance is
/// registered again on a new lease, retrying forever with backoff, until
/// deregistered ([`Registrations`]). Dropping the handle stops the
/// keep-alive (the instance expires); `close` (also the backend's close)
/// deregisters.
///
/// Raw operations: the backend hands it out layered
/// ([`ObservedRegistry`](im_infra::layer::ObservedRegistry)).
pub(crate) struct EtcdRegistry {
    conn: Arc<ConnectionManager>,
    registrations: Registrations,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry").finish_non_exhaustive()
    }
}

#[async_trait]
impl Closable for EtcdRegistry {
    /// Deregisters everything registered through this handle (failures are
    /// logged: those instances expire on etcd).
    async fn close(&self) -> Result<()> {
        self.registrations.close().await;
        Ok(())
    }
}

impl EtcdRegistry {
    pub(crate) fn new(conn: Arc<ConnectionManager>) -> Self {
        EtcdRegistry {
            registrations: Registrations::new(
                Arc::new(Server { conn: conn.clone() }),
                conn.settings().retry.clone(),
            ),
            conn,
        }
    }

    fn with_defaults(&self, instance: &ServiceInstance) -> ServiceInstance {
        let mut i = instance.clone();
        for (k, v) in &self.conn.settings().default_metadata {
            i.metadata.entry(k.clone()).or_insert_with(|| v.clone());
        }
        i
    }
}

/// Registers on etcd.
struct Server {
    conn: Arc<ConnectionManager>,
}

#[async_trait]
impl RegistrationBackend for Server {
    fn name(&self) -> &'static str {
        crate::NAME
    }

    /// Grants a lease and puts the instance on it.
    async fn put(
        &self,
        instance: &ServiceInstance,
        ttl: Duration,
    ) -> Result<(Arc<dyn RegistrationLease>, Duration)> {
        let (lease, granted) = EtcdLease::grant(&self.conn, "registry.lease_grant", ttl).await?;
        let mut pending = PendingLease::new(lease);
        pending.arm();
        let id = pending.backend().id();
        let key = instance_key(&self.conn, &instance.service, &instance.id);
        let value = serde_json::to_vec(instance).map_err(|e| Error::serialization(&key, e))?;
        let k = key.clone();
        self.conn
            .call("registry.put", |mut c| async move {
                c.put(k, value, Some(PutOptions::new().with_lease(id)))
                    .await
            })
            .await?;
        Ok((
            Arc::new(Registered {
                lease: pending.into_backend(),
                key,
            }),
            granted,
        ))
    }
}

/// One registration: the instance key on its lease.
struct Registered {
    lease: EtcdLease,
    key: String,
}

impl Registered {
    /// Runs `op` on the key only while it is on this registration's lease.
    async fn if_mine(&self, what: &'static str, op: TxnOp) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::lease(
                self.key.clone(),
                CompareOp::Equal,
                self.lease.id(),
            )])
            .and_then([op]);
        let r = self
            .lease
            .conn()
            .call(what, |mut c| async move { c.txn(txn).await })
            .await?;
        Ok(r.succeeded())
    }
}

#[async_trait]
impl LeaseBackend for Registered {
    fn describe(&self) -> String {
        format!("registration {}", self.key)
    }

    async fn extend(&self, _ttl: Duration) -> Result<bool> {
        self.lease.keep_alive().await
    }

    /// Deletes the key if it is still on this lease, then revokes the lease.
    async fn release(&self) -> Result<bool> {
        let deleted = self
            .if_mine("registry.delete", TxnOp::delete(self.key.clone(), None))
            .await?;
        let _ = self.lease.revoke().await;
        Ok(deleted)
    }
}

#[async_trait]
impl RegistrationLease for Registered {
    async fn update(&self, instance: &ServiceInstance) -> Result<bool> {
        let value = serde_json::to_vec(instance).map_err(|e| Error::serialization(&self.key, e))?;
        let put = TxnOp::put(
            self.key.clone(),
            value,
            Some(PutOptions::new().with_lease(self.lease.id())),
        );
        self.if_mine("registry.update", put).await
    }
}

#[async_trait]
impl ServiceRegistry for EtcdRegistry {
    async fn register(&self, instance: &ServiceInstance, ttl: Duration) -> Result<()> {
        let instance = self.with_defaults(instance);
        self.registrations.register(&instance, ttl).await
    }

    async fn deregister(&self, service: &str, id: &str) -> Result<()> {
        self.registrations.deregister(service, id).await
    }

    async fn update(&self, instance: &ServiceInstance) -> Result<()> {
        let instance = self.with_defaults(instance);
        self.registrations.update(&instance).await
    }

    async fn list_services(&self) -> Result<Vec<String>> {
        let root = self
            .conn
            .settings()
            .key(&format!("{}/", self.conn.settings().service_prefix));
        let opts = GetOptions::new().with_prefix().with_keys_only();
        let prefix = root.clone();
        let r = self
            .conn
            .call("registry.list", |mut c| async move {
                c.get(prefix, Some(opts)).await
            })
            .await?;
        let mut names: Vec<String> = r
            .kvs()
            .iter()
            .filter_map(|kv| {
                let k = String::from_utf8_lossy(kv.key());
                k.strip_prefix(root.as_str())?
                    .split('/')
                    .next()
                    .map(str::to_owned)
            })
            .filter(|s| !s.is_empty())
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }
}

/// Discovery on an [`EtcdBackend`](crate::EtcdBackend): a read of the
/// service's prefix, and a watch that starts with the instances of that read
/// and follows the prefix from its revision (resuming after disconnects).
///
/// Raw operations: the backend hands it out layered
/// ([`ObservedDiscovery`](im_infra::layer::ObservedDiscovery)).
pub(crate) struct EtcdDiscovery {
    conn: Arc<ConnectionManager>,
}

impl std::fmt::Debug for EtcdDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDiscovery").finish_non_exhaustive()
    }
}

impl EtcdDiscovery {
    pub(crate) fn new(conn: Arc<ConnectionManager>) -> Self {
        EtcdDiscovery { conn }
    }
}

/// A service's prefix as one watch reads it: a server-side watch from the
/// revision of the last listing.
struct Instances {
    conn: Arc<ConnectionManager>,
    service: String,
    /// `service_dir` of the service.
    dir: String,
    stream: Option<WatchStream>,
}

impl Instances {
    /// The change an event records (an unreadable instance is skipped).
    fn change(&self, ev: &etcd_client::Event) -> Option<InstanceChange> {
        let kv = ev.kv()?;
        let key = String::from_utf8_lossy(kv.key());
        let id = key.strip_prefix(self.dir.as_str())?.to_owned();
        match ev.event_type() {
            EventType::Put => parse(kv.value()).ok().map(InstanceChange::Put),
            EventType::Delete => Some(InstanceChange::Delete(id)),
        }
    }
}

#[async_trait]
impl InstanceHistory for Instances {
    async fn list(&mut self) -> Result<(u64, Vec<ServiceInstance>)> {
        let (rev, instances) = read(&self.conn, &self.service).await?;
        Ok((rev as u64, instances))
    }

    async fn connect(&mut self, after: u64) -> Result<()> {
        self.stream = None;
        let key = self.dir.clone();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(after as i64 + 1);
        let stream = self
            .conn
            .call("discovery.watch", |mut c| async move {
                c.watch(key, Some(opts)).await
            })
            .await?;
        self.stream = Some(stream);
        Ok(())
    }

    async fn next_batch(&mut self, _after: u64) -> Result<InstanceBatch> {
        let ended = || Error::new(ErrorKind::Unavailable, "etcd watch stream ended");
        let stream = self.stream.as_mut().ok_or_else(ended)?;
        let resp = stream.message().await.map_err(crate::error::from_etcd)?;
        let resp = resp.ok_or_else(ended)?;
        if resp.compact_revision() > 0 {
            return Ok(InstanceBatch::Gap);
        }
        if resp.canceled() {
            let reason = format!("etcd canceled the watch: {}", resp.cancel_reason());
            return Err(Error::new(ErrorKind::Unavailable, reason));
        }
        let events = resp.events();
        let changes = events.iter().filter_map(|e| self.change(e)).collect();
        let upto = events
            .iter()
            .filter_map(|e| e.kv())
            .map(|kv| kv.mod_revision());
        Ok(InstanceBatch::Changes {
            changes,
            upto: upto.max().unwrap_or(0) as u64,
        })
    }
}

#[async_trait]
impl ServiceDiscovery for EtcdDiscovery {
    fn capabilities(&self) -> RegistryCapabilities {
        RegistryCapabilities::default().with_watch()
    }

    async fn instances(&self, service: &str) -> Result<Vec<ServiceInstance>> {
        Ok(read(&self.conn, service).await?.1)
    }

    async fn watch(&self, service: &str) -> Result<ServiceEventStream> {
        let history = Instances {
            conn: self.conn.clone(),
            service: service.to_owned(),
            dir: service_dir(&self.conn, service),
            stream: None,
        };
        let (retry, shutdown) = (
            self.conn.settings().retry.clone(),
            self.conn.shutdown.clone(),
        );
        spawn_watch(history, retry, shutdown).await
    }
}

/// Revokes the lease of a registered instance (fault injection).
pub(crate) async fn revoke(conn: &Arc<ConnectionManager>, service: &str, id: &str) -> Result<bool> {
    let key = instance_key(conn, service, id);
    let r = conn
        .call(
            "registry.get",
            |mut c| async move { c.get(key, None).await },
        )
        .await?;
    let Some(kv) = r.kvs().first() else {
        return Ok(false);
    };
    crate::lease::revoke(conn, kv.lease()).await?;
    Ok(true)
}
