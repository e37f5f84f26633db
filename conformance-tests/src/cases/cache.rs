//! `Cache` contract.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use im_infra::backend::Capability;
use im_infra::cache::{Cache, CacheExt, KeyTtl, LoadOptions};
use im_infra::validate::MAX_KEY_BYTES;
use im_infra::ErrorKind;

use super::{expect_kind, unique};
use crate::harness::{Case, World};

async fn cache(w: &World) -> Result<Arc<dyn Cache>> {
    Ok(w.backend.cache().await?)
}

fn b(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

async fn get_miss_returns_none(w: World) -> Result<()> {
    let c = cache(&w).await?;
    ensure!(
        c.get(&unique("missing")).await?.is_none(),
        "a missing key must read as None"
    );
    Ok(())
}

async fn set_then_get_roundtrips_binary(w: World) -> Result<()> {
    let c = cache(&w).await?;
    let value: Bytes = (0u8..=255).collect::<Vec<_>>().into();
    c.set("bin", value.clone(), None).await?;
    ensure!(
        c.get("bin").await? == Some(value),
        "binary value must round-trip exactly"
    );
    c.set("empty", Bytes::new(), None).await?;
    ensure!(
        c.get("empty").await? == Some(Bytes::new()),
        "an empty value is a value, not a miss"
    );
    Ok(())
}

async fn unicode_and_punctuated_keys_roundtrip(w: World) -> Result<()> {
    let c = cache(&w).await?;
    for key in [
        "ключ/😀",
        "a b:c{d}",
        "/config/dev/x",
        "*",
        "key\twith\ttabs",
    ] {
        c.set(key, Bytes::from(key.to_owned()), None).await?;
        ensure!(
            c.get(key).await?.as_deref() == Some(key.as_bytes()),
            "key {key:?}"
        );
    }
    Ok(())
}

async fn set_overwrites_value_and_ttl(w: World) -> Result<()> {
    let c = cache(&w).await?;
    c.set("k", b("one"), Some(Duration::from_secs(60))).await?;
    c.set("k", b("two"), None).await?;
    ensure!(c.get("k").await? == Some(b("two")));
    ensure!(
        c.ttl("k").await? == KeyTtl::Persistent,
        "set without TTL must clear the old TTL"
    );
    Ok(())
}

async fn set_nx_only_when_absent(w: World) -> Result<()> {
    let c = cache(&w).await?;
    ensure!(
        c.set_nx("k", b("first"), None).await?,
        "first set_nx must store"
    );
    ensure!(
        !c.set_nx("k", b("second"), None).await?,
        "second set_nx must not store"
    );
    ensure!(c.get("k").await? == Some(b("first")));
    c.set_nx("short", b("x"), Some(Duration::from_millis(100)))
        .await?;
    tokio::time::sleep(Duration::from_millis(350)).await;
    ensure!(
        c.set_nx("short", b("y"), None).await?,
        "set_nx must store over an expired key"
    );
    Ok(())
}

async fn delete_many_returns_count(w: World) -> Result<()> {
    let c = cache(&w).await?;
    c.set("a", b("1"), None).await?;
    c.set("b", b("2"), None).await?;
    let n = c.delete(&["a", "b", "never-there"]).await?;
    ensure!(n == 2, "delete must count existing keys, got {n}");
    ensure!(c.get("a").await?.is_none() && c.get("b").await?.is_none());
    ensure!(c.delete(&["a"]).await? == 0);
    Ok(())
}

async fn exists_reflects_presence(w: World) -> Result<()> {
    let c = cache(&w).await?;
    ensure!(!c.exists("k").await?);
    c.set("k", b("v"), None).await?;
    ensure!(c.exists("k").await?);
    c.delete(&["k"]).await?;
    ensure!(!c.exists("k").await?);
    Ok(())
}

async fn ttl_expiry_is_observed(w: World) -> Result<()> {
    let c = cache(&w).await?;
    c.set("k", b("v"), Some(Duration::from_millis(200))).await?;
    ensure!(
        c.get("k").await?.is_some(),
        "value must be there before its TTL"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    ensure!(
        c.get("k").await?.is_none(),
        "value must be gone after its TTL"
    );
    ensure!(!c.exists("k").await?);
    ensure!(c.ttl("k").await? == KeyTtl::Missing);
    Ok(())
}

async fn ttl_reports_missing_persistent_and_expiring(w: World) -> Result<()> {
    let c = cache(&w).await?;
    ensure!(c.ttl("none").await? == KeyTtl::Missing);
    c.set("p", b("v"), None).await?;
    ensure!(c.ttl("p").await? == KeyTtl::Persistent);
    c.set("e", b("v"), Some(Duration::from_secs(30))).await?;
    match c.ttl("e").await? {
        KeyTtl::Expires(d) => ensure!(
            d <= Duration::from_secs(30) && d > Duration::from_secs(25),
            "ttl {d:?} out of range"
        ),
        other => anyhow::bail!("expected Expires, got {other:?}"),
    }
    Ok(())
}

async fn get_with_ttl_reads_the_value_and_its_lifetime(w: World) -> Result<()> {
    let c = cache(&w).await?;
    ensure!(
        c.get_with_ttl("none").await? == (None, KeyTtl::Missing),
        "an absent key is (None, Missing)"
    );
    c.set("p", b("kept"), None).await?;
    ensure!(c.get_with_ttl("p").await? == (Some(b("kept")), KeyTtl::Persistent));
    c.set("e", b("brief"), Some(Duration::from_secs(30)))
        .await?;
    match c.get_with_ttl("e").await? {
        (Some(v), KeyTtl::Expires(d)) => ensure!(
            v == b("brief") && d <= Duration::from_secs(30) && d > Duration::from_secs(25),
            "{v:?} with {d:?}"
        ),
        other => anyhow::bail!("expected the value with Expires, got {other:?}"),
    }
    c.set("gone", b("v"), Some(Duration::from_millis(150)))
        .await?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    ensure!(
        c.get_with_ttl("gone").await? == (None, KeyTtl::Missing),
        "an expired key reads as absent"
    );
    expect_kind(
        c.get_with_ttl("").await,
        ErrorKind::InvalidArgument,
        "get_with_ttl of an empty key",
    )?;
    Ok(())
}

async fn get_many_with_ttl_reads_each_key_in_order(w: World) -> Result<()> {
    let c = cache(&w).await?;
    c.set("p", b("kept"), None).await?;
    c.set("e", b("brief"), Some(Duration::from_secs(30)))
        .await?;
    let read = c.get_many_with_ttl(&["e", "none", "p", "e"]).await?;
    ensure!(read.len() == 4, "one answer per key, got {read:?}");
    for i in [0, 3] {
        match &read[i] {
            (Some(v), KeyTtl::Expires(d)) => ensure!(
                *v == b("brief") && *d <= Duration::from_secs(30) && *d > Duration::from_secs(25),
                "key {i}: {v:?} with {d:?}"
            ),
            other => anyhow::bail!("key {i}: expected the value with Expires, got {other:?}"),
        }
    }
    ensure!(
        read[1] == (None, KeyTtl::Missing),
        "an absent key is (None, Missing)"
    );
    ensure!(read[2] == (Some(b("kept")), KeyTtl::Persistent));
    expect_kind(
        c.get_many_with_ttl(&[]).await,
        ErrorKind::InvalidArgument,
        "get_many_with_ttl of no keys",
    )?;
    expect_kind(
        c.get_many_with_ttl(&["p", ""]).await,
        ErrorKind::InvalidArgument,
        "get_many_with_ttl with an empty key",
    )?;
    Ok(())
}

async fn expire_sets_a_ttl_on_existing_keys_only(w: World) -> Result<()> {
    let c = cache(&w).await?;
    ensure!(
        !c.expire("none", Duration::from_secs(5)).await?,
        "expire of a missing key is false"
    );
    c.set("k", b("v"), None).await?;
    ensure!(c.expire("k", Duration::from_millis(200)).await?);
    ensure!(matches!(c.ttl("k").await?, KeyTtl::Expires(_)));
    tokio::time::sleep(Duration::from_millis(600)).await;
    ensure!(
        c.get("k").await?.is_none(),
        "expire must make the key expire"
    );
    Ok(())
}

async fn incr_by_from_absent_and_negative(w: World) -> Result<()> {
    let c = cache(&w).await?;
    ensure!(c.incr_by("n", 5).await? == 5, "absent counts as 0");
    ensure!(c.incr_by("n", -7).await? == -2);
    ensure!(
        c.get("n").await? == Some(b("-2")),
        "counters are stored as decimal text"
    );
    Ok(())
}

async fn incr_by_sums_exactly_under_concurrency(w: World) -> Result<()> {
    let tasks = 16;
    let per_task = 50;
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let c = cache(&w).await?;
        handles.push(tokio::spawn(async move {
            for _ in 0..per_task {
                c.incr_by("counter", 1).await?;
            }
            Ok::<_, im_infra::Error>(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let total = cache(&w).await?.incr_by("counter", 0).await?;
    ensure!(
        total == tasks * per_task,
        "lost increments: {total} != {}",
        tasks * per_task
    );
    Ok(())
}

async fn incr_by_keeps_the_ttl(w: World) -> Result<()> {
    let c = cache(&w).await?;
    c.set("n", b("1"), Some(Duration::from_secs(30))).await?;
    c.incr_by("n", 1).await?;
    ensure!(
        matches!(c.ttl("n").await?, KeyTtl::Expires(_)),
        "incr_by must keep the TTL"
    );
    Ok(())
}

async fn incr_by_non_integer_is_invalid_state(w: World) -> Result<()> {
    let c = cache(&w).await?;
    c.set("text", b("hello"), None).await?;
    expect_kind(
        c.incr_by("text", 1).await,
        ErrorKind::InvalidState,
        "incr_by on text",
    )?;
    c.set("max", Bytes::from(i64::MAX.to_string()), None)
        .await?;
    expect_kind(
        c.incr_by("max", 1).await,
        ErrorKind::InvalidState,
        "incr_by overflow",
    )?;
    ensure!(
        c.get("text").await? == Some(b("hello")),
        "a failed incr_by must not change the value"
    );
    Ok(())
}

async fn get_many_set_many_keep_order(w: World) -> Result<()> {
    let c = cache(&w).await?;
    c.set_many(
        &[("a", b("1")), ("b", b("2")), ("c", b("3"))],
        Some(Duration::from_secs(30)),
    )
    .await?;
    let got = c.get_many(&["c", "missing", "a", "b"]).await?;
    ensure!(
        got == vec![Some(b("3")), None, Some(b("1")), Some(b("2"))],
        "got {got:?}"
    );
    ensure!(
        matches!(c.ttl("b").await?, KeyTtl::Expires(_)),
        "set_many applies the TTL"
    );
    Ok(())
}

async fn instances_share_entries(w: World) -> Result<()> {
    let a = cache(&w).await?;
    let other = w.peer.cache().await?;
    a.set("shared", b("v"), None).await?;
    ensure!(
        other.get("shared").await? == Some(b("v")),
        "a second instance must see the value"
    );
    Ok(())
}

async fn json_roundtrip_and_malformed_value(w: World) -> Result<()> {
    let c = cache(&w).await?;
    c.set_json("j", &vec![1, 2, 3], None).await?;
    let got: Option<Vec<i32>> = c.get_json("j").await?;
    ensure!(got == Some(vec![1, 2, 3]));
    c.set("bad", b("{not json"), None).await?;
    let err = c
        .get_json::<Vec<i32>>("bad")
        .await
        .err()
        .context("malformed JSON must fail")?;
    ensure!(err.kind() == ErrorKind::Serialization, "got {err}");
    ensure!(
        err.to_string().contains("bad"),
        "the error must name the key: {err}"
    );
    Ok(())
}

async fn get_or_load_runs_one_loader(w: World) -> Result<()> {
    let c = cache(&w).await?;
    let loads = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..16 {
        let c = c.clone();
        let loads = loads.clone();
        handles.push(tokio::spawn(async move {
            c.get_or_load(
                "loaded",
                LoadOptions::ttl(Duration::from_secs(30)),
                || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    Ok(Some(Bytes::from_static(b"from-db")))
                },
            )
            .await
        }));
    }
    for h in handles {
        ensure!(h.await?? == Some(b("from-db")));
    }
    ensure!(
        loads.load(Ordering::SeqCst) == 1,
        "loader ran {} times",
        loads.load(Ordering::SeqCst)
    );
    ensure!(
        c.get("loaded").await? == Some(b("from-db")),
        "the loaded value is cached"
    );
    Ok(())
}

async fn get_or_load_caches_misses_when_asked(w: World) -> Result<()> {
    let c = cache(&w).await?;
    let loads = Arc::new(AtomicUsize::new(0));
    for _ in 0..3 {
        let loads = loads.clone();
        let got = c
            .get_or_load(
                "ghost",
                LoadOptions::ttl(Duration::from_secs(30)).negative(Duration::from_secs(30)),
                || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    Ok(None)
                },
            )
            .await?;
        ensure!(got.is_none());
    }
    ensure!(
        loads.load(Ordering::SeqCst) == 1,
        "a negatively cached miss must not load again"
    );
    Ok(())
}

async fn bad_keys_are_invalid_argument(w: World) -> Result<()> {
    let c = cache(&w).await?;
    let long = "k".repeat(MAX_KEY_BYTES + 1);
    expect_kind(c.get("").await, ErrorKind::InvalidArgument, "get empty key")?;
    expect_kind(
        c.set("", b("v"), None).await,
        ErrorKind::InvalidArgument,
        "set empty key",
    )?;
    expect_kind(
        c.get(&long).await,
        ErrorKind::InvalidArgument,
        "get oversized key",
    )?;
    expect_kind(
        c.set(&long, b("v"), None).await,
        ErrorKind::InvalidArgument,
        "set oversized key",
    )?;
    expect_kind(
        c.delete(&[]).await,
        ErrorKind::InvalidArgument,
        "delete no keys",
    )?;
    expect_kind(
        c.get_many(&["ok", ""]).await,
        ErrorKind::InvalidArgument,
        "get_many empty key",
    )?;
    expect_kind(
        c.incr_by("a\0b", 1).await,
        ErrorKind::InvalidArgument,
        "NUL in key",
    )?;
    Ok(())
}

async fn zero_ttl_is_invalid_argument(w: World) -> Result<()> {
    let c = cache(&w).await?;
    expect_kind(
        c.set("k", b("v"), Some(Duration::ZERO)).await,
        ErrorKind::InvalidArgument,
        "set ttl 0",
    )?;
    expect_kind(
        c.set_nx("k", b("v"), Some(Duration::ZERO)).await,
        ErrorKind::InvalidArgument,
        "set_nx ttl 0",
    )?;
    c.set("k", b("v"), None).await?;
    expect_kind(
        c.expire("k", Duration::ZERO).await,
        ErrorKind::InvalidArgument,
        "expire 0",
    )?;
    ensure!(
        c.ttl("k").await? == KeyTtl::Persistent,
        "a rejected expire changes nothing"
    );
    Ok(())
}

async fn oversized_value_is_invalid_argument(w: World) -> Result<()> {
    let c = cache(&w).await?;
    let max = c.capabilities().max_value_bytes;
    let value = Bytes::from(vec![7u8; max + 1]);
    expect_kind(
        c.set("big", value.clone(), None).await,
        ErrorKind::InvalidArgument,
        "oversized set",
    )?;
    expect_kind(
        c.set_many(&[("big", value)], None).await,
        ErrorKind::InvalidArgument,
        "oversized set_many",
    )?;
    ensure!(c.get("big").await?.is_none(), "nothing may be stored");
    Ok(())
}

fn stores(c: &crate::harness::Claims) -> bool {
    c.has(Capability::Cache) && c.cache.as_ref().is_some_and(|x| x.stores_values)
}

/// The cache cases.
pub fn cases() -> Vec<Case> {
    vec![
        crate::case!("cache", get_miss_returns_none, when = stores),
        crate::case!("cache", set_then_get_roundtrips_binary, when = stores),
        crate::case!(
            "cache",
            unicode_and_punctuated_keys_roundtrip,
            when = stores
        ),
        crate::case!("cache", set_overwrites_value_and_ttl, when = stores),
        crate::case!("cache", set_nx_only_when_absent, when = stores),
        crate::case!("cache", delete_many_returns_count, when = stores),
        crate::case!("cache", exists_reflects_presence, when = stores),
        crate::case!("cache", ttl_expiry_is_observed, when = stores),
        crate::case!(
            "cache",
            ttl_reports_missing_persistent_and_expiring,
            when = stores
        ),
        crate::case!(
            "cache",
            get_with_ttl_reads_the_value_and_its_lifetime,
            when = stores
        ),
        crate::case!(
            "cache",
            get_many_with_ttl_reads_each_key_in_order,
            when = stores
        ),
        crate::case!(
            "cache",
            expire_sets_a_ttl_on_existing_keys_only,
            when = stores
        ),
        crate::case!("cache", incr_by_from_absent_and_negative, when = stores),
        crate::case!(
            "cache",
            incr_by_sums_exactly_under_concurrency,
            when = stores
        ),
        crate::case!("cache", incr_by_keeps_the_ttl, when = stores),
        crate::case!("cache", incr_by_non_integer_is_invalid_state, when = stores),
        crate::case!("cache", get_many_set_many_keep_order, when = stores),
        crate::case!("cache", instances_share_entries, when = stores),
        crate::case!("cache", json_roundtrip_and_malformed_value, when = stores),
        crate::case!("cache", get_or_load_runs_one_loader, when = stores),
        crate::case!("cache", get_or_load_caches_misses_when_asked, when = stores),
        crate::case!("cache", bad_keys_are_invalid_argument, when = stores),
        crate::case!("cache", zero_ttl_is_invalid_argument, when = stores),
        crate::case!("cache", oversized_value_is_invalid_argument, when = stores),
    ]
}
