//! The service runtime: composition from configuration, settings from the
//! config center first, hot-reloaded limiter rules, the metrics and health
//! endpoint, the coordinator policy, and graceful shutdown — in process
//! with no configuration, and on the real servers with one file.
//!
//! The runtime's subscriber is process-global; these tests run without it
//! (`logging(false)`), and `runtime_log_reload.rs` tests it alone.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use im_infra::backend::Backend;
use im_infra::config::{ConfigCenter, ConfigCenterExt};
use im_infra::lock::LockExt;
use im_infra::mq::{handler_fn, ConsumerSettings, Message};
use im_infra::once::OnceExt;
use im_infra::registry::{ServiceEventKind, ServiceInstance};
use im_infra::ErrorKind;
use im_infra_conformance::faults::until;
use im_infra_conformance::servers::{server_or_skip, ETCD_ENV, KAFKA_ENV, MYSQL_ENV, REDIS_ENV};
use im_infra_integration_tests::http;
use im_infra_runtime::{BackendKind, Role, Runtime, RuntimeBuilder};
use serde_json::json;
use tokio::io::AsyncBufReadExt;

fn unique(what: &str) -> String {
    format!(
        "{what}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A runtime of `service` reading nothing from the process environment and
/// leaving the process's subscriber alone.
fn builder(service: &str) -> RuntimeBuilder {
    Runtime::builder(service).environment(false).logging(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_configuration_every_capability_works_in_process() -> Result<()> {
    let rt = builder("svc-plain").start().await?;
    assert_eq!(rt.composition().backends(), vec![BackendKind::Memory]);
    assert_eq!(rt.backend(Role::Cache).name(), "memory");

    rt.cache().set("k", Bytes::from_static(b"v"), None).await?;
    assert_eq!(rt.cache().get("k").await?, Some(Bytes::from_static(b"v")));
    let guard = rt.lock().try_lock("job", Duration::from_secs(5)).await?;
    assert!(rt.lock().is_locked("job").await?);
    guard.release().await?;
    let instance = ServiceInstance::new("svc-plain", "a", "127.0.0.1:1");
    rt.registry()
        .register(&instance, Duration::from_secs(30))
        .await?;
    assert_eq!(rt.discovery().instances("svc-plain").await?.len(), 1);
    let ran = rt
        .once()
        .run("op-1", Duration::from_secs(60), || async {
            Ok::<_, im_infra::Error>(7u32)
        })
        .await
        .map_err(|e| anyhow::anyhow!("once: {:?}", e.kind()))?;
    assert!(ran.executed());
    rt.producer().produce(Message::new("t", "m")).await?;
    assert!(
        rt.worker_ids()
            .allocate(1023, Duration::from_secs(30))
            .await?
            .worker_id()
            <= 1023
    );
    let e = rt.limiter().check("send", "alice", 1).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "no rules configured: {e}");
    rt.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn an_unknown_backend_or_a_missing_capability_fails_the_start_naming_both() -> Result<()> {
    for (backends, names) in [
        (json!({"cache": "mongo"}), ["cache", "mongo"]),
        (json!({"mq": "redis"}), ["mq", "redis"]),
        (json!({"cache": "kafka"}), ["cache", "kafka"]),
        (json!({"search": "redis"}), ["search", "unknown"]),
    ] {
        let e = builder("svc-bad")
            .section("backends", &backends)
            .start()
            .await
            .expect_err("must not start");
        let text = e.to_string();
        ensure!(names.iter().all(|n| text.contains(n)), "{backends}: {text}");
    }
    let e = builder("svc-bad")
        .section("reddis", json!({"urls": ["redis://x"]}))
        .start()
        .await
        .expect_err("an unknown section");
    ensure!(e.to_string().contains("reddis"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_rules_come_from_the_file_then_the_center_and_hot_reload() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("svc.yaml");
    std::fs::write(
        &file,
        "ratelimit:\n  rules:\n    send: { rate: 1000, period: 1s }\n",
    )?;
    let rt = builder("svc-rules").config_file(&file).start().await?;
    let limiter = rt.limiter();
    for _ in 0..5 {
        ensure!(
            limiter.check("send", "alice", 1).await?.allowed,
            "the file's 1000/s"
        );
    }
    let path = format!("/config/{}/svc-rules/ratelimit", rt.env());
    rt.config()
        .set_json(
            &path,
            &json!({"rules": {"send": {"rate": 1, "period": "1m"}}}),
        )
        .await?;
    let started = Instant::now();
    let user = &std::sync::atomic::AtomicU32::new(0);
    let limiter = &limiter;
    until(
        Duration::from_secs(1),
        "the center's 1/min rule applies",
        || async move {
            // A fresh user each try: only the rule in force decides.
            let key = format!("bob-{}", user.fetch_add(1, Ordering::SeqCst));
            let first = limiter
                .check("send", &key, 1)
                .await
                .is_ok_and(|d| d.allowed);
            let second = limiter
                .check("send", &key, 1)
                .await
                .is_ok_and(|d| d.allowed);
            first && !second
        },
    )
    .await?;
    println!(
        "a rule written to the center applied in {:?}",
        started.elapsed()
    );
    rt.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_serves_operation_metrics_health_and_readiness() -> Result<()> {
    let rt = builder("svc-metrics")
        .section("metrics", json!({"listen": "127.0.0.1:0"}))
        .start()
        .await?;
    let addr = rt.metrics_addr().context("a listener")?;
    rt.cache().set("k", Bytes::from_static(b"v"), None).await?;
    metrics::counter!("svc_sends_total").increment(3);

    let (status, body) = http::get(addr, "/metrics").await?;
    ensure!(status == 200, "/metrics: {status}");
    let ops = body
        .lines()
        .find(|l| l.starts_with("im_infra_ops_total{") && l.contains("backend=\"memory\""))
        .with_context(|| format!("no im_infra_ops_total of memory in:\n{body}"))?;
    // The labels of the process's recorder (installed by the first runtime
    // of this test binary to serve metrics).
    ensure!(
        ops.contains("service=\"") && ops.contains("env=\""),
        "{ops}"
    );
    ensure!(
        body.contains("svc_sends_total"),
        "the service's own metric:\n{body}"
    );
    assert_eq!(http::get(addr, "/healthz").await?.0, 200);
    let (status, body) = http::get(addr, "/readyz").await?;
    ensure!(
        status == 200 && body.contains("memory: ok"),
        "/readyz: {status} {body}"
    );
    assert_eq!(http::get(addr, "/nope").await?.0, 404);

    rt.request_shutdown();
    let (status, body) = http::get(addr, "/readyz").await?;
    ensure!(
        status == 503 && body.contains("shutting down"),
        "/readyz once stopping: {status} {body}"
    );
    rt.shutdown().await?;
    ensure!(
        http::get(addr, "/healthz").await.is_err(),
        "the listener is closed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_message_in_hand_then_deregisters_and_releases_locks() -> Result<()> {
    let rt = builder("svc-stop")
        .section("shutdown", json!({"timeout": "5s"}))
        .start()
        .await?;
    let instance = ServiceInstance::new("svc-stop", "a", "127.0.0.1:1");
    rt.registry()
        .register(&instance, Duration::from_secs(60))
        .await?;
    let mut events = rt.discovery().watch("svc-stop").await?;
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    tokio::spawn({
        let seen = seen.clone();
        async move {
            while let Some(Ok(e)) = events.next().await {
                seen.lock().push((e.kind, e.instance.id, Instant::now()));
            }
        }
    });
    let has = |kind: ServiceEventKind| {
        let seen = seen.clone();
        move || {
            let found = seen.lock().iter().any(|(k, id, _)| *k == kind && id == "a");
            async move { found }
        }
    };
    until(
        Duration::from_secs(2),
        "the watch sees the instance",
        has(ServiceEventKind::Add),
    )
    .await?;
    let guard = rt.lock().lock("ledger", Duration::from_secs(60)).await?;
    let consumer = rt.consumer(ConsumerSettings::new("g", ["jobs"])).await?;
    let (started, finished) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let handler = handler_fn({
        let (started, finished) = (started.clone(), finished.clone());
        move |_| {
            let (started, finished) = (started.clone(), finished.clone());
            async move {
                started.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(500)).await;
                finished.store(true, Ordering::SeqCst);
                Ok(())
            }
        }
    });
    rt.producer().produce(Message::new("jobs", "one")).await?;

    // The service consumes; once its handler holds the message, shutdown
    // begins as SIGTERM would begin it.
    let stop = rt.shutdown_signal();
    let service = async move {
        let trigger = async {
            let started = &started;
            until(
                Duration::from_secs(5),
                "the handler has the message",
                || async move { started.load(Ordering::SeqCst) },
            )
            .await?;
            stop.cancel();
            anyhow::Ok(())
        };
        let (ran, triggered) = tokio::join!(consumer.run(handler), trigger);
        triggered?;
        ran?;
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), rt.run(service)).await??;

    ensure!(
        finished.load(Ordering::SeqCst),
        "the message in hand was finished before run returned"
    );
    ensure!(
        !guard.is_held(),
        "the lock still held at shutdown was released"
    );
    until(
        Duration::from_secs(1),
        "the watch sees the instance leave",
        has(ServiceEventKind::Delete),
    )
    .await?;
    Ok(())
}

/// The servers' addresses, or `None` (a loud skip) when they are not up.
struct Servers {
    etcd: Vec<String>,
    redis: String,
    mysql: String,
    kafka: Vec<String>,
}

fn servers() -> Option<Servers> {
    let list = |v: String| v.split(',').map(str::to_owned).collect::<Vec<_>>();
    Some(Servers {
        etcd: list(server_or_skip("etcd", ETCD_ENV)?),
        redis: server_or_skip("redis", REDIS_ENV)?,
        mysql: server_or_skip("mysql", MYSQL_ENV)?,
        kafka: list(server_or_skip("kafka", KAFKA_ENV)?),
    })
}

/// The one file that moves a service to the real servers; `namespace`
/// keeps each run's keys, tables and topics apart.
fn service_file(
    dir: &Path,
    s: &Servers,
    namespace: &str,
    topic: &str,
) -> Result<std::path::PathBuf> {
    let file = dir.join("service.yaml");
    let yaml = serde_yaml_ng::to_string(&json!({
        "env": "it",
        "backends": {
            "coord": "etcd", "cache": "redis", "ratelimit": "redis",
            "once": "mysql", "mq": "kafka", "uid": "etcd",
        },
        "etcd": {"endpoints": s.etcd, "namespace": namespace},
        "redis": {"urls": [s.redis], "namespace": namespace},
        "db": {"url": s.mysql, "namespace": namespace},
        "kafka": {
            "brokers": s.kafka, "namespace": format!("{namespace}."),
            "topics": [{"name": topic, "partitions": 1, "replication_factor": 1}],
        },
        "ratelimit": {"rules": {"send": {"rate": 100, "period": "1s"}}},
        "metrics": {"listen": "127.0.0.1:0"},
        "shutdown": {"timeout": "10s"},
    }))?;
    std::fs::write(&file, yaml)?;
    Ok(file)
}

/// A service that panics is a failed service, not a skipped shutdown: its
/// instance is deregistered and its lock released, and `run` reports the
/// panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_service_still_deregisters_and_releases_and_reports_the_panic() -> Result<()> {
    let rt = builder("svc-panic").start().await?;
    let instance = ServiceInstance::new("svc-panic", "a", "127.0.0.1:1");
    rt.registry()
        .register(&instance, Duration::from_secs(60))
        .await?;
    let mut events = rt.discovery().watch("svc-panic").await?;
    let added = events.next().await.context("the watch ended")??;
    ensure!(added.kind == ServiceEventKind::Add, "{added:?}");
    let guard = rt.lock().lock("ledger", Duration::from_secs(60)).await?;
    let service = async {
        if guard.is_held() {
            panic!("expected: this test checks that a panicking service is shut down");
        }
        Ok::<(), std::io::Error>(())
    };
    let result = tokio::time::timeout(Duration::from_secs(10), rt.run(service)).await?;
    ensure!(
        matches!(&result, Err(im_infra_runtime::RunError::Service(e)) if e.to_string().contains("panicked")),
        "{result:?}"
    );
    ensure!(!guard.is_held(), "the lock was released");
    let gone = tokio::time::timeout(Duration::from_secs(2), events.next())
        .await
        .context("no event after the shutdown")?
        .context("the watch ended")??;
    ensure!(
        gone.kind == ServiceEventKind::Delete && gone.instance.id == "a",
        "{gone:?}"
    );
    Ok(())
}

async fn etcd_center(s: &Servers, namespace: &str) -> Result<Arc<dyn ConfigCenter>> {
    let etcd = im_infra_etcd::EtcdBackend::builder()
        .endpoints(s.etcd.clone())
        .namespace(namespace)
        .build()
        .await?;
    Ok(etcd.config().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_file_moves_the_service_to_the_real_servers_with_settings_from_the_center_first(
) -> Result<()> {
    let Some(s) = servers() else { return Ok(()) };
    let (namespace, service) = (unique("rt"), unique("svc"));
    let center_ns = unique("from-center");
    let dir = tempfile::tempdir()?;
    let file = service_file(dir.path(), &s, &namespace, "events")?;
    // The center's Redis settings win over the file's.
    let center = etcd_center(&s, &namespace).await?;
    let redis_path = format!("/config/it/{service}/redis");
    center
        .set_json(
            &redis_path,
            &json!({"urls": [s.redis], "namespace": center_ns}),
        )
        .await?;

    let rt = builder(&service).config_file(&file).start().await?;
    let kinds = rt.composition().backends();
    for k in [
        BackendKind::Etcd,
        BackendKind::Redis,
        BackendKind::Mysql,
        BackendKind::Kafka,
    ] {
        ensure!(kinds.contains(&k), "{k} in use: {kinds:?}");
    }
    rt.cache().set("k", Bytes::from_static(b"v"), None).await?;
    let read_in = |ns: String| {
        let url = s.redis.clone();
        async move {
            let other = im_infra_redis::RedisBackend::builder()
                .url(url)
                .namespace(ns)
                .build()
                .await?;
            let v = other.cache().await?.get("k").await?;
            other.close().await?;
            anyhow::Ok(v)
        }
    };
    ensure!(
        read_in(center_ns).await? == Some(Bytes::from_static(b"v")),
        "written under the center's namespace"
    );
    ensure!(
        read_in(namespace.clone()).await?.is_none(),
        "not under the file's"
    );

    ensure!(
        rt.limiter().check("send", "alice", 1).await?.allowed,
        "the file's rules on Redis"
    );
    rt.once()
        .run("op", Duration::from_secs(60), || async {
            Ok::<_, im_infra::Error>(1u8)
        })
        .await
        .map_err(|e| anyhow::anyhow!("once on MySQL: {:?}", e.kind()))?;
    rt.producer()
        .produce(Message::new("events", "hello"))
        .await?;
    rt.worker_ids()
        .allocate(1023, Duration::from_secs(30))
        .await?;

    let addr = rt.metrics_addr().context("a listener")?;
    let (status, body) = http::get(addr, "/metrics").await?;
    ensure!(status == 200, "/metrics: {status}");
    for backend in ["etcd", "redis", "mysql", "kafka"] {
        let label = format!("backend=\"{backend}\"");
        ensure!(
            body.lines()
                .any(|l| l.starts_with("im_infra_ops_total{") && l.contains(&label)),
            "no im_infra_ops_total of {backend} in:\n{body}"
        );
    }
    let (status, body) = http::get(addr, "/readyz").await?;
    ensure!(status == 200, "/readyz: {status} {body}");
    for backend in ["etcd", "redis", "mysql", "kafka"] {
        ensure!(body.contains(&format!("{backend}: ok")), "/readyz: {body}");
    }
    rt.shutdown().await?;
    center.delete(&redis_path).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_coordinator_fails_the_start_or_is_replaced_in_process_by_policy(
) -> Result<()> {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let etcd = json!({"endpoints": [format!("http://{closed}")], "connect_timeout": "1s"});
    let started = Instant::now();
    let e = builder("svc-nocoord")
        .section("backends", json!({"coord": "etcd"}))
        .section("etcd", &etcd)
        .start()
        .await
        .expect_err("policy fail");
    ensure!(
        e.to_string().contains("coordinator (etcd) is unreachable"),
        "{e}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "failed in {:?}",
        started.elapsed()
    );

    let rt = builder("svc-nocoord")
        .section("backends", json!({"coord": "etcd", "uid": "etcd"}))
        .section("etcd", &etcd)
        .section("startup", json!({"coordinator_unreachable": "defaults"}))
        .start()
        .await?;
    assert_eq!(rt.composition().kind(Role::Coord), BackendKind::Memory);
    assert_eq!(rt.composition().kind(Role::Uid), BackendKind::Memory);
    rt.cache().set("k", Bytes::from_static(b"v"), None).await?;
    rt.shutdown().await?;
    Ok(())
}

/// Lines of the record file (one per handled message).
fn recorded(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Starts the child service and waits for its `ready`.
async fn start_child(
    config: &Path,
    record: &Path,
    id: &str,
    group: &str,
) -> Result<tokio::process::Child> {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_runtime_child"))
        .args(["--config", &config.display().to_string()])
        .args(["--record", &record.display().to_string()])
        .args([
            "--id",
            id,
            "--topic",
            "work",
            "--group",
            group,
            "--work-ms",
            "150",
        ])
        .env_remove("IMINFRA_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if line == "ready" {
                return anyhow::Ok(());
            }
        }
        bail!("the child exited before it was ready")
    });
    ready.await.context("the child was not ready in 60 s")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(child)
}

fn sigterm(child: &tokio::process::Child) -> Result<()> {
    let pid = child.id().context("the child has a pid")?;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -TERM {pid}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_consuming_loses_no_message_and_leaves_discovery_at_once() -> Result<()> {
    let Some(s) = servers() else { return Ok(()) };
    let namespace = unique("rt-stop");
    let dir = tempfile::tempdir()?;
    let config = service_file(dir.path(), &s, &namespace, "work")?;
    let record = dir.path().join("record.txt");
    const MESSAGES: usize = 40;

    // The messages, produced before any consumer joins.
    let kafka = im_infra_kafka::KafkaBackend::builder()
        .brokers(s.kafka.clone())
        .namespace(format!("{namespace}."))
        .topic("work", 1)
        .build()
        .await?;
    let producer = kafka.producer().await?;
    for i in 0..MESSAGES {
        producer
            .produce(Message::new("work", format!("m{i:02}")))
            .await?;
    }
    producer.flush(Duration::from_secs(10)).await?;
    let etcd = im_infra_etcd::EtcdBackend::builder()
        .endpoints(s.etcd.clone())
        .namespace(&namespace)
        .build()
        .await?;
    let discovery = etcd.discovery().await?;
    let service = "im-runtime-child";

    let record = record.as_path();
    let mut first = start_child(&config, record, "first", "workers").await?;
    ensure!(
        discovery
            .instances(service)
            .await?
            .iter()
            .any(|i| i.id == "first"),
        "registered"
    );
    until(
        Duration::from_secs(60),
        "the child handles messages",
        || async move { recorded(record).len() >= 5 },
    )
    .await?;
    sigterm(&first)?;
    let signalled = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(15), first.wait())
        .await
        .context("the child did not exit within 15 s of SIGTERM")??;
    let exited_in = signalled.elapsed();
    ensure!(status.success(), "the child's shutdown failed: {status}");
    let gone_in = loop {
        let listed = discovery.instances(service).await;
        if listed.is_ok_and(|l| l.iter().all(|i| i.id != "first")) {
            break signalled.elapsed();
        }
        ensure!(
            signalled.elapsed() < exited_in + Duration::from_secs(3),
            "the instance is still in discovery 3 s after the child exited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let handled_first = recorded(record).len();
    println!(
        "SIGTERM → exit in {exited_in:?}, out of discovery {gone_in:?} after the signal (TTL 30 s); {handled_first} of {MESSAGES} handled by the first child"
    );
    ensure!(handled_first < MESSAGES, "the signal came mid-run");

    // A second member of the group takes the rest from the committed offset.
    let mut second = start_child(&config, record, "second", "workers").await?;
    until(
        Duration::from_secs(60),
        "every message is handled",
        || async move { recorded(record).len() >= MESSAGES },
    )
    .await?;
    sigterm(&second)?;
    let status = tokio::time::timeout(Duration::from_secs(15), second.wait()).await??;
    ensure!(
        status.success(),
        "the second child's shutdown failed: {status}"
    );

    let lines = recorded(record);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for l in &lines {
        *counts.entry(l.clone()).or_default() += 1;
    }
    let missing: Vec<String> = (0..MESSAGES)
        .map(|i| format!("m{i:02}"))
        .filter(|m| !counts.contains_key(m))
        .collect();
    let twice: Vec<&String> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(m, _)| m)
        .collect();
    println!(
        "{} lines, {} distinct, missing {missing:?}, handled twice {twice:?}",
        lines.len(),
        counts.len()
    );
    ensure!(missing.is_empty(), "lost: {missing:?}");
    ensure!(
        twice.is_empty(),
        "the message in hand at SIGTERM was committed, so none is handled twice: {twice:?}"
    );
    etcd.close().await?;
    kafka.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_ignores_the_signal_is_dropped_at_the_deadline_and_reported() -> Result<()> {
    let rt = builder("svc-stubborn")
        .section("shutdown", json!({"timeout": "1s"}))
        .start()
        .await?;
    let guard = rt.lock().lock("stubborn", Duration::from_secs(60)).await?;
    let stop = rt.shutdown_signal();
    let began = Instant::now();
    let service = async move {
        stop.cancel(); // as SIGTERM would
        std::future::pending::<()>().await; // never winds down
        anyhow::Ok(())
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), rt.run(service)).await?;
    let took = began.elapsed();
    match outcome {
        Err(im_infra_runtime::RunError::Shutdown(e)) => {
            ensure!(e.kind() == ErrorKind::Timeout, "{e}")
        }
        other => bail!("a missed deadline is reported: {other:?}"),
    }
    ensure!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "the deadline (1 s) bounds the wait, and every step still ran: {took:?}"
    );
    ensure!(
        !guard.is_held(),
        "the lock is released once the service is dropped"
    );
    Ok(())
}
