//! The documented semantics of the null backend (`im-infra-noop`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{ensure, Result};
use bytes::Bytes;
use futures::StreamExt;
use im_infra::backend::Capability;
use im_infra::cache::KeyTtl;
use im_infra::lock::LockOptions;
use im_infra::mq::{handler_fn, ConsumerSettings, Message};
use im_infra::once::{OnceExt, Outcome, RunError};
use im_infra::ratelimit::{LimiterExt, Rule, Rules};
use im_infra::registry::ServiceInstance;
use im_infra::ErrorKind;

use super::expect_kind;
use crate::harness::{Case, World};

async fn claims_every_capability(w: World) -> Result<()> {
    for c in Capability::ALL {
        ensure!(w.backend.supports(c), "noop offers {c}");
    }
    w.backend.health_check().await?;
    Ok(())
}

async fn cache_always_misses(w: World) -> Result<()> {
    let c = w.backend.cache().await?;
    c.set("k", Bytes::from_static(b"v"), None).await?;
    ensure!(c.get("k").await?.is_none() && !c.exists("k").await?);
    ensure!(c.ttl("k").await? == KeyTtl::Missing);
    ensure!(
        c.set_nx("k", Bytes::new(), None).await?,
        "absent, so set_nx 'stores'"
    );
    ensure!(
        c.incr_by("n", 3).await? == 3 && c.incr_by("n", 3).await? == 3,
        "absent counts as 0"
    );
    ensure!(c.get_many(&["a", "b"]).await? == vec![None, None]);
    ensure!(c.delete(&["k"]).await? == 0);
    ensure!(!c.capabilities().stores_values);
    Ok(())
}

async fn limiter_allows_everything(w: World) -> Result<()> {
    let l = w
        .backend
        .limiter(Rules::single("r", Rule::per_minute(1))?)
        .await?;
    for _ in 0..1000 {
        ensure!(l.allow("r", "k").await);
    }
    ensure!(l.check("r", "k", u64::MAX).await?.allowed);
    Ok(())
}

async fn lock_is_always_granted(w: World) -> Result<()> {
    let l = w.backend.lock().await?;
    let a = l
        .acquire("k", LockOptions::new(Duration::from_secs(1)))
        .await?;
    let b = l
        .try_acquire("k", LockOptions::new(Duration::from_secs(1)))
        .await?;
    ensure!(b.is_some(), "granted even while 'held'");
    ensure!(
        b.map(|g| g.fencing_token()).unwrap_or(0) > a.fencing_token(),
        "tokens increase per handle"
    );
    ensure!(!l.is_locked("k").await?);
    expect_kind(l.info("k").await, ErrorKind::Unsupported, "info")?;
    a.release().await?;
    expect_kind(a.release().await, ErrorKind::LockNotHeld, "second release")?;
    Ok(())
}

async fn config_is_empty_and_watches_never_fire(w: World) -> Result<()> {
    let c = w.backend.config().await?;
    ensure!(
        c.set("/k", Bytes::from_static(b"1")).await? == 0,
        "version 0: nothing stored"
    );
    ensure!(c.get_with_version("/k").await?.is_none());
    ensure!(c.list("/").await?.is_empty());
    expect_kind(
        c.compare_and_set("/k", Bytes::new(), 0).await,
        ErrorKind::Unsupported,
        "cas",
    )?;
    let mut s = c.watch("/k", Default::default()).await?;
    ensure!(
        tokio::time::timeout(Duration::from_millis(200), s.next())
            .await
            .is_err(),
        "never fires"
    );
    Ok(())
}

async fn registry_is_empty(w: World) -> Result<()> {
    let r = w.backend.registry().await?;
    r.register(
        &ServiceInstance::new("s", "1", "127.0.0.1:1"),
        Duration::from_secs(1),
    )
    .await?;
    ensure!(r.list_services().await?.is_empty());
    let d = w.backend.discovery().await?;
    ensure!(d.instances("s").await?.is_empty());
    let mut s = d.watch("s").await?;
    ensure!(
        tokio::time::timeout(Duration::from_millis(200), s.next())
            .await
            .is_err(),
        "never fires"
    );
    Ok(())
}

async fn once_always_runs(w: World) -> Result<()> {
    let o = w.backend.once().await?;
    let runs = AtomicUsize::new(0);
    for _ in 0..3 {
        let r: Result<Outcome<u8>, RunError<std::io::Error>> = o
            .run("k", Duration::from_secs(60), || async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(1)
            })
            .await;
        ensure!(matches!(r, Ok(Outcome::Executed(1))));
    }
    ensure!(runs.load(Ordering::SeqCst) == 3);
    ensure!(o.outcome("k").await?.is_none());
    Ok(())
}

async fn messages_are_dropped_and_never_delivered(w: World) -> Result<()> {
    let p = w.backend.producer().await?;
    let d = p.produce(Message::new("t", "x")).await?;
    ensure!(d.offset == -1, "dropped messages have offset -1");
    let c = w
        .backend
        .consumer(ConsumerSettings::new("g", ["t"]))
        .await?;
    let delivered = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = delivered.clone();
    let runner = c.clone();
    let task = tokio::spawn(async move {
        runner
            .run(handler_fn(move |_| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.shutdown().await?;
    tokio::time::timeout(Duration::from_secs(2), task).await???;
    ensure!(delivered.load(Ordering::SeqCst) == 0);
    Ok(())
}

async fn worker_id_is_fixed(w: World) -> Result<()> {
    let a = w.backend.worker_ids().await?;
    let x = a.allocate(1023, Duration::from_secs(1)).await?;
    let y = a.allocate(1023, Duration::from_secs(1)).await?;
    ensure!(x.worker_id() == y.worker_id());
    Ok(())
}

/// The noop cases.
pub fn cases() -> Vec<Case> {
    vec![
        crate::case!("backend", claims_every_capability),
        crate::case!("cache", cache_always_misses),
        crate::case!("ratelimit", limiter_allows_everything),
        crate::case!("lock", lock_is_always_granted),
        crate::case!("config", config_is_empty_and_watches_never_fire),
        crate::case!("registry", registry_is_empty),
        crate::case!("once", once_always_runs),
        crate::case!("mq", messages_are_dropped_and_never_delivered),
        crate::case!("uid", worker_id_is_fixed),
    ]
}
