//! Messaging. Basic: produce, consume in a group, the offset committed
//! after the handler. Advanced: messages with one key keep their order
//! across partitions; a message the handler keeps failing goes to a
//! dead-letter topic, and the rest go on.
//!
//! ```text
//! cargo run --example mq [basic|advanced]
//! IMINFRA_CONFIG=examples/servers.yaml cargo run --example mq
//! ```
//!
//! On Kafka the topics `examples.events`, `examples.orders` and
//! `examples.orders.dlq` must exist (`examples/servers.yaml` creates them).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use im_infra::mq::{handler_fn, ConsumerSettings, Message, ReceivedMessage};
use im_infra::{Error, ErrorKind, RetrySettings};
use im_infra_examples::{parts, run_id, start};
use im_infra_runtime::Runtime;
use tokio::sync::mpsc;

/// Consumes as `settings` say until `n` messages of this run (their payload
/// starts with `run`) arrived; returns those. Messages of earlier runs on
/// the same topics (on Kafka) are read and skipped. The handler fails on
/// the payload `fail_on`.
async fn consume(
    runtime: &Runtime,
    settings: ConsumerSettings,
    run: &str,
    n: usize,
    fail_on: Option<String>,
) -> Result<Vec<ReceivedMessage>> {
    let consumer = runtime.consumer(settings).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handler = handler_fn(move |m: ReceivedMessage| {
        let (tx, fail_on) = (tx.clone(), fail_on.clone());
        async move {
            if fail_on
                .as_deref()
                .is_some_and(|p| m.payload.as_ref() == p.as_bytes())
            {
                return Err(Error::new(ErrorKind::Internal, "cannot handle this one"));
            }
            let _ = tx.send(m);
            Ok(())
        }
    });
    let task = tokio::spawn({
        let consumer = consumer.clone();
        async move { consumer.run(handler).await }
    });
    let mut got = Vec::new();
    while got.len() < n {
        let m: ReceivedMessage = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .context("messages arrive")?
            .context("the consumer runs")?;
        if m.payload.starts_with(run.as_bytes()) {
            got.push(m);
        }
    }
    consumer.shutdown().await?;
    task.await??;
    Ok(got)
}

async fn basic(runtime: &Runtime, run: &str) -> Result<()> {
    let producer = runtime.producer();
    for i in 0..3 {
        let d = producer
            .produce(Message::new("examples.events", format!("{run}:event {i}")))
            .await?;
        println!(
            "basic: produced to partition {} offset {}",
            d.partition, d.offset
        );
    }
    let settings = ConsumerSettings::new(format!("events-{run}"), ["examples.events"]);
    let got = consume(runtime, settings, run, 3, None).await?;
    println!(
        "basic: consumed {} message(s), the offsets committed after each",
        got.len()
    );
    Ok(())
}

async fn advanced(runtime: &Runtime, run: &str) -> Result<()> {
    let producer = runtime.producer();
    let rooms = ["room-1", "room-2", "room-3"];
    for i in 0..5 {
        for room in rooms {
            let m = Message::new("examples.orders", format!("{run}:{room}:{i}")).with_key(room);
            producer.produce(m).await?;
        }
    }
    let poison = format!("{run}:poison");
    producer
        .produce(Message::new("examples.orders", poison.clone()))
        .await?;
    producer.flush(Duration::from_secs(10)).await?;
    let settings = ConsumerSettings::new(format!("orders-{run}"), ["examples.orders"])
        .dead_letter("examples.orders.dlq")
        .handler_retry(RetrySettings {
            max_retries: 1,
            initial_interval: Duration::from_millis(10),
            ..RetrySettings::default()
        });
    let seen: Vec<String> = consume(runtime, settings, run, 15, Some(poison.clone()))
        .await?
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    for room in rooms {
        let order: Vec<String> = seen.iter().filter(|p| p.contains(room)).cloned().collect();
        let expected: Vec<String> = (0..5).map(|i| format!("{run}:{room}:{i}")).collect();
        ensure!(order == expected, "{room} in order: {order:?}");
    }
    let dlq = ConsumerSettings::new(format!("dlq-{run}"), ["examples.orders.dlq"]);
    let dead = consume(runtime, dlq, run, 1, None).await?;
    ensure!(dead[0].payload.as_ref() == poison.as_bytes());
    println!(
        "advanced: 15 keyed messages in order per key; dead letter: {:?}",
        dead.iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let parts = parts()?;
    let runtime = start("example-mq").await?;
    let run = run_id();
    if parts.basic {
        basic(&runtime, &run).await?;
    }
    if parts.advanced {
        advanced(&runtime, &run).await?;
    }
    runtime.shutdown().await?;
    Ok(())
}
