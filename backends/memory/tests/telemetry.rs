//! Every operation of the memory backend is counted under its name and
//! labels, the consumer's per-message handling and the health check
//! included: a recording `metrics` recorder is installed for the test.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use im_infra::backend::Backend;
use im_infra::lock::LockOptions;
use im_infra::mq::{handler_fn, ConsumerConfig, Message};
use im_infra::ratelimit::{Rule, Rules};
use im_infra::registry::ServiceInstance;
use im_infra::telemetry::{OPS_TOTAL, OP_DURATION_SECONDS};
use im_infra::ErrorKind;
use im_infra_memory::MemoryBackend;
use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

/// Counts every counter increment and histogram sample by
/// `name{label=value,...}`.
#[derive(Default)]
struct Recording(Mutex<BTreeMap<String, Arc<Count>>>);

#[derive(Default)]
struct Count(AtomicU64);

impl CounterFn for Count {
    fn increment(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    fn absolute(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }
}

impl HistogramFn for Count {
    fn record(&self, _: f64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl Recording {
    fn slot(&self, key: &Key) -> Arc<Count> {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        self.0.lock().unwrap().entry(name).or_default().clone()
    }

    fn get(&self, name: &str, op: &str, outcome: Option<&str>) -> u64 {
        let capability = match op.split('.').next() {
            Some("discovery") => "registry",
            Some("ratelimit") => "ratelimit",
            Some(c) => c,
            None => "",
        };
        let mut labels = format!("backend=memory,capability={capability},op={op}");
        if let Some(o) = outcome {
            labels.push_str(&format!(",outcome={o}"));
        }
        let key = format!("{name}{{{labels}}}");
        self.0
            .lock()
            .unwrap()
            .get(&key)
            .map_or(0, |c| c.0.load(Ordering::Relaxed))
    }
}

impl Recorder for Recording {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.slot(key))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.slot(key))
    }
}

async fn exercise() -> im_infra::Result<()> {
    let backend = MemoryBackend::new();
    let secs = Duration::from_secs(5);

    let cache = backend.cache().await?;
    cache.set("k", Bytes::from_static(b"v"), Some(secs)).await?;
    cache.get("k").await?;
    assert_eq!(
        cache.get("").await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    let limiter = backend
        .limiter(Rules::single("api", Rule::per_second(5))?)
        .await?;
    limiter.check("api", "ana", 1).await?;

    let locks = backend.lock().await?;
    let guard = locks.acquire("job", LockOptions::new(secs)).await?;
    guard.release().await?;

    let config = backend.config().await?;
    config.set("/a", Bytes::from_static(b"1")).await?;
    let _watch = config.watch_prefix("/", Default::default()).await?;

    let registry = backend.registry().await?;
    registry
        .register(&ServiceInstance::new("svc", "a", "127.0.0.1:1"), secs)
        .await?;
    let discovery = backend.discovery().await?;
    discovery.instances("svc").await?;

    let once = backend.once().await?;
    once.claim("job", secs).await?;

    let ids = backend.worker_ids().await?;
    let lease = ids.allocate(7, secs).await?;
    drop(lease);

    let producer = backend.producer().await?;
    producer.produce(Message::new("t", "m")).await?;
    let consumer = backend.consumer(ConsumerConfig::new("g", ["t"])).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let run = tokio::spawn({
        let consumer = consumer.clone();
        async move {
            consumer
                .run(handler_fn(move |_| {
                    let tx = tx.clone();
                    async move {
                        let _ = tx.send(());
                        Ok(())
                    }
                }))
                .await
        }
    });
    tokio::time::timeout(secs, rx.recv())
        .await
        .expect("the message is handled");

    backend.health_check().await?;
    backend.close().await?;
    run.await.expect("run ends")?;
    assert_eq!(
        backend.health_check().await.unwrap_err().operation(),
        Some("backend.health_check")
    );
    Ok(())
}

#[test]
fn every_operation_is_counted_with_its_labels() {
    let recording = Recording::default();
    metrics::with_local_recorder(&recording, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(exercise())
    })
    .unwrap();
    for op in [
        "cache.set",
        "ratelimit.check",
        "lock.acquire",
        "config.set",
        "config.watch_prefix",
        "registry.register",
        "discovery.instances",
        "once.claim",
        "uid.allocate",
        "mq.produce",
        "mq.handle",
        "mq.run",
    ] {
        assert_eq!(recording.get(OPS_TOTAL, op, Some("ok")), 1, "{op}");
        assert_eq!(recording.get(OP_DURATION_SECONDS, op, None), 1, "{op}");
    }
    assert_eq!(recording.get(OPS_TOTAL, "cache.get", Some("ok")), 1);
    assert_eq!(
        recording.get(OPS_TOTAL, "cache.get", Some("invalid_argument")),
        1,
        "a refused argument is counted under its error kind"
    );
    // The consumer was shut down by `close`, directly, not through the
    // layer: no `mq.shutdown`.
    assert_eq!(recording.get(OPS_TOTAL, "mq.shutdown", Some("ok")), 0);
    let health = |outcome| {
        let key = format!(
            "{OPS_TOTAL}{{backend=memory,capability=backend,op=backend.health_check,outcome={outcome}}}"
        );
        recording
            .0
            .lock()
            .unwrap()
            .get(&key)
            .map_or(0, |c| c.0.load(Ordering::Relaxed))
    };
    assert_eq!((health("ok"), health("closed")), (1, 1));
}
