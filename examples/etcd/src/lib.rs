//! Programs on the etcd backend.
//!
//! [`failover`]: two gRPC servers register in etcd; a client calls through
//! a [`BalancedChannel`] that
//! follows the registrations; one server is killed and the calls move to
//! the other. Run it with
//!
//! ```text
//! scripts/services.sh up && source .services/env
//! cargo run -p im-infra-examples-etcd --example grpc_failover
//! ```
#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use im_infra::backend::{Backend, Maintenance};
use im_infra::registry::grpc::{BalancePolicy, BalancedChannel, GrpcOptions};
use im_infra::registry::{ServiceInstance, ServiceRegistry};
use im_infra_etcd::{EtcdBackend, EtcdSettings};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The header naming the server that answered.
pub const SERVER_HEADER: &str = "x-server-id";

/// What the failover run observed.
#[derive(Debug, Clone)]
pub struct FailoverReport {
    /// Calls answered by each server while both ran.
    pub before: BTreeMap<String, usize>,
    /// Calls that failed after server `a` was killed.
    pub failed_after_kill: usize,
    /// Time from the kill to the last failed call (zero when none failed).
    pub last_failure_after: Duration,
    /// Calls answered by each server after the kill.
    pub after: BTreeMap<String, usize>,
}

/// A server process: its own runtime, so that killing it drops every
/// connection it holds, as the end of a process would.
pub struct Server {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Server {
    /// Stops the server at once, dropping its connections: when this
    /// returns, every socket it held is closed, as at the end of a process.
    /// (The runtime is dropped on a thread of its own, which this waits
    /// for, a few milliseconds; `shutdown_background` would return before
    /// the sockets close, and a call sent meanwhile would hang.)
    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            let _ = std::thread::spawn(move || drop(rt)).join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One gRPC server (the standard health service) that names itself in a
/// response header, on a free loopback port; its address and handle.
/// With `tls` it speaks only TLS (and requires client certificates when the
/// configuration names a client CA).
pub async fn serve(
    id: &'static str,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<(String, Server)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?.to_string();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let stamp = tower::ServiceBuilder::new().map_response(
        move |mut r: http::Response<tonic::body::Body>| {
            r.headers_mut()
                .insert(SERVER_HEADER, http::HeaderValue::from_static(id));
            r
        },
    );
    runtime.spawn(async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(std_listener) else {
            return;
        };
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            match builder.tls_config(tls) {
                Ok(b) => builder = b,
                Err(e) => {
                    eprintln!("server {id}: bad TLS configuration: {e}");
                    return;
                }
            }
        }
        let _ = builder
            .layer(stamp)
            .add_service(health)
            .serve_with_incoming(incoming)
            .await;
    });
    Ok((
        addr,
        Server {
            runtime: Some(runtime),
        },
    ))
}

/// Calls the balanced channel once; the answering server's id.
pub async fn call(client: &mut HealthClient<BalancedChannel>) -> Option<String> {
    let resp = tokio::time::timeout(
        Duration::from_secs(2),
        client.check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .ok()?
    .ok()?;
    resp.metadata()
        .get(SERVER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Runs the scenario against etcd at `endpoints`, under a fresh namespace.
pub async fn failover(endpoints: &[String]) -> Result<FailoverReport> {
    let ns = format!(
        "/example-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut cfg = EtcdSettings::with_endpoints(endpoints.iter().cloned());
    cfg.namespace = ns;
    let etcd = EtcdBackend::builder().settings(cfg).build().await?;

    let (addr_a, mut server_a) = serve("a", None).await?;
    let (addr_b, mut server_b) = serve("b", None).await?;
    // Each server registers through its own registry, as separate processes would.
    let registry_a: Arc<dyn ServiceRegistry> = etcd.registry().await?;
    let registry_b: Arc<dyn ServiceRegistry> = etcd.registry().await?;
    let ttl = Duration::from_secs(10);
    registry_a
        .register(&ServiceInstance::new("echo", "a", &addr_a), ttl)
        .await?;
    registry_b
        .register(&ServiceInstance::new("echo", "b", &addr_b), ttl)
        .await?;

    let channel = BalancedChannel::connect(
        etcd.discovery().await?,
        "echo",
        GrpcOptions::default().policy(BalancePolicy::RoundRobin),
    )
    .await?;
    let mut client = HealthClient::new(channel.clone());

    let mut before = BTreeMap::new();
    for _ in 0..20 {
        let id = call(&mut client)
            .await
            .context("a call failed while both servers ran")?;
        *before.entry(id).or_insert(0) += 1;
    }

    // Kill server a: no deregistration, its process is gone (lease and all).
    server_a.kill();
    drop(registry_a);
    let killed = Instant::now();
    let (mut failed, mut last_failure, mut after) = (0, Duration::ZERO, BTreeMap::new());
    while killed.elapsed() < Duration::from_secs(3) {
        match call(&mut client).await {
            Some(id) => *after.entry(id).or_insert(0) += 1,
            None => {
                failed += 1;
                last_failure = killed.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    server_b.kill();
    drop(registry_b);
    etcd.purge_namespace().await?;
    etcd.close().await?;
    Ok(FailoverReport {
        before,
        failed_after_kill: failed,
        last_failure_after: last_failure,
        after,
    })
}

/// Checks what the scenario promises: both servers served while both ran;
/// after the kill, every call from the first success on went to `b`.
pub fn check(report: &FailoverReport) -> Result<()> {
    ensure!(
        report.before.get("a").copied().unwrap_or(0) > 0
            && report.before.get("b").copied().unwrap_or(0) > 0,
        "round-robin must use both servers: {:?}",
        report.before
    );
    ensure!(
        !report.after.contains_key("a"),
        "a killed server answered: {:?}",
        report.after
    );
    ensure!(
        report.after.get("b").copied().unwrap_or(0) > 10,
        "b must take the traffic: {:?}",
        report.after
    );
    ensure!(
        report.last_failure_after < Duration::from_secs(1),
        "calls kept failing for {:?} after the kill",
        report.last_failure_after
    );
    Ok(())
}
