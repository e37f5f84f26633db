//! The cache. Basic: values with a TTL, counters, several keys at once.
//! Advanced: a read-through load shared by concurrent callers (one load for
//! twenty readers), remembered misses, and JSON values.
//!
//! ```text
//! cargo run --example cache [basic|advanced]
//! IMINFRA_CONFIG=examples/servers.yaml cargo run --example cache
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use bytes::Bytes;
use im_infra::cache::{Cache, CacheExt, KeyTtl, LoadOptions};
use im_infra_examples::{parts, run_id, start};

async fn basic(cache: &dyn Cache, run: &str) -> Result<()> {
    let key = format!("greeting:{run}");
    cache
        .set(
            &key,
            Bytes::from_static(b"hello"),
            Some(Duration::from_secs(60)),
        )
        .await?;
    let value = cache.get(&key).await?;
    ensure!(value.as_deref() == Some(&b"hello"[..]));
    ensure!(matches!(cache.ttl(&key).await?, KeyTtl::Expires(t) if t <= Duration::from_secs(60)));
    let hits = format!("hits:{run}");
    for _ in 0..3 {
        cache.incr_by(&hits, 1).await?;
    }
    let (a, b) = (format!("a:{run}"), format!("b:{run}"));
    cache
        .set_many(
            &[
                (a.as_str(), Bytes::from_static(b"1")),
                (b.as_str(), Bytes::from_static(b"2")),
            ],
            None,
        )
        .await?;
    let both = cache.get_many(&[a.as_str(), b.as_str()]).await?;
    println!(
        "basic: {key}={value:?}, hits={}, many={both:?}",
        cache.incr_by(&hits, 0).await?
    );
    ensure!(
        cache
            .delete(&[key.as_str(), hits.as_str(), a.as_str(), b.as_str()])
            .await?
            == 4
    );
    Ok(())
}

async fn advanced(cache: Arc<dyn Cache>, run: &str) -> Result<()> {
    // Twenty readers of a cold key: one load, twenty answers.
    let loads = Arc::new(AtomicUsize::new(0));
    let key = format!("profile:{run}");
    let readers = (0..20).map(|_| {
        let (cache, loads, key) = (cache.clone(), loads.clone(), key.clone());
        tokio::spawn(async move {
            cache
                .get_or_load(
                    &key,
                    LoadOptions::ttl(Duration::from_secs(60)),
                    || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await; // the database
                        Ok(Some(Bytes::from_static(b"{\"name\":\"Ada\"}")))
                    },
                )
                .await
        })
    });
    for reader in futures::future::join_all(readers).await {
        ensure!(reader??.is_some());
    }
    println!(
        "advanced: 20 concurrent readers, {} load(s)",
        loads.load(Ordering::SeqCst)
    );
    ensure!(loads.load(Ordering::SeqCst) == 1, "single flight");

    // A miss remembered for a while: the loader runs once.
    let missing = format!("profile:nobody:{run}");
    let opts = LoadOptions::ttl(Duration::from_secs(60)).negative(Duration::from_secs(5));
    for _ in 0..3 {
        let found = cache
            .get_or_load(&missing, opts, || async { Ok(None) })
            .await?;
        ensure!(found.is_none());
    }

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Session {
        user: String,
        devices: u32,
    }
    let session = format!("session:{run}");
    let value = Session {
        user: "ada".into(),
        devices: 2,
    };
    cache
        .set_json(&session, &value, Some(Duration::from_secs(60)))
        .await?;
    ensure!(cache.get_json::<Session>(&session).await? == Some(value));
    cache
        .delete(&[key.as_str(), missing.as_str(), session.as_str()])
        .await?;
    println!("advanced: negative entries and JSON values work");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let parts = parts()?;
    let runtime = start("example-cache").await?;
    let run = run_id();
    println!(
        "cache on {}",
        runtime.backend(im_infra_runtime::Role::Cache).name()
    );
    if parts.basic {
        basic(&*runtime.cache(), &run).await?;
    }
    if parts.advanced {
        advanced(runtime.cache(), &run).await?;
    }
    runtime.shutdown().await?;
    Ok(())
}
