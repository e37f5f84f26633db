//! Service registry and discovery on Redis: instances with server-clock
//! expiries, keep-alive, re-registration, and a change stream for watches.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_infra::lease::LeaseBackend;
use im_infra::registry::{
    RegistrationBackend, RegistrationLease, Registrations, RegistryCapabilities, ServiceDiscovery,
    ServiceEvent, ServiceEventKind, ServiceEventStream, ServiceInstance, ServiceRegistry,
};
use im_infra::telemetry::OpMetrics;
use im_infra::{validate, Error, ErrorKind, Result};
use redis::Value;
use tokio::sync::mpsc;

use crate::error::{decode, from_redis};
use crate::Shared;

static SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("scripts/registry.lua")));

/// How long one blocking read of the change stream waits; expired
/// instances are reaped at least this often while a watch runs.
const BLOCK: Duration = Duration::from_millis(250);

fn sid(service: &str, id: &str) -> String {
    format!("{service}/{id}")
}

fn parse(json: &[u8]) -> Result<ServiceInstance> {
    serde_json::from_slice(json).map_err(|e| Error::serialization("registry instance", e))
}

/// Runs one registry operation.
async fn op<T: redis::FromRedisValue>(shared: &Shared, args: &[&str]) -> Result<T> {
    let k = &shared.keys;
    let mut inv = SCRIPT.prepare_invoke();
    for part in ["inst", "lease", "exp", "names", "rev", "log"] {
        inv.key(k.reg(part));
    }
    inv.arg(args[0]).arg(shared.client.cfg().config_history);
    for a in &args[1..] {
        inv.arg(*a);
    }
    shared.client.script(inv).await
}

/// Live instances whose id starts with `prefix`, with the revision.
async fn list(shared: &Shared, prefix: &str) -> Result<(u64, Vec<ServiceInstance>)> {
    let raw: Vec<Value> = op(shared, &["list", prefix]).await?;
    let mut it = raw.into_iter();
    let rev: u64 = match it.next() {
        Some(v) => decode(v)?,
        None => 0,
    };
    let mut out = Vec::new();
    for v in it {
        let json: Vec<u8> = decode(v)?;
        out.push(parse(&json)?);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((rev, out))
}

/// The registry of a [`RedisBackend`](crate::RedisBackend).
///
/// An instance is a JSON value with a lease token and an expiry on the
/// server's clock, kept by a [`Lease`](im_infra::lease::Lease) (renewed
/// every `ttl / 3`, with a local deadline); if the registration is lost
/// (expired during a partition, removed), it is registered again with a new
/// lease, retrying forever with backoff ([`Registrations`]). Dropping the
/// handle stops the renewals (the instances then expire, as when a process
/// dies); `close` deregisters them.
pub struct RedisRegistry {
    registrations: Registrations,
    register: OpMetrics,
    deregister: OpMetrics,
    update: OpMetrics,
    list: OpMetrics,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRegistry").finish_non_exhaustive()
    }
}

impl RedisRegistry {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let m = |op| OpMetrics::new(crate::NAME, "registry", op);
        RedisRegistry {
            registrations: Registrations::new(
                Arc::new(Server {
                    shared: shared.clone(),
                }),
                shared.client.cfg().retry.clone(),
            ),
            register: m("registry.register"),
            deregister: m("registry.deregister"),
            update: m("registry.update"),
            list: m("registry.list_services"),
            shared,
        }
    }

    /// Deregisters every instance registered through this handle.
    pub async fn close(&self) {
        self.registrations.close().await;
    }
}

/// Registers on the server.
struct Server {
    shared: Arc<Shared>,
}

#[async_trait]
impl RegistrationBackend for Server {
    fn name(&self) -> &'static str {
        crate::NAME
    }

    async fn put(
        &self,
        instance: &ServiceInstance,
        ttl: Duration,
    ) -> Result<(Arc<dyn RegistrationLease>, Duration)> {
        let sid = sid(&instance.service, &instance.id);
        let json = serde_json::to_string(instance).map_err(|e| Error::serialization(&sid, e))?;
        let lease = uuid::Uuid::new_v4().to_string();
        let ttl_ms = validate::ttl_millis(ttl).to_string();
        op::<i64>(&self.shared, &["put", &sid, &json, &lease, &ttl_ms]).await?;
        Ok((
            Arc::new(Registered {
                shared: self.shared.clone(),
                sid,
                lease,
            }),
            ttl,
        ))
    }
}

/// One registration: its instance id and lease token.
struct Registered {
    shared: Arc<Shared>,
    sid: String,
    lease: String,
}

#[async_trait]
impl LeaseBackend for Registered {
    fn describe(&self) -> String {
        format!("registration {}", self.sid)
    }

    async fn extend(&self, ttl: Duration) -> Result<bool> {
        let ttl_ms = validate::ttl_millis(ttl).to_string();
        let kept: i64 = op(
            &self.shared,
            &["keepalive", &self.sid, &self.lease, &ttl_ms],
        )
        .await?;
        Ok(kept == 1)
    }

    async fn release(&self) -> Result<bool> {
        let removed: i64 = op(&self.shared, &["remove", &self.sid, &self.lease]).await?;
        Ok(removed == 1)
    }
}

#[async_trait]
impl RegistrationLease for Registered {
    async fn update(&self, instance: &ServiceInstance) -> Result<bool> {
        let json =
            serde_json::to_string(instance).map_err(|e| Error::serialization(&self.sid, e))?;
        let updated: i64 = op(&self.shared, &["update", &self.sid, &self.lease, &json]).await?;
        Ok(updated == 1)
    }
}

#[async_trait]
impl ServiceRegistry for RedisRegistry {
    async fn register(&self, instance: &ServiceInstance, ttl: Duration) -> Result<()> {
        self.register
            .run(async {
                self.shared.client.check_open()?;
                validate::ttl(ttl)?;
                if ttl < Duration::from_millis(100) {
                    return Err(Error::invalid_argument(
                        "registration ttl must be at least 100 ms",
                    ));
                }
                self.registrations.register(instance, ttl).await
            })
            .await
    }

    async fn deregister(&self, service: &str, id: &str) -> Result<()> {
        self.deregister
            .run(self.registrations.deregister(service, id))
            .await
    }

    async fn update(&self, instance: &ServiceInstance) -> Result<()> {
        self.update.run(self.registrations.update(instance)).await
    }

    async fn list_services(&self) -> Result<Vec<String>> {
        self.list
            .run(async {
                let sids: Vec<String> = op(&self.shared, &["names"]).await?;
                let mut names: Vec<String> = sids
                    .iter()
                    .filter_map(|s| s.split_once('/').map(|(svc, _)| svc.to_owned()))
                    .collect();
                names.sort();
                names.dedup();
                Ok(names)
            })
            .await
    }
}

/// Discovery on a [`RedisBackend`](crate::RedisBackend). A watch reaps
/// expired instances while it waits, so expiries become `Delete` events
/// within about a quarter of a second.
pub struct RedisDiscovery {
    shared: Arc<Shared>,
    instances: OpMetrics,
    watch: OpMetrics,
}

impl std::fmt::Debug for RedisDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisDiscovery").finish_non_exhaustive()
    }
}

impl RedisDiscovery {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let m = |op| OpMetrics::new(crate::NAME, "registry", op);
        RedisDiscovery {
            shared,
            instances: m("discovery.instances"),
            watch: m("discovery.watch"),
        }
    }
}

/// Emits the changes that turn `known` into `now`.
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
    shared: std::sync::Weak<Shared>,
    service: String,
    first: (u64, Vec<ServiceInstance>),
    tx: mpsc::Sender<Result<ServiceEvent>>,
) {
    let prefix = format!("{service}/");
    let mut known: BTreeMap<String, ServiceInstance> = BTreeMap::new();
    let mut first = Some(first);
    let mut delays = None;
    loop {
        let Some(s) = shared.upgrade() else { return };
        let stop = s.client.shutdown.clone();
        let outcome: Result<bool> = async {
            // (Re)synchronise from a snapshot, then follow the stream.
            let (mut rev, now) = match first.take() {
                Some(snapshot) => snapshot,
                None => list(&s, &prefix).await?,
            };
            if !diff(&mut known, now, &tx).await {
                return Ok(false);
            }
            let mut conn = s
                .client
                .dedicated(BLOCK + s.client.cfg().response_timeout)
                .await?;
            delays = None;
            loop {
                if tx.is_closed() {
                    return Ok(false);
                }
                op::<i64>(&s, &["reap"]).await?;
                let mut cmd = redis::cmd("XREAD");
                if conn.is_some() {
                    cmd.arg("BLOCK").arg(BLOCK.as_millis() as u64);
                }
                cmd.arg("COUNT")
                    .arg(512)
                    .arg("STREAMS")
                    .arg(s.keys.reg("log"))
                    .arg(format!("{rev}-1"));
                let reply: Option<redis::streams::StreamReadReply> = match &mut conn {
                    Some(c) => cmd.query_async(c).await.map_err(from_redis)?,
                    None => {
                        let r = s.client.query(&cmd).await?;
                        tokio::time::sleep(BLOCK).await;
                        r
                    }
                };
                let entries: Vec<redis::streams::StreamId> = reply
                    .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
                    .unwrap_or_default();
                let Some(first) = entries.first() else {
                    continue;
                };
                let first_rev: u64 = first
                    .id
                    .split('-')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if first_rev > rev + 1 {
                    // Trimmed past us: start over from a snapshot.
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        "registry change stream trimmed",
                    ));
                }
                for e in &entries {
                    rev =
                        e.id.split('-')
                            .next()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(rev);
                    let kind: Option<String> = e.get("t");
                    let json: Option<Vec<u8>> = e.get("i");
                    let (Some(kind), Some(json)) = (kind, json) else {
                        continue;
                    };
                    let Ok(inst) = parse(&json) else { continue };
                    if inst.service != service {
                        continue;
                    }
                    let kind = match kind.as_str() {
                        "a" | "u" if known.contains_key(&inst.id) => {
                            if known.get(&inst.id) == Some(&inst) {
                                continue;
                            }
                            ServiceEventKind::Update
                        }
                        "a" | "u" => ServiceEventKind::Add,
                        _ => {
                            if known.remove(&inst.id).is_none() {
                                continue;
                            }
                            ServiceEventKind::Delete
                        }
                    };
                    if kind != ServiceEventKind::Delete {
                        known.insert(inst.id.clone(), inst.clone());
                    }
                    if tx
                        .send(Ok(ServiceEvent {
                            kind,
                            instance: inst,
                        }))
                        .await
                        .is_err()
                    {
                        return Ok(false);
                    }
                }
            }
        }
        .await;
        drop(s);
        match outcome {
            Ok(_) => return,
            Err(e) if e.kind() == ErrorKind::Closed => return,
            Err(e) => {
                tracing::debug!(service, error = %e, "registry watch interrupted; resynchronising");
                let Some(s) = shared.upgrade() else { return };
                let d = delays
                    .get_or_insert_with(|| s.client.cfg().retry.delays_forever())
                    .next()
                    .unwrap_or(Duration::from_secs(1));
                drop(s);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(d) => {}
                }
            }
        }
    }
}

#[async_trait]
impl ServiceDiscovery for RedisDiscovery {
    fn capabilities(&self) -> RegistryCapabilities {
        RegistryCapabilities::new(true)
    }

    async fn instances(&self, service: &str) -> Result<Vec<ServiceInstance>> {
        self.instances
            .run(async {
                validate::name("service name", service)?;
                Ok(list(&self.shared, &format!("{service}/")).await?.1)
            })
            .await
    }

    async fn watch(&self, service: &str) -> Result<ServiceEventStream> {
        self.watch
            .run(async {
                validate::name("service name", service)?;
                self.shared.client.check_open()?;
                // The first snapshot is taken now, so the stream starts from this call.
                let first = list(&self.shared, &format!("{service}/")).await?;
                let (tx, mut rx) = mpsc::channel(256);
                tokio::spawn(watch_task(
                    Arc::downgrade(&self.shared),
                    service.to_owned(),
                    first,
                    tx,
                ));
                Ok(
                    Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
                        as ServiceEventStream,
                )
            })
            .await
    }
}

/// Removes an instance whoever holds it, as if its lease had expired.
pub(crate) async fn revoke(shared: &Shared, service: &str, id: &str) -> Result<bool> {
    let n: i64 = op(shared, &["remove", &sid(service, id), ""]).await?;
    Ok(n == 1)
}
