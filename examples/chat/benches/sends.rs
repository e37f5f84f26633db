//! End-to-end sends per second through the gateway: the whole platform in
//! one process (`chat all`), on the in-process backend, then on the real
//! servers when `scripts/services.sh` exported their addresses. Each send
//! is a gRPC call to the gateway, a balanced call to logic, a rate-limit
//! check, a once-claim, a Snowflake id, a conversation lock, a counter, a
//! queued message and its outcome stored; task stores it behind.
//!
//! ```text
//! cargo bench -p im-infra-examples-chat --bench sends
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use im_infra_examples_chat::proto::gateway_client::GatewayClient;
use im_infra_examples_chat::proto::SendRequest;
use im_infra_examples_chat::servers::{config, SERVER_VARS};
use im_infra_examples_chat::{builder, MysqlStore, Platform, Role};

const SENDS: u32 = 4000;
const CONCURRENCY: usize = 32;

/// Sends `SENDS` messages (64 users, 256 conversations) `CONCURRENCY` at a
/// time; prints sends/s and latency quantiles.
async fn measure(what: &str, platform: Platform) -> Result<()> {
    let gateway = platform.gateway_addr().context("gateway")?;
    let store = platform.store().context("store")?;
    let stopper = platform.stopper();
    let running = tokio::spawn(platform.run());
    let client = GatewayClient::connect(format!("http://{gateway}")).await?;
    let run = |range: std::ops::Range<u32>| {
        let client = client.clone();
        async move {
            let began = Instant::now();
            let mut latencies: Vec<Duration> = futures::stream::iter(range)
                .map(|i| {
                    let mut client = client.clone();
                    async move {
                        let t = Instant::now();
                        client
                            .send(SendRequest {
                                user: format!("u{}", i % 64),
                                conversation: format!("c{}", i % 256),
                                client_msg_id: format!("m{i}"),
                                body: "hello".into(),
                            })
                            .await?;
                        anyhow::Ok(t.elapsed())
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_>>()?;
            latencies.sort();
            anyhow::Ok((began.elapsed(), latencies))
        }
    };
    run(0..SENDS / 10).await?; // warm-up: connections, caches
    let (elapsed, latencies) = run(SENDS..2 * SENDS).await?;
    let q = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    println!(
        "chat sends {what:<10} {:>7.0} sends/s  p50 {:>8.2?}  p99 {:>8.2?}  ({SENDS} sends, {CONCURRENCY} at a time)",
        f64::from(SENDS) / elapsed.as_secs_f64(),
        q(0.5),
        q(0.99)
    );
    let expected = u64::from(SENDS + SENDS / 10);
    let answered = Instant::now();
    let deadline = answered + Duration::from_secs(60);
    while store.count().await? < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "chat sends {what:<10} stored {} of {expected}, the last {:?} after the last answer",
        store.count().await?,
        answered.elapsed()
    );
    stopper.cancel();
    running.await??;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    // The in-process backend, a limit high enough not to interfere.
    let unlimited = serde_json::json!({"rules": {"send": {"rate": 1000000, "period": "1s"}}});
    let platform = Platform::start(
        Role::All,
        builder(Role::All)
            .environment(false)
            .section("clog", serde_json::json!({"level": "warn"}))
            .section("chat", serde_json::json!({"gateway_listen": "127.0.0.1:0"}))
            .section("ratelimit", &unlimited),
    )
    .await?;
    measure("in-process", platform).await?;

    let vars = |v: &str| std::env::var(v).ok().filter(|s| !s.is_empty());
    if SERVER_VARS.iter().any(|(_, v)| vars(v).is_none()) {
        println!("chat sends on servers: SKIPPED (scripts/services.sh up; source .services/env)");
        return Ok(());
    }
    let run = format!("bench{}", std::process::id());
    let mut sections = config(&run, vars)?;
    sections.insert("ratelimit".into(), unlimited);
    let mut b = builder(Role::All)
        .environment(false)
        .section("clog", serde_json::json!({"level": "warn"}));
    for (name, value) in &sections {
        b = b.section(name, value);
    }
    let platform = Platform::start(Role::All, b).await?;
    measure("servers", platform).await?;
    // The run's table.
    let db_settings: im_infra_mysql::MysqlSettings =
        serde_json::from_value(sections["db"].clone())?;
    let db = std::sync::Arc::new(im_infra_mysql::Db::connect(db_settings).await?);
    MysqlStore::open(db.clone(), &format!("chat_{run}"))
        .await?
        .drop_table()
        .await?;
    db.close().await?;
    Ok(())
}
