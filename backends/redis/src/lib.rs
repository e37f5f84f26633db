//! # im-infra-redis
//!
//! The Redis backend of im-infra, on the `redis` crate (Tokio, a
//! reconnecting multiplexed `ConnectionManager`, or a cluster connection):
//!
//! | capability | how |
//! |---|---|
//! | `Cache` | strings with `PX` TTLs; `MGET`; one pipeline for `set_many`; `GET` and `PTTL` of every key of `get_many_with_ttl` in one script call (`EVALSHA`, reloaded on `NOSCRIPT`; one call per key on a cluster) |
//! | `Limiter` | GCRA in one Lua script (`EVALSHA`, reloaded on `NOSCRIPT`) on the server's `TIME`; failure policy (fail-open, fail-closed, local limiter) while Redis is unreachable |
//! | `DistributedLock` | owner token + Lua; fencing token from a per-key counter in the acquire script, never below the server's clock in µs (see below); renewal; release notifications by pub/sub |
//! | `Once` | one hash per key, claim/complete/abandon in Lua |
//! | `ConfigCenter` | values + versions in a hash, a revision counter (never below the server's clock in µs), a change stream that watches resume from and resynchronise on |
//! | `ServiceRegistry` / `ServiceDiscovery` | instances with server-clock expiries, keep-alive, re-registration, change stream |
//! | `WorkerIdAllocator` | one key per id with an expiry, renewed |
//!
//! Every key starts with the configured namespace; keys a script touches
//! together share a Redis Cluster hash tag.
//!
//! The server is one node, a Redis Cluster, or the primary that Redis
//! Sentinel names ([`RedisSettings::sentinels`]): the sentinels are asked
//! again whenever the primary fails or refuses writes, so the backend
//! follows a failover to a promoted replica without a restart; commands
//! fail retryably while the sentinels name no primary.
//!
//! ## When Redis loses acknowledged writes
//!
//! Redis acknowledges a write before it is on disk or on a replica: a
//! restart from an older RDB/AOF file, or a failover to a replica that was
//! behind, brings back older data. What clients were told still holds:
//!
//! - **Fencing tokens** never repeat or go back. The acquire script issues
//!   `max(last token + 1, server clock in microseconds since 1970)` (about
//!   1.8e15: exact in a Lua number, below 2^53, a `u64` in Rust) and stores
//!   it back as the counter: strictly increasing while the data lasts, and
//!   after the data went back, still larger than every token issued before
//!   — **as long as the clock of the server that comes back (the restarted
//!   one, or the promoted replica) does not read earlier than the clock of
//!   the server that issued those tokens** did when it issued them. Keep
//!   the servers' clocks synchronised (NTP slewing, never stepping back by
//!   more than the time a restore or failover takes); a clock that steps
//!   back across the restore can make a token repeat. Tokens are no longer
//!   consecutive (a gap is the time between acquisitions); only their order
//!   is meaningful.
//! - **Config versions** come from a revision counter with the same rule,
//!   so they keep increasing for clients across such a loss (compare-and-set
//!   and "newer version wins" consumers keep working), under the same clock
//!   condition. A config watch that finds the server's history behind its
//!   cursor, or no longer continuing from it, re-reads the current state,
//!   reports every key that may differ from what it delivered (also keys
//!   whose lost changes took them to versions the server no longer has) and
//!   continues from the server's revision.
//!
//! Everything acknowledged after the older data was written is still lost:
//! locks granted then are free again (their holders' later writes are
//! fenced off by the larger tokens), and config changes made then are gone.
//! How much can be lost is Redis's persistence setting (`appendonly yes`
//! with `appendfsync always`, or `everysec`: up to about a second).
//!
//! ```no_run
//! use std::time::Duration;
//! use bytes::Bytes;
//! use im_infra::prelude::*;
//! use im_infra_redis::RedisBackend;
//!
//! # async fn demo() -> im_infra::Result<()> {
//! let backend = RedisBackend::builder()
//!     .url("redis://127.0.0.1:6379/0")
//!     .namespace("im-logic")
//!     .build()
//!     .await?;
//! let cache = backend.cache().await?;
//! cache.set("k", Bytes::from_static(b"v"), Some(Duration::from_secs(60))).await?;
//! let limiter = backend.limiter(Rules::single("login", Rule::per_minute(5))?).await?;
//! let _ok = limiter.allow("login", "alice").await;
//! backend.close().await
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod cache;
mod client;
mod config_center;
mod error;
mod keys;
mod limiter;
mod lock;
mod once;
mod registry;
mod sentinel;
mod settings;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(feature = "near-cache")]
mod topology;
#[cfg(feature = "near-cache")]
mod tracking;
mod worker_id;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_infra::backend::{Backend, Capability, HandedOut, RawMaintenance};
use im_infra::cache::Cache;
use im_infra::config::ConfigCenter;
use im_infra::layer::{
    ObservedCache, ObservedConfigCenter, ObservedDiscovery, ObservedLimiter, ObservedLock,
    ObservedOnce, ObservedRegistry, ObservedWorkerIds,
};
use im_infra::lock::DistributedLock;
use im_infra::once::Once;
use im_infra::ratelimit::{Limiter, LimiterFallback, Rules};
use im_infra::registry::{ServiceDiscovery, ServiceRegistry};
use im_infra::secret::Secret;
use im_infra::telemetry::OpMetrics;
use im_infra::uid::WorkerIdAllocator;
use im_infra::Result;

use cache::RedisCache;
use config_center::RedisConfigCenter;
use lock::RedisLock;
use once::RedisOnce;
use registry::RedisDiscovery;
use worker_id::RedisWorkerIds;

pub use limiter::{gcra_script, RedisLimiter};
pub use settings::{RedisSettings, RedisTls};
#[cfg(feature = "near-cache")]
pub use tracking::{TRACKING_CLIENT_NAME, TRACKING_HEARTBEAT};

/// The backend name used in metrics, spans and errors.
pub const NAME: &str = "redis";

/// What the Redis backend offers.
pub const CAPABILITIES: &[Capability] = &[
    Capability::Cache,
    Capability::Limiter,
    Capability::Lock,
    Capability::Config,
    Capability::Registry,
    Capability::Once,
    Capability::WorkerIds,
];

/// State shared by every handle of one backend instance.
pub(crate) struct Shared {
    client: client::Client,
    keys: keys::Keys,
    notifier: lock::ReleaseNotifier,
    /// What was handed out that closes with the backend (registries).
    handed_out: HandedOut,
    /// The backend's own operation (capability `backend`).
    health_check: OpMetrics,
    /// The limiters' failure policy (one local budget for all of them).
    limiter_fallback: LimiterFallback,
}

/// Builds a [`RedisBackend`].
#[derive(Debug, Clone, Default)]
pub struct RedisBackendBuilder {
    settings: RedisSettings,
}

impl RedisBackendBuilder {
    /// Uses `settings` (replacing what was set before).
    #[must_use]
    pub fn settings(mut self, settings: RedisSettings) -> Self {
        self.settings = settings;
        self
    }

    /// One server URL (`redis://` or `rediss://`).
    #[must_use]
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.settings.urls = vec![url.into()];
        self
    }

    /// Several cluster seed URLs.
    #[must_use]
    pub fn cluster<S: Into<String>>(mut self, urls: impl IntoIterator<Item = S>) -> Self {
        self.settings.urls = urls.into_iter().map(Into::into).collect();
        self.settings.cluster = true;
        self
    }

    /// Redis Sentinel: the sentinels' URLs and the name they monitor the
    /// primary under. The backend connects to the primary they name and
    /// asks them again when it fails, following a failover without a
    /// restart ([`RedisSettings::sentinels`]).
    #[must_use]
    pub fn sentinel<S: Into<String>>(
        mut self,
        sentinels: impl IntoIterator<Item = S>,
        master_name: impl Into<String>,
    ) -> Self {
        self.settings.sentinels = sentinels.into_iter().map(Into::into).collect();
        self.settings.master_name = Some(master_name.into());
        self
    }

    /// ACL user and password.
    #[must_use]
    pub fn auth(mut self, username: impl Into<String>, password: impl Into<Secret>) -> Self {
        self.settings.username = Some(username.into());
        self.settings.password = Some(password.into());
        self
    }

    /// The key prefix.
    #[must_use]
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.settings.namespace = ns.into();
        self
    }

    /// Bound of every command.
    #[must_use]
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.settings.request_timeout = d;
        self
    }

    /// Bound of establishing a connection.
    #[must_use]
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.settings.connect_timeout = d;
        self
    }

    /// Connects; `InvalidConfig` for bad settings, `Connection`/`Timeout`
    /// when Redis cannot be reached.
    pub async fn build(self) -> Result<RedisBackend> {
        let client = client::Client::connect(self.settings).await?;
        let keys = keys::Keys::new(client.ns());
        let limiter_fallback = LimiterFallback::new(
            NAME,
            client.settings().limiter_probe_interval,
            client.settings().request_timeout,
            client.stop().clone(),
        );
        Ok(RedisBackend {
            shared: Arc::new(Shared {
                client,
                keys,
                limiter_fallback,
                notifier: lock::ReleaseNotifier::default(),
                handed_out: HandedOut::new(NAME),
                health_check: OpMetrics::new(NAME, "backend", "backend.health_check"),
            }),
        })
    }
}

/// The Redis backend. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RedisBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("settings", self.shared.client.settings())
            .finish()
    }
}

impl RedisBackend {
    /// A builder with default settings.
    pub fn builder() -> RedisBackendBuilder {
        RedisBackendBuilder::default()
    }

    /// The settings in force.
    pub fn settings(&self) -> &RedisSettings {
        self.shared.client.settings()
    }

    /// The invalidations of this backend's cache for a
    /// [`NearCache`](im_infra::cache::near::NearCache): Redis's client-side
    /// caching in broadcast mode over the namespace's cache keys, on a
    /// RESP3 connection of its own (feature `near-cache`). Each call gives a
    /// new source, for one near cache; a second near cache on the same
    /// source is refused (`InvalidState`). On Redis Cluster there is one
    /// such connection to every primary (`CLUSTER NODES`); a change of
    /// primaries (a failover, a node added) or a tracked node that turns
    /// replica (also behind Sentinel, checked with `ROLE`) empties the
    /// near cache until the connections are made again. The backend's
    /// credentials and TLS settings apply to these connections too; its
    /// user needs `CLIENT` and `PING`, `ROLE` behind Sentinel or on a
    /// cluster, and `CLUSTER NODES` on a cluster.
    ///
    /// ```no_run
    /// # async fn demo(redis: im_infra_redis::RedisBackend) -> im_infra::Result<()> {
    /// use im_infra::backend::Backend;
    /// use im_infra::cache::near::NearCache;
    /// let near = NearCache::builder(redis.cache().await?)
    ///     .invalidation(redis.invalidations())
    ///     .build()
    ///     .await?;
    /// # let _ = near; Ok(()) }
    /// ```
    #[cfg(feature = "near-cache")]
    pub fn invalidations(&self) -> Arc<dyn im_infra::cache::near::InvalidationSource> {
        Arc::new(tracking::RedisInvalidations::new(self.shared.clone()))
    }

    /// The distributed limiter without the failure policy and without the
    /// layer (no argument checks, no telemetry): what the benchmarks
    /// compare with the raw script. Hand out [`Backend::limiter`] instead.
    pub fn limiter_without_policy(&self, rules: &Rules) -> RedisLimiter {
        RedisLimiter::new(self.shared.clone(), rules)
    }
}

/// Tear-down and fault injection (see [`Maintenance`](im_infra::backend::Maintenance)).
#[async_trait]
impl RawMaintenance for RedisBackend {
    fn namespace(&self) -> Option<&str> {
        Some(&self.shared.client.settings().namespace)
    }

    /// Fault injection: removes a registered instance as if its lease had
    /// expired. Its registry notices and registers it again.
    async fn revoke_registration(&self, service: &str, id: &str) -> Result<bool> {
        registry::revoke(&self.shared, service, id).await
    }

    /// Fault injection: deletes a worker-id lease as if it had expired.
    async fn revoke_worker_id(&self, id: u64) -> Result<bool> {
        worker_id::revoke(&self.shared, id).await
    }

    /// Trims the config change stream to nothing, so that watches resuming
    /// from an older version must resynchronise from the current state.
    async fn compact_config_history(&self) -> Result<()> {
        let shared = &self.shared;
        let mut xtrim = redis::cmd("XTRIM");
        xtrim.arg(shared.keys.cfg("log")).arg("MAXLEN").arg(0);
        shared.client.query::<i64>(&xtrim).await.map(drop)
    }

    /// Deletes every key of the namespace.
    async fn purge_namespace(&self) -> Result<u64> {
        self.purge().await
    }
}

impl RedisBackend {
    async fn purge(&self) -> Result<u64> {
        let (client, all) = (&self.shared.client, self.shared.keys.all());
        if client.settings().is_cluster() {
            // SCAN walks one node; KEYS is sent to every primary and the
            // answers combined (a tear-down tool, not a hot path).
            let keys: Vec<String> = client.query(redis::cmd("KEYS").arg(&all)).await?;
            for chunk in keys.chunks(500) {
                // Split by slot by the client.
                let _: u64 = client.query(redis::cmd("UNLINK").arg(chunk)).await?;
            }
            return Ok(keys.len() as u64);
        }
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&all)
                .arg("COUNT")
                .arg(500);
            let (next, keys): (u64, Vec<String>) = client.query(&scan).await?;
            if !keys.is_empty() {
                let mut p = redis::pipe();
                for k in &keys {
                    p.cmd("UNLINK").arg(k).ignore();
                }
                client.pipe::<()>(&p).await?;
                deleted += keys.len() as u64;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    async fn ping(&self) -> Result<()> {
        let pong: String = self.shared.client.query(&redis::cmd("PING")).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(im_infra::Error::new(
                im_infra::ErrorKind::Internal,
                format!("PING answered {pong:?}"),
            ))
        }
    }
}

#[async_trait]
impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> &'static [Capability] {
        CAPABILITIES
    }

    async fn cache(&self) -> Result<Arc<dyn Cache>> {
        self.shared.client.check_open()?;
        let raw = RedisCache::new(self.shared.clone());
        Ok(Arc::new(ObservedCache::new(NAME, raw)))
    }

    async fn limiter(&self, rules: Rules) -> Result<Arc<dyn Limiter>> {
        self.shared.client.check_open()?;
        let primary = Arc::new(RedisLimiter::new(self.shared.clone(), &rules));
        let guarded = self.shared.limiter_fallback.guard(primary, rules);
        Ok(Arc::new(ObservedLimiter::new(NAME, guarded)))
    }

    async fn lock(&self) -> Result<Arc<dyn DistributedLock>> {
        self.shared.client.check_open()?;
        let raw = RedisLock::new(self.shared.clone());
        Ok(Arc::new(ObservedLock::new(NAME, raw)))
    }

    async fn config(&self) -> Result<Arc<dyn ConfigCenter>> {
        self.shared.client.check_open()?;
        let raw = RedisConfigCenter::new(self.shared.clone());
        Ok(Arc::new(ObservedConfigCenter::new(NAME, raw)))
    }

    async fn registry(&self) -> Result<Arc<dyn ServiceRegistry>> {
        self.shared.client.check_open()?;
        let raw = Arc::new(registry::registry(self.shared.clone()));
        self.shared
            .handed_out
            .track(&raw)
            .map_err(|e| e.with_backend(NAME))?;
        Ok(Arc::new(ObservedRegistry::new(NAME, raw)))
    }

    async fn discovery(&self) -> Result<Arc<dyn ServiceDiscovery>> {
        self.shared.client.check_open()?;
        let raw = RedisDiscovery::new(self.shared.clone());
        Ok(Arc::new(ObservedDiscovery::new(NAME, raw)))
    }

    async fn once(&self) -> Result<Arc<dyn Once>> {
        self.shared.client.check_open()?;
        let raw = RedisOnce::new(self.shared.clone());
        Ok(Arc::new(ObservedOnce::new(NAME, raw)))
    }

    async fn worker_ids(&self) -> Result<Arc<dyn WorkerIdAllocator>> {
        self.shared.client.check_open()?;
        let raw = RedisWorkerIds::new(self.shared.clone());
        Ok(Arc::new(ObservedWorkerIds::new(NAME, raw)))
    }

    async fn health_check(&self) -> Result<()> {
        self.shared.health_check.run(self.ping()).await
    }

    /// Deregisters what every registry handed out registered, then closes
    /// the connection and stops background work. Concurrent and later
    /// calls wait for the first and answer what it answered.
    async fn close(&self) -> Result<()> {
        let shared = &self.shared;
        shared
            .handed_out
            .close_once(async {
                let handed_out = shared.handed_out.close_all().await;
                shared.client.close();
                handed_out
            })
            .await
    }
}
