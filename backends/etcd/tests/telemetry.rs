//! Every operation of the etcd backend is one span and counted once in
//! `im_infra_ops_total`: the trait operations (through the layers), the
//! lease and connection managers and the backend's health check; the
//! backend's own requests inside an operation are not counted again. And
//! closing the backend closes what it handed out.
//!
//! Needs etcd at `IMINFRA_ETCD_ENDPOINTS`; skipped without it unless
//! `IMINFRA_REQUIRE_BACKENDS` names etcd (or is `all`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use im_infra::backend::Backend;
use im_infra::config::WatchOptions;
use im_infra::lock::LockOptions;
use im_infra::once::Claim;
use im_infra::registry::ServiceInstance;
use im_infra::ErrorKind;
use im_infra_etcd::{EtcdBackend, EtcdConfig};
use metrics::{Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};

/// `(backend, capability, op, outcome)` → count.
type Counts = Arc<Mutex<BTreeMap<(String, String, String, String), u64>>>;

/// A recorder that keeps the operation counters.
#[derive(Default, Clone)]
struct Recorded(Counts);

struct Count(Counts, (String, String, String, String));

impl CounterFn for Count {
    fn increment(&self, n: u64) {
        *self.0.lock().unwrap().entry(self.1.clone()).or_default() += n;
    }
    fn absolute(&self, n: u64) {
        self.0.lock().unwrap().insert(self.1.clone(), n);
    }
}

impl metrics::Recorder for Recorded {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() != im_infra::telemetry::OPS_TOTAL {
            return Counter::noop();
        }
        let label = |name: &str| {
            key.labels()
                .find(|l| l.key() == name)
                .map(|l| l.value().to_owned())
                .unwrap_or_default()
        };
        let id = (
            label("backend"),
            label("capability"),
            label("op"),
            label("outcome"),
        );
        Counter::from_arc(Arc::new(Count(self.0.clone(), id)))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

impl Recorded {
    /// Runs of `op` on etcd, by outcome.
    fn of(&self, op: &str) -> BTreeMap<String, (String, u64)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|((b, _, o, _), n)| b == "etcd" && o == op && **n > 0)
            .map(|((_, c, _, outcome), n)| (outcome.clone(), (c.clone(), *n)))
            .collect()
    }

    /// Asserts `op` ran `n` times, all `ok`, counted under `capability`.
    fn ok(&self, op: &str, capability: &str, n: u64) {
        let got = self.of(op);
        let want = BTreeMap::from([("ok".to_owned(), (capability.to_owned(), n))]);
        assert_eq!(got, want, "{op}");
    }

    fn none(&self, op: &str) {
        assert_eq!(self.of(op), BTreeMap::new(), "{op} must not be counted");
    }
}

fn endpoints() -> Option<String> {
    let eps = std::env::var("IMINFRA_ETCD_ENDPOINTS")
        .ok()
        .filter(|v| !v.trim().is_empty());
    if eps.is_none() {
        let required = std::env::var("IMINFRA_REQUIRE_BACKENDS").unwrap_or_default();
        assert!(
            !required
                .split(',')
                .any(|b| b.trim() == "all" || b.trim() == "etcd"),
            "IMINFRA_ETCD_ENDPOINTS is not set but etcd is required"
        );
        eprintln!("skipped: IMINFRA_ETCD_ENDPOINTS is not set");
    }
    eps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_is_counted_once_and_close_closes_what_was_handed_out() {
    let Some(eps) = endpoints() else { return };
    let rec = Recorded::default();
    metrics::set_global_recorder(rec.clone()).expect("the only recorder of this test binary");

    let ns = format!(
        "/telemetry-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut cfg = EtcdConfig::with_endpoints(eps.split(',').map(|e| e.trim().to_owned()));
    cfg.namespace = ns.clone();
    let etcd = EtcdBackend::builder()
        .config(cfg.clone())
        .build()
        .await
        .unwrap();
    rec.ok("connection.connect", "connection", 1);

    // The backend and its connection manager.
    etcd.health_check().await.unwrap();
    rec.ok("backend.health_check", "backend", 1);
    let conn = etcd.connection();
    conn.health_check().await.unwrap();
    conn.reconnect().await.unwrap();
    conn.disconnect();
    conn.connect().await.unwrap();
    rec.ok("connection.health_check", "connection", 1);
    rec.ok("connection.reconnect", "connection", 1);
    rec.ok("connection.disconnect", "connection", 1);
    rec.ok("connection.connect", "connection", 2);

    // Locks: the layer counts, and refuses bad input before etcd.
    let locks = etcd.lock().await.unwrap();
    let guard = locks
        .acquire("job", LockOptions::new(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(locks.is_locked("job").await.unwrap());
    assert!(locks.info("job").await.unwrap().is_some());
    guard.release().await.unwrap();
    let err = locks.is_locked("").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(err.operation(), Some("lock.is_locked"));
    assert_eq!(err.backend(), Some("etcd"));
    rec.ok("lock.acquire", "lock", 1);
    rec.ok("lock.info", "lock", 1);
    assert_eq!(
        rec.of("lock.is_locked"),
        BTreeMap::from([
            ("ok".to_owned(), ("lock".to_owned(), 1)),
            ("invalid_argument".to_owned(), ("lock".to_owned(), 1)),
        ])
    );

    // Config: watch and watch_prefix are two operations.
    let config = etcd.config().await.unwrap();
    config.set("/a", Bytes::from_static(b"1")).await.unwrap();
    assert!(config.get_with_version("/a").await.unwrap().is_some());
    let watch = config
        .watch_prefix("/", WatchOptions::default())
        .await
        .unwrap();
    drop(watch);
    rec.ok("config.set", "config", 1);
    rec.ok("config.get", "config", 1);
    rec.ok("config.watch_prefix", "config", 1);
    rec.none("config.watch");

    // Registry and discovery.
    let registry = etcd.registry().await.unwrap();
    let instance = ServiceInstance::new("svc", "i-1", "127.0.0.1:1");
    registry
        .register(&instance, Duration::from_secs(10))
        .await
        .unwrap();
    let discovery = etcd.discovery().await.unwrap();
    assert_eq!(discovery.instances("svc").await.unwrap().len(), 1);
    rec.ok("registry.register", "registry", 1);
    rec.ok("discovery.instances", "registry", 1);

    // Once and worker ids: their lease revocations are not lease.revoke.
    let once = etcd.once().await.unwrap();
    let Claim::Acquired { token } = once.claim("k", Duration::from_secs(5)).await.unwrap() else {
        panic!("a fresh key is claimed");
    };
    once.complete(
        "k",
        &token,
        Bytes::from_static(b"done"),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    rec.ok("once.claim", "once", 1);
    rec.ok("once.complete", "once", 1);
    let ids = etcd.worker_ids().await.unwrap();
    let worker = ids.allocate(1023, Duration::from_secs(5)).await.unwrap();
    rec.ok("uid.allocate", "uid", 1);
    drop(worker);

    // The lease manager: each method once, nothing counted from inside.
    let leases = etcd.leases();
    let id = leases.create(Duration::from_secs(5)).await.unwrap();
    leases.info(id).await.unwrap();
    assert!(leases.list().await.unwrap().contains(&id));
    leases.refresh(id).await.unwrap();
    let kept = leases.keep_alive(id).await.unwrap();
    assert!(kept.is_held());
    rec.ok("lease.create", "lease", 1);
    rec.ok("lease.info", "lease", 1);
    rec.ok("lease.list", "lease", 1);
    rec.ok("lease.refresh", "lease", 1);
    rec.ok("lease.keep_alive", "lease", 1);
    rec.none("lease.revoke");
    let other = leases.create(Duration::from_secs(5)).await.unwrap();
    leases.revoke(other).await.unwrap();
    rec.ok("lease.revoke", "lease", 1);

    // Close: the registration goes, the keep-alive stops.
    etcd.close().await.unwrap();
    assert!(kept.lost().is_cancelled(), "keep-alives stop on close");
    assert!(!kept.is_held());
    rec.none("registry.deregister");
    let sweeper = EtcdBackend::builder().config(cfg).build().await.unwrap();
    let left = sweeper
        .discovery()
        .await
        .unwrap()
        .instances("svc")
        .await
        .unwrap();
    assert!(left.is_empty(), "deregistered on close: {left:?}");
    sweeper.purge_namespace().await.unwrap();
    sweeper.close().await.unwrap();
}
