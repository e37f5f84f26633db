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
//! [`EtcdBackendBuilder`] (endpoints, connect timeout, auth, TLS, default TTL,
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
//!     .connect_timeout(Duration::from_secs(5))
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
/// The original system's error categories (now in `im_infra`, for every backend).
pub use im_infra::ErrorCategory;
pub use lease::{KeepAlive, LeaseInfo, LeaseManager, MIN_TTL};
use lock::EtcdLock;
use once::EtcdOnce;
use registry::EtcdDiscovery;
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

/// One of the builder's arguments, applied over the loaded settings.
type Edit = Arc<dyn Fn(&mut EtcdSettings) + Send + Sync>;

/// Builds an [`EtcdBackend`]: the original `ManagerBuilder`.
#[derive(Clone, Default)]
pub struct EtcdBackendBuilder {
    settings: Option<EtcdSettings>,
    file: Option<std::path::PathBuf>,
    /// The arguments, in the order given (a later one wins).
    edits: Vec<Edit>,
}

impl std::fmt::Debug for EtcdBackendBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdBackendBuilder")
            .field("settings", &self.settings)
            .field("file", &self.file)
            .field("arguments", &self.edits.len())
            .finish()
    }
}

impl EtcdBackendBuilder {
    fn edit(mut self, edit: impl Fn(&mut EtcdSettings) + Send + Sync + 'static) -> Self {
        self.edits.push(Arc::new(edit));
        self
    }

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
    pub fn endpoints<S: Into<String>>(self, endpoints: impl IntoIterator<Item = S>) -> Self {
        let endpoints: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        self.edit(move |s| s.endpoints = endpoints.clone())
    }

    /// Bound of connecting.
    #[must_use]
    pub fn connect_timeout(self, d: Duration) -> Self {
        self.edit(move |s| s.connect_timeout = d)
    }

    /// Bound of every request.
    #[must_use]
    pub fn request_timeout(self, d: Duration) -> Self {
        self.edit(move |s| s.request_timeout = d)
    }

    /// User and password.
    #[must_use]
    pub fn auth(self, username: impl Into<String>, password: impl Into<Secret>) -> Self {
        let (username, password) = (username.into(), password.into());
        self.edit(move |s| {
            s.username = Some(username.clone());
            s.password = Some(password.clone());
        })
    }

    /// TLS files.
    #[must_use]
    pub fn tls(self, tls: TlsFiles) -> Self {
        self.edit(move |s| s.tls = Some(tls.clone()))
    }

    /// TTL of registrations without one.
    #[must_use]
    pub fn default_ttl(self, ttl: Duration) -> Self {
        self.edit(move |s| s.default_ttl = ttl)
    }

    /// Prefix of registered services.
    #[must_use]
    pub fn service_prefix(self, p: impl Into<String>) -> Self {
        let p = p.into();
        self.edit(move |s| s.service_prefix = p.clone())
    }

    /// Prefix of locks.
    #[must_use]
    pub fn lock_prefix(self, p: impl Into<String>) -> Self {
        let p = p.into();
        self.edit(move |s| s.lock_prefix = p.clone())
    }

    /// Prefix of every key.
    #[must_use]
    pub fn namespace(self, ns: impl Into<String>) -> Self {
        let ns = ns.into();
        self.edit(move |s| s.namespace = ns.clone())
    }

    /// Background health-check interval and timeout.
    #[must_use]
    pub fn health_check(self, interval: Duration, timeout: Duration) -> Self {
        self.edit(move |s| {
            s.health_check_interval = interval;
            s.health_check_timeout = timeout;
        })
    }

    /// Backoff of reconnections and re-registrations.
    #[must_use]
    pub fn retry(self, retry: RetrySettings) -> Self {
        self.edit(move |s| s.retry = retry.clone())
    }

    /// The effective configuration: the given one (or defaults, environment
    /// and file, in rising priority), then this builder's arguments.
    pub fn resolve(&self) -> Result<EtcdSettings> {
        let mut settings = match &self.settings {
            Some(c) => c.clone(),
            None => EtcdSettings::load(self.file.as_deref())?,
        };
        for edit in &self.edits {
            edit(&mut settings);
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Connects and checks etcd within the connect timeout.
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
        let raw = Arc::new(registry::registry(self.conn.clone()));
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
