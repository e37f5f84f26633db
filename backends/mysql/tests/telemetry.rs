//! Every operation of the MySQL backend is one span and counted once in
//! `im_infra_ops_total`: the trait operations (through the layers) and the
//! backend's health check; the backend's own queries inside an operation
//! are not counted again as `db.*`, while the queries of the `Db` it hands
//! out are.
//!
//! Needs MySQL/MariaDB at `IMINFRA_MYSQL_URL`; skipped without it unless
//! `IMINFRA_REQUIRE_BACKENDS` names mysql (or is `all`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use im_infra::backend::Backend;
use im_infra::config::WatchOptions;
use im_infra::lock::LockOptions;
use im_infra::once::Claim;
use im_infra::ratelimit::{Rule, Rules};
use im_infra::ErrorKind;
use im_infra_mysql::MysqlBackend;
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
    /// Runs of `op` on mysql, by outcome.
    fn of(&self, op: &str) -> BTreeMap<String, (String, u64)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|((b, _, o, _), n)| b == "mysql" && o == op && **n > 0)
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

fn url() -> Option<String> {
    let url = std::env::var("IMINFRA_MYSQL_URL")
        .ok()
        .filter(|v| !v.trim().is_empty());
    if url.is_none() {
        let required = std::env::var("IMINFRA_REQUIRE_BACKENDS").unwrap_or_default();
        assert!(
            !required
                .split(',')
                .any(|b| b.trim() == "all" || b.trim() == "mysql"),
            "IMINFRA_MYSQL_URL is not set but mysql is required"
        );
        eprintln!("skipped: IMINFRA_MYSQL_URL is not set");
    }
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_is_counted_once() {
    let Some(url) = url() else { return };
    let rec = Recorded::default();
    metrics::set_global_recorder(rec.clone()).expect("the only recorder of this test binary");

    let ns = format!(
        "telemetry-{}/",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let backend = MysqlBackend::builder()
        .url(url)
        .namespace(ns)
        .table_prefix("iminfra_test_")
        .build()
        .await
        .unwrap();
    backend.health_check().await.unwrap();
    rec.ok("backend.health_check", "backend", 1);

    let cache = backend.cache().await.unwrap();
    cache
        .set("k", Bytes::from_static(b"v"), Some(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(cache.get("k").await.unwrap().is_some());
    assert_eq!(cache.incr_by("n", 2).await.unwrap(), 2);
    let err = cache.get("").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert_eq!(err.operation(), Some("cache.get"));
    assert_eq!(err.backend(), Some("mysql"));
    rec.ok("cache.set", "cache", 1);
    rec.ok("cache.incr_by", "cache", 1);
    assert_eq!(
        rec.of("cache.get"),
        BTreeMap::from([
            ("ok".to_owned(), ("cache".to_owned(), 1)),
            ("invalid_argument".to_owned(), ("cache".to_owned(), 1)),
        ])
    );

    let locks = backend.lock().await.unwrap();
    let guard = locks
        .acquire("job", LockOptions::new(Duration::from_secs(5)))
        .await
        .unwrap();
    assert!(locks.is_locked("job").await.unwrap());
    guard.release().await.unwrap();
    rec.ok("lock.acquire", "lock", 1);
    rec.ok("lock.is_locked", "lock", 1);

    let config = backend.config().await.unwrap();
    config.set("a", Bytes::from_static(b"1")).await.unwrap();
    assert_eq!(config.list("").await.unwrap(), ["a"]);
    drop(config.watch("a", WatchOptions::default()).await.unwrap());
    rec.ok("config.set", "config", 1);
    rec.ok("config.list", "config", 1);
    rec.ok("config.watch", "config", 1);
    rec.none("config.watch_prefix");

    let once = backend.once().await.unwrap();
    let claim = once.claim("w", Duration::from_secs(5)).await.unwrap();
    assert!(matches!(claim, Claim::Acquired { .. }));
    rec.ok("once.claim", "once", 1);

    let ids = backend.worker_ids().await.unwrap();
    let worker = ids.allocate(1023, Duration::from_secs(5)).await.unwrap();
    drop(worker);
    rec.ok("uid.allocate", "uid", 1);

    let limiter = backend
        .limiter(Rules::single("api", Rule::per_second(10)).unwrap())
        .await
        .unwrap();
    assert!(limiter.check("api", "ana", 1).await.unwrap().allowed);
    rec.ok("ratelimit.check", "ratelimit", 1);

    // None of those queries counted as `db.*`; the handed-out `Db` does.
    for op in [
        "db.exec",
        "db.query",
        "db.text",
        "db.conn",
        "db.health_check",
    ] {
        rec.none(op);
    }
    backend.db().exec("DO 1", ()).await.unwrap();
    rec.ok("db.exec", "db", 1);

    backend.purge_namespace().await.unwrap();
    backend.close().await.unwrap();
    let err = backend.cache().await.err().expect("closed");
    assert_eq!(err.kind(), ErrorKind::Closed);
}
