//! Every im-infra capability, started by the runtime: in process with no
//! configuration, on the real servers with one file.
//!
//! ```text
//! cargo run --example quickstart
//! IMINFRA_CONFIG=examples/servers.yaml cargo run --example quickstart
//! ```

use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use futures::StreamExt;
use im_infra::config::WatchOptions;
use im_infra::lock::LockOptions;
use im_infra::mq::{handler_fn, ConsumerSettings, Message};
use im_infra::once::Outcome;
use im_infra::prelude::*;
use im_infra::ratelimit::LimiterSettings;
use im_infra::registry::ServiceInstance;
use im_infra::uid::{Layout, Snowflake};
use im_infra_runtime::Runtime;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ChatSettings {
    max_message_len: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    // The runtime composes the backends from configuration (none: all in
    // process), installs the log subscriber, and hands out the traits.
    let runtime = Runtime::builder("im-logic")
        .section(
            "ratelimit",
            LimiterSettings::with_rule("send", Rule::per_second(3)),
        )
        .start()
        .await?;
    println!(
        "runtime: {} in {}: {}",
        runtime.service(),
        runtime.env(),
        runtime.composition()
    );

    // Cache.
    let cache = runtime.cache();
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
    let limiter = runtime.limiter();
    let mut verdicts = Vec::new();
    for _ in 0..5 {
        verdicts.push(limiter.check("send", "alice", 1).await?.allowed);
    }
    println!("ratelimit: 5 sends by alice at once -> {verdicts:?}");

    // Distributed lock with a fencing token.
    let locks = runtime.lock();
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
    let center = runtime.config();
    let path = &format!("/config/{}/im-logic/chat", runtime.env());
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
    let settings = runtime
        .config_manager::<ChatSettings>("chat")
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
    let registry = runtime.registry();
    let discovery = runtime.discovery();
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
    let once = runtime.once();
    for attempt in 1..=2 {
        let out: Outcome<String> = once
            .run("charge:order-42", Duration::from_secs(3600), || async {
                Ok::<_, std::io::Error>("receipt-7".to_string())
            })
            .await?;
        println!("once: attempt {attempt} -> {out:?}");
    }

    // Messaging: produce, consume in a group, commit after the handler.
    let producer = runtime.producer();
    for i in 0..3 {
        let d = producer
            .produce(Message::new("chat.events", format!("msg {i}")).with_key("room-1"))
            .await?;
        println!(
            "mq: produced to partition {} offset {}",
            d.partition, d.offset
        );
    }
    let consumer = runtime
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
    let lease = runtime
        .worker_ids()
        .allocate(1023, Duration::from_secs(30))
        .await?;
    let ids = Snowflake::with_lease(Layout::default(), lease)?;
    let id = ids.next_id()?;
    println!("uid: {id} -> {:?}", ids.decompose(id));

    // The limiter's rules hot-reload from /config/{env}/im-logic/ratelimit.
    let rules_path = format!("/config/{}/im-logic/ratelimit", runtime.env());
    center
        .set_json(
            &rules_path,
            &LimiterSettings::with_rule("send", Rule::per_minute(1)),
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (first, second) = (
        limiter.check("send", "carol", 1).await?.allowed,
        limiter.check("send", "carol", 1).await?.allowed,
    );
    println!("ratelimit: after the center's 1/min rule, carol's two sends -> {first} {second}");
    center.delete(&rules_path).await?;

    // Graceful shutdown: consumers, producer, registrations, locks, backends.
    runtime.shutdown().await?;
    println!("done");
    Ok(())
}
