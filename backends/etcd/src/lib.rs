//! # im-infra-etcd
//!
//! The etcd backend of im-infra: the coordinator of the original system.
//!
//! | capability | how |
//! |---|---|
//! | `DistributedLock` | etcd's mutex recipe (waiter keys ordered by create revision, each watching its predecessor): fair, fenced by create revision, compatible with `etcdctl lock` and Go's `concurrency.Mutex` |
//! | `ConfigCenter` | plain JSON keys (`etcdctl`-readable), version = mod revision, CAS by transaction, watches that resume after disconnects and resynchronise after compaction |
//! | `ServiceRegistry` / `ServiceDiscovery` | lease-backed instances, re-registered forever after a lost lease, prefix watches |
//! | `Once`, `WorkerIdAllocator` | transactions on lease-backed keys |
//!
//! and the etcd-specific surface of the original component:
//! [`EtcdBackendBuilder`] (endpoints, dial timeout, auth, TLS, default TTL,
//! prefixes, health checks, retry), presets ([`EtcdBackend::quick_start`],
//! [`EtcdBackend::development`], ...), configuration loaded with priority
//! arguments > file > environment > defaults ([`EtcdSettings::load`]), the
//! [`LeaseManager`] and the [`ConnectionManager`].
//!
//! ```no_run
//! use std::time::Duration;
//! use im_infra::backend::Backend;
//! use im_infra::lock::LockExt;
//! use im_infra_etcd::EtcdBackend;
//!
//! # async fn demo() -> im_infra::Result<()> {
//! let etcd = EtcdBackend::builder()
//!     .endpoints(["http://127.0.0.1:2379"])
//!     .dial_timeout(Duration::from_secs(5))
//!     .service_prefix("/prod/services")
//!     .build()
//!     .await?;
//! let guard = etcd.lock().await?.lock("jobs/nightly", Duration::from_secs(30)).await?;
//! println!("fencing token {}", guard.fencing_token());
//! guard.release().await?;
//! etcd.close().await
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod config_center;
mod connection;
mod error;
mod lease;
mod lock;
mod once;
mod registry;
mod settings;
#[cfg(feature = "testing")]
pub mod testing;
mod worker_id;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_infra::backend::{Backend, Capability, HandedOut, RawMaintenance};
use im_infra::config::ConfigCenter;
use im_infra::layer::{
    ObservedConfigCenter, ObservedDiscovery, ObservedLock, ObservedOnce, ObservedRegistry,
    ObservedWorkerIds,
};
use im_infra::lock::DistributedLock;
use im_infra::once::Once;
use im_infra::registry::{ServiceDiscovery, ServiceRegistry};
use im_infra::secret::Secret;
use im_infra::telemetry::OpMetrics;
use im_infra::uid::WorkerIdAllocator;
use im_infra::{Result, RetrySettings};

use config_center::EtcdConfigCenter;
pub use connection::{ConnectionManager, ConnectionStatus};
pub use error::ErrorCategory;
pub use lease::{KeepAlive, LeaseInfo, LeaseManager, MIN_TTL};
use lock::EtcdLock;
use once::EtcdOnce;
use registry::{EtcdDiscovery, EtcdRegistry};
pub use settings::{EtcdSettings, TlsFiles, SETTINGS_FILES};
use worker_id::EtcdWorkerIds;

/// The backend name used in metrics, spans and errors.
pub const NAME: &str = "etcd";

/// What the etcd backend offers.
pub const CAPABILITIES: &[Capability] = &[
    Capability::Lock,
    Capability::Config,
    Capability::Registry,
    Capability::Once,
    Capability::WorkerIds,
];

/// Builds an [`EtcdBackend`]: the original `ManagerBuilder`.
#[derive(Debug, Clone, Default)]
pub struct EtcdBackendBuilder {
    settings: Option<EtcdSettings>,
    file: Option<std::path::PathBuf>,
    endpoints: Option<Vec<String>>,
    dial_timeout: Option<Duration>,
    request_timeout: Option<Duration>,
    auth: Option<(String, Secret)>,
    tls: Option<TlsFiles>,
    default_ttl: Option<Duration>,
    service_prefix: Option<String>,
    lock_prefix: Option<String>,
    namespace: Option<String>,
    health: Option<(Duration, Duration)>,
    retry: Option<RetrySettings>,
}

impl EtcdBackendBuilder {
    /// Starts from `settings` instead of loading file and environment.
    #[must_use]
    pub fn settings(mut self, settings: EtcdSettings) -> Self {
        self.settings = Some(settings);
        self
    }

    /// Loads this file (JSON or YAML) instead of looking for one.
    #[must_use]
    pub fn settings_file(mut self, path: impl AsRef<Path>) -> Self {
        self.file = Some(path.as_ref().to_path_buf());
        self
    }

    /// The members' client URLs.
    #[must_use]
    pub fn endpoints<S: Into<String>>(mut self, endpoints: impl IntoIterator<Item = S>) -> Self {
        self.endpoints = Some(endpoints.into_iter().map(Into::into).collect());
        self
    }

    /// Bound of connecting.
    #[must_use]
    pub fn dial_timeout(mut self, d: Duration) -> Self {
        self.dial_timeout = Some(d);
        self
    }

    /// Bound of every request.
    #[must_use]
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.request_timeout = Some(d);
        self
    }

    /// User and password.
    #[must_use]
    pub fn auth(mut self, username: impl Into<String>, password: impl Into<Secret>) -> Self {
        self.auth = Some((username.into(), password.into()));
        self
    }

    /// TLS files.
    #[must_use]
    pub fn tls(mut self, tls: TlsFiles) -> Self {
        self.tls = Some(tls);
        self
    }

    /// TTL of registrations without one.
    #[must_use]
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = Some(ttl);
        self
    }

    /// Prefix of registered services.
    #[must_use]
    pub fn service_prefix(mut self, p: impl Into<String>) -> Self {
        self.service_prefix = Some(p.into());
        self
    }

    /// Prefix of locks.
    #[must_use]
    pub fn lock_prefix(mut self, p: impl Into<String>) -> Self {
        self.lock_prefix = Some(p.into());
        self
    }

    /// Prefix of every key.
    #[must_use]
    pub fn namespace(mut self, ns: impl Into<String>) -> Self {
        self.namespace = Some(ns.into());
        self
    }

    /// Background health-check interval and timeout.
    #[must_use]
    pub fn health_check(mut self, interval: Duration, timeout: Duration) -> Self {
        self.health = Some((interval, timeout));
        self
    }

    /// Backoff of reconnections and re-registrations.
    #[must_use]
    pub fn retry(mut self, retry: RetrySettings) -> Self {
        self.retry = Some(retry);
        self
    }

    /// The effective configuration: the given one (or defaults, environment
    /// and file, in rising priority), then this builder's arguments.
    pub fn resolve(&self) -> Result<EtcdSettings> {
        let mut cfg = match &self.settings {
            Some(c) => c.clone(),
            None => EtcdSettings::load(self.file.as_deref())?,
        };
        if let Some(v) = &self.endpoints {
            cfg.endpoints = v.clone();
        }
        if let Some(v) = self.dial_timeout {
            cfg.dial_timeout = v;
        }
        if let Some(v) = self.request_timeout {
            cfg.request_timeout = v;
        }
        if let Some((u, p)) = &self.auth {
            cfg.username = Some(u.clone());
            cfg.password = Some(p.clone());
        }
        if let Some(v) = &self.tls {
            cfg.tls = Some(v.clone());
        }
        if let Some(v) = self.default_ttl {
            cfg.default_ttl = v;
        }
        if let Some(v) = &self.service_prefix {
            cfg.service_prefix = v.clone();
        }
        if let Some(v) = &self.lock_prefix {
            cfg.lock_prefix = v.clone();
        }
        if let Some(v) = &self.namespace {
            cfg.namespace = v.clone();
        }
        if let Some((i, t)) = self.health {
            cfg.health_check_interval = i;
            cfg.health_check_timeout = t;
        }
        if let Some(r) = &self.retry {
            cfg.retry = r.clone();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Connects and checks etcd within the dial timeout.
    pub async fn build(self) -> Result<EtcdBackend> {
        let cfg = self.resolve()?;
        let conn = Arc::new(ConnectionManager::new(cfg));
        conn.connect().await?;
        tokio::spawn(ConnectionManager::health_loop(Arc::downgrade(&conn)));
        let handed_out = Arc::new(HandedOut::new(NAME));
        Ok(EtcdBackend {
            leases: LeaseManager::new(conn.clone(), handed_out.clone()),
            conn,
            handed_out,
            health_check: OpMetrics::new(NAME, "backend", "backend.health_check"),
        })
    }
}

/// The etcd backend (the original `EtcdManager`). Cheap to clone.
///
/// Its accessors hand out the raw capabilities wrapped in the layers of
/// [`im_infra::layer`] (argument checks, one span and the operation
/// metrics per call). Registries and lease keep-alives it handed out are
/// closed with it ([`HandedOut`]).
#[derive(Clone)]
pub struct EtcdBackend {
    conn: Arc<ConnectionManager>,
    /// Registries (deregistered on close) and keep-alives (stopped).
    handed_out: Arc<HandedOut>,
    leases: LeaseManager,
    health_check: OpMetrics,
}

impl std::fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("settings", self.conn.settings())
            .finish()
    }
}

impl EtcdBackend {
    /// A builder; without `settings` it loads file and environment.
    pub fn builder() -> EtcdBackendBuilder {
        EtcdBackendBuilder::default()
    }

    /// Connects with the configuration found (file, environment, defaults),
    /// overriding the endpoints when any are given.
    pub async fn quick_start<S: Into<String>>(
        endpoints: impl IntoIterator<Item = S>,
    ) -> Result<EtcdBackend> {
        let eps: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        let b = EtcdBackend::builder();
        if eps.is_empty() { b } else { b.endpoints(eps) }
            .build()
            .await
    }

    /// The development preset ([`EtcdSettings::development`]).
    pub async fn development() -> Result<EtcdBackend> {
        EtcdBackend::builder()
            .settings(EtcdSettings::development())
            .build()
            .await
    }

    /// The production preset ([`EtcdSettings::production`]).
    pub async fn production<S: Into<String>>(
        endpoints: impl IntoIterator<Item = S>,
    ) -> Result<EtcdBackend> {
        EtcdBackend::builder()
            .settings(EtcdSettings::production(endpoints))
            .build()
            .await
    }

    /// The test preset ([`EtcdSettings::testing`]) on `endpoints`.
    pub async fn testing<S: Into<String>>(
        endpoints: impl IntoIterator<Item = S>,
    ) -> Result<EtcdBackend> {
        EtcdBackend::builder()
            .settings(EtcdSettings::testing())
            .endpoints(endpoints)
            .build()
            .await
    }

    /// The settings in force.
    pub fn settings(&self) -> &EtcdSettings {
        self.conn.settings()
    }

    /// The connection manager.
    pub fn connection(&self) -> &ConnectionManager {
        &self.conn
    }

    /// The lease manager. Its keep-alives stop when the backend closes.
    pub fn leases(&self) -> LeaseManager {
        self.leases.clone()
    }

    /// The raw `etcd-client` client.
    pub fn client(&self) -> Result<etcd_client::Client> {
        self.conn.client()
    }
}

/// Tear-down and fault injection (see [`Maintenance`](im_infra::backend::Maintenance)).
#[async_trait]
impl RawMaintenance for EtcdBackend {
    fn namespace(&self) -> Option<&str> {
        Some(&self.conn.settings().namespace)
    }

    /// Fault injection: revokes the lease of a registered instance; its
    /// registry notices and registers it again.
    async fn revoke_registration(&self, service: &str, id: &str) -> Result<bool> {
        registry::revoke(&self.conn, service, id).await
    }

    /// Fault injection: revokes the lease of a worker id.
    async fn revoke_worker_id(&self, id: u64) -> Result<bool> {
        worker_id::revoke(&self.conn, id).await
    }

    /// Compacts etcd's history up to now (watches resuming from older
    /// revisions then resynchronise).
    async fn compact_config_history(&self) -> Result<()> {
        config_center::compact(&self.conn).await
    }

    /// Deletes every key under the namespace.
    async fn purge_namespace(&self) -> Result<u64> {
        let ns = self.conn.settings().namespace.clone();
        let r = self
            .conn
            .call("purge", |mut c| async move {
                c.delete(ns, Some(etcd_client::DeleteOptions::new().with_prefix()))
                    .await
            })
            .await?;
        Ok(u64::try_from(r.deleted()).unwrap_or(0))
    }
}

#[async_trait]
impl Backend for EtcdBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> &'static [Capability] {
        CAPABILITIES
    }

    async fn lock(&self) -> Result<Arc<dyn DistributedLock>> {
        self.conn.client()?;
        let raw = EtcdLock::new(self.conn.clone());
        Ok(Arc::new(ObservedLock::new(NAME, raw)))
    }

    async fn config(&self) -> Result<Arc<dyn ConfigCenter>> {
        self.conn.client()?;
        let raw = EtcdConfigCenter::new(self.conn.clone());
        Ok(Arc::new(ObservedConfigCenter::new(NAME, raw)))
    }

    async fn registry(&self) -> Result<Arc<dyn ServiceRegistry>> {
        self.conn.client()?;
        let raw = Arc::new(EtcdRegistry::new(self.conn.clone()));
        self.handed_out
            .track(&raw)
            .map_err(|e| e.with_backend(NAME))?;
        Ok(Arc::new(ObservedRegistry::new(NAME, raw)))
    }

    async fn discovery(&self) -> Result<Arc<dyn ServiceDiscovery>> {
        self.conn.client()?;
        let raw = EtcdDiscovery::new(self.conn.clone());
        Ok(Arc::new(ObservedDiscovery::new(NAME, raw)))
    }

    async fn once(&self) -> Result<Arc<dyn Once>> {
        self.conn.client()?;
        let raw = EtcdOnce::new(self.conn.clone());
        Ok(Arc::new(ObservedOnce::new(NAME, raw)))
    }

    async fn worker_ids(&self) -> Result<Arc<dyn WorkerIdAllocator>> {
        self.conn.client()?;
        let raw = EtcdWorkerIds::new(self.conn.clone());
        Ok(Arc::new(ObservedWorkerIds::new(NAME, raw)))
    }

    async fn health_check(&self) -> Result<()> {
        self.health_check.run(self.conn.check()).await
    }

    /// Deregisters what the registries handed out registered and stops the
    /// lease keep-alives ([`HandedOut::close_all`]), then closes the
    /// connection (watches and the health checker stop). Concurrent and
    /// later calls wait for the first and answer what it answered.
    async fn close(&self) -> Result<()> {
        self.handed_out
            .close_once(async {
                let handed_out = self.handed_out.close_all().await;
                self.conn.close();
                handed_out
            })
            .await
    }
}
