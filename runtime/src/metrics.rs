//! Metrics and health: a Prometheus endpoint carrying the library's
//! operation metrics and the service's own, with `/healthz` and `/readyz`
//! on the same listener.
//!
//! ```yaml
//! metrics:
//!   listen: 0.0.0.0:9100   # no listener when unset
//! ```
//!
//! - `GET /metrics`: the Prometheus text format. Every series has the
//!   labels `service` and `env`.
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 when every backend in use answers its health check
//!   (each bounded by two seconds), 503 naming those that do not, and 503
//!   once shutdown has begun.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use im_infra::backend::Backend;
use im_infra::{Error, ErrorKind, Result};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// How long `/readyz` waits for one backend's health check.
pub const READY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The `metrics` settings. Read at start; a change needs a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// The address of the endpoint; none when unset.
    pub listen: Option<SocketAddr>,
}

impl im_infra::settings::Settings for MetricsSettings {
    const COMPONENT: &'static str = "metrics";
    fn validate(&self) -> Result<()> {
        Ok(())
    }
}

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus recorder, installed as the global one the first
/// time (labels `service` and `env` of the first caller on every series).
/// `None` when another recorder was installed first.
pub(crate) fn install_recorder(service: &str, env: &str) -> Option<PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .add_global_label("service", service)
                .add_global_label("env", env)
                .build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    let upkeep = handle.clone();
                    tokio::spawn(async move {
                        let mut tick = tokio::time::interval(Duration::from_secs(5));
                        loop {
                            tick.tick().await;
                            upkeep.run_upkeep();
                        }
                    });
                    Some(handle)
                }
                Err(_) => {
                    tracing::warn!("a metrics recorder was installed before the runtime's; /metrics will be empty");
                    None
                }
            }
        })
        .clone()
}

/// What `/readyz` checks.
#[derive(Clone)]
pub(crate) struct Readiness {
    /// Filled once every backend is connected.
    pub(crate) backends: Arc<parking_lot::Mutex<Vec<Arc<dyn Backend>>>>,
    pub(crate) stopping: CancellationToken,
}

impl Readiness {
    /// Whether every backend answers, with one line per backend.
    pub(crate) async fn check(&self) -> (bool, String) {
        if self.stopping.is_cancelled() {
            return (false, "shutting down\n".into());
        }
        let backends = self.backends.lock().clone();
        if backends.is_empty() {
            return (false, "starting\n".into());
        }
        let checks = backends.iter().map(|b| async move {
            let res = tokio::time::timeout(READY_CHECK_TIMEOUT, b.health_check()).await;
            let res = res.unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorKind::Timeout,
                    "health check did not answer in 2s",
                ))
            });
            (b.name(), res)
        });
        let mut ready = true;
        let mut body = String::new();
        for (name, res) in futures::future::join_all(checks).await {
            match res {
                Ok(()) => body.push_str(&format!("{name}: ok\n")),
                Err(e) => {
                    ready = false;
                    body.push_str(&format!("{name}: {e}\n"));
                }
            }
        }
        (ready, body)
    }
}

#[derive(Clone)]
struct Shared {
    prometheus: Option<PrometheusHandle>,
    readiness: Readiness,
}

async fn metrics_text(State(s): State<Shared>) -> impl IntoResponse {
    let body = s
        .prometheus
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Shared>) -> impl IntoResponse {
    let (ready, body) = s.readiness.check().await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

/// The running endpoint.
pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Endpoint {
    /// A runtime dropped without shutdown (or a start cancelled midway)
    /// does not leave its port bound.
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Endpoint {
    /// Binds `listen` and serves until [`stop`](Self::stop).
    pub(crate) async fn start(
        listen: SocketAddr,
        service: &str,
        env: &str,
        readiness: Readiness,
    ) -> Result<Endpoint> {
        let shared = Shared {
            prometheus: install_recorder(service, env),
            readiness,
        };
        let app = Router::new()
            .route("/metrics", get(metrics_text))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(shared);
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            Error::new(
                ErrorKind::InvalidConfig,
                format!("metrics: cannot listen on {listen}: {e}"),
            )
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::new(ErrorKind::Internal, format!("metrics: {e}")))?;
        let stop = CancellationToken::new();
        let until = stop.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(until)
                .await
            {
                tracing::warn!(error = %e, "metrics endpoint failed");
            }
        });
        tracing::info!(%addr, "metrics endpoint: /metrics, /healthz, /readyz");
        Ok(Endpoint {
            addr,
            stop,
            task: Some(task),
        })
    }

    /// Stops serving (requests in flight finish).
    pub(crate) async fn stop(mut self) {
        self.stop.cancel();
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(2), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}
