//! `ConfigCenter` and `ConfigManager` contract.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use im_infra::backend::Capability;
use im_infra::config::{
    ConfigCenter, ConfigCenterExt, ConfigEvent, ConfigEventKind, ConfigManager, WatchOptions,
    WatchStream,
};
use im_infra::ErrorKind;
use serde::{Deserialize, Serialize};

use super::{eventually, expect_kind, unique};
use crate::harness::{Case, Claims, World};

async fn center(w: &World) -> Result<Arc<dyn ConfigCenter>> {
    Ok(w.backend.config().await?)
}

fn json(v: serde_json::Value) -> Bytes {
    Bytes::from(v.to_string())
}

async fn next_event(stream: &mut WatchStream) -> Result<ConfigEvent> {
    let item = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .context("no watch event within 10 s")?
        .context("the watch stream ended")?;
    Ok(item?)
}

async fn no_event_for(stream: &mut WatchStream, d: Duration) -> Result<()> {
    match tokio::time::timeout(d, stream.next()).await {
        Err(_) => Ok(()),
        Ok(item) => bail!("unexpected watch item {item:?}"),
    }
}

async fn get_missing_is_none(w: World) -> Result<()> {
    let c = center(&w).await?;
    ensure!(c
        .get_with_version(&format!("/{}", unique("none")))
        .await?
        .is_none());
    Ok(())
}

async fn set_and_get_with_version(w: World) -> Result<()> {
    let c = center(&w).await?;
    let key = format!("/app/{}", unique("k"));
    let v1 = c.set(&key, json(serde_json::json!({"a": 1}))).await?;
    ensure!(v1 > 0, "versions are positive");
    let got = c.get_with_version(&key).await?.context("value after set")?;
    ensure!(got.version == v1 && got.value == json(serde_json::json!({"a": 1})));
    let v2 = c.set(&key, json(serde_json::json!({"a": 2}))).await?;
    ensure!(
        v2 > v1,
        "every change increases the version ({v2} after {v1})"
    );
    ensure!(c.get(&key).await? == Some(json(serde_json::json!({"a": 2}))));
    Ok(())
}

async fn versions_are_ordered_across_keys(w: World) -> Result<()> {
    let c = center(&w).await?;
    let a = c.set("/order/a", json(serde_json::json!(1))).await?;
    let b = c.set("/order/b", json(serde_json::json!(2))).await?;
    ensure!(b > a, "a later change of another key has a larger version");
    Ok(())
}

async fn delete_reports_existence(w: World) -> Result<()> {
    let c = center(&w).await?;
    c.set("/d/k", json(serde_json::json!(1))).await?;
    ensure!(c.delete("/d/k").await?, "delete of an existing key is true");
    ensure!(!c.delete("/d/k").await?, "delete of a missing key is false");
    ensure!(c.get_with_version("/d/k").await?.is_none());
    Ok(())
}

async fn list_returns_sorted_keys_under_the_prefix(w: World) -> Result<()> {
    let c = center(&w).await?;
    for k in ["/svc/b", "/svc/a", "/svc/c/x", "/svcx/no", "/other"] {
        c.set(k, json(serde_json::json!(k))).await?;
    }
    let keys = c.list("/svc/").await?;
    ensure!(keys == vec!["/svc/a", "/svc/b", "/svc/c/x"], "got {keys:?}");
    ensure!(c.list("/nothing/").await?.is_empty());
    Ok(())
}

async fn compare_and_set_create_only(w: World) -> Result<()> {
    let c = center(&w).await?;
    let v = c
        .compare_and_set("/cas/new", json(serde_json::json!(1)), 0)
        .await?;
    ensure!(v > 0);
    expect_kind(
        c.compare_and_set("/cas/new", json(serde_json::json!(2)), 0)
            .await,
        ErrorKind::Conflict,
        "create-only CAS of an existing key",
    )?;
    ensure!(c.get("/cas/new").await? == Some(json(serde_json::json!(1))));
    Ok(())
}

async fn compare_and_set_with_a_stale_version_conflicts(w: World) -> Result<()> {
    let c = center(&w).await?;
    let v1 = c.set("/cas/k", json(serde_json::json!(1))).await?;
    let v2 = c
        .compare_and_set("/cas/k", json(serde_json::json!(2)), v1)
        .await?;
    ensure!(v2 > v1);
    expect_kind(
        c.compare_and_set("/cas/k", json(serde_json::json!(3)), v1)
            .await,
        ErrorKind::Conflict,
        "stale CAS",
    )?;
    expect_kind(
        c.compare_and_set("/cas/missing", json(serde_json::json!(3)), v1)
            .await,
        ErrorKind::Conflict,
        "CAS of a missing key with a version",
    )?;
    ensure!(c.get("/cas/k").await? == Some(json(serde_json::json!(2))));
    Ok(())
}

#[derive(Serialize, Deserialize)]
struct Counter {
    n: u64,
}

async fn concurrent_cas_writers_lose_nothing(w: World) -> Result<()> {
    let key = "/cas/counter";
    center(&w).await?.set_json(key, &Counter { n: 0 }).await?;
    let conflicts = Arc::new(AtomicUsize::new(0));
    let (writers, rounds) = (6u64, 10u64);
    let mut handles = Vec::new();
    for i in 0..writers {
        let c = if i % 2 == 0 {
            center(&w).await?
        } else {
            w.peer.config().await?
        };
        let conflicts = conflicts.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..rounds {
                loop {
                    let (cur, version): (Counter, u64) = c
                        .get_json_with_version(key)
                        .await?
                        .ok_or_else(|| anyhow::anyhow!("gone"))?;
                    match c
                        .compare_and_set_json(key, &Counter { n: cur.n + 1 }, version)
                        .await
                    {
                        Ok(_) => break,
                        Err(e) if e.kind() == ErrorKind::Conflict => {
                            conflicts.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => return Err(anyhow::Error::from(e)),
                    }
                }
            }
            Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let end: Counter = center(&w).await?.get_json(key).await?.context("counter")?;
    ensure!(
        end.n == writers * rounds,
        "counter {} after {} CAS increments",
        end.n,
        writers * rounds
    );
    Ok(())
}

async fn watch_delivers_ordered_puts_and_deletes(w: World) -> Result<()> {
    let c = center(&w).await?;
    let key = "/watch/k";
    let mut events = c.watch(key, WatchOptions::default()).await?;
    let writer = w.peer.config().await?;
    let v1 = writer.set(key, json(serde_json::json!(1))).await?;
    writer
        .set("/watch/other", json(serde_json::json!(0)))
        .await?;
    let v2 = writer.set(key, json(serde_json::json!(2))).await?;
    ensure!(writer.delete(key).await?);
    let e1 = next_event(&mut events).await?;
    let e2 = next_event(&mut events).await?;
    let e3 = next_event(&mut events).await?;
    ensure!(
        e1.kind == ConfigEventKind::Put
            && e1.version == v1
            && e1.value == Some(json(serde_json::json!(1)))
    );
    ensure!(e2.kind == ConfigEventKind::Put && e2.version == v2);
    ensure!(
        e3.kind == ConfigEventKind::Delete && e3.version > v2 && e3.key == key,
        "{e3:?}"
    );
    no_event_for(&mut events, Duration::from_millis(300)).await
}

async fn watch_prefix_sees_only_its_prefix(w: World) -> Result<()> {
    let c = center(&w).await?;
    let mut events = c.watch_prefix("/wp/", WatchOptions::default()).await?;
    c.set("/wpx", json(serde_json::json!(0))).await?;
    c.set("/wp/a", json(serde_json::json!(1))).await?;
    c.set("/other/a", json(serde_json::json!(0))).await?;
    c.set("/wp/b/c", json(serde_json::json!(2))).await?;
    let a = next_event(&mut events).await?;
    let b = next_event(&mut events).await?;
    ensure!(
        a.key == "/wp/a" && b.key == "/wp/b/c" && b.version > a.version,
        "{a:?} {b:?}"
    );
    no_event_for(&mut events, Duration::from_millis(300)).await
}

async fn watch_after_a_version_replays_later_changes(w: World) -> Result<()> {
    let c = center(&w).await?;
    let key = "/replay/k";
    let v1 = c.set(key, json(serde_json::json!(1))).await?;
    let v2 = c.set(key, json(serde_json::json!(2))).await?;
    let v3 = c.set(key, json(serde_json::json!(3))).await?;
    let mut events = c.watch(key, WatchOptions::after(v1)).await?;
    ensure!(next_event(&mut events).await?.version == v2);
    ensure!(next_event(&mut events).await?.version == v3);
    no_event_for(&mut events, Duration::from_millis(300)).await
}

async fn watch_resynchronises_after_compaction(w: World) -> Result<()> {
    let c = center(&w).await?;
    let v0 = c
        .set("/compact/gone", json(serde_json::json!("soon deleted")))
        .await?;
    for i in 0..40 {
        c.set("/compact/k", json(serde_json::json!(i))).await?;
    }
    c.delete("/compact/gone").await?;
    let last = c
        .set("/compact/k", json(serde_json::json!("final")))
        .await?;
    w.hooks.compact_config_history().await?;
    // Resume a key watch and a prefix watch from before the compaction.
    let mut key_events = c.watch("/compact/k", WatchOptions::after(v0)).await?;
    let e = next_event(&mut key_events).await?;
    ensure!(
        e.kind == ConfigEventKind::Put
            && e.value == Some(json(serde_json::json!("final")))
            && e.version == last,
        "the key watch must land on the final value, got {e:?}"
    );
    let mut gone_events = c.watch("/compact/gone", WatchOptions::after(v0)).await?;
    let e = next_event(&mut gone_events).await?;
    ensure!(
        e.kind == ConfigEventKind::Delete,
        "a deleted key reports its deletion: {e:?}"
    );
    // The watch keeps working after the resync.
    let next = c
        .set("/compact/k", json(serde_json::json!("after")))
        .await?;
    let mut seen = None;
    while seen.is_none_or(|v| v < next) {
        let e = next_event(&mut key_events).await?;
        seen = Some(e.version);
    }
    ensure!(seen == Some(next));
    Ok(())
}

async fn typed_access_and_malformed_json(w: World) -> Result<()> {
    let c = center(&w).await?;
    c.set_json("/typed/ok", &vec!["a", "b"]).await?;
    let v: Vec<String> = c.get_json("/typed/ok").await?.context("typed value")?;
    ensure!(v == ["a", "b"]);
    c.set("/typed/bad", Bytes::from_static(b"{\"unterminated\": "))
        .await?;
    let err = c
        .get_json::<Vec<String>>("/typed/bad")
        .await
        .err()
        .context("malformed JSON must fail")?;
    ensure!(
        err.kind() == ErrorKind::Serialization && err.to_string().contains("/typed/bad"),
        "{err}"
    );
    Ok(())
}

async fn bad_input_is_invalid_argument(w: World) -> Result<()> {
    let c = center(&w).await?;
    expect_kind(
        c.get_with_version("").await,
        ErrorKind::InvalidArgument,
        "get empty key",
    )?;
    expect_kind(
        c.set("", json(serde_json::json!(1))).await,
        ErrorKind::InvalidArgument,
        "set empty key",
    )?;
    let max = c.capabilities().max_value_bytes;
    expect_kind(
        c.set("/big", Bytes::from(vec![b' '; max + 1])).await,
        ErrorKind::InvalidArgument,
        "oversized value",
    )?;
    expect_kind(
        c.set(&"/k".repeat(1000), json(serde_json::json!(1))).await,
        ErrorKind::InvalidArgument,
        "oversized key",
    )?;
    let res = c.watch("", WatchOptions::default()).await.map(|_| ());
    expect_kind(res, ErrorKind::InvalidArgument, "watch empty key")?;
    Ok(())
}

async fn instances_share_entries(w: World) -> Result<()> {
    center(&w)
        .await?
        .set("/shared/k", json(serde_json::json!(7)))
        .await?;
    let other = w.peer.config().await?;
    ensure!(other.get("/shared/k").await? == Some(json(serde_json::json!(7))));
    Ok(())
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Settings {
    workers: u32,
    name: String,
}

/// A manager started on a key that once had values and was deleted keeps
/// its default: none of the old values the backend's history still holds
/// is applied or handed to a callback. A value set afterwards is.
async fn a_manager_of_a_deleted_key_keeps_its_default(w: World) -> Result<()> {
    let c = center(&w).await?;
    let service = unique("svc");
    let path = format!("/config/test/{service}/settings");
    c.set_json(
        &path,
        &Settings {
            workers: 4,
            name: "old".into(),
        },
    )
    .await?;
    c.delete(&path).await?;
    let updates = Arc::new(AtomicUsize::new(0));
    let counted = updates.clone();
    let m = ConfigManager::<Settings>::builder(c.clone(), &service, "settings")
        .env("test")
        .default_value(Settings {
            workers: 1,
            name: "default".into(),
        })
        .on_update(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .build()?;
    m.start().await;
    // Time for a watch to replay whatever it would replay.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        m.current().name == "default" && updates.load(Ordering::SeqCst) == 0,
        "the default stays and no callback ran: {:?}, {} callbacks",
        m.current(),
        updates.load(Ordering::SeqCst)
    );
    c.set_json(
        &path,
        &Settings {
            workers: 2,
            name: "new".into(),
        },
    )
    .await?;
    let applied = m.clone();
    eventually(Duration::from_secs(10), "the new value", move || {
        let m = applied.clone();
        async move { Ok(m.current().name == "new") }
    })
    .await?;
    ensure!(
        updates.load(Ordering::SeqCst) == 1,
        "one callback, for the new value"
    );
    m.stop().await;
    Ok(())
}

async fn manager_loads_validates_and_hot_reloads(w: World) -> Result<()> {
    let c = center(&w).await?;
    let service = unique("svc");
    let path = format!("/config/test/{service}/settings");
    c.set_json(
        &path,
        &Settings {
            workers: 4,
            name: "initial".into(),
        },
    )
    .await?;
    let updates = Arc::new(AtomicUsize::new(0));
    let counted = updates.clone();
    let m = ConfigManager::<Settings>::builder(c.clone(), &service, "settings")
        .env("test")
        .default_value(Settings {
            workers: 1,
            name: "default".into(),
        })
        .validator(|s| {
            if s.workers == 0 {
                Err("workers must be positive".into())
            } else {
                Ok(())
            }
        })
        .on_update(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .build()?;
    ensure!(m.path() == path);
    m.start().await;
    ensure!(
        m.current().name == "initial",
        "start loads the stored value"
    );
    let reload = |want: &'static str| {
        let m = m.clone();
        eventually(Duration::from_secs(10), want, move || {
            let m = m.clone();
            async move { Ok(m.current().name == want) }
        })
    };
    // A valid change is applied.
    c.set_json(
        &path,
        &Settings {
            workers: 8,
            name: "second".into(),
        },
    )
    .await?;
    reload("second").await?;
    // An invalid value is rejected; a malformed one too; the last good stays.
    c.set_json(
        &path,
        &Settings {
            workers: 0,
            name: "invalid".into(),
        },
    )
    .await?;
    c.set(&path, Bytes::from_static(b"{broken")).await?;
    let marker = c
        .set_json(
            &path,
            &Settings {
                workers: 2,
                name: "third".into(),
            },
        )
        .await?;
    reload("third").await?;
    let (applied, version) = m.current_with_version();
    ensure!(
        applied.name == "third" && version == marker,
        "the applied value with its version: {} at {version}, want third at {marker}",
        applied.name
    );
    // The value is visible before its callbacks run: wait for the third,
    // then check that no other came.
    let seen = updates.clone();
    eventually(Duration::from_secs(10), "the third callback", move || {
        let seen = seen.clone();
        async move { Ok(seen.load(Ordering::SeqCst) >= 3) }
    })
    .await?;
    ensure!(
        updates.load(Ordering::SeqCst) == 3,
        "callbacks for initial, second, third only, not {}",
        updates.load(Ordering::SeqCst)
    );
    // Deleting the key reverts to the default.
    c.delete(&path).await?;
    reload("default").await?;
    m.stop().await;
    ensure!(!m.is_started());
    Ok(())
}

fn on(c: &Claims) -> bool {
    c.has(Capability::Config)
        && c.config
            .as_ref()
            .is_some_and(|x| x.watch && x.compare_and_set)
}

/// The config cases.
pub fn cases() -> Vec<Case> {
    vec![
        crate::case!("config", get_missing_is_none, when = on),
        crate::case!("config", set_and_get_with_version, when = on),
        crate::case!("config", versions_are_ordered_across_keys, when = on),
        crate::case!("config", delete_reports_existence, when = on),
        crate::case!(
            "config",
            list_returns_sorted_keys_under_the_prefix,
            when = on
        ),
        crate::case!("config", compare_and_set_create_only, when = on),
        crate::case!(
            "config",
            compare_and_set_with_a_stale_version_conflicts,
            when = on
        ),
        crate::case!("config", concurrent_cas_writers_lose_nothing, when = on),
        crate::case!("config", watch_delivers_ordered_puts_and_deletes, when = on),
        crate::case!("config", watch_prefix_sees_only_its_prefix, when = on),
        crate::case!(
            "config",
            watch_after_a_version_replays_later_changes,
            when = on
        ),
        Case {
            exclusive: true,
            ..crate::case!("config", watch_resynchronises_after_compaction, when = on)
        },
        crate::case!("config", typed_access_and_malformed_json, when = on),
        crate::case!("config", bad_input_is_invalid_argument, when = on),
        crate::case!("config", instances_share_entries, when = on),
        crate::case!("config", manager_loads_validates_and_hot_reloads, when = on),
        crate::case!(
            "config",
            a_manager_of_a_deleted_key_keeps_its_default,
            when = on
        ),
    ]
}
