//! Every im-infra capability on the in-process backend, in one run.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use futures::StreamExt;
use im_infra::config::{ConfigManager, WatchOptions};
use im_infra::lock::LockOptions;
use im_infra::mq::{handler_fn, ConsumerSettings, Message};
use im_infra::once::Outcome;
use im_infra::prelude::*;
use im_infra::ratelimit::LimiterSettings;
use im_infra::registry::ServiceInstance;
use im_infra::uid::{Layout, Snowflake};
use im_infra_memory::MemoryBackend;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ChatSettings {
    max_message_len: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    // The composition root picks the backend; everything below only sees traits.
    let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::new());
    println!(
        "backend: {} offers {:?}",
        backend.name(),
        backend.capabilities()
    );

    // Cache.
    let cache = backend.cache().await?;
    cache
        .set(
            "greeting",
            Bytes::from_static(b"hello"),
            Some(Duration::from_secs(60)),
        )
        .await?;
    let hits = cache.incr_by("hits", 1).await?;
    println!(
        "cache: greeting={:?} ttl={:?} hits={hits}",
        cache.get("greeting").await?,
        cache.ttl("greeting").await?
    );

    // Rate limiting: 3 per second per user.
    let limiter = backend
        .limiter(Rules::single("send", Rule::per_second(3))?)
        .await?;
    let mut verdicts = Vec::new();
    for _ in 0..5 {
        verdicts.push(limiter.check("send", "alice", 1).await?.allowed);
    }
    println!("ratelimit: 5 sends by alice at once -> {verdicts:?}");

    // Distributed lock with a fencing token.
    let locks = backend.lock().await?;
    let guard = locks
        .acquire("ledger", LockOptions::new(Duration::from_secs(5)))
        .await?;
    println!(
        "lock: holding {:?} with fencing token {}",
        guard.key(),
        guard.fencing_token()
    );
    guard.release().await?;

    // Configuration: versioned values, CAS, watch, typed manager with hot reload.
    let center = backend.config().await?;
    let path = "/config/dev/im-logic/chat";
    let mut changes = center.watch(path, WatchOptions::default()).await?;
    let v1 = center
        .set_json(
            path,
            &ChatSettings {
                max_message_len: 500,
            },
        )
        .await?;
    let v2 = center
        .compare_and_set_json(
            path,
            &ChatSettings {
                max_message_len: 1000,
            },
            v1,
        )
        .await?;
    println!(
        "config: wrote v{v1} then v{v2}; watch saw v{} and v{}",
        changes.next().await.transpose()?.map_or(0, |e| e.version),
        changes.next().await.transpose()?.map_or(0, |e| e.version)
    );
    let settings = ConfigManager::<ChatSettings>::builder(center.clone(), "im-logic", "chat")
        .env("dev")
        .default_value(ChatSettings {
            max_message_len: 200,
        })
        .validator(|s| {
            if s.max_message_len == 0 {
                Err("must be positive".into())
            } else {
                Ok(())
            }
        })
        .build()?;
    settings.start().await;
    println!(
        "config: manager loaded max_message_len={}",
        settings.current().max_message_len
    );
    settings.stop().await;

    // Registry and discovery.
    let registry = backend.registry().await?;
    let discovery = backend.discovery().await?;
    registry
        .register(
            &ServiceInstance::new("im-logic", "logic-1", "127.0.0.1:9001")
                .with_metadata("zone", "a"),
            Duration::from_secs(10),
        )
        .await?;
    println!(
        "registry: im-logic endpoints {:?}",
        discovery.endpoints("im-logic").await?
    );
    registry.deregister("im-logic", "logic-1").await?;

    // Idempotency: the second run returns the stored outcome.
    let once = backend.once().await?;
    for attempt in 1..=2 {
        let out: Outcome<String> = once
            .run("charge:order-42", Duration::from_secs(3600), || async {
                Ok::<_, std::io::Error>("receipt-7".to_string())
            })
            .await?;
        println!("once: attempt {attempt} -> {out:?}");
    }

    // Messaging: produce, consume in a group, commit after the handler.
    let producer = backend.producer().await?;
    for i in 0..3 {
        let d = producer
            .produce(Message::new("chat.events", format!("msg {i}")).with_key("room-1"))
            .await?;
        println!(
            "mq: produced to partition {} offset {}",
            d.partition, d.offset
        );
    }
    let consumer = backend
        .consumer(ConsumerSettings::new("quickstart", ["chat.events"]))
        .await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let runner = consumer.clone();
    let task = tokio::spawn(async move {
        runner
            .run(handler_fn(move |m| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(String::from_utf8_lossy(&m.payload).into_owned());
                    Ok(())
                }
            }))
            .await
    });
    for _ in 0..3 {
        println!("mq: consumed {:?}", rx.recv().await);
    }
    consumer.shutdown().await?;
    task.await??;

    // Unique ids on a leased worker id.
    let lease = backend
        .worker_ids()
        .await?
        .allocate(1023, Duration::from_secs(30))
        .await?;
    let ids = Snowflake::with_lease(Layout::default(), lease)?;
    let id = ids.next_id()?;
    println!("uid: {id} -> {:?}", ids.decompose(id));

    // Per-resource rules hot-reloaded from the config center.
    let rules = ConfigManager::<LimiterSettings>::builder(center, "im-gateway", "ratelimit")
        .env("dev")
        .build()?;
    rules
        .publish(&LimiterSettings::with_rule("login", Rule::per_minute(10)))
        .await?;
    rules.start().await;
    let managed = backend.limiter(Rules::Managed(rules.clone())).await?;
    println!(
        "ratelimit: managed rule login -> {:?}",
        managed.check("login", "bob", 1).await?
    );
    rules.stop().await;

    backend.close().await?;
    println!("done");
    Ok(())
}
