//! The service runtime of im-infra: what a service's `main` uses to get its
//! infrastructure, while business code keeps depending on `im-infra` alone.
//!
//! - **Composition from configuration.** The `backends` section says which
//!   backend plays each role (`coord`, `registry`, `lock`, `cache`,
//!   `ratelimit`, `once`, `mq`, `uid`); unstated roles are in process, so no
//!   configuration at all gives a working service. The runtime hands out
//!   typed `Arc<dyn …>` handles.
//! - **One settings convention.** Every component's settings are read from
//!   `/config/{env}/{service}/{component}` in the config center first, then
//!   from the local sources (code, then a YAML or JSON file, then
//!   `IMINFRA_*` variables), then the defaults, with a warning on each
//!   fallback. The coordinator's own settings can only be local.
//! - **Logs** ([`log`]): a bootstrap subscriber before anything connects,
//!   reloaded from `clog`, at start and on every change.
//! - **Metrics and health** ([`metrics`]): a Prometheus endpoint with
//!   `/healthz` and `/readyz`, from the `metrics` settings.
//! - **Two-phase start-up** in the seed's order (bootstrap log →
//!   coordination → log reload → metrics → the other libraries → business),
//!   with a policy for an unreachable coordinator, and **graceful shutdown**
//!   on SIGTERM or Ctrl-C in reverse order within a deadline
//!   ([`Runtime::run`]).
//!
//! What changes at run time: the limiter rules (`ratelimit`) and the log
//! settings (`clog`). Everything else — the composition, the backends'
//! settings, `metrics`, `startup`, `shutdown` — is read once at start and
//! needs a restart.
//!
//! ```no_run
//! use im_infra_runtime::Runtime;
//!
//! #[tokio::main]
//! async fn main() -> anyhow::Result<()> {
//!     // IMINFRA_CONFIG=im-logic.yaml switches it to the real servers.
//!     let runtime = Runtime::builder("im-logic").start().await?;
//!     let (cache, stop) = (runtime.cache(), runtime.shutdown_signal());
//!     runtime
//!         .run(async move {
//!             cache.set("started", "yes".into(), None).await?;
//!             stop.cancelled().await;
//!             Ok::<_, im_infra::Error>(())
//!         })
//!         .await?;
//!     Ok(())
//! }
//! ```
//!
//! The file that moves it to the real servers:
//!
//! ```yaml
//! backends: { coord: etcd, cache: redis, ratelimit: redis, mq: kafka, uid: etcd }
//! etcd: { endpoints: ["http://10.0.0.5:2379"] }
//! redis: { url: "redis://10.0.0.6:6379" }
//! kafka: { brokers: ["10.0.0.7:9092"] }
//! metrics: { listen: "0.0.0.0:9100" }
//! ```
#![deny(missing_docs)]

mod composition;
mod connect;
pub mod log;
pub mod metrics;
mod runtime;
mod settings;
mod sources;
mod tracked;

pub use composition::{BackendKind, Composition, Role};
pub use log::{LogFile, LogFormat, LogRotation, LogSettings};
pub use metrics::MetricsSettings;
pub use runtime::{RunError, Runtime, RuntimeBuilder};
pub use settings::{CoordinatorPolicy, ShutdownSettings, StartupSettings};
pub use sources::{COMPONENTS, CONFIG_FILE_VAR, ENV_PREFIX};
