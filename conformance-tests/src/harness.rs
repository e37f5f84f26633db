//! Turns the suites into named trials for one backend and runs them.
//!
//! Every trial builds a fresh [`World`] (a new namespace on the backend),
//! runs one case on its own Tokio runtime with a deadline, and cleans up.
//! Names read `<backend>::<capability>::<case>` and can be filtered and
//! listed like any `cargo test` (`-- --list`, `-- redis::lock`).
//!
//! A server backend's runner gets its server from its endpoint variable
//! (`IMINFRA_REDIS_URL`, ...), or with `IMINFRA_SERVERS=containers` from a
//! container of its own (feature `containers`, see
//! [`ServerSource`]), removed when the trials
//! are done. The trials and their names are the same on both paths; a
//! server that cannot be had is a loud skip, or a failure of
//! `<backend>::server::reachable` under `IMINFRA_REQUIRE_BACKENDS`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use async_trait::async_trait;
use futures::future::BoxFuture;
use im_infra::backend::{Backend, Capability};
use im_infra::cache::CacheCapabilities;
use im_infra::config::ConfigCapabilities;
use im_infra::lock::LockCapabilities;
use im_infra::mq::{ConsumerCapabilities, ConsumerSettings, TopicSpec};
use im_infra::registry::RegistryCapabilities;
use libtest_mimic::{Arguments, Failed, Trial};

use crate::cases;
use crate::servers::{self, ServerSource};

/// What keeps a runner's servers alive until its trials are done: the
/// containers it started (removed when dropped), or nothing.
#[cfg(feature = "containers")]
type Provided = crate::containers::Servers;
/// What keeps a runner's servers alive until its trials are done: nothing
/// without the `containers` feature.
#[cfg(not(feature = "containers"))]
enum Provided {}

/// Everything a case gets: a backend on a fresh namespace, a second backend
/// instance on the same namespace (another "process"), and fault hooks.
#[derive(Clone)]
pub struct World {
    /// The backend under test.
    pub backend: Arc<dyn Backend>,
    /// Another instance on the same namespace, with its own connections.
    pub peer: Arc<dyn Backend>,
    /// Fault injection and set-up that the traits do not offer.
    pub hooks: Arc<dyn Hooks>,
}

/// Test-only operations a fixture provides for its backend.
#[async_trait]
pub trait Hooks: Send + Sync {
    /// Makes the lease of a registered instance end now, as if it expired.
    async fn revoke_registration(&self, service: &str, id: &str) -> Result<()> {
        let _ = (service, id);
        Err(anyhow!(
            "revoke_registration is not available for this backend"
        ))
    }

    /// Makes a worker-id lease end now, as if it expired.
    async fn revoke_worker_id(&self, id: u64) -> Result<()> {
        let _ = id;
        Err(anyhow!(
            "revoke_worker_id is not available for this backend"
        ))
    }

    /// Creates a topic as the backend's `create_topic` does: `true` if
    /// created, `false` if it existed with that partition count, the
    /// backend's `AlreadyExists` error if it exists with another.
    async fn create_topic(&self, spec: &TopicSpec) -> Result<bool> {
        let _ = spec;
        Err(anyhow!("create_topic is not available for this backend"))
    }

    /// Discards the configuration change history up to now, so that a watch
    /// resuming from an older version must resynchronise.
    async fn compact_config_history(&self) -> Result<()> {
        Err(anyhow!(
            "compact_config_history is not available for this backend"
        ))
    }

    /// Removes what the world stored (keys of its namespace, topics, ...).
    async fn cleanup(&self) -> Result<()> {
        Ok(())
    }
}

/// Builds worlds for one backend.
#[async_trait]
pub trait Fixture: Send + Sync + 'static {
    /// A fresh world on a new namespace.
    async fn world(&self) -> Result<World>;
}

/// What the backend claims, read from a probe world.
#[derive(Debug, Clone)]
pub struct Claims {
    /// Capabilities of the backend.
    pub capabilities: Vec<Capability>,
    /// Cache capabilities, if the cache is claimed.
    pub cache: Option<CacheCapabilities>,
    /// Lock capabilities, if locks are claimed.
    pub lock: Option<LockCapabilities>,
    /// Config capabilities, if the config center is claimed.
    pub config: Option<ConfigCapabilities>,
    /// Discovery capabilities, if the registry is claimed.
    pub registry: Option<RegistryCapabilities>,
    /// Consumer capabilities, if messaging is claimed.
    pub consumer: Option<ConsumerCapabilities>,
}

impl Claims {
    /// Whether `c` is claimed.
    pub fn has(&self, c: Capability) -> bool {
        self.capabilities.contains(&c)
    }

    async fn read(backend: &Arc<dyn Backend>) -> Result<Claims> {
        let capabilities = backend.capabilities().to_vec();
        let has = |c| capabilities.contains(&c);
        let cache = if has(Capability::Cache) {
            Some(backend.cache().await?.capabilities())
        } else {
            None
        };
        let lock = if has(Capability::Lock) {
            Some(backend.lock().await?.capabilities())
        } else {
            None
        };
        let config = if has(Capability::Config) {
            Some(backend.config().await?.capabilities())
        } else {
            None
        };
        let registry = if has(Capability::Registry) {
            Some(backend.discovery().await?.capabilities())
        } else {
            None
        };
        let consumer = if has(Capability::Messaging) {
            let cfg = ConsumerSettings::new("conformance-probe", ["conformance-probe"]);
            Some(backend.consumer(cfg).await?.capabilities())
        } else {
            None
        };
        Ok(Claims {
            capabilities,
            cache,
            lock,
            config,
            registry,
            consumer,
        })
    }
}

/// A case: an async function of a world.
pub type CaseFn = fn(World) -> BoxFuture<'static, Result<()>>;

/// One named case of a capability suite.
#[derive(Clone)]
pub struct Case {
    /// The capability module (`"lock"`).
    pub capability: &'static str,
    /// The case name (`"fencing_token_increases"`).
    pub name: &'static str,
    /// Whether the case applies to a backend with these claims.
    pub applies: fn(&Claims) -> bool,
    /// The case itself.
    pub run: CaseFn,
    /// Deadline of the case.
    pub timeout: Duration,
    /// Runs alone: no other case of the runner at the same time (for cases
    /// whose fault injection reaches beyond their namespace, such as an
    /// etcd compaction).
    pub exclusive: bool,
}

/// Shared by every trial; taken exclusively by `exclusive` cases.
static EXCLUSIVE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Declares a case: `case!("lock", fencing_token_increases)`, optionally
/// with `when = |claims| ...` and `timeout = secs`.
#[macro_export]
macro_rules! case {
    ($cap:expr, $f:ident) => {
        $crate::case!($cap, $f, when = |_| true, timeout = 60)
    };
    ($cap:expr, $f:ident, when = $when:expr) => {
        $crate::case!($cap, $f, when = $when, timeout = 60)
    };
    ($cap:expr, $f:ident, when = $when:expr, timeout = $secs:expr) => {
        $crate::harness::Case {
            capability: $cap,
            name: stringify!($f),
            applies: $when,
            run: |w| Box::pin($f(w)),
            timeout: std::time::Duration::from_secs($secs),
            exclusive: false,
        }
    };
}

/// Which suites a runner runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuiteKind {
    /// The capability contract, gated by the backend's claims.
    Contract,
    /// The documented semantics of the null backend.
    Noop,
}

/// Builds a backend's fixture from its server address (empty in process).
pub type MakeFixture = fn(&str) -> Result<Arc<dyn Fixture>>;

/// A runner's target.
pub struct Target {
    /// Backend name used in trial names.
    pub backend: &'static str,
    /// The environment variable naming the server, for server backends.
    pub env_var: Option<&'static str>,
    /// Builds the fixture from the server address (`None` while the
    /// backend crate does not exist yet: only reachability is tested).
    pub fixture: Option<MakeFixture>,
    /// Which suites to run.
    pub suite: SuiteKind,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Into::into)
}

fn failed(e: anyhow::Error) -> Failed {
    Failed::from(format!("{e:#}"))
}

/// Holds the exclusivity lock for the length of a trial.
#[allow(dead_code)]
enum Turn {
    Shared(std::sync::RwLockReadGuard<'static, ()>),
    Alone(std::sync::RwLockWriteGuard<'static, ()>),
}

fn trial_for(backend: &'static str, fixture: Arc<dyn Fixture>, case: Case) -> Trial {
    let name = format!("{backend}::{}::{}", case.capability, case.name);
    Trial::test(name, move || {
        let _turn = if case.exclusive {
            Turn::Alone(EXCLUSIVE.write().unwrap_or_else(|p| p.into_inner()))
        } else {
            Turn::Shared(EXCLUSIVE.read().unwrap_or_else(|p| p.into_inner()))
        };
        let rt = runtime().map_err(failed)?;
        rt.block_on(async move {
            let world = fixture
                .world()
                .await
                .map_err(|e| failed(e.context("building the world")))?;
            let hooks = world.hooks.clone();
            let outcome = tokio::time::timeout(case.timeout, (case.run)(world)).await;
            if let Err(e) = hooks.cleanup().await {
                eprintln!("cleanup after {} failed: {e:#}", case.name);
            }
            match outcome {
                Ok(res) => res.map_err(failed),
                Err(_) => Err(Failed::from(format!(
                    "did not finish within {:?}",
                    case.timeout
                ))),
            }
        })
    })
}

/// Runs the target's trials with the command-line arguments of `cargo test`.
pub fn run_main(target: Target) -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let args = Arguments::from_args();
    let (trials, provided) = match build_trials(&target) {
        Ok(t) => t,
        Err(e) => (
            vec![Trial::test(
                format!("{}::harness::setup", target.backend),
                move || Err(failed(e)),
            )],
            None,
        ),
    };
    let conclusion = {
        // Held until every trial is done, passed or failed: the containers
        // go at the end of this block.
        let _servers = provided;
        libtest_mimic::run(&args, trials)
    };
    conclusion.exit_code()
}

fn build_trials(target: &Target) -> Result<(Vec<Trial>, Option<Provided>)> {
    let backend = target.backend;
    let reachable = format!("{backend}::server::reachable");
    let Some(var) = target.env_var else {
        return Ok((in_process_trials(target)?, None));
    };
    let required = servers::required(backend);
    // Before any runtime of the harness exists: starting containers may
    // set DOCKER_HOST for this process (see `containers`).
    let (address, provided) = match server(backend, var) {
        Ok(found) => found,
        Err(reason) => {
            return Ok((
                vec![skipped_or_failed(backend, &reachable, required, reason)],
                None,
            ))
        }
    };
    let rt = runtime()?;
    if let Err(e) = rt.block_on(servers::probe(backend, &address)) {
        let reason = format!("{backend} at {address} is not reachable: {e:#}");
        return Ok((
            vec![skipped_or_failed(backend, &reachable, required, reason)],
            provided,
        ));
    }
    let mut trials = vec![{
        let address = address.clone();
        Trial::test(reachable, move || {
            let rt = runtime().map_err(failed)?;
            rt.block_on(servers::probe(backend, &address))
                .map_err(failed)
        })
    }];
    if let Some(make) = target.fixture {
        let fixture = make(&address)?;
        trials.extend(contract_trials(backend, fixture, target.suite, &rt)?);
    }
    Ok((trials, provided))
}

/// The address of `backend`'s server, and what keeps it alive; or why
/// there is none.
fn server(backend: &str, var: &str) -> Result<(String, Option<Provided>), String> {
    match ServerSource::from_env().map_err(|e| format!("{e:#}"))? {
        ServerSource::Environment => match std::env::var(var).ok().filter(|v| !v.trim().is_empty())
        {
            Some(address) => Ok((address, None)),
            None => Err(format!(
                "{var} is not set (start the servers with scripts/services.sh up, \
                 or set {}=containers)",
                servers::SERVERS_ENV
            )),
        },
        ServerSource::Containers => container_server(backend),
    }
}

#[cfg(feature = "containers")]
fn container_server(backend: &str) -> Result<(String, Option<Provided>), String> {
    let servers = crate::containers::Servers::start(backend)
        .map_err(|e| format!("its server could not be started in a container: {e:#}"))?;
    Ok((servers.address().to_owned(), Some(servers)))
}

#[cfg(not(feature = "containers"))]
fn container_server(_backend: &str) -> Result<(String, Option<Provided>), String> {
    Err(format!(
        "{}=containers, but this runner was built without the `containers` feature of \
         im-infra-conformance",
        servers::SERVERS_ENV
    ))
}

fn skipped_or_failed(backend: &'static str, name: &str, required: bool, reason: String) -> Trial {
    if required {
        let msg = format!("{backend} is required (IMINFRA_REQUIRE_BACKENDS) but {reason}");
        Trial::test(name.to_owned(), move || Err(Failed::from(msg)))
    } else {
        eprintln!(
            "SKIPPED {backend}: {reason}; set IMINFRA_REQUIRE_BACKENDS=all to make this a failure"
        );
        Trial::test(name.to_owned(), || Ok(())).with_ignored_flag(true)
    }
}

fn in_process_trials(target: &Target) -> Result<Vec<Trial>> {
    let make = target
        .fixture
        .ok_or_else(|| anyhow!("an in-process target needs a fixture"))?;
    let fixture = make("")?;
    let rt = runtime()?;
    contract_trials(target.backend, fixture, target.suite, &rt)
}

fn contract_trials(
    backend: &'static str,
    fixture: Arc<dyn Fixture>,
    suite: SuiteKind,
    rt: &tokio::runtime::Runtime,
) -> Result<Vec<Trial>> {
    let all = match suite {
        SuiteKind::Noop => cases::noop::cases(),
        SuiteKind::Contract => cases::contract(),
    };
    let claims = rt.block_on(async {
        let world = fixture.world().await?;
        let claims = Claims::read(&world.backend).await;
        world.hooks.cleanup().await.ok();
        claims
    })?;
    Ok(all
        .into_iter()
        .filter(|c| (c.applies)(&claims))
        .map(|c| trial_for(backend, fixture.clone(), c))
        .collect())
}
