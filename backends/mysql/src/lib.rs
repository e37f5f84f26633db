//! # im-infra-mysql
//!
//! The MySQL / MariaDB backend of im-infra, on `mysql_async`, and the
//! original system's `db` library ([`Db`]): a pooled connection with a
//! deadline, a `tracing` span and metrics around every query.
//!
//! | capability | how |
//! |---|---|
//! | `Cache` | one row per key, expiry by the server's `NOW(6)`, expired rows never returned and purged in the background |
//! | `Limiter` | GCRA state per key, read and updated by one `INSERT ... ON DUPLICATE KEY UPDATE` in one round trip; failure policy while the database is unreachable |
//! | `DistributedLock` | row lease (owner, expiry on the server's clock), fencing counter bumped by every acquisition, renewal, owner-only release |
//! | `Once` | one row per key; claim, complete and abandon are single statements |
//! | `ConfigCenter` | values with versions, compare-and-set, a change log (auto-increment id = version) that watches poll and resume from |
//! | `WorkerIdAllocator` | one leased row per id |
//!
//! Registry, discovery and messaging are not offered (they answer
//! `Unsupported`). The backend creates and upgrades its tables itself
//! ([`SCHEMA_VERSION`]), under a configurable table prefix; every key
//! starts with the configured namespace.
//!
//! ```no_run
//! use std::time::Duration;
//! use bytes::Bytes;
//! use im_infra::prelude::*;
//! use im_infra_mysql::MysqlBackend;
//!
//! # async fn demo() -> im_infra::Result<()> {
//! let backend = MysqlBackend::builder()
//!     .url("mysql://app:secret@127.0.0.1:3306/im")
//!     .namespace("im-logic/")
//!     .build()
//!     .await?;
//! let cache = backend.cache().await?;
//! cache.set("k", Bytes::from_static(b"v"), Some(Duration::from_secs(60))).await?;
//! let locks = backend.lock().await?;
//! let guard = locks.acquire("orders/42", LockOptions::new(Duration::from_secs(10))).await?;
//! guard.release().await?;
//! backend.close().await
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod cache;
mod config_center;
mod db;
mod error;
mod limiter;
mod lock;
mod once;
mod purge;
mod schema;
mod settings;
mod shared;
#[cfg(feature = "testing")]
pub mod testing;
mod worker_id;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_infra::backend::{Backend, Capability, RawMaintenance};
use im_infra::cache::Cache;
use im_infra::config::ConfigCenter;
use im_infra::layer::{
    ObservedCache, ObservedConfigCenter, ObservedLimiter, ObservedLock, ObservedOnce,
    ObservedWorkerIds,
};
use im_infra::lock::DistributedLock;
use im_infra::once::Once;
use im_infra::ratelimit::{Limiter, Rules};
use im_infra::telemetry::OpMetrics;
use im_infra::uid::WorkerIdAllocator;
use im_infra::Result;

/// The client library, for [`Db::with_conn`] and [`Db::transaction`]
/// closures and anything else the wrapper does not offer.
pub use mysql_async;

use cache::MysqlCache;
use config_center::MysqlConfigCenter;
pub use db::Db;
use limiter::MysqlLimiter;
use lock::MysqlLock;
use once::MysqlOnce;
pub use schema::SCHEMA_VERSION;
pub use settings::{MysqlSettings, MysqlTls};
use worker_id::MysqlWorkerIds;

pub(crate) use shared::Shared;

/// The backend name used in metrics, spans and errors.
pub const NAME: &str = "mysql";

/// What the MySQL backend offers.
pub const CAPABILITIES: &[Capability] = &[
    Capability::Cache,
    Capability::Limiter,
    Capability::Lock,
    Capability::Config,
    Capability::Once,
    Capability::WorkerIds,
];

/// Builds a [`MysqlBackend`].
#[derive(Debug, Clone, Default)]
pub struct MysqlBackendBuilder {
    settings: MysqlSettings,
}

impl MysqlBackendBuilder {
    /// Uses `settings` (replacing what was set before).
    #[must_use]
    pub fn settings(mut self, settings: MysqlSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The server, as `mysql://user:password@host:port/database`.
    #[must_use]
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.settings.url = Some(url.into());
        self
    }

    /// The prefix of every stored key.
    #[must_use]
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.settings.namespace = ns.into();
        self
    }

    /// The prefix of the backend's tables (default `iminfra_`).
    #[must_use]
    pub fn table_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.settings.table_prefix = prefix.into();
        self
    }

    /// Bound of every query.
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

    /// Connections kept open and the most open at once.
    #[must_use]
    pub fn pool(mut self, min: usize, max: usize) -> Self {
        self.settings.pool_min = min;
        self.settings.pool_max = max;
        self
    }

    /// How often config watches look for changes.
    #[must_use]
    pub fn config_poll_interval(mut self, d: Duration) -> Self {
        self.settings.config_poll_interval = d;
        self
    }

    /// Connects, creates or upgrades the tables and starts the background
    /// purge. `InvalidConfig` for bad settings or credentials,
    /// `Unavailable`/`Timeout` when the server cannot be reached.
    pub async fn build(self) -> Result<MysqlBackend> {
        // The backend's own queries are untimed: the layers count them.
        let db = Db::open(self.settings, false).await?;
        let prefix = db.settings().table_prefix.clone();
        if let Err(e) = schema::migrate(&db, &prefix).await {
            let _ = db.close().await;
            return Err(e);
        }
        let shared = Arc::new(Shared::new(db));
        tokio::spawn(purge::run(Arc::downgrade(&shared)));
        Ok(MysqlBackend {
            db: Arc::new(shared.db.timed()),
            shared,
            health_check: OpMetrics::new(NAME, "backend", "backend.health_check"),
        })
    }
}

/// The MySQL backend. Cheap to clone; clones share the pool.
///
/// Its accessors hand out the raw capabilities wrapped in the layers of
/// [`im_infra::layer`] (argument checks, one span and the operation
/// metrics per call).
#[derive(Clone)]
pub struct MysqlBackend {
    shared: Arc<Shared>,
    /// The pool with the `db.*` telemetry, for the service's own queries.
    db: Arc<Db>,
    health_check: OpMetrics,
}

impl std::fmt::Debug for MysqlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlBackend")
            .field("settings", self.shared.settings())
            .finish()
    }
}

impl MysqlBackend {
    /// A builder with default settings.
    pub fn builder() -> MysqlBackendBuilder {
        MysqlBackendBuilder::default()
    }

    /// The settings in force.
    pub fn settings(&self) -> &MysqlSettings {
        self.shared.settings()
    }

    /// The pooled connection, for the service's own queries (each one
    /// span and counted as `db.*`).
    pub fn db(&self) -> &Db {
        &self.db
    }

    fn check_open(&self) -> Result<()> {
        self.shared.check_open()
    }

    /// Runs one pass of the background purge now; returns the rows deleted.
    /// One span, counted as `backend.purge_expired`.
    pub async fn purge_expired(&self) -> Result<u64> {
        OpMetrics::new(NAME, "backend", "backend.purge_expired")
            .run(purge::purge_once(&self.shared))
            .await
    }
}

/// Tear-down and fault injection (see [`Maintenance`](im_infra::backend::Maintenance)).
#[async_trait]
impl RawMaintenance for MysqlBackend {
    fn namespace(&self) -> Option<&str> {
        Some(&self.shared.settings().namespace)
    }

    /// Fault injection: deletes a worker-id lease as if it had expired.
    async fn revoke_worker_id(&self, id: u64) -> Result<bool> {
        worker_id::revoke(&self.shared, id).await
    }

    /// Deletes the whole config change log, so that watches resuming from
    /// an older version must resynchronise from the current state.
    async fn compact_config_history(&self) -> Result<()> {
        config_center::compact(&self.shared).await.map(drop)
    }

    /// Deletes every row of the namespace.
    async fn purge_namespace(&self) -> Result<u64> {
        let s = &self.shared;
        let (low, high) = s.key_range("");
        let mut deleted = 0;
        for table in ["cache", "config", "config_log", "locks", "once", "limiter"] {
            let sql = format!("DELETE FROM {} WHERE k >= ? AND k < ?", s.table(table));
            deleted += s.db.exec(&sql, (low.as_slice(), high.as_slice())).await?;
        }
        let sql = format!("DELETE FROM {} WHERE ns = ?", s.table("workers"));
        deleted += s.db.exec(&sql, (s.ns(),)).await?;
        Ok(deleted)
    }
}

#[async_trait]
impl Backend for MysqlBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> &'static [Capability] {
        CAPABILITIES
    }

    async fn cache(&self) -> Result<Arc<dyn Cache>> {
        self.check_open()?;
        let raw = MysqlCache::new(self.shared.clone());
        Ok(Arc::new(ObservedCache::new(NAME, raw)))
    }

    async fn limiter(&self, rules: Rules) -> Result<Arc<dyn Limiter>> {
        self.check_open()?;
        let primary = Arc::new(MysqlLimiter::new(self.shared.clone(), &rules)?);
        Ok(Arc::new(ObservedLimiter::new(
            NAME,
            self.shared.limiter_fallback.guard(primary, rules),
        )))
    }

    async fn lock(&self) -> Result<Arc<dyn DistributedLock>> {
        self.check_open()?;
        let raw = MysqlLock::new(self.shared.clone());
        Ok(Arc::new(ObservedLock::new(NAME, raw)))
    }

    async fn config(&self) -> Result<Arc<dyn ConfigCenter>> {
        self.check_open()?;
        let raw = MysqlConfigCenter::new(self.shared.clone());
        Ok(Arc::new(ObservedConfigCenter::new(NAME, raw)))
    }

    async fn once(&self) -> Result<Arc<dyn Once>> {
        self.check_open()?;
        let raw = MysqlOnce::new(self.shared.clone());
        Ok(Arc::new(ObservedOnce::new(NAME, raw)))
    }

    async fn worker_ids(&self) -> Result<Arc<dyn WorkerIdAllocator>> {
        self.check_open()?;
        let raw = MysqlWorkerIds::new(self.shared.clone());
        Ok(Arc::new(ObservedWorkerIds::new(NAME, raw)))
    }

    async fn health_check(&self) -> Result<()> {
        self.health_check.run(self.shared.db.health_check()).await
    }

    /// Stops the background work (purge, config watches, lock waits),
    /// then closes the pool. Nothing it hands out needs closing first: it
    /// has no registry, and the leases of held locks, once claims and
    /// worker ids end at their next renewal (`Closed`), their rows
    /// expiring on the server's clock. Concurrent and later calls wait for
    /// the first and answer what it answered.
    async fn close(&self) -> Result<()> {
        let shared = &self.shared;
        shared
            .handed_out
            .close_once(async {
                shared.shutdown.close();
                shared.db.close().await
            })
            .await
    }
}
