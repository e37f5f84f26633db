//! Service registry and discovery on Redis: instances with server-clock
//! expiries, keep-alive, re-registration, and a change stream for watches.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use im_infra::lease::LeaseBackend;
use im_infra::registry::watch::{spawn_watch, InstanceBatch, InstanceChange, InstanceHistory};
use im_infra::registry::{
    RegistrationBackend, RegistrationLease, Registrations, RegistryCapabilities, ServiceDiscovery,
    ServiceEventStream, ServiceInstance, DEFAULT_TTL,
};
use im_infra::{validate, Error, Result};
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamReadReply};
use redis::Value;

use crate::client;
use crate::error::{decode, from_redis};
use crate::Shared;

static SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("scripts/registry.lua")));

/// The shortest registration TTL kept alive (renewals every third of it);
/// a shorter one is raised to it.
const MIN_TTL: Duration = Duration::from_millis(100);

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
    let keys = ["inst", "lease", "exp", "names", "rev", "log"].map(|part| k.reg(part));
    let mut cmd = client::evalsha(&SCRIPT, keys);
    cmd.arg(args[0])
        .arg(shared.client.settings().config_history);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    shared.client.script(&SCRIPT, &cmd).await
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
        // One unreadable record (written by another client or version)
        // must not hide the others.
        match parse(&json) {
            Ok(i) => out.push(i),
            Err(e) => tracing::warn!(
                prefix,
                record = %String::from_utf8_lossy(&json),
                error = %e,
                "unreadable instance ignored"
            ),
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((rev, out))
}

/// The registry of a [`RedisBackend`](crate::RedisBackend): a
/// [`Registrations`] over this server's side.
///
/// An instance is a JSON value with a lease token and an expiry on the
/// server's clock; without a TTL, [`DEFAULT_TTL`], and at least 100 ms
/// (keep-alives every third of it need room).
pub(crate) fn registry(shared: Arc<Shared>) -> Registrations {
    let retry = shared.client.settings().retry.clone();
    Registrations::new(Arc::new(Server { shared }), retry)
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

    fn default_ttl(&self) -> Duration {
        DEFAULT_TTL
    }

    fn min_ttl(&self) -> Duration {
        MIN_TTL
    }

    async fn list(&self) -> Result<Vec<ServiceInstance>> {
        Ok(list(&self.shared, "").await?.1)
    }

    async fn put(
        &self,
        instance: &ServiceInstance,
        ttl: Duration,
        _lease_id: Option<i64>,
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

    async fn replace(&self, instance: &ServiceInstance) -> Result<bool> {
        let sid = sid(&instance.service, &instance.id);
        // The script keeps the TTL recorded with the registration.
        let json = serde_json::to_string(instance).map_err(|e| Error::serialization(&sid, e))?;
        let replaced: i64 = op(&self.shared, &["replace", &sid, &json]).await?;
        Ok(replaced == 1)
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

/// Discovery on a [`RedisBackend`](crate::RedisBackend). A watch reaps
/// expired instances while it waits, so expiries become `Delete` events
/// within about a quarter of a second. Handed out inside
/// [`ObservedDiscovery`](im_infra::layer::ObservedDiscovery), which checks
/// service names.
pub(crate) struct RedisDiscovery {
    shared: Arc<Shared>,
}

impl RedisDiscovery {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RedisDiscovery { shared }
    }
}

/// The revision of a change-stream entry.
fn stream_rev(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

/// The registry's change stream as one watch of one service reads it: on a
/// connection of its own (`None` on a cluster, which polls), reaping
/// expired instances before every read.
struct Instances {
    shared: Weak<Shared>,
    service: String,
    conn: Option<MultiplexedConnection>,
}

impl Instances {
    fn shared(&self) -> Result<Arc<Shared>> {
        im_infra::backend::upgrade(&self.shared, crate::NAME)
    }

    /// The entries after `after` (blocking up to [`BLOCK`], or a plain
    /// read and a pause on a cluster).
    async fn read(&mut self, shared: &Shared, after: u64) -> Result<Vec<StreamId>> {
        let mut cmd = redis::cmd("XREAD");
        if self.conn.is_some() {
            cmd.arg("BLOCK").arg(BLOCK.as_millis() as u64);
        }
        cmd.arg("COUNT")
            .arg(512)
            .arg("STREAMS")
            .arg(shared.keys.reg("log"))
            .arg(format!("{after}-1"));
        let reply: Option<StreamReadReply> = match &mut self.conn {
            Some(c) => cmd.query_async(c).await.map_err(from_redis)?,
            None => {
                let r = shared.client.query(&cmd).await?;
                tokio::time::sleep(BLOCK).await;
                r
            }
        };
        Ok(reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default())
    }

    /// The change an entry records, if it is one of the watched service's.
    /// An instance whose record is unreadable counts as gone (as the
    /// listing leaves it out), if its service and id can be read.
    fn change(&self, entry: &StreamId) -> Option<InstanceChange> {
        let kind: String = entry.get("t")?;
        let json: Vec<u8> = entry.get("i")?;
        let instance = match parse(&json) {
            Ok(instance) => instance,
            Err(e) => {
                #[derive(serde::Deserialize)]
                struct Named {
                    service: String,
                    id: String,
                }
                let named: Named = serde_json::from_slice(&json).ok()?;
                if named.service != self.service {
                    return None;
                }
                tracing::warn!(service = %named.service, id = %named.id, error = %e, "unreadable instance counted as gone");
                return Some(InstanceChange::Delete(named.id));
            }
        };
        if instance.service != self.service {
            return None;
        }
        Some(match kind.as_str() {
            "a" | "u" => InstanceChange::Put(instance),
            _ => InstanceChange::Delete(instance.id),
        })
    }
}

#[async_trait]
impl InstanceHistory for Instances {
    async fn list(&mut self) -> Result<(u64, Vec<ServiceInstance>)> {
        list(&*self.shared()?, &format!("{}/", self.service)).await
    }

    async fn connect(&mut self, _after: u64) -> Result<()> {
        let s = self.shared()?;
        self.conn = s
            .client
            .dedicated(BLOCK + s.client.settings().request_timeout)
            .await?;
        Ok(())
    }

    async fn next_batch(&mut self, after: u64) -> Result<InstanceBatch> {
        let s = self.shared()?;
        // A revision behind the cursor: the server lost changes it had
        // reported (a failover to a replica that lagged, a restore), and
        // the stream will not repeat what it now holds at those
        // revisions. A cluster client reconnects to the new primary by
        // itself, so no error tells the watch.
        let revision: u64 = op(&s, &["reap"]).await?;
        if revision < after {
            return Ok(InstanceBatch::Gap);
        }
        let entries = self.read(&s, after).await?;
        // Revisions are consecutive: a first entry beyond the next one
        // means the stream was trimmed past us.
        let first = entries.first().and_then(|e| stream_rev(&e.id));
        if first.is_some_and(|rev| rev > after + 1) {
            return Ok(InstanceBatch::Gap);
        }
        let changes = entries.iter().filter_map(|e| self.change(e)).collect();
        // Entries of other services still move the cursor.
        let upto = entries.last().and_then(|e| stream_rev(&e.id)).unwrap_or(0);
        Ok(InstanceBatch::Changes { changes, upto })
    }
}

#[async_trait]
impl ServiceDiscovery for RedisDiscovery {
    fn capabilities(&self) -> RegistryCapabilities {
        RegistryCapabilities::default()
            .with_watch()
            .with_min_ttl(MIN_TTL)
    }

    async fn instances(&self, service: &str) -> Result<Vec<ServiceInstance>> {
        Ok(list(&self.shared, &format!("{service}/")).await?.1)
    }

    async fn watch(&self, service: &str) -> Result<ServiceEventStream> {
        let history = Instances {
            shared: Arc::downgrade(&self.shared),
            service: service.to_owned(),
            conn: None,
        };
        let client = &self.shared.client;
        spawn_watch(
            history,
            client.settings().retry.clone(),
            client.stop().clone(),
        )
        .await
    }
}

/// Removes an instance whoever holds it, as if its lease had expired.
pub(crate) async fn revoke(shared: &Shared, service: &str, id: &str) -> Result<bool> {
    let n: i64 = op(shared, &["remove", &sid(service, id), ""]).await?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use im_infra::backend::Backend;
    use im_infra_conformance::servers::{server_or_skip, REDIS_ENV};

    use super::*;

    /// Keep-alives run every third of a TTL: a TTL below 100 ms is raised
    /// to 100 ms, and discovery reports the TTL the instance is kept with.
    #[tokio::test]
    async fn a_ttl_under_100_ms_is_raised_to_100_ms() {
        let Some(url) = server_or_skip("redis", REDIS_ENV) else {
            return;
        };
        let ns = format!("t-min-ttl-{}", uuid::Uuid::new_v4().simple());
        let backend = crate::RedisBackend::builder()
            .url(url)
            .namespace(ns)
            .build()
            .await
            .unwrap();
        let (reg, disc) = (
            backend.registry().await.unwrap(),
            backend.discovery().await.unwrap(),
        );
        assert_eq!(disc.capabilities().min_ttl, MIN_TTL);
        for (id, ttl) in [("a", 99), ("b", 100)] {
            let instance = ServiceInstance::new("svc", id, "127.0.0.1:1");
            reg.register(&instance, Duration::from_millis(ttl))
                .await
                .unwrap();
        }
        let mut ttls: Vec<_> = disc
            .instances("svc")
            .await
            .unwrap()
            .into_iter()
            .map(|i| (i.id, i.ttl))
            .collect();
        ttls.sort();
        assert_eq!(
            ttls,
            [("a".into(), Some(MIN_TTL)), ("b".into(), Some(MIN_TTL))],
        );
        backend.close().await.unwrap();
    }
}
