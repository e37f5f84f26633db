//! im-infra's Kafka backend against raw `rdkafka`, in one run.
//!
//! ```text
//! scripts/services.sh up && source .services/env
//! cargo bench -p im-infra-kafka --bench vs_raw
//! ```
//!
//! Both sides use clients built from the same librdkafka properties
//! ([`KafkaSettings::producer_properties`], [`KafkaSettings::consumer_settings`]).
//!
//! - produce: 64 tasks each produce 1 KiB messages and await the broker's
//!   acknowledgement; rounds of 1.5 s alternate raw and im-infra (7 pairs).
//! - consume: a topic is filled with 1 KiB messages, then read whole by a
//!   new group per round, alternately a raw `StreamConsumer` (receive, store
//!   the offset) and an im-infra consumer with an empty handler (5 pairs).
//!
//! `RATIO` lines print the median of the per-pair im-infra / raw ratios.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use im_infra::backend::Backend;
use im_infra::mq::{handler_fn, ConsumerSettings, Message, StartPosition, TopicSpec};
use im_infra_bench_support::{compare_throughput, median, server_env, Rounds};
use im_infra_kafka::rdkafka::consumer::{Consumer as _, StreamConsumer};
use im_infra_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use im_infra_kafka::rdkafka::util::Timeout;
use im_infra_kafka::{KafkaBackend, KafkaSettings};

const PAYLOAD: usize = 1024;
const CONSUME_MESSAGES: u64 = 50_000;

fn unique(what: &str) -> String {
    format!("{what}-{}", std::process::id())
}

async fn consume_raw(cfg: &KafkaSettings, topic: &str, group: &str) -> f64 {
    let consumer: StreamConsumer = cfg
        .consumer_properties(group, StartPosition::Earliest)
        .create()
        .expect("raw consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut n = 0u64;
    let mut start = None;
    while n < CONSUME_MESSAGES {
        let m = consumer.recv().await.expect("recv");
        // Timed from the first message: group joining is not throughput.
        start.get_or_insert_with(Instant::now);
        consumer
            .store_offset(
                im_infra_kafka::rdkafka::Message::topic(&m),
                im_infra_kafka::rdkafka::Message::partition(&m),
                im_infra_kafka::rdkafka::Message::offset(&m),
            )
            .expect("store");
        n += 1;
    }
    let secs = start.map_or(1.0, |s| s.elapsed().as_secs_f64());
    tokio::task::spawn_blocking(move || drop(consumer))
        .await
        .expect("close");
    n as f64 / secs
}

async fn consume_ours(backend: &KafkaBackend, topic: &str, group: &str) -> f64 {
    let consumer = backend
        .consumer(ConsumerSettings::new(group, [topic]))
        .await
        .expect("consumer");
    let count = Arc::new(AtomicU64::new(0));
    let first = Arc::new(std::sync::OnceLock::new());
    let done = Arc::new(tokio::sync::Notify::new());
    let task = tokio::spawn({
        let (consumer, count, first, done) =
            (consumer.clone(), count.clone(), first.clone(), done.clone());
        async move {
            consumer
                .run(handler_fn(move |_m| {
                    let (count, first, done) = (count.clone(), first.clone(), done.clone());
                    async move {
                        first.get_or_init(Instant::now);
                        if count.fetch_add(1, Ordering::Relaxed) + 1 == CONSUME_MESSAGES {
                            done.notify_one();
                        }
                        Ok(())
                    }
                }))
                .await
        }
    });
    done.notified().await;
    let secs = first.get().map_or(1.0, |s| s.elapsed().as_secs_f64());
    consumer.shutdown().await.expect("shutdown");
    task.await.expect("join").expect("run");
    CONSUME_MESSAGES as f64 / secs
}

fn main() {
    let Some(brokers) = server_env("IMINFRA_KAFKA_BROKERS") else {
        return;
    };
    im_infra_bench_support::runtime().block_on(async move {
        let backend = KafkaBackend::builder()
            .brokers(brokers.split(','))
            .client_id("im-infra-bench")
            .build()
            .await
            .expect("backend");
        let cfg = backend.settings().clone();
        let payload = vec![b'x'; PAYLOAD];

        // Produce: the same properties, the same topic, 1 KiB messages.
        let topic = unique("bench-produce");
        backend.create_topic(&TopicSpec::new(&topic, 4)).await.expect("topic");
        let raw_producer: FutureProducer = cfg.producer_properties().create().expect("raw producer");
        let rounds = Rounds { tasks: 64, ..Rounds::default() };
        let (p, t, body) = (raw_producer.clone(), topic.clone(), payload.clone());
        let raw = Arc::new(move |i: usize| {
            let (p, t, body) = (p.clone(), t.clone(), body.clone());
            async move {
                let key = format!("k{}", i % 64);
                let rec = FutureRecord::to(&t).key(&key).payload(&body);
                p.send(rec, Timeout::After(Duration::from_secs(1))).await.is_ok()
            }
        });
        let producer = backend.producer().await.expect("producer");
        let (p, t, body) = (producer.clone(), topic.clone(), bytes::Bytes::from(payload.clone()));
        let ours = Arc::new(move |i: usize| {
            let (p, t, body) = (p.clone(), t.clone(), body.clone());
            async move {
                p.produce(Message::new(t, body).with_key(format!("k{}", i % 64)))
                    .await
                    .is_ok()
            }
        });
        compare_throughput("kafka produce 1 KiB", rounds, raw, ours).await;

        // Consume: fill a topic, then read it whole with a new group.
        let topic = unique("bench-consume");
        backend.create_topic(&TopicSpec::new(&topic, 4)).await.expect("topic");
        let batch: Vec<Message> = (0..CONSUME_MESSAGES)
            .map(|i| {
                Message::new(&topic, bytes::Bytes::from(payload.clone()))
                    .with_key(format!("k{}", i % 64))
            })
            .collect();
        for chunk in batch.chunks(5000) {
            for r in producer.produce_batch(chunk.to_vec()).await.expect("fill") {
                r.expect("filled");
            }
        }
        let (mut raws, mut ourss, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for pair in 0..5 {
            let (r, o) = if pair % 2 == 0 {
                let r = consume_raw(&cfg, &topic, &format!("raw-{pair}-{}", std::process::id())).await;
                (r, consume_ours(&backend, &topic, &format!("ours-{pair}-{}", std::process::id())).await)
            } else {
                let o = consume_ours(&backend, &topic, &format!("ours-{pair}-{}", std::process::id())).await;
                (consume_raw(&cfg, &topic, &format!("raw-{pair}-{}", std::process::id())).await, o)
            };
            ratios.push(o / r);
            raws.push(r);
            ourss.push(o);
        }
        println!(
            "RATIO kafka consume 1 KiB: im-infra {:.0} msg/s, raw {:.0} msg/s (medians), ratio {:.3} (median of 5 paired reads of {CONSUME_MESSAGES} messages)",
            median(ourss),
            median(raws),
            median(ratios)
        );

        producer.close().await.expect("close producer");
        backend.close().await.expect("close");
    });
}
