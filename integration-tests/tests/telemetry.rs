//! Every operation of every backend is one span and is counted once: with
//! `metrics-util`'s recording recorder installed before the backends are
//! built, each test drives every capability a backend offers and checks
//! that `im_infra_ops_total` counts each operation exactly as often as it
//! was called, with its `backend`, `capability`, `op` and `outcome`
//! labels, and that `im_infra_op_duration_seconds` has its durations. Then
//! the backend is closed, twice: the close is one operation
//! (`backend.close`), counted once; what the backend registered is
//! deregistered at once, and the closed backend answers `Closed`. The maintenance operations, one
//! layer for every backend, are counted the same way, with their outcome.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use im_infra::backend::{Backend, Capability, Maintenance};
use im_infra::config::WatchOptions;
use im_infra::lock::LockOptions;
use im_infra::mq::{ConsumerSettings, Handler, Message, ReceivedMessage, TopicSpec};
use im_infra::once::OnceExt;
use im_infra::ratelimit::{Rule, Rules};
use im_infra::registry::ServiceInstance;
use im_infra::telemetry::{OPS_TOTAL, OP_DURATION_SECONDS};
use im_infra_conformance::servers::{server_or_skip, ETCD_ENV, KAFKA_ENV, MYSQL_ENV, REDIS_ENV};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;

/// The recorder, installed once per process before any backend is built.
fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("no other recorder in this test binary");
        snapshotter
    })
}

/// Per (capability, op): the count of each outcome and whether durations
/// were recorded, for one backend.
type Seen = BTreeMap<(String, String), (BTreeMap<String, u64>, bool)>;

/// Everything recorded so far, by backend. A snapshot of the debugging
/// recorder drains it (counters go back to 0), and the tests run in
/// parallel: every snapshot is added here, so no test loses another's.
fn seen(backend: &str) -> Seen {
    static ALL: Mutex<BTreeMap<String, Seen>> = Mutex::new(BTreeMap::new());
    let mut all = ALL.lock().unwrap_or_else(|p| p.into_inner());
    for (key, _, _, value) in snapshotter().snapshot().into_vec() {
        let (kind, key) = key.into_parts();
        let labels: BTreeMap<String, String> = key
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        let (Some(be), Some(cap), Some(op)) = (
            labels.get("backend"),
            labels.get("capability"),
            labels.get("op"),
        ) else {
            continue;
        };
        let entry = all
            .entry(be.clone())
            .or_default()
            .entry((cap.clone(), op.clone()))
            .or_default();
        match (kind, key.name(), value) {
            (MetricKind::Counter, name, DebugValue::Counter(n)) if name == OPS_TOTAL && n > 0 => {
                *entry
                    .0
                    .entry(labels.get("outcome").cloned().unwrap_or_default())
                    .or_default() += n;
            }
            (MetricKind::Histogram, name, DebugValue::Histogram(v))
                if name == OP_DURATION_SECONDS && !v.is_empty() =>
            {
                entry.1 = true;
            }
            _ => {}
        }
    }
    all.get(backend).cloned().unwrap_or_default()
}

/// A (capability, op) and how often it was called (`None`: at least once,
/// e.g. background renewals).
type Expect = (&'static str, &'static str, Option<u64>);
const ONCE: Option<u64> = Some(1);
const AT_LEAST_ONCE: Option<u64> = None;

/// A handler that accepts everything.
struct Accept;

#[async_trait::async_trait]
impl Handler for Accept {
    async fn handle(&self, _message: &ReceivedMessage) -> im_infra::Result<()> {
        Ok(())
    }
}

/// Calls every operation of every capability `b` offers (one of them with
/// bad input); returns the (capability, op) pairs that must be counted.
async fn drive(b: &dyn Backend, topic: &str) -> Result<Vec<Expect>> {
    let mut expect = vec![("backend", "backend.health_check", ONCE)];
    b.health_check().await?;
    let has = |c| b.supports(c);
    if has(Capability::Cache) {
        let c = b.cache().await?;
        let v = || Bytes::from_static(b"1");
        c.set("k", v(), None).await?;
        c.set_nx("k2", v(), Some(Duration::from_secs(60))).await?;
        c.get("k").await?;
        let _ = c.get("").await; // invalid_argument, counted as such
        c.exists("k").await?;
        c.expire("k", Duration::from_secs(60)).await?;
        c.ttl("k").await?;
        c.get_with_ttl("k").await?;
        c.get_many_with_ttl(&["k", "n"]).await?;
        c.incr_by("n", 1).await?;
        c.get_many(&["k", "n"]).await?;
        c.set_many(&[("a", v())], None).await?;
        c.delete(&["k", "k2", "n", "a"]).await?;
        expect.extend([
            ("cache", "cache.get", Some(2)),
            ("cache", "cache.set", ONCE),
            ("cache", "cache.set_nx", ONCE),
            ("cache", "cache.delete", ONCE),
            ("cache", "cache.exists", ONCE),
            ("cache", "cache.expire", ONCE),
            ("cache", "cache.ttl", ONCE),
            ("cache", "cache.get_with_ttl", ONCE),
            ("cache", "cache.get_many_with_ttl", ONCE),
            ("cache", "cache.incr_by", ONCE),
            ("cache", "cache.get_many", ONCE),
            ("cache", "cache.set_many", ONCE),
        ]);
    }
    if has(Capability::Limiter) {
        let l = b
            .limiter(Rules::single("api", Rule::per_second(100))?)
            .await?;
        l.check("api", "u", 1).await?;
        expect.push(("ratelimit", "ratelimit.check", ONCE));
    }
    if has(Capability::Lock) {
        let l = b.lock().await?;
        let opts = LockOptions::new(Duration::from_secs(10));
        let g = l.acquire("t", opts).await?;
        g.refresh(Duration::from_secs(10)).await?;
        l.is_locked("t").await?;
        if l.capabilities().info {
            l.info("t").await?;
            expect.push(("lock", "lock.info", ONCE));
        }
        g.release().await?;
        let g = l.try_acquire("t", opts).await?.context("free")?;
        g.release().await?;
        expect.extend([
            ("lock", "lock.acquire", ONCE),
            ("lock", "lock.try_acquire", ONCE),
            ("lock", "lock.is_locked", ONCE),
            ("lock", "lease.extend", AT_LEAST_ONCE),
            ("lock", "lease.release", Some(2)),
        ]);
    }
    if has(Capability::Config) {
        let c = b.config().await?;
        let v = c.set("/t/a", Bytes::from_static(b"1")).await?;
        c.compare_and_set("/t/a", Bytes::from_static(b"2"), v)
            .await?;
        c.get_with_version("/t/a").await?;
        c.list("/t/").await?;
        drop(c.watch("/t/a", WatchOptions::default()).await?);
        drop(c.watch_prefix("/t/", WatchOptions::default()).await?);
        c.delete("/t/a").await?;
        expect.extend([
            ("config", "config.get", ONCE),
            ("config", "config.set", ONCE),
            ("config", "config.delete", ONCE),
            ("config", "config.list", ONCE),
            ("config", "config.compare_and_set", ONCE),
            ("config", "config.watch", ONCE),
            ("config", "config.watch_prefix", ONCE),
        ]);
    }
    if has(Capability::Registry) {
        let r = b.registry().await?;
        let d = b.discovery().await?;
        let mut i = ServiceInstance::new("svc", "i1", "127.0.0.1:7000");
        r.register(&i, Duration::from_secs(10)).await?;
        i.metadata.insert("zone".into(), "a".into());
        r.update(&i).await?;
        r.list_services().await?;
        d.instances("svc").await?;
        drop(d.watch("svc").await?);
        r.deregister("svc", "i1").await?;
        expect.extend([
            ("registry", "registry.register", ONCE),
            ("registry", "registry.deregister", ONCE),
            ("registry", "registry.update", ONCE),
            ("registry", "registry.list_services", ONCE),
            ("registry", "discovery.instances", ONCE),
            ("registry", "discovery.watch", ONCE),
        ]);
    }
    if has(Capability::Once) {
        let o = b.once().await?;
        let hour = Duration::from_secs(3600);
        o.run("job", hour, || async { Ok::<_, std::io::Error>(1) })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        o.outcome("job").await?;
        o.reset("job").await?;
        let _ = o.abandon("job", "not-a-token").await; // lock_not_held
        expect.extend([
            ("once", "once.claim", ONCE),
            ("once", "once.complete", ONCE),
            ("once", "once.abandon", ONCE),
            ("once", "once.outcome", ONCE),
            ("once", "once.reset", ONCE),
        ]);
    }
    if has(Capability::WorkerIds) {
        let lease = b
            .worker_ids()
            .await?
            .allocate(1023, Duration::from_secs(10))
            .await?;
        lease.release().await?;
        expect.extend([
            ("uid", "uid.allocate", ONCE),
            ("uid", "lease.release", ONCE),
        ]);
    }
    if has(Capability::Messaging) {
        let p = b.producer().await?;
        p.produce(Message::new(topic, Bytes::from_static(b"m")))
            .await?;
        p.produce_batch(vec![Message::new(topic, Bytes::from_static(b"n"))])
            .await?;
        p.flush(Duration::from_secs(10)).await?;
        let c = b
            .consumer(ConsumerSettings::new("telemetry", [topic]))
            .await?;
        let running = {
            let c = c.clone();
            tokio::spawn(async move { c.run(Arc::new(Accept)).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        if c.capabilities().pause_resume {
            c.pause().await?;
            c.resume().await?;
            expect.extend([("mq", "mq.pause", ONCE), ("mq", "mq.resume", ONCE)]);
        }
        c.shutdown().await?;
        tokio::time::timeout(Duration::from_secs(30), running).await???;
        p.close().await?;
        expect.extend([
            ("mq", "mq.produce", ONCE),
            ("mq", "mq.produce_batch", ONCE),
            ("mq", "mq.flush", ONCE),
            ("mq", "mq.close", ONCE),
            ("mq", "mq.run", ONCE),
            ("mq", "mq.shutdown", ONCE),
        ]);
    }
    Ok(expect)
}

/// Drives `backend` (messages go to `topic`) and checks what was recorded
/// under its name.
async fn check(backend: Arc<dyn Backend>, topic: &str) -> Result<()> {
    let name = backend.name();
    let expect = drive(&*backend, topic).await?;
    let closes = |seen: &Seen| -> u64 {
        seen.get(&("backend".to_string(), "backend.close".to_string()))
            .map_or(0, |(outcomes, _)| outcomes.values().sum())
    };
    let before = closes(&seen(name));
    backend.close().await?;
    backend.close().await?; // answered with the first close's result
    let seen = seen(name);
    ensure!(
        closes(&seen) - before == 1,
        "{name}: two calls of close counted {} times, not once",
        closes(&seen) - before
    );
    for (cap, op, calls) in &expect {
        let (outcomes, timed) =
            seen.get(&(cap.to_string(), op.to_string()))
                .with_context(|| {
                    format!(
                        "{name}: {op} ({cap}) was not counted; seen {:?}",
                        seen.keys()
                    )
                })?;
        let counted: u64 = outcomes.values().sum();
        match calls {
            Some(n) => ensure!(
                counted == *n,
                "{name}: {op} called {n} times, counted {counted} ({outcomes:?})"
            ),
            None => ensure!(counted >= 1, "{name}: {op} not counted"),
        }
        ensure!(*timed, "{name}: {op} has no duration");
    }
    if backend.supports(Capability::Cache) {
        let (outcomes, _) = &seen[&("cache".to_string(), "cache.get".to_string())];
        ensure!(
            outcomes.get("ok") == Some(&1) && outcomes.get("invalid_argument") == Some(&1),
            "{name}: cache.get outcomes {outcomes:?}"
        );
    }
    Ok(())
}

/// Closing a backend deregisters at once what it registered (seen from
/// `peer`, another instance on the same namespace, where there is one),
/// and the closed backend answers `Closed`.
async fn close_closes_what_was_handed_out(
    backend: Arc<dyn Backend>,
    peer: Option<Arc<dyn Backend>>,
) -> Result<()> {
    let name = backend.name();
    if let (true, Some(peer)) = (backend.supports(Capability::Registry), &peer) {
        let r = backend.registry().await?;
        r.register(
            &ServiceInstance::new("closing", "i1", "127.0.0.1:7001"),
            Duration::from_secs(60),
        )
        .await?;
        backend.close().await?;
        let left = peer.discovery().await?.instances("closing").await?;
        ensure!(
            left.is_empty(),
            "{name}: still registered after close: {left:?}"
        );
    } else {
        backend.close().await?;
    }
    backend.close().await?; // idempotent
    let err = backend.health_check().await.unwrap_err();
    ensure!(
        err.kind() == im_infra::ErrorKind::Closed,
        "{name}: a closed backend's health check: {err}"
    );
    if let Some(peer) = peer {
        peer.close().await?;
    }
    Ok(())
}

/// Calls each maintenance operation once on `b` (a fresh instance, purged
/// last) and checks that each was counted once, under `maintenance`, with
/// the outcome it had: `Ok` counts `ok`, an error counts its kind.
async fn maintenance_is_counted<B: Maintenance>(b: B) -> Result<()> {
    let name = b.name();
    fn outcome<T>(r: im_infra::Result<T>) -> String {
        r.map_or_else(|e| e.kind().as_str().to_owned(), |_| "ok".to_owned())
    }
    let expect = [
        (
            "maintenance.revoke_registration",
            outcome(b.revoke_registration("telemetry", "nobody").await),
        ),
        (
            "maintenance.revoke_worker_id",
            outcome(b.revoke_worker_id(1).await),
        ),
        (
            "maintenance.compact_config_history",
            outcome(b.compact_config_history().await),
        ),
        (
            "maintenance.purge_namespace",
            outcome(b.purge_namespace().await),
        ),
    ];
    b.close().await?;
    let seen = seen(name);
    for (op, outcome) in expect {
        let (outcomes, timed) = seen
            .get(&("maintenance".to_string(), op.to_string()))
            .with_context(|| format!("{name}: {op} was not counted"))?;
        ensure!(
            outcomes.len() == 1 && outcomes.get(&outcome) == Some(&1),
            "{name}: {op} must be counted once as {outcome}, counted {outcomes:?}"
        );
        ensure!(*timed, "{name}: {op} has no duration");
    }
    Ok(())
}

fn namespace() -> String {
    format!(
        "telemetry-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Drives a backend, then checks the close path on two fresh instances of
/// the same namespace.
async fn run<F, Fut>(make: F, topic: &str) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Arc<dyn Backend>>>,
{
    snapshotter();
    check(make().await?, topic).await?;
    close_closes_what_was_handed_out(make().await?, Some(make().await?)).await
}

/// [`run`] on instances made by `build`, then [`maintenance_is_counted`]
/// on one more.
async fn run_maintained<B, F, Fut>(build: F, topic: &str) -> Result<()>
where
    B: Maintenance,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<B>>,
{
    let make = || async { Ok(Arc::new(build().await?) as Arc<dyn Backend>) };
    // Boxed: the nested futures are too deep for the compiler's layout.
    Box::pin(run(make, topic)).await?;
    Box::pin(maintenance_is_counted(build().await?)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_operations_are_spans_and_counted_once() -> Result<()> {
    snapshotter();
    let fresh = || Arc::new(im_infra_memory::MemoryBackend::new()) as Arc<dyn Backend>;
    check(fresh(), "telemetry").await?;
    // In one process there is no other instance to look from: the memory
    // backend's own tests check that close deregisters.
    close_closes_what_was_handed_out(fresh(), None).await?;
    maintenance_is_counted(im_infra_memory::MemoryBackend::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_operations_are_spans_and_counted_once() -> Result<()> {
    let Some(url) = server_or_skip("redis", REDIS_ENV) else {
        return Ok(());
    };
    let ns = namespace();
    let build = || async {
        anyhow::Ok(
            im_infra_redis::RedisBackend::builder()
                .url(&url)
                .namespace(&ns)
                .build()
                .await?,
        )
    };
    run_maintained(build, "unused").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_operations_are_spans_and_counted_once() -> Result<()> {
    let Some(eps) = server_or_skip("etcd", ETCD_ENV) else {
        return Ok(());
    };
    let ns = format!("/{}", namespace());
    let build = || async {
        let mut cfg =
            im_infra_etcd::EtcdSettings::with_endpoints(eps.split(',').map(str::to_owned));
        cfg.namespace = ns.clone();
        anyhow::Ok(
            im_infra_etcd::EtcdBackend::builder()
                .settings(cfg)
                .build()
                .await?,
        )
    };
    snapshotter();
    // The lease manager's operations count too.
    let b = build().await?;
    let leases = b.leases();
    let id = leases.create(Duration::from_secs(5)).await?;
    leases.info(id).await?;
    leases.revoke(id).await?;
    b.close().await?;
    let seen = seen("etcd");
    for op in ["lease.create", "lease.info", "lease.revoke"] {
        let counted: u64 = seen
            .get(&("lease".to_string(), op.to_string()))
            .map_or(0, |(o, _)| o.values().sum());
        ensure!(
            counted == 1,
            "etcd lease manager: {op} counted {counted} times"
        );
    }
    run_maintained(build, "unused").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_operations_are_spans_and_counted_once() -> Result<()> {
    let Some(url) = server_or_skip("mysql", MYSQL_ENV) else {
        return Ok(());
    };
    let ns = format!("{}/", namespace());
    let build = || async {
        anyhow::Ok(
            im_infra_mysql::MysqlBackend::builder()
                .url(&url)
                .namespace(&ns)
                .table_prefix("iminfra_test_")
                .build()
                .await?,
        )
    };
    snapshotter();
    // The purge the backend runs in the background, run now, counts too.
    let b = build().await?;
    b.purge_expired().await?;
    b.close().await?;
    let counted: u64 = seen("mysql")
        .get(&("backend".to_string(), "backend.purge_expired".to_string()))
        .map_or(0, |(o, _)| o.get("ok").copied().unwrap_or(0));
    ensure!(counted == 1, "mysql: purge_expired counted {counted} times");
    run_maintained(build, "unused").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_operations_are_spans_and_counted_once() -> Result<()> {
    let Some(brokers) = server_or_skip("kafka", KAFKA_ENV) else {
        return Ok(());
    };
    let ns = namespace();
    let make = || async {
        let b = im_infra_kafka::KafkaBackend::builder()
            .brokers(brokers.split(',').map(str::to_owned))
            .namespace(&ns)
            .build()
            .await?;
        b.create_topic(&TopicSpec::new("telemetry", 1)).await?;
        Ok(Arc::new(b) as Arc<dyn Backend>)
    };
    run(make, "telemetry").await
}
