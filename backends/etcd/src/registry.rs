//! Service registry and discovery on etcd: one key per instance on a lease,
//! kept alive, registered again after a lost lease, watched by prefix.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions, WatchStream,
};
use im_infra::lease::{LeaseBackend, PendingLease};
use im_infra::registry::watch::{spawn_watch, InstanceBatch, InstanceChange, InstanceHistory};
use im_infra::registry::{
    RegistrationBackend, RegistrationLease, Registrations, RegistryCapabilities, ServiceDiscovery,
    ServiceEventStream, ServiceInstance,
};
use im_infra::{Error, ErrorKind, Result};

use crate::connection::ConnectionManager;
use crate::lease::{EtcdLease, MIN_TTL};

/// `<namespace><service_prefix>/<service>/`.
fn service_dir(conn: &ConnectionManager, service: &str) -> String {
    conn.settings()
        .key(&format!("{}/{service}/", conn.settings().service_prefix))
}

fn instance_key(conn: &ConnectionManager, service: &str, id: &str) -> String {
    format!("{}{id}", service_dir(conn, service))
}

/// The instance stored in `kv`, with the lease it is on.
fn parse(kv: &etcd_client::KeyValue) -> Result<ServiceInstance> {
    let mut i: ServiceInstance = serde_json::from_slice(kv.value())
        .map_err(|e| Error::serialization("service instance", e))?;
    i.lease_id = Some(kv.lease()).filter(|&l| l != 0);
    Ok(i)
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
        match parse(kv) {
            Ok(i) => out.push(i),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable instance ignored")
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((rev, out))
}

/// The registry of an [`EtcdBackend`](crate::EtcdBackend): a
/// [`Registrations`] over etcd's side.
///
/// An instance is JSON at `<service_prefix>/<service>/<id>` on a lease of
/// its TTL (whole seconds), or on a lease of the caller's; without a TTL,
/// the settings' `default_ttl`. Every instance carries the settings'
/// `default_metadata` under its own.
pub(crate) fn registry(conn: Arc<ConnectionManager>) -> Registrations {
    let retry = conn.settings().retry.clone();
    Registrations::new(Arc::new(Server { conn }), retry)
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

    fn default_ttl(&self) -> Duration {
        self.conn.settings().default_ttl
    }

    fn min_ttl(&self) -> Duration {
        MIN_TTL
    }

    fn takes_caller_leases(&self) -> bool {
        true
    }

    fn default_metadata(&self) -> &BTreeMap<String, String> {
        &self.conn.settings().default_metadata
    }

    async fn list(&self) -> Result<Vec<ServiceInstance>> {
        let root = self
            .conn
            .settings()
            .key(&format!("{}/", self.conn.settings().service_prefix));
        let r = self
            .conn
            .call("registry.list", |mut c| async move {
                c.get(root, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        let instances = r
            .kvs().iter().filter_map(|kv| match parse(kv) {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable instance ignored");
                None
            }
        });
        Ok(instances.collect())
    }

    /// Grants a lease and puts the instance on it; or puts it on the
    /// caller's lease `lease_id` (never revoked by the registry).
    async fn put(
        &self,
        instance: &ServiceInstance,
        ttl: Duration,
        lease_id: Option<i64>,
    ) -> Result<(Arc<dyn RegistrationLease>, Duration)> {
        if let Some(id) = lease_id {
            return self.put_on(instance, id).await;
        }
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
                own_lease: true,
            }),
            granted,
        ))
    }

    /// Replaces the value of a registered instance on the lease it is on,
    /// if the key did not change in between (retried on a race).
    async fn replace(&self, instance: &ServiceInstance) -> Result<bool> {
        let key = instance_key(&self.conn, &instance.service, &instance.id);
        for _ in 0..5 {
            let k = key.clone();
            let r = self
                .conn
                .call("registry.get", |mut c| async move { c.get(k, None).await })
                .await?;
            let Some(kv) = r.kvs().first() else {
                return Ok(false);
            };
            let (rev, lease) = (kv.mod_revision(), kv.lease());
            let ttl = parse(kv).ok().and_then(|old| old.ttl);
            let value = serde_json::to_vec(&ServiceInstance {
                ttl,
                ..instance.clone()
            })
            .map_err(|e| Error::serialization(&key, e))?;
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
                .and_then([TxnOp::put(
                    key.clone(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                )]);
            let r = self
                .conn
                .call("registry.replace", |mut c| async move { c.txn(txn).await });
            match r.await {
                Ok(r) if r.succeeded() => return Ok(true),
                Ok(_) => {}
                // Its lease ended between the read and the write: the
                // instance is registered no more.
                Err(e) if e.kind() == ErrorKind::LeaseLost => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Err(Error::new(
            ErrorKind::Conflict,
            format!("{key} kept changing while it was updated"),
        )
        .with_backend(crate::NAME))
    }
}

impl Server {
    /// Puts the instance on the caller's lease `id`: renewed by the
    /// registration while it lasts, never revoked by it. The lease is
    /// renewed first, so that its whole granted TTL counts from now. A put
    /// that fails after etcd applied it (a timeout) leaves the key on the
    /// caller's lease, until that lease ends or the instance is registered
    /// again.
    async fn put_on(
        &self,
        instance: &ServiceInstance,
        id: i64,
    ) -> Result<(Arc<dyn RegistrationLease>, Duration)> {
        let granted = crate::lease::info(&self.conn, id)
            .await
            .map_err(|e| crate::lease::not_found(e, id))?
            .granted_ttl
            .max(Duration::from_secs(1));
        let lease = EtcdLease::new(self.conn.clone(), id);
        if !lease
            .keep_alive()
            .await
            .map_err(|e| crate::lease::not_found(e, id))?
        {
            return Err(crate::lease::not_found(crate::lease::lost(id), id));
        }
        let key = instance_key(&self.conn, &instance.service, &instance.id);
        let recorded = ServiceInstance {
            ttl: Some(granted),
            ..instance.clone()
        };
        let value = serde_json::to_vec(&recorded).map_err(|e| Error::serialization(&key, e))?;
        let k = key.clone();
        self.conn
            .call("registry.put", |mut c| async move {
                c.put(k, value, Some(PutOptions::new().with_lease(id)))
                    .await
            })
            .await
            .map_err(|e| crate::lease::not_found(e, id))?;
        Ok((
            Arc::new(Registered {
                lease,
                key,
                own_lease: false,
            }),
            granted,
        ))
    }
}

/// One registration: the instance key on its lease.
struct Registered {
    lease: EtcdLease,
    key: String,
    /// Granted for this registration (revoked with it), or the caller's.
    own_lease: bool,
}

impl Registered {
    /// Runs `ops` on the key only while it is on this registration's
    /// lease; whether it was.
    async fn if_mine(&self, what: &'static str, ops: Vec<TxnOp>) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::lease(
                self.key.clone(),
                CompareOp::Equal,
                self.lease.id(),
            )])
            .and_then(ops);
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

    /// Renews the lease, then checks that the key is still on it. A key
    /// deleted or put on another lease meanwhile (the same instance
    /// registered by another handle and deregistered there, or a put that
    /// etcd applied after reporting it failed) is a lost registration,
    /// which its keeper registers again: a live lease alone would keep
    /// renewing nothing.
    async fn extend(&self, _ttl: Duration) -> Result<bool> {
        Ok(self.lease.keep_alive().await? && self.if_mine("registry.check", Vec::new()).await?)
    }

    /// Deletes the key if it is still on this lease, then revokes the lease
    /// if the registration granted it.
    async fn release(&self) -> Result<bool> {
        let deleted = self
            .if_mine(
                "registry.delete",
                vec![TxnOp::delete(self.key.clone(), None)],
            )
            .await?;
        if self.own_lease {
            let _ = self.lease.revoke().await;
        }
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
        self.if_mine("registry.update", vec![put]).await
    }

    fn callers_lease(&self) -> Option<i64> {
        (!self.own_lease).then(|| self.lease.id())
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
    /// The change an event records. An instance whose value became
    /// unreadable counts as gone, as the listing leaves it out.
    fn change(&self, ev: &etcd_client::Event) -> Option<InstanceChange> {
        let kv = ev.kv()?;
        let key = String::from_utf8_lossy(kv.key());
        let id = key.strip_prefix(self.dir.as_str())?.to_owned();
        Some(match ev.event_type() {
            EventType::Put => match parse(kv) {
                Ok(instance) => InstanceChange::Put(instance),
                Err(e) => {
                    tracing::warn!(%key, error = %e, "unreadable instance counted as gone");
                    InstanceChange::Delete(id)
                }
            },
            EventType::Delete => InstanceChange::Delete(id),
        })
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
        RegistryCapabilities::default()
            .with_watch()
            .with_caller_leases()
            .with_min_ttl(MIN_TTL)
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
        let (retry, shutdown) = (self.conn.settings().retry.clone(), self.conn.stop().clone());
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
