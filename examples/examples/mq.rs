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

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use im_infra::mq::{handler_fn, Consumer, ConsumerSettings, Message, ReceivedMessage};
use im_infra::{Error, ErrorKind, RetrySettings};
use im_infra_examples::{parts, run_id, start};
use im_infra_runtime::Runtime;
use tokio::sync::mpsc;

/// A consumer-group member that hands this run's messages (their payload
/// starts with the run id) to the example; earlier runs' messages on the
/// same topics (on Kafka) are read and skipped, and a redelivered message
/// (at least once) is counted once. Its handler fails on `fail_on`.
struct Collector {
    consumer: Arc<dyn Consumer>,
    task: tokio::task::JoinHandle<im_infra::Result<()>>,
    rx: mpsc::UnboundedReceiver<ReceivedMessage>,
    seen: HashSet<Bytes>,
}

impl Collector {
    async fn start(
        runtime: &Runtime,
        settings: ConsumerSettings,
        run: &str,
        fail_on: Option<String>,
    ) -> Result<Self> {
        let consumer = runtime.consumer(settings).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let run = run.to_owned();
        let handler = handler_fn(move |m: ReceivedMessage| {
            let (tx, fail_on, run) = (tx.clone(), fail_on.clone(), run.clone());
            async move {
                if fail_on
                    .as_deref()
                    .is_some_and(|p| m.payload.as_ref() == p.as_bytes())
                {
                    return Err(Error::new(ErrorKind::Internal, "cannot handle this one"));
                }
                if m.payload.starts_with(run.as_bytes()) {
                    let _ = tx.send(m);
                }
                Ok(())
            }
        });
        let task = tokio::spawn({
            let consumer = consumer.clone();
            async move { consumer.run(handler).await }
        });
        Ok(Collector {
            consumer,
            task,
            rx,
            seen: HashSet::new(),
        })
    }

    /// The next `n` distinct messages of this run.
    async fn take(&mut self, n: usize) -> Result<Vec<ReceivedMessage>> {
        let mut got = Vec::new();
        while got.len() < n {
            let m = tokio::time::timeout(Duration::from_secs(30), self.rx.recv())
                .await
                .context("messages arrive within 30 s")?
                .context("the consumer runs")?;
            if self.seen.insert(m.payload.clone()) {
                got.push(m);
            }
        }
        Ok(got)
    }

    /// Leaves the group (the offsets of handled messages committed).
    async fn stop(self) -> Result<()> {
        self.consumer.shutdown().await?;
        self.task.await??;
        Ok(())
    }
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
    let mut events = Collector::start(runtime, settings, run, None).await?;
    let got = events.take(3).await?;
    events.stop().await?;
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
    // The dead letters are read while the orders are: the poison is
    // dead-lettered whenever its partition comes.
    let mut orders = Collector::start(runtime, settings, run, Some(poison.clone())).await?;
    let dlq = ConsumerSettings::new(format!("dlq-{run}"), ["examples.orders.dlq"]);
    let mut dead_letters = Collector::start(runtime, dlq, run, None).await?;
    let dead = dead_letters.take(1).await?;
    let seen: Vec<String> = orders
        .take(15)
        .await?
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    for room in rooms {
        let order: Vec<String> = seen.iter().filter(|p| p.contains(room)).cloned().collect();
        let expected: Vec<String> = (0..5).map(|i| format!("{run}:{room}:{i}")).collect();
        ensure!(order == expected, "{room} in order: {order:?}");
    }
    orders.stop().await?;
    dead_letters.stop().await?;
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
