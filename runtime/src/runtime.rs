//! [`Runtime`]: two-phase start-up, the typed handles, graceful shutdown.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use im_infra::backend::Backend;
use im_infra::cache::Cache;
use im_infra::config::{ConfigCenter, ConfigManager, ConfigManagerBuilder};
use im_infra::lock::DistributedLock;
use im_infra::mq::{Consumer, ConsumerSettings, Producer};
use im_infra::once::Once;
use im_infra::ratelimit::{Limiter, LimiterSettings, Rules};
use im_infra::registry::{ServiceDiscovery, ServiceRegistry};
use im_infra::settings::Settings;
use im_infra::uid::WorkerIdAllocator;
use im_infra::{Error, ErrorKind, Result};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::composition::{BackendKind, Composition, Role};
use crate::connect::{connect, Lookup};
use crate::log::{self, LogSettings};
use crate::metrics::{Endpoint, MetricsSettings, Readiness};
use crate::settings::{CoordinatorPolicy, RuntimeSettings};
use crate::sources::Sources;
use crate::tracked::{TrackedLocks, TrackedRegistry};

/// How a service's `main` is started: the service name, then where its
/// configuration comes from.
///
/// ```no_run
/// # async fn demo() -> im_infra::Result<()> {
/// let runtime = im_infra_runtime::Runtime::builder("im-logic")
///     .config_file("im-logic.yaml")
///     .start()
///     .await?;
/// # let _ = runtime; Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RuntimeBuilder {
    service: String,
    sources: Sources,
    logging: bool,
}

impl RuntimeBuilder {
    /// Reads the configuration file `path` (YAML, or JSON when it ends in
    /// `.json`) instead of the one `IMINFRA_CONFIG` names.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.sources.file = Some(path.into());
        self
    }

    /// Sets a section in code (`"backends"`, `"redis"`, `"clog"`, …): the
    /// base the file and the environment override.
    ///
    /// ```
    /// let b = im_infra_runtime::Runtime::builder("im-logic")
    ///     .section("backends", serde_json::json!({"cache": "redis"}))
    ///     .section("redis", serde_json::json!({"url": "redis://127.0.0.1:6379"}));
    /// # let _ = b;
    /// ```
    pub fn section(mut self, name: &str, value: impl Serialize) -> Self {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        let mut section = Map::from_iter([(name.to_owned(), value)]);
        // Each call is a source of its own; a call that gives a field by
        // both names is reported when the configuration is loaded.
        let _ = crate::sources::use_current_names(&mut section);
        crate::sources::merge(&mut self.sources.code, section);
        self
    }

    /// Declares a section of the service's own, `name`: the file and
    /// `IMINFRA_<NAME>__<FIELD>` variables may then set it, and
    /// [`Runtime::settings`] reads it by the one convention (config center,
    /// then the local section, then the defaults). Without the declaration
    /// a section of that name is an unknown-section error.
    ///
    /// ```
    /// let b = im_infra_runtime::Runtime::builder("im-logic")
    ///     .component("chat")
    ///     .section("chat", serde_json::json!({"topic": "chat.messages"}));
    /// # let _ = b;
    /// ```
    pub fn component(mut self, name: &str) -> Self {
        let name = name.to_ascii_lowercase();
        if !self.sources.own.contains(&name) {
            self.sources.own.push(name);
        }
        self
    }

    /// Whether `IMINFRA_*` environment variables are read (default: yes).
    pub fn environment(mut self, read: bool) -> Self {
        self.sources.read_env = read;
        self
    }

    /// Whether the runtime installs the process's subscriber (default: yes).
    /// Without it, log settings from `clog` do not apply.
    pub fn logging(mut self, install: bool) -> Self {
        self.logging = install;
        self
    }

    /// Starts the service's infrastructure in the seed's order: bootstrap
    /// log → coordination → log reload → metrics → the other libraries.
    /// Anything that fails closes what was already connected.
    pub async fn start(self) -> Result<Runtime> {
        if self.logging {
            log::bootstrap();
        }
        let settings =
            RuntimeSettings::read(&self.service, self.sources.load()?, &self.sources.own)?;
        let mut started = Started::default();
        // Boxed: the start-up future is large, and callers' futures embed it.
        match Box::pin(start(settings, self.logging, &mut started)).await {
            Ok(runtime) => Ok(runtime),
            Err(e) => {
                started.close().await;
                Err(e)
            }
        }
    }
}

/// What start-up connected so far, closed if it fails.
#[derive(Default)]
struct Started {
    backends: Vec<(BackendKind, Arc<dyn Backend>)>,
    endpoint: Option<Endpoint>,
    managers: Vec<Box<dyn StopManager>>,
}

impl Started {
    /// Closes what start-up connected, each step bounded.
    async fn close(&mut self) {
        stop_managers(&std::mem::take(&mut self.managers)).await;
        if let Some(endpoint) = self.endpoint.take() {
            endpoint.stop().await;
        }
        for (kind, backend) in self.backends.drain(..).rev() {
            match tokio::time::timeout(CLOSE_BOUND, backend.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(backend = %kind, error = %e, "closing a backend failed")
                }
                Err(_) => {
                    tracing::warn!(backend = %kind, "closing a backend did not finish in time")
                }
            }
        }
    }

    fn backend(&self, kind: BackendKind) -> Arc<dyn Backend> {
        self.backends
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, b)| b.clone())
            .expect("every backend of the composition is connected")
    }
}

/// How long a failed start waits for one backend to close.
const CLOSE_BOUND: Duration = Duration::from_secs(5);

/// Stops the hot reloads, all at once, each bounded by [`GRACE`] (a watch
/// blocked on an unreachable center does not hold the shutdown).
async fn stop_managers(managers: &[Box<dyn StopManager>]) {
    let stops = managers
        .iter()
        .map(|m| tokio::time::timeout(GRACE, m.stop()));
    if futures::future::join_all(stops)
        .await
        .iter()
        .any(|r| r.is_err())
    {
        tracing::warn!("a configuration watch did not stop in time; it ends with the process");
    }
}

#[async_trait::async_trait]
trait StopManager: Send + Sync {
    async fn stop(&self);
}

#[async_trait::async_trait]
impl<T> StopManager for ConfigManager<T>
where
    T: DeserializeOwned + Default + Send + Sync + 'static,
{
    async fn stop(&self) {
        ConfigManager::stop(self).await
    }
}

async fn connect_coordinator(
    settings: &RuntimeSettings,
    lookup: &Lookup<'_>,
) -> Result<(Composition, Arc<dyn Backend>)> {
    let kind = settings.composition.kind(Role::Coord);
    let connected = match connect(kind, lookup).await {
        Ok(backend) => match backend.health_check().await {
            Ok(()) => Ok(backend),
            Err(e) => {
                let _ = backend.close().await;
                Err(e)
            }
        },
        Err(e) => Err(e),
    };
    // Only a server that cannot be reached falls back: a settings error
    // (not retryable) fails the start under either policy.
    match (connected, settings.startup.coordinator_unreachable) {
        (Ok(backend), _) => Ok((settings.composition, backend)),
        (Err(e), policy) if policy == CoordinatorPolicy::Fail || !e.is_retryable() => {
            let what = if e.is_retryable() {
                "is unreachable"
            } else {
                "cannot be used"
            };
            Err(Error::new(
                e.kind(),
                format!("the coordinator ({kind}) {what}: {e}"),
            ))
        }
        (Err(e), _) => {
            tracing::error!(coordinator = %kind, error = %e,
                "the coordinator is unreachable; going on with its roles in process and the local settings (startup.coordinator_unreachable: defaults)");
            let composition = settings.composition.replacing(kind, BackendKind::Memory);
            let backend = connect(BackendKind::Memory, lookup).await?;
            Ok((composition, backend))
        }
    }
}

async fn start(settings: RuntimeSettings, logging: bool, started: &mut Started) -> Result<Runtime> {
    let began = Instant::now();
    let RuntimeSettings {
        service,
        env,
        composition,
        startup,
        shutdown,
        sections,
    } = settings.clone();
    tracing::info!(%service, %env, %composition, "starting");
    let mut lookup = Lookup {
        local: &sections,
        center: None,
        env: &env,
        service: &service,
        timeout: startup.settings_timeout,
    };

    // The recorder before the coordinator when the local settings already
    // ask for an endpoint, so the coordinator's operations are counted too
    // (a backend binds its metric handles when it is built).
    let local_metrics: MetricsSettings = lookup.local()?;
    if local_metrics.listen.is_some() {
        crate::metrics::install_recorder(&service, &env);
    }

    // Coordination: its own settings can only be local.
    let (composition, coord) = connect_coordinator(&settings, &lookup).await?;
    started
        .backends
        .push((composition.kind(Role::Coord), coord.clone()));
    let center = coord.config().await?;
    lookup.center = Some(&*center);

    // Log reload from clog.
    if logging {
        let local = lookup.local::<LogSettings>()?;
        let clog = manager(&center, &lookup, "clog", local.clone())
            .validator(|s: &LogSettings| s.check().map_err(|e| e.message().to_owned()))
            .on_update(|s: &LogSettings| {
                if let Err(e) = log::apply(s) {
                    tracing::warn!(error = %e, "clog: the new settings could not be applied");
                }
            })
            .build()?;
        clog.start().await;
        started.managers.push(Box::new(clog.clone()));
        let configured = clog.version() > 0 || sections.contains_key("clog");
        // Nothing configured anywhere: the bootstrap subscriber (RUST_LOG)
        // stays until the center says otherwise.
        if configured {
            if let Err(e) = log::apply(&clog.current()) {
                tracing::warn!(error = %e, "clog: the settings of the config center cannot be applied; using the local ones");
                log::apply(&local)?;
            }
        }
    }

    // Metrics (and health) before the other libraries, so their connects count.
    let metrics = lookup.center_or(local_metrics).await;
    let stopping = CancellationToken::new();
    let readiness_backends = Arc::new(Mutex::new(Vec::new()));
    if let Some(listen) = metrics.listen {
        let readiness = Readiness {
            backends: readiness_backends.clone(),
            stopping: stopping.clone(),
        };
        started.endpoint = Some(Endpoint::start(listen, &service, &env, readiness).await?);
    }

    // The other libraries, each with its settings from the center first.
    for kind in composition.backends() {
        if started.backends.iter().any(|(k, _)| *k == kind) {
            continue;
        }
        let backend = connect(kind, &lookup)
            .await
            .map_err(|e| Error::new(e.kind(), format!("backend {kind}: {e}")))?;
        started.backends.push((kind, backend));
    }

    let named = |role: Role| {
        move |e: Error| {
            Error::new(
                e.kind(),
                format!("{role} on {}: {e}", composition.kind(role)),
            )
        }
    };
    let local_rules: LimiterSettings = section_or_default(&sections, "ratelimit")?;
    let rules = manager(&center, &lookup, "ratelimit", local_rules)
        .validator(|s: &LimiterSettings| s.validate().map_err(|e| e.message().to_owned()))
        .build()?;
    rules.start().await;
    started.managers.push(Box::new(rules.clone()));

    let of = |role: Role| started.backend(composition.kind(role));

    let handles = Handles {
        config: center.clone(),
        registry: Arc::new(TrackedRegistry::new(
            of(Role::Registry)
                .registry()
                .await
                .map_err(named(Role::Registry))?,
        )),
        discovery: of(Role::Registry)
            .discovery()
            .await
            .map_err(named(Role::Registry))?,
        lock: Arc::new(TrackedLocks::new(
            of(Role::Lock).lock().await.map_err(named(Role::Lock))?,
        )),
        cache: of(Role::Cache).cache().await.map_err(named(Role::Cache))?,
        limiter: of(Role::Ratelimit)
            .limiter(Rules::Managed(rules))
            .await
            .map_err(named(Role::Ratelimit))?,
        once: of(Role::Once).once().await.map_err(named(Role::Once))?,
        producer: of(Role::Mq).producer().await.map_err(named(Role::Mq))?,
        worker_ids: of(Role::Uid).worker_ids().await.map_err(named(Role::Uid))?,
    };
    *readiness_backends.lock() = started.backends.iter().map(|(_, b)| b.clone()).collect();
    tracing::info!(elapsed = ?began.elapsed(), "started");
    Ok(Runtime {
        service,
        env,
        composition,
        settings_timeout: startup.settings_timeout,
        shutdown_timeout: shutdown.timeout,
        sections,
        handles,
        backends: std::mem::take(&mut started.backends),
        managers: std::mem::take(&mut started.managers),
        endpoint: Mutex::new(started.endpoint.take()),
        consumers: Mutex::new(Vec::new()),
        stopping,
        finished: tokio::sync::OnceCell::new(),
        early_deregistration: Mutex::new(None),
    })
}

fn section_or_default<T: DeserializeOwned + Default>(
    sections: &Map<String, Value>,
    name: &str,
) -> Result<T> {
    match sections.get(name) {
        None => Ok(T::default()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
            Error::new(
                ErrorKind::InvalidConfig,
                format!("local settings {name:?}: {e}"),
            )
        }),
    }
}

/// A hot-reloaded setting of the service: `component`'s value in the
/// center, `local` until then.
fn manager<T>(
    center: &Arc<dyn ConfigCenter>,
    lookup: &Lookup<'_>,
    component: &str,
    local: T,
) -> ConfigManagerBuilder<T>
where
    T: Serialize + DeserializeOwned + Default + Send + Sync + 'static,
{
    ConfigManager::<T>::builder(center.clone(), lookup.service, component)
        .env(lookup.env)
        .default_value(local)
        .load_timeout(lookup.timeout)
}

struct Handles {
    config: Arc<dyn ConfigCenter>,
    registry: Arc<TrackedRegistry>,
    discovery: Arc<dyn ServiceDiscovery>,
    lock: Arc<TrackedLocks>,
    cache: Arc<dyn Cache>,
    limiter: Arc<dyn Limiter>,
    once: Arc<dyn Once>,
    producer: Arc<dyn Producer>,
    worker_ids: Arc<dyn WorkerIdAllocator>,
}

/// Why [`Runtime::run`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The business future failed (the shutdown still ran).
    #[error("the service failed: {0}")]
    Service(Box<dyn std::error::Error + Send + Sync>),
    /// A shutdown step failed or missed the deadline.
    #[error("shutdown: {0}")]
    Shutdown(#[from] Error),
}

/// A running service's infrastructure: the handles its business code
/// receives, and the shutdown that undoes them.
///
/// ```no_run
/// use im_infra_runtime::Runtime;
///
/// #[tokio::main]
/// async fn main() -> anyhow::Result<()> {
///     let runtime = Runtime::builder("im-logic").start().await?;
///     let cache = runtime.cache();
///     let stop = runtime.shutdown_signal();
///     runtime
///         .run(async move {
///             cache.set("up", "1".into(), None).await?;
///             stop.cancelled().await; // serve until SIGTERM or Ctrl-C
///             Ok::<_, im_infra::Error>(())
///         })
///         .await?;
///     Ok(())
/// }
/// ```
pub struct Runtime {
    service: String,
    env: String,
    composition: Composition,
    settings_timeout: Duration,
    shutdown_timeout: Duration,
    /// The local sections (code, file, environment), by component.
    sections: Map<String, Value>,
    handles: Handles,
    backends: Vec<(BackendKind, Arc<dyn Backend>)>,
    managers: Vec<Box<dyn StopManager>>,
    endpoint: Mutex<Option<Endpoint>>,
    consumers: Mutex<Vec<Arc<dyn Consumer>>>,
    stopping: CancellationToken,
    /// The outcome of the shutdown, once it has run to its end.
    finished: tokio::sync::OnceCell<Result<()>>,
    /// The deregistration begun as shutdown began.
    early_deregistration: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("service", &self.service)
            .field("env", &self.env)
            .field("composition", &self.composition.to_string())
            .field("metrics_addr", &self.metrics_addr())
            .finish()
    }
}

impl Runtime {
    /// The builder of the service `service`.
    pub fn builder(service: impl Into<String>) -> RuntimeBuilder {
        RuntimeBuilder {
            service: service.into(),
            sources: Sources {
                read_env: true,
                ..Sources::default()
            },
            logging: true,
        }
    }

    /// The service's name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The deployment environment.
    pub fn env(&self) -> &str {
        &self.env
    }

    /// Which backend plays which role (after any start-up fallback).
    pub fn composition(&self) -> Composition {
        self.composition
    }

    /// The backend playing `role`.
    pub fn backend(&self, role: Role) -> Arc<dyn Backend> {
        let kind = self.composition.kind(role);
        self.backends
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, b)| b.clone())
            .expect("every role's backend is connected")
    }

    /// The address of the metrics endpoint, when one listens.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.endpoint.lock().as_ref().map(|e| e.addr)
    }

    /// The config center.
    pub fn config(&self) -> Arc<dyn ConfigCenter> {
        self.handles.config.clone()
    }

    /// The settings of the component `T` by the one convention: the config
    /// center's `/config/{env}/{service}/{T::COMPONENT}`, else the local
    /// section (declared with [`RuntimeBuilder::component`] when it is the
    /// service's own), else the defaults, with a warning on each fallback.
    /// A local section that does not parse or validate is an error naming
    /// it. Read once: for values that change at run time use
    /// [`config_manager`](Self::config_manager).
    ///
    /// ```no_run
    /// # async fn demo(runtime: &im_infra_runtime::Runtime) -> im_infra::Result<()> {
    /// #[derive(Debug, Default, serde::Deserialize)]
    /// struct Store { table: String }
    /// impl im_infra::settings::Settings for Store {
    ///     const COMPONENT: &'static str = "store";
    ///     fn validate(&self) -> im_infra::Result<()> { Ok(()) }
    /// }
    /// let store: Store = runtime.settings().await?;
    /// # let _ = store; Ok(()) }
    /// ```
    pub async fn settings<T: Settings + Default>(&self) -> Result<T> {
        let center = self.config();
        Lookup {
            local: &self.sections,
            center: Some(&*center),
            env: &self.env,
            service: &self.service,
            timeout: self.settings_timeout,
        }
        .resolve()
        .await
    }

    /// A typed configuration of this service at
    /// `/config/{env}/{service}/{component}`, to build and start.
    pub fn config_manager<T>(&self, component: &str) -> ConfigManagerBuilder<T>
    where
        T: Serialize + DeserializeOwned + Default + Send + Sync + 'static,
    {
        ConfigManager::<T>::builder(self.config(), &self.service, component)
            .env(&self.env)
            .load_timeout(self.settings_timeout)
    }

    /// The service registry; what is registered through it is deregistered
    /// at shutdown.
    pub fn registry(&self) -> Arc<dyn ServiceRegistry> {
        self.handles.registry.clone()
    }

    /// Service discovery.
    pub fn discovery(&self) -> Arc<dyn ServiceDiscovery> {
        self.handles.discovery.clone()
    }

    /// Distributed locks; those still held at shutdown are released.
    pub fn lock(&self) -> Arc<dyn DistributedLock> {
        self.handles.lock.clone()
    }

    /// The cache.
    pub fn cache(&self) -> Arc<dyn Cache> {
        self.handles.cache.clone()
    }

    /// The limiter, its rules hot-reloaded from
    /// `/config/{env}/{service}/ratelimit` (the local `ratelimit` section
    /// until then).
    pub fn limiter(&self) -> Arc<dyn Limiter> {
        self.handles.limiter.clone()
    }

    /// Idempotency.
    pub fn once(&self) -> Arc<dyn Once> {
        self.handles.once.clone()
    }

    /// The producer; flushed at shutdown.
    pub fn producer(&self) -> Arc<dyn Producer> {
        self.handles.producer.clone()
    }

    /// The worker-id allocator.
    pub fn worker_ids(&self) -> Arc<dyn WorkerIdAllocator> {
        self.handles.worker_ids.clone()
    }

    /// A consumer-group member; shut down at shutdown (the message in hand
    /// finishes and its offset is committed).
    pub async fn consumer(&self, settings: ConsumerSettings) -> Result<Arc<dyn Consumer>> {
        let consumer = self.backend(Role::Mq).consumer(settings).await?;
        self.consumers.lock().push(consumer.clone());
        Ok(consumer)
    }

    /// Cancelled when shutdown begins: the business stops accepting work
    /// when it fires. Cancelling it begins shutdown, as a signal would.
    pub fn shutdown_signal(&self) -> CancellationToken {
        self.stopping.clone()
    }

    /// Begins shutdown as a signal would.
    pub fn request_shutdown(&self) {
        self.stopping.cancel();
    }

    /// Runs `service` until it ends (or panics), or until SIGTERM, Ctrl-C
    /// or [`request_shutdown`](Self::request_shutdown); then shuts down
    /// within the deadline (`shutdown.timeout`) in reverse order:
    ///
    /// 1. [`shutdown_signal`](Self::shutdown_signal) fires: the business
    ///    stops accepting; `/readyz` answers 503; instances registered
    ///    through [`registry`](Self::registry) are deregistered at once,
    ///    so that clients stop finding the instance while it still answers
    ///    what reaches it;
    /// 2. consumers finish the message in hand and commit, while `service`
    ///    winds down (awaited up to the deadline);
    /// 3. the producer flushes;
    /// 4. what was registered meanwhile, or failed to deregister, is
    ///    deregistered;
    /// 5. locks still held are released;
    /// 6. hot reloads stop, backends close (the coordinator last), the
    ///    metrics endpoint stops.
    ///
    /// Every step runs even when the deadline has passed (bounded by a
    /// short grace each), so registrations never outlive the process by
    /// their TTL; a panic of `service` is caught, the steps run, and `run`
    /// answers [`RunError::Service`]. A SIGTERM or Ctrl-C during the
    /// wind-down (the second, when one began it) ends the wait for
    /// `service` and the consumers at once; the steps after it get their
    /// short grace each.
    pub async fn run<F, E>(self, service: F) -> std::result::Result<(), RunError>
    where
        F: Future<Output = std::result::Result<(), E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // A panic of the service is its failure: the steps still run.
        let mut service = Box::pin(
            AssertUnwindSafe(async move { service.await.map_err(Into::into) }).catch_unwind(),
        );
        let ended = tokio::select! {
            r = &mut service => Some(r),
            _ = stop_requested(&self.stopping) => None,
        };
        let mut deadline = deadline_after(self.shutdown_timeout);
        self.stopping.cancel();
        self.deregister_early(deadline);
        let mut missed = None;
        let outcome = match ended {
            Some(r) => {
                tokio::select! {
                    _ = self.shutdown_consumers(deadline) => {}
                    _ = os_signal() => deadline = hurried(),
                }
                Some(r)
            }
            None => {
                tracing::info!(deadline = ?self.shutdown_timeout, "shutting down");
                let (this, until, running) = (&self, deadline, &mut service);
                let wind_down = async move {
                    let consumers = this.shutdown_consumers(until);
                    let service = tokio::time::timeout_at(until, running);
                    tokio::join!(consumers, service).1.ok()
                };
                tokio::select! {
                    r = wind_down => {
                        if r.is_none() {
                            tracing::warn!(
                                "the service did not finish before the shutdown deadline; it is dropped"
                            );
                            missed = Some(Error::new(
                                ErrorKind::Timeout,
                                format!(
                                    "the service did not finish within the shutdown deadline ({:?})",
                                    self.shutdown_timeout
                                ),
                            ));
                        }
                        r
                    }
                    _ = os_signal() => {
                        deadline = hurried();
                        missed = Some(Error::new(
                            ErrorKind::Timeout,
                            "shutdown hurried by a signal: the service was dropped",
                        ));
                        None
                    }
                }
            }
        };
        // Nothing of the service runs past this point: its locks are
        // released and its registrations removed only after it is gone.
        drop(service);
        let closed = self.finish(deadline).await;
        let result = match outcome {
            Some(Ok(r)) => r,
            Some(Err(panic)) => {
                let what = panic_message(panic.as_ref());
                tracing::error!(panic = %what, "the service panicked");
                Err(format!("the service panicked: {what}").into())
            }
            None => Ok(()),
        };
        result.map_err(RunError::Service)?;
        closed.map_err(RunError::Shutdown)?;
        missed.map_or(Ok(()), |e| Err(RunError::Shutdown(e)))
    }

    /// Begins deregistering what was registered through the runtime, in a
    /// task of its own (bounded by `deadline`): clients stop finding the
    /// instance while it drains, and no other step waits for it before the
    /// second pass. Failures are left to that pass, which reports them.
    fn deregister_early(&self, deadline: tokio::time::Instant) {
        let mut early = self.early_deregistration.lock();
        if early.is_some() {
            return;
        }
        let registry = self.handles.registry.clone();
        *early = Some(tokio::spawn(async move {
            if let Some(Ok(n)) = step_timeout(deadline, registry.deregister_all()).await {
                if n > 0 {
                    tracing::info!(instances = n, "deregistered");
                }
            }
        }));
    }

    /// Shuts down as [`run`](Self::run) does after a signal, without a
    /// business future. Idempotent.
    pub async fn shutdown(&self) -> Result<()> {
        let deadline = deadline_after(self.shutdown_timeout);
        self.stopping.cancel();
        self.deregister_early(deadline);
        self.shutdown_consumers(deadline).await;
        self.finish(deadline).await
    }

    async fn shutdown_consumers(&self, deadline: tokio::time::Instant) {
        let consumers: Vec<_> = std::mem::take(&mut *self.consumers.lock());
        let all = futures::future::join_all(consumers.iter().map(|c| c.shutdown()));
        match step_timeout(deadline, all).await {
            Some(results) => {
                for e in results.into_iter().filter_map(|r| r.err()) {
                    tracing::warn!(error = %e, "a consumer did not shut down cleanly");
                }
            }
            None => tracing::warn!("consumers did not finish before the shutdown deadline"),
        }
    }

    /// The steps after the consumers, run to their end once: a later or
    /// concurrent call gets the same outcome; one cancelled midway leaves
    /// them to the next.
    async fn finish(&self, deadline: tokio::time::Instant) -> Result<()> {
        self.finished
            .get_or_init(|| self.finish_steps(deadline))
            .await
            .clone()
    }

    async fn finish_steps(&self, deadline: tokio::time::Instant) -> Result<()> {
        let mut first: Option<Error> = None;
        let mut note = |what: &str, res: Option<Result<()>>| match res {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                tracing::warn!(step = what, error = %e, "shutdown step failed");
                first.get_or_insert(e);
            }
            None => {
                tracing::warn!(step = what, "shutdown step missed the deadline");
                first.get_or_insert_with(|| {
                    Error::new(
                        ErrorKind::Timeout,
                        format!("shutdown: {what} missed the deadline"),
                    )
                });
            }
        };
        let producer = &self.handles.producer;
        let flush_for = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(GRACE);
        note(
            "flush the producer",
            step_timeout(deadline, producer.flush(flush_for)).await,
        );
        let early = self.early_deregistration.lock().take();
        if let Some(early) = early {
            let _ = step_timeout(deadline, early).await;
        }
        let deregistered = step_timeout(deadline, self.handles.registry.deregister_all()).await;
        note(
            "deregister",
            deregistered.map(|r| r.map(|n| tracing::info!(instances = n, "deregistered"))),
        );
        let released = step_timeout(deadline, self.handles.lock.release_all()).await;
        note(
            "release locks",
            released.map(|n| {
                tracing::info!(locks = n, "released");
                Ok(())
            }),
        );
        stop_managers(&self.managers).await;
        for (kind, backend) in self.backends.iter().rev() {
            let closed = step_timeout(deadline, backend.close()).await;
            note(kind.as_str(), closed);
        }
        let endpoint = self.endpoint.lock().take();
        if let Some(endpoint) = endpoint {
            endpoint.stop().await;
        }
        tracing::info!("stopped");
        first.map_or(Ok(()), Err)
    }
}

/// What a step gets past the deadline: deregistering and closing still
/// happen, briefly, rather than being skipped.
const GRACE: Duration = Duration::from_millis(500);

/// `timeout` from now, or far ahead when that is past what the clock holds.
fn deadline_after(timeout: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

async fn step_timeout<T>(
    deadline: tokio::time::Instant,
    fut: impl Future<Output = T>,
) -> Option<T> {
    let until = deadline.max(deadline_after(GRACE));
    tokio::time::timeout_at(until, fut).await.ok()
}

/// What a signal during the wind-down does: the steps left get their
/// short grace each, from now.
fn hurried() -> tokio::time::Instant {
    tracing::warn!(
        "a signal during the shutdown: the business is no longer waited for; \
         the steps left get a short grace each"
    );
    tokio::time::Instant::now()
}

/// The text of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(not a message)".to_owned())
}

/// SIGTERM, Ctrl-C (SIGINT), or a requested shutdown.
async fn stop_requested(requested: &CancellationToken) {
    tokio::select! {
        _ = os_signal() => {}
        _ = requested.cancelled() => {}
    }
}

/// SIGTERM or Ctrl-C (SIGINT).
async fn os_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C"),
        _ = term => tracing::info!("SIGTERM"),
    }
}

#[cfg(all(test, feature = "etcd"))]
mod tests {
    /// Each `section` call is a source of its own: a later call's earlier
    /// field name overrides an earlier call's current one.
    #[test]
    fn a_later_section_call_may_use_an_earlier_field_name() {
        let b = super::Runtime::builder("svc")
            .section("etcd", im_infra_etcd::EtcdSettings::default())
            .section("etcd", serde_json::json!({"dial_timeout": "4s"}));
        let etcd: im_infra_etcd::EtcdSettings =
            serde_json::from_value(b.sources.code["etcd"].clone()).unwrap();
        assert_eq!(etcd.connect_timeout, std::time::Duration::from_secs(4));
    }
}
