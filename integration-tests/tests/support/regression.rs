//! The scenario of the regression tests (`redis_regression.rs`,
//! `mysql_regression.rs`): a config watch and a `ConfigManager` see changes
//! that the server then loses (it comes back with older data); writes made
//! after that must reach them, and the watch must converge on the server's
//! state.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use im_infra::config::{
    ConfigCenter, ConfigCenterExt, ConfigEvent, ConfigEventKind, ConfigManager, WatchOptions,
    WatchStream,
};
use im_infra::RetrySettings;
use im_infra_conformance::faults::{events_until, set_retrying, until};

/// The keys under `prefix` with their values, as the server has them now
/// (retryable errors, as while the backend reconnects, are retried for up
/// to 30 s).
pub async fn server_state(
    center: &dyn ConfigCenter,
    prefix: &str,
) -> Result<BTreeMap<String, Bytes>> {
    let started = Instant::now();
    loop {
        match read_state(center, prefix).await {
            Err(e) if e.is_retryable() && started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return Ok(r?),
        }
    }
}

async fn read_state(
    center: &dyn ConfigCenter,
    prefix: &str,
) -> im_infra::Result<BTreeMap<String, Bytes>> {
    let mut state = BTreeMap::new();
    for key in center.list(prefix).await? {
        if let Some(v) = center.get_with_version(&key).await? {
            state.insert(key, v.value);
        }
    }
    Ok(state)
}

/// What a consumer of a watch holds after applying `event`.
pub fn apply(model: &mut BTreeMap<String, Bytes>, event: ConfigEvent) {
    match event.kind {
        ConfigEventKind::Put => {
            model.insert(event.key, event.value.unwrap_or_default());
        }
        ConfigEventKind::Delete => {
            model.remove(&event.key);
        }
    }
}

/// Applies events until the model equals `want` (within 30 s), then checks
/// that nothing arriving in the next half second changes that.
pub async fn converge(
    events: &mut WatchStream,
    model: &mut BTreeMap<String, Bytes>,
    want: &BTreeMap<String, Bytes>,
) -> Result<()> {
    let started = Instant::now();
    while model != want {
        let left = Duration::from_secs(30).saturating_sub(started.elapsed());
        let next = tokio::time::timeout(left, events.next()).await;
        let Ok(Some(event)) = next else {
            bail!("the watch did not converge: it holds {model:?}, the server {want:?}");
        };
        apply(model, event?);
    }
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(500), events.next()).await
    {
        apply(model, event?);
    }
    ensure!(
        model == want,
        "after converging: {model:?}, the server {want:?}"
    );
    Ok(())
}

/// The value a [`ConfigManager`] holds.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    /// Which write it came from.
    pub name: String,
}

/// A JSON string, as `set_json` stores it.
pub fn json(s: &str) -> Bytes {
    Bytes::from(serde_json::to_vec(s).unwrap_or_default())
}

fn settings(name: &str) -> Settings {
    Settings { name: name.into() }
}

/// Runs the scenario on `center`. `snapshot` takes the copy the server
/// later comes back with; `regress` makes it come back with that copy
/// (every write acknowledged since is lost).
pub async fn watch_converges_after_the_server_lost_writes<S, SF, R, RF>(
    center: Arc<dyn ConfigCenter>,
    snapshot: S,
    regress: R,
) -> Result<()>
where
    S: FnOnce() -> SF,
    SF: Future<Output = Result<()>>,
    R: FnOnce() -> RF,
    RF: Future<Output = Result<()>>,
{
    let pause = Duration::from_millis(100);
    // The state the snapshot will hold.
    for (k, v) in [("/app/a", "a1"), ("/app/b", "b1"), ("/app/c", "c1")] {
        center.set_json(k, &v).await?;
    }
    let manager = ConfigManager::<Settings>::builder(center.clone(), "svc", "settings")
        .env("test")
        .retry(RetrySettings {
            max_retries: u32::MAX,
            initial_interval: Duration::from_millis(50),
            max_interval: Duration::from_millis(500),
            multiplier: 2.0,
            jitter: true,
        })
        .build()?;
    let path = manager.path().to_owned();
    center.set_json(&path, &settings("initial")).await?;
    manager.start().await;
    ensure!(manager.current().name == "initial");
    let mut events = center
        .watch_prefix("/app/", WatchOptions::default())
        .await?;
    let mut model = server_state(&*center, "/app/").await?;
    snapshot().await?;

    // Changes after the snapshot: delivered, then lost.
    let lost_a = center.set_json("/app/a", &"a2-lost").await?;
    center.delete("/app/b").await?;
    let lost_last = center.set_json("/app/d", &"d1-lost").await?;
    for e in events_until(&mut events, lost_last, Duration::from_secs(10)).await? {
        apply(&mut model, e);
    }
    ensure!(model.get("/app/d") == Some(&json("d1-lost")), "{model:?}");
    center.set_json(&path, &settings("lost")).await?;
    let m = manager.clone();
    until(
        Duration::from_secs(10),
        "the manager applies 'lost'",
        || {
            let m = m.clone();
            async move { m.current().name == "lost" }
        },
    )
    .await?;

    regress().await?;
    // Without any write since, the watch notices that the server is behind
    // it and lands on the restored state.
    let restored = server_state(&*center, "/app/").await?;
    ensure!(
        restored.get("/app/a") == Some(&json("a1")) && restored.contains_key("/app/b"),
        "the server came back with the snapshot: {restored:?}"
    );
    converge(&mut events, &mut model, &restored).await?;
    // Writes after the regression, through the same backend instance.
    let c2 = set_retrying(&*center, "/app/c", &"c2", pause).await?;
    ensure!(
        c2 > lost_last,
        "versions never go back for a client: {c2} after {lost_last}"
    );
    set_retrying(&*center, "/app/e", &"e1", pause).await?;
    set_retrying(&*center, &path, &settings("newest"), pause).await?;

    let want = server_state(&*center, "/app/").await?;
    converge(&mut events, &mut model, &want).await?;
    let m = manager.clone();
    until(
        Duration::from_secs(30),
        "the manager applies the newest value",
        || {
            let m = m.clone();
            async move { m.current().name == "newest" }
        },
    )
    .await?;

    // A watch resumed from a version the server lost — with newer writes
    // since, so the server's revision is past it — lands on its state.
    let mut resumed = center.watch("/app/a", WatchOptions::after(lost_a)).await?;
    let first = tokio::time::timeout(Duration::from_secs(10), resumed.next())
        .await
        .context("no event on the resumed watch within 10 s")?
        .context("the resumed watch ended")??;
    ensure!(
        first.kind == ConfigEventKind::Put && first.value == Some(json("a1")),
        "the resumed watch reports the restored value: {first:?}"
    );
    manager.stop().await;
    Ok(())
}
