//! The config center. Basic: versioned values, compare-and-set, a watch.
//! Advanced: a typed configuration of the service that validates every
//! change, keeps the last good value when a bad one arrives, and tells the
//! code that depends on it.
//!
//! ```text
//! cargo run --example config [basic|advanced]
//! IMINFRA_CONFIG=examples/servers.yaml cargo run --example config
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use im_infra::config::{ConfigCenter, ConfigCenterExt, WatchOptions};
use im_infra::ErrorKind;
use im_infra_examples::{parts, run_id, start};
use im_infra_runtime::Runtime;
use serde::{Deserialize, Serialize};

async fn basic(center: Arc<dyn ConfigCenter>, run: &str) -> Result<()> {
    let key = format!("/examples/{run}/motd");
    let mut changes = center.watch(&key, WatchOptions::default()).await?;
    let v1 = center.set(&key, Bytes::from_static(b"hello")).await?;
    let v2 = center
        .compare_and_set(&key, Bytes::from_static(b"hello again"), v1)
        .await?;
    let stale = center
        .compare_and_set(&key, Bytes::from_static(b"lost"), v1)
        .await;
    ensure!(
        stale.is_err_and(|e| e.kind() == ErrorKind::Conflict),
        "a stale version is refused"
    );
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(5), changes.next())
            .await
            .context("the watch answers")?
            .context("the watch goes on")??;
        seen.push(event.version);
    }
    println!("basic: wrote v{v1}, then v{v2} by compare-and-set; the watch saw {seen:?}");
    ensure!(seen == vec![v1, v2]);
    center.delete(&key).await?;
    Ok(())
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct ChatSettings {
    max_message_len: usize,
    welcome: String,
}

async fn advanced(runtime: &Runtime, run: &str) -> Result<()> {
    let component = format!("chat-{run}");
    let changes = Arc::new(AtomicUsize::new(0));
    let settings = runtime
        .config_manager::<ChatSettings>(&component)
        .default_value(ChatSettings {
            max_message_len: 200,
            welcome: "hi".into(),
        })
        .validator(|s| {
            if s.max_message_len == 0 {
                Err("max_message_len must be positive".into())
            } else {
                Ok(())
            }
        })
        .on_update({
            let changes = changes.clone();
            move |_| {
                changes.fetch_add(1, Ordering::SeqCst);
            }
        })
        .build()?;
    settings.start().await;
    ensure!(
        settings.current().max_message_len == 200,
        "the default until something is stored"
    );
    let good = ChatSettings {
        max_message_len: 1000,
        welcome: "welcome".into(),
    };
    settings.publish(&good).await?;
    wait_for(|| settings.current().max_message_len == 1000).await?;
    // A bad value is refused; the last good one stays.
    let center = runtime.config();
    center
        .set_json(
            settings.path(),
            &ChatSettings {
                max_message_len: 0,
                welcome: "x".into(),
            },
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!(
        "advanced: in force {:?} after a bad value; {} update(s) applied",
        settings.current(),
        changes.load(Ordering::SeqCst)
    );
    ensure!(*settings.current() == good);
    ensure!(
        changes.load(Ordering::SeqCst) == 1,
        "the bad value told nobody"
    );
    center.delete(settings.path()).await?;
    wait_for(|| settings.current().max_message_len == 200).await?;
    settings.stop().await;
    Ok(())
}

async fn wait_for(done: impl Fn() -> bool) -> Result<()> {
    for _ in 0..100 {
        if done() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("not within 2 s")
}

#[tokio::main]
async fn main() -> Result<()> {
    let parts = parts()?;
    let runtime = start("example-config").await?;
    let run = run_id();
    if parts.basic {
        basic(runtime.config(), &run).await?;
    }
    if parts.advanced {
        advanced(&runtime, &run).await?;
    }
    runtime.shutdown().await?;
    Ok(())
}
