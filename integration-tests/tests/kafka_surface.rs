//! The Kafka backend's own surface against the real tansu broker: the
//! bounded producer queue, namespaces, an unreachable broker, a panicking
//! handler, topic creation and `close`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use im_infra::backend::Backend;
use im_infra::mq::{handler_fn, Consumer, ConsumerSettings, Message, ReceivedMessage, TopicSpec};
use im_infra::{ErrorKind, RetrySettings};
use im_infra_conformance::faults::until;
use im_infra_conformance::servers::{server_or_skip, KAFKA_ENV};
use im_infra_kafka::{KafkaBackend, ProducerTuning};

fn unique(what: &str) -> String {
    format!(
        "{what}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

fn brokers(list: &str) -> Vec<String> {
    list.split(',').map(str::to_owned).collect()
}

/// Runs `consumer` with a handler that records every message (calling
/// `on_message` first); returns the records and the task.
fn record_all(
    consumer: Arc<dyn Consumer>,
) -> (
    Arc<Mutex<Vec<ReceivedMessage>>>,
    tokio::task::JoinHandle<im_infra::Result<()>>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let task = tokio::spawn({
        let seen = seen.clone();
        async move {
            consumer
                .run(handler_fn(move |m| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap_or_else(|p| p.into_inner()).push(m);
                        Ok(())
                    }
                }))
                .await
        }
    });
    (seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_producer_queue_answers_resource_exhausted() -> Result<()> {
    let Some(list) = server_or_skip("kafka", KAFKA_ENV) else {
        return Ok(());
    };
    let backend = KafkaBackend::builder()
        .brokers(brokers(&list))
        .producer(ProducerTuning {
            queue_max_messages: 10,
            enqueue_timeout: Duration::ZERO,
            // Messages wait in the queue for a second before they are sent.
            linger: Duration::from_secs(1),
            ..ProducerTuning::default()
        })
        .build()
        .await?;
    let topic = unique("queue");
    backend.create_topic(&TopicSpec::new(&topic, 1)).await?;
    let producer = backend.producer().await?;
    let batch = (0..30)
        .map(|i| Message::new(&topic, format!("{i}")))
        .collect();
    let results = producer.produce_batch(batch).await?;
    let full = results
        .iter()
        .filter(|r| matches!(r, Err(e) if e.kind() == ErrorKind::ResourceExhausted))
        .count();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    ensure!(
        full > 0,
        "30 messages into a queue of 10: some must be refused"
    );
    ensure!(
        ok + full == 30,
        "every message either stored or refused as queue-full: {results:?}"
    );
    ensure!(
        results[..10].iter().all(Result::is_ok),
        "the first 10 fit the queue and are stored"
    );
    let refused = results
        .iter()
        .find_map(|r| r.as_ref().err())
        .context("a refusal")?;
    ensure!(refused.is_retryable(), "queue-full is retryable");
    producer.close().await?;
    backend.close().await?;
    Ok(())
}

/// A batch waits for room in the queue once: after one message was
/// refused, none after it is queued, even if the queue drained meanwhile
/// (a later message of the same key would otherwise overtake the refused
/// one when the caller sends it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_queues_nothing_after_a_message_the_full_queue_refused() -> Result<()> {
    let Some(list) = server_or_skip("kafka", KAFKA_ENV) else {
        return Ok(());
    };
    let enqueue_timeout = Duration::from_millis(300);
    let backend = KafkaBackend::builder()
        .brokers(brokers(&list))
        .producer(ProducerTuning {
            queue_max_messages: 10,
            enqueue_timeout,
            // The queue drains after half a second: a per-message wait
            // would see room again from the twelfth message on.
            linger: Duration::from_millis(500),
            ..ProducerTuning::default()
        })
        .build()
        .await?;
    let topic = unique("queue");
    backend.create_topic(&TopicSpec::new(&topic, 1)).await?;
    let producer = backend.producer().await?;
    let batch = (0..30)
        .map(|i| Message::new(&topic, format!("{i}")).with_key("one key"))
        .collect();
    let started = std::time::Instant::now();
    let results = producer.produce_batch(batch).await?;
    let stored = results.iter().take_while(|r| r.is_ok()).count();
    ensure!(stored == 10, "the first 10 fit the queue: {results:?}");
    ensure!(
        results[stored..]
            .iter()
            .all(|r| matches!(r, Err(e) if e.kind() == ErrorKind::ResourceExhausted)),
        "after the first refusal every message is refused: {results:?}"
    );
    println!("batch answered in {:?}", started.elapsed());
    producer.close().await?;
    backend.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_prefix_topics_and_groups_on_the_broker() -> Result<()> {
    let Some(list) = server_or_skip("kafka", KAFKA_ENV) else {
        return Ok(());
    };
    let ns = format!("{}.", unique("ns"));
    let namespaced = KafkaBackend::builder()
        .brokers(brokers(&list))
        .namespace(&ns)
        .build()
        .await?;
    let plain = KafkaBackend::builder()
        .brokers(brokers(&list))
        .build()
        .await?;
    ensure!(
        namespaced
            .create_topic(&TopicSpec::new("orders", 2))
            .await?,
        "created"
    );
    ensure!(
        !namespaced
            .create_topic(&TopicSpec::new("orders", 2))
            .await?,
        "creating it again reports that it existed"
    );
    namespaced
        .producer()
        .await?
        .produce(Message::new("orders", "o-1").with_key("k"))
        .await?;

    // A client without the namespace sees the real topic name.
    let real = format!("{ns}orders");
    let (seen, task) = record_all(
        plain
            .consumer(ConsumerSettings::new(unique("plain"), [real.as_str()]))
            .await?,
    );
    until(
        Duration::from_secs(30),
        "the message on the real topic",
        || {
            let n = seen.lock().unwrap_or_else(|p| p.into_inner()).len();
            async move { n >= 1 }
        },
    )
    .await?;
    task.abort();
    let m = seen.lock().unwrap_or_else(|p| p.into_inner())[0].clone();
    ensure!(m.topic == real && m.payload == "o-1", "{m:?}");

    // The namespaced backend's consumers see the logical name.
    let consumer = namespaced
        .consumer(ConsumerSettings::new("billing", ["orders"]))
        .await?;
    let (seen, task) = record_all(consumer.clone());
    until(
        Duration::from_secs(30),
        "the message through the namespace",
        || {
            let n = seen.lock().unwrap_or_else(|p| p.into_inner()).len();
            async move { n >= 1 }
        },
    )
    .await?;
    consumer.shutdown().await?;
    task.await??;
    let m = seen.lock().unwrap_or_else(|p| p.into_inner())[0].clone();
    ensure!(m.topic == "orders", "logical name: {m:?}");

    for bad in ["has/slash", "white space"] {
        let err = KafkaBackend::builder()
            .brokers(brokers(&list))
            .namespace(bad)
            .build()
            .await
            .err()
            .context("a bad namespace is refused")?;
        ensure!(err.kind() == ErrorKind::InvalidConfig, "{err}");
    }
    namespaced.close().await?;
    plain.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_gives_retryable_errors_within_the_deadlines() -> Result<()> {
    // Port 1 on loopback: nothing listens there.
    let backend = KafkaBackend::builder()
        .brokers(["127.0.0.1:1"])
        .request_timeout(Duration::from_secs(1))
        .producer(ProducerTuning {
            delivery_timeout: Duration::from_secs(1),
            ..ProducerTuning::default()
        })
        .build()
        .await?;
    let started = std::time::Instant::now();
    let err = backend
        .producer()
        .await?
        .produce(Message::new("t", "x"))
        .await
        .err()
        .context("producing without a broker must fail")?;
    ensure!(err.is_retryable(), "produce: {err} ({:?})", err.kind());
    let err = backend
        .health_check()
        .await
        .err()
        .context("the health check must fail without a broker")?;
    ensure!(err.is_retryable(), "health check: {err} ({:?})", err.kind());
    let err = backend
        .create_topic(&TopicSpec::new("t", 1))
        .await
        .err()
        .context("topic creation must fail without a broker")?;
    ensure!(err.is_retryable(), "create topic: {err} ({:?})", err.kind());
    ensure!(
        started.elapsed() < Duration::from_secs(15),
        "bounded by the configured deadlines"
    );
    backend.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_failed_attempt_not_a_dead_consumer() -> Result<()> {
    let Some(list) = server_or_skip("kafka", KAFKA_ENV) else {
        return Ok(());
    };
    let backend = KafkaBackend::builder()
        .brokers(brokers(&list))
        .build()
        .await?;
    let topic = unique("panic");
    backend.create_topic(&TopicSpec::new(&topic, 1)).await?;
    let producer = backend.producer().await?;
    producer.produce(Message::new(&topic, "boom")).await?;
    producer.produce(Message::new(&topic, "calm")).await?;
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let consumer = backend
        .consumer(
            ConsumerSettings::new(unique("group"), [&topic]).handler_retry(RetrySettings {
                max_retries: 5,
                initial_interval: Duration::from_millis(10),
                max_interval: Duration::from_millis(50),
                multiplier: 2.0,
                jitter: false,
            }),
        )
        .await?;
    let task = tokio::spawn({
        let (consumer, attempts) = (consumer.clone(), attempts.clone());
        async move {
            consumer
                .run(handler_fn(move |m| {
                    let attempts = attempts.clone();
                    async move {
                        let payload = String::from_utf8_lossy(&m.payload).into_owned();
                        attempts
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((payload.clone(), m.attempt));
                        if payload == "boom" && m.attempt == 1 {
                            panic!("handler bug");
                        }
                        Ok(())
                    }
                }))
                .await
        }
    });
    until(Duration::from_secs(30), "both messages handled", || {
        let n = attempts.lock().unwrap_or_else(|p| p.into_inner()).len();
        async move { n >= 3 }
    })
    .await?;
    consumer.shutdown().await?;
    task.await??;
    let attempts = attempts.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let expected = vec![
        ("boom".to_owned(), 1),
        ("boom".to_owned(), 2),
        ("calm".to_owned(), 1),
    ];
    ensure!(attempts == expected, "{attempts:?}");
    backend.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_stops_consumers_and_refuses_new_work() -> Result<()> {
    let Some(list) = server_or_skip("kafka", KAFKA_ENV) else {
        return Ok(());
    };
    let backend = KafkaBackend::builder()
        .brokers(brokers(&list))
        .build()
        .await?;
    let topic = unique("close");
    backend.create_topic(&TopicSpec::new(&topic, 1)).await?;
    let producer = backend.producer().await?;
    producer.produce(Message::new(&topic, "x")).await?;
    let consumer = backend
        .consumer(ConsumerSettings::new(unique("group"), [&topic]))
        .await?;
    let (seen, task) = record_all(consumer.clone());
    until(Duration::from_secs(30), "the message", || {
        let n = seen.lock().unwrap_or_else(|p| p.into_inner()).len();
        async move { n >= 1 }
    })
    .await?;
    backend.close().await?;
    // The running member stops by itself: its run returns Ok.
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .context("run did not end after close")???;
    match producer.produce(Message::new(&topic, "y")).await {
        Err(e) if e.kind() == ErrorKind::Closed => {}
        other => bail!("produce after close: {other:?}"),
    }
    match consumer.run(handler_fn(|_| async { Ok(()) })).await {
        Err(e) if e.kind() == ErrorKind::Closed => {}
        other => bail!("run after close: {other:?}"),
    }
    match backend.consumer(ConsumerSettings::new("g", [&topic])).await {
        Err(e) if e.kind() == ErrorKind::Closed => {}
        Err(e) => bail!("consumer after close: {e}"),
        Ok(_) => bail!("consumer after close accepted"),
    }
    backend.close().await?;
    Ok(())
}

/// A consumer holds its own client and stop signal, not the backend value:
/// dropping the last `KafkaBackend` (without closing it) leaves a running
/// consumer consuming. Only `close` stops what the backend handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_backend_value_leaves_its_consumers_running() -> Result<()> {
    let Some(list) = server_or_skip("kafka", KAFKA_ENV) else {
        return Ok(());
    };
    let backend = KafkaBackend::builder()
        .brokers(brokers(&list))
        .build()
        .await?;
    let topic = unique("dropped");
    backend.create_topic(&TopicSpec::new(&topic, 1)).await?;
    let producer = backend.producer().await?;
    let consumer = backend
        .consumer(ConsumerSettings::new(unique("group"), [&topic]))
        .await?;
    let (seen, task) = record_all(consumer.clone());
    drop(backend);
    producer
        .produce(Message::new(&topic, "after the drop"))
        .await?;
    until(
        Duration::from_secs(30),
        "the message sent after the drop",
        || {
            let n = seen.lock().unwrap_or_else(|p| p.into_inner()).len();
            async move { n >= 1 }
        },
    )
    .await?;
    ensure!(
        !task.is_finished(),
        "the consumer stopped with the backend value"
    );
    consumer.shutdown().await?;
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .context("run did not end after shutdown")???;
    Ok(())
}
