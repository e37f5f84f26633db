//! Service registry and discovery on etcd: one key per instance on a lease,
//! kept alive, registered again after a lost lease, watched by prefix.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use im_infra::lease::{LeaseBackend, PendingLease};
use im_infra::registry::{
    RegistrationBackend, RegistrationLease, Registrations, RegistryCapabilities, ServiceDiscovery,
    ServiceEvent, ServiceEventKind, ServiceEventStream, ServiceInstance, ServiceRegistry,
};
use im_infra::telemetry::OpMetrics;
use im_infra::{validate, Error, ErrorKind, Result};
use tokio::sync::mpsc;

use crate::connection::ConnectionManager;
use crate::lease::{EtcdLease, LeaseManager};

/// `<namespace><service_prefix>/<service>/`.
fn service_dir(conn: &ConnectionManager, service: &str) -> String {
    conn.cfg()
        .key(&format!("{}/{service}/", conn.cfg().service_prefix))
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
/// keep-alive (the instance expires); `close` deregisters.
pub struct EtcdRegistry {
    conn: Arc<ConnectionManager>,
    registrations: Registrations,
    register: OpMetrics,
    deregister: OpMetrics,
    update: OpMetrics,
    list: OpMetrics,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry").finish_non_exhaustive()
    }
}

impl EtcdRegistry {
    pub(crate) fn new(conn: Arc<ConnectionManager>) -> Self {
        let m = |op| OpMetrics::new(crate::NAME, "registry", op);
        EtcdRegistry {
            registrations: Registrations::new(
                Arc::new(Server { conn: conn.clone() }),
                conn.cfg().retry.clone(),
            ),
            conn,
            register: m("registry.register"),
            deregister: m("registry.deregister"),
            update: m("registry.update"),
            list: m("registry.list_services"),
        }
    }

    /// Deregisters everything registered through this handle.
    pub async fn close(&self) {
        self.registrations.close().await;
    }

    fn with_defaults(&self, instance: &ServiceInstance) -> ServiceInstance {
        let mut i = instance.clone();
        for (k, v) in &self.conn.cfg().default_metadata {
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
        self.register
            .run(async {
                validate::ttl(ttl)?;
                let instance = self.with_defaults(instance);
                self.registrations.register(&instance, ttl).await
            })
            .await
    }

    async fn deregister(&self, service: &str, id: &str) -> Result<()> {
        self.deregister
            .run(self.registrations.deregister(service, id))
            .await
    }

    async fn update(&self, instance: &ServiceInstance) -> Result<()> {
        self.update
            .run(async {
                let instance = self.with_defaults(instance);
                self.registrations.update(&instance).await
            })
            .await
    }

    async fn list_services(&self) -> Result<Vec<String>> {
        self.list
            .run(async {
                let root = self
                    .conn
                    .cfg()
                    .key(&format!("{}/", self.conn.cfg().service_prefix));
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
            })
            .await
    }
}

/// Discovery on an [`EtcdBackend`](crate::EtcdBackend): a read of the
/// service's prefix, and a watch that starts with the instances of that read
/// and follows the prefix from its revision (resuming after disconnects).
pub struct EtcdDiscovery {
    conn: Arc<ConnectionManager>,
    instances: OpMetrics,
    watch: OpMetrics,
}

impl std::fmt::Debug for EtcdDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDiscovery").finish_non_exhaustive()
    }
}

impl EtcdDiscovery {
    pub(crate) fn new(conn: Arc<ConnectionManager>) -> Self {
        let m = |op| OpMetrics::new(crate::NAME, "registry", op);
        EtcdDiscovery {
            conn,
            instances: m("discovery.instances"),
            watch: m("discovery.watch"),
        }
    }
}

async fn diff(
    known: &mut BTreeMap<String, ServiceInstance>,
    now: Vec<ServiceInstance>,
    tx: &mpsc::Sender<Result<ServiceEvent>>,
) -> bool {
    let now: BTreeMap<String, ServiceInstance> =
        now.into_iter().map(|i| (i.id.clone(), i)).collect();
    let mut events = Vec::new();
    for (id, old) in known.iter() {
        if !now.contains_key(id) {
            events.push(ServiceEvent {
                kind: ServiceEventKind::Delete,
                instance: old.clone(),
            });
        }
    }
    for (id, inst) in &now {
        match known.get(id) {
            None => events.push(ServiceEvent {
                kind: ServiceEventKind::Add,
                instance: inst.clone(),
            }),
            Some(old) if old != inst => events.push(ServiceEvent {
                kind: ServiceEventKind::Update,
                instance: inst.clone(),
            }),
            _ => {}
        }
    }
    *known = now;
    for e in events {
        if tx.send(Ok(e)).await.is_err() {
            return false;
        }
    }
    true
}

async fn watch_task(
    conn: Arc<ConnectionManager>,
    service: String,
    first: (i64, Vec<ServiceInstance>),
    tx: mpsc::Sender<Result<ServiceEvent>>,
) {
    let dir = service_dir(&conn, &service);
    let mut known = BTreeMap::new();
    let mut first = Some(first);
    let mut delays = conn.cfg().retry.delays_forever();
    loop {
        let outcome: Result<bool> = async {
            let (mut rev, now) = match first.take() {
                Some(s) => s,
                None => read(&conn, &service).await?,
            };
            if !diff(&mut known, now, &tx).await {
                return Ok(false);
            }
            let key = dir.clone();
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(rev + 1);
            let mut stream = conn
                .call("discovery.watch", |mut c| async move {
                    c.watch(key, Some(opts)).await
                })
                .await?;
            delays = conn.cfg().retry.delays_forever();
            loop {
                let msg = tokio::select! {
                    _ = tx.closed() => return Ok(false),
                    _ = conn.shutdown.cancelled() => return Ok(false),
                    m = stream.message() => m,
                };
                let Some(resp) = msg.map_err(crate::error::from_etcd)? else {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        "etcd watch stream ended",
                    ));
                };
                if resp.canceled() || resp.compact_revision() > 0 {
                    // Start over from a fresh read (diffed against what we reported).
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        "registry watch restarted",
                    ));
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    rev = rev.max(kv.mod_revision());
                    let k = String::from_utf8_lossy(kv.key());
                    let Some(id) = k.strip_prefix(dir.as_str()).map(str::to_owned) else {
                        continue;
                    };
                    let event = match ev.event_type() {
                        EventType::Put => match parse(kv.value()) {
                            Ok(inst) => {
                                let kind = match known.get(&id) {
                                    None => ServiceEventKind::Add,
                                    Some(old) if *old == inst => continue,
                                    Some(_) => ServiceEventKind::Update,
                                };
                                known.insert(id, inst.clone());
                                ServiceEvent {
                                    kind,
                                    instance: inst,
                                }
                            }
                            Err(_) => continue,
                        },
                        EventType::Delete => match known.remove(&id) {
                            Some(inst) => ServiceEvent {
                                kind: ServiceEventKind::Delete,
                                instance: inst,
                            },
                            None => continue,
                        },
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return Ok(false);
                    }
                }
            }
        }
        .await;
        match outcome {
            Ok(_) => return,
            Err(e) if e.kind() == ErrorKind::Closed => return,
            Err(e) => {
                tracing::debug!(service, error = %e, "registry watch interrupted; resynchronising");
                let d = delays.next().unwrap_or(Duration::from_secs(1));
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = conn.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(d) => {}
                }
            }
        }
    }
}

#[async_trait]
impl ServiceDiscovery for EtcdDiscovery {
    fn capabilities(&self) -> RegistryCapabilities {
        RegistryCapabilities::new(true)
    }

    async fn instances(&self, service: &str) -> Result<Vec<ServiceInstance>> {
        self.instances
            .run(async {
                validate::name("service name", service)?;
                Ok(read(&self.conn, service).await?.1)
            })
            .await
    }

    async fn watch(&self, service: &str) -> Result<ServiceEventStream> {
        self.watch
            .run(async {
                validate::name("service name", service)?;
                let first = read(&self.conn, service).await?;
                let (tx, mut rx) = mpsc::channel(256);
                tokio::spawn(watch_task(self.conn.clone(), service.to_owned(), first, tx));
                Ok(
                    Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
                        as ServiceEventStream,
                )
            })
            .await
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
    LeaseManager::new(conn.clone()).revoke(kv.lease()).await?;
    Ok(true)
}
