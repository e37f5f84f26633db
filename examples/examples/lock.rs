//! Distributed locks. Basic: acquire, try without waiting, release, fencing
//! tokens that only grow. Advanced: four workers contending for one lock
//! around a read-modify-write (no update lost), each holder's token larger
//! than the one before; the lost signal.
//!
//! ```text
//! cargo run --example lock [basic|advanced]
//! IMINFRA_CONFIG=examples/servers.yaml cargo run --example lock
//! ```

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use bytes::Bytes;
use im_infra::lock::{LockExt, LockOptions};
use im_infra::ErrorKind;
use im_infra_examples::{parts, run_id, start};
use im_infra_runtime::Runtime;

async fn basic(runtime: &Runtime, run: &str) -> Result<()> {
    let locks = runtime.lock();
    let key = format!("ledger-{run}");
    let first = locks.lock(&key, Duration::from_secs(10)).await?;
    ensure!(locks.is_locked(&key).await?);
    let busy = locks.try_lock(&key, Duration::from_secs(10)).await;
    ensure!(busy.as_ref().err().map(|e| e.kind()) == Some(ErrorKind::LockAlreadyHeld));
    first.release().await?;
    let second = locks.lock(&key, Duration::from_secs(10)).await?;
    println!(
        "basic: tokens {} then {} (a later holder always has a larger one)",
        first.fencing_token(),
        second.fencing_token()
    );
    ensure!(second.fencing_token() > first.fencing_token());
    second.release().await?;
    Ok(())
}

async fn advanced(runtime: &Runtime, run: &str) -> Result<()> {
    let (locks, cache) = (runtime.lock(), runtime.cache());
    let key = format!("counter-{run}");
    let workers = (0..4).map(|_| {
        let (locks, cache, key) = (locks.clone(), cache.clone(), key.clone());
        tokio::spawn(async move {
            let mut last_token = 0;
            for _ in 0..5 {
                let opts = LockOptions::new(Duration::from_secs(10)).wait(Duration::from_secs(30));
                let guard = locks.acquire(&key, opts).await?;
                anyhow::ensure!(guard.fencing_token() > last_token, "tokens grow");
                last_token = guard.fencing_token();
                // The critical section: a read-modify-write no other holder overlaps.
                let value_key = format!("{key}:value");
                let now = cache
                    .get(&value_key)
                    .await?
                    .and_then(|v| String::from_utf8_lossy(&v).parse::<u64>().ok())
                    .unwrap_or(0);
                cache
                    .set(
                        &value_key,
                        Bytes::from((now + 1).to_string()),
                        Some(Duration::from_secs(60)),
                    )
                    .await?;
                guard.release().await?;
            }
            anyhow::Ok(())
        })
    });
    for w in futures::future::join_all(workers).await {
        w??;
    }
    let total = cache.get(&format!("{key}:value")).await?;
    println!("advanced: 4 workers x 5 increments under the lock -> {total:?}");
    ensure!(total.as_deref() == Some(&b"20"[..]), "no lost update");

    let guard = Arc::new(
        locks
            .lock(&format!("watch-{run}"), Duration::from_secs(10))
            .await?,
    );
    let lost = guard.lost();
    guard.release().await?;
    ensure!(
        lost.is_cancelled(),
        "lost() fires when the lock is no longer held"
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let parts = parts()?;
    let runtime = start("example-lock").await?;
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
