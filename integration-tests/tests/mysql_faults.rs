//! Fault tests against the real MariaDB from `scripts/services.sh`: the
//! server is killed in the middle of a run and started again; stored rows
//! are corrupted behind the backend's back; credentials are wrong.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Result};
use bytes::Bytes;
use futures::StreamExt;
use im_infra::backend::{Backend, Maintenance};
use im_infra::config::{ConfigCenterExt, ConfigEventKind, WatchOptions};
use im_infra::lock::LockOptions;
use im_infra::once::Claim;
use im_infra::ErrorKind;
use im_infra_conformance::faults::{
    events_until, expect_retryable, set_retrying, until, PolicyLimiters,
};
use im_infra_conformance::servers::{server_or_skip, MYSQL_ENV};
use im_infra_integration_tests::services;
use im_infra_mysql::MysqlBackend;

/// The fault tests stop and start the shared server: one at a time.
static SERVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TABLE_PREFIX: &str = "iminfra_test_";

async fn backend(url: &str, what: &str) -> Result<MysqlBackend> {
    let ns = format!(
        "{what}-{}/",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    Ok(MysqlBackend::builder()
        .url(url)
        .namespace(ns)
        .table_prefix(TABLE_PREFIX)
        .request_timeout(Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1))
        .config_poll_interval(Duration::from_millis(50))
        .build()
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_killed_mid_run_fails_retryably_and_the_same_instance_recovers() -> Result<()> {
    let _one_at_a_time = SERVER.lock().await;
    let Some(url) = server_or_skip("mysql", MYSQL_ENV) else {
        return Ok(());
    };
    let backend = backend(&url, "fault").await?;
    let cache = backend.cache().await?;
    let config = backend.config().await?;
    let once = backend.once().await?;
    let locks = backend.lock().await?;
    let limiters = PolicyLimiters::of(&backend).await?;
    // Closed during the outage, while its limiters decide by their policy.
    let closing = self::backend(&url, "closing").await?;
    let closing_limiters = PolicyLimiters::of(&closing).await?;

    cache.set("k", Bytes::from_static(b"before"), None).await?;
    let v1 = config.set_json("/cfg/k", &1).await?;
    let Claim::Acquired { token } = once.claim("job-1", Duration::from_secs(60)).await? else {
        bail!("a fresh key must be claimable");
    };
    once.complete(
        "job-1",
        &token,
        Bytes::from_static(b"done"),
        Duration::from_secs(60),
    )
    .await?;
    // Held across the outage: the lease (10 s) outlives it, renewal resumes.
    let guard = locks
        .acquire("held", LockOptions::new(Duration::from_secs(10)))
        .await?;
    limiters.expect_backend().await?;

    // A workload runs while the server dies: every error must be retryable.
    let stop = Arc::new(AtomicBool::new(false));
    let workload = {
        let (cache, stop) = (cache.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let r = match i % 2 {
                    0 => cache
                        .set("w", Bytes::from(i.to_string()), None)
                        .await
                        .map(drop),
                    _ => cache.get("w").await.map(drop),
                };
                match r {
                    Ok(()) => ok += 1,
                    Err(e) if e.is_retryable() => {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => return Err(anyhow!("a non-retryable error during the outage: {e}")),
                }
            }
            Ok((ok, failed))
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    services(&["kill", "mysql"])?;
    let result = async {
        for _ in 0..3 {
            expect_retryable("cache.get", cache.get("k").await)?;
        }
        expect_retryable("config.get", config.get_with_version("/cfg/k").await)?;
        let opts = LockOptions::new(Duration::from_secs(5));
        expect_retryable(
            "lock.try_acquire",
            locks.try_acquire("job", opts).await.map(|g| g.is_some()),
        )?;
        expect_retryable(
            "once.claim",
            once.claim("job-2", Duration::from_secs(5)).await,
        )?;
        limiters.expect_policies().await?;
        // A closed backend's limiters answer Closed, not their policy.
        closing_limiters.expect_policies().await?;
        closing.close().await?;
        closing_limiters.expect_closed().await
    }
    .await;
    // Whatever happened, bring the server back for the tests that follow.
    services(&["up", "mysql"])?;
    result?;

    let started = Instant::now();
    until(
        Duration::from_secs(30),
        "the cache works again on the same instance",
        || {
            let cache = cache.clone();
            async move { cache.get("k").await.is_ok() }
        },
    )
    .await?;
    println!(
        "mysql: operations recovered {:?} after the restart",
        started.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = workload.await??;
    println!("mysql: workload during the outage: {ok} ok, {failed} retryable failures");
    ensure!(failed > 0, "the workload never saw the outage");

    // Nothing committed before the kill was lost.
    ensure!(
        cache.get("k").await?.as_deref() == Some(&b"before"[..]),
        "the cache value was lost"
    );
    ensure!(config.get_json_with_version::<i32>("/cfg/k").await? == Some((1, v1)));
    ensure!(
        once.outcome("job-1").await?.as_deref() == Some(&b"done"[..]),
        "the once outcome was lost"
    );
    ensure!(guard.is_held(), "the lock lease outlives a short outage");
    guard.release().await?;

    let v2 = config.set_json("/cfg/k", &2).await?;
    ensure!(
        v2 > v1,
        "versions keep growing across the restart: {v1} then {v2}"
    );
    limiters.expect_recovery(Duration::from_secs(10)).await?;
    backend.purge_namespace().await?;
    backend.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_watch_resumes_across_a_kill_and_loses_nothing() -> Result<()> {
    let _one_at_a_time = SERVER.lock().await;
    let Some(url) = server_or_skip("mysql", MYSQL_ENV) else {
        return Ok(());
    };
    let backend = backend(&url, "watch").await?;
    let center = backend.config().await?;
    let mut events = center.watch("/svc/flag", WatchOptions::default()).await?;
    for i in 0..50 {
        center.set_json("/svc/flag", &i).await?;
    }
    services(&["kill", "mysql"])?;
    let restarted = services(&["up", "mysql"]);
    restarted?;
    let writer = async {
        let mut last = 0;
        for i in 50..100 {
            last = set_retrying(&*center, "/svc/flag", &i, Duration::from_millis(100)).await?;
        }
        anyhow::Ok(last)
    };
    let last = tokio::time::timeout(Duration::from_secs(60), writer).await??;
    let seen = events_until(&mut events, last, Duration::from_secs(30)).await?;
    let values = seen
        .iter()
        .map(|e| serde_json::from_slice(e.value.as_deref().unwrap_or_default()))
        .collect::<Result<Vec<i32>, _>>()?;
    ensure!(
        values == (0..100).collect::<Vec<_>>(),
        "every change, in order, once: {values:?}"
    );
    backend.purge_namespace().await?;
    backend.close().await?;
    Ok(())
}

/// A client that goes silent inside a config write (its host froze, its
/// network partitioned) holds the writers' row lock until the server ends
/// its session after `idle_session_timeout`, not for the server's default
/// of hours: another client's write then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_gone_silent_in_a_config_write_blocks_writes_only_until_its_session_ends(
) -> Result<()> {
    let Some(url) = server_or_skip("mysql", MYSQL_ENV) else {
        return Ok(());
    };
    // Tables of its own: the writers' row is one per table prefix, and
    // this test holds it.
    let prefix = "iminfra_silent_".to_owned();
    let mut settings = im_infra_mysql::MysqlSettings::new(url.clone());
    settings.table_prefix = prefix.clone();
    settings.idle_session_timeout = Duration::from_secs(2);
    let silent = MysqlBackend::builder().settings(settings).build().await?;
    let other = MysqlBackend::builder()
        .url(url)
        .table_prefix(prefix.clone())
        .request_timeout(Duration::from_secs(1))
        .build()
        .await?;
    let center = other.config().await?;
    center.set("/k", Bytes::from_static(b"{}")).await?;
    // What a config write does first, then silence for 10 s.
    let lock = format!("UPDATE {prefix}meta SET value = value + 1 WHERE name = 'config_writer'");
    let holder = tokio::spawn(async move {
        silent
            .db()
            .with_conn_within(Duration::from_secs(30), move |c| {
                Box::pin(async move {
                    use im_infra_mysql::mysql_async::prelude::Queryable;
                    c.query_drop("BEGIN").await?;
                    c.query_drop(lock).await?;
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    c.query_drop("COMMIT").await
                })
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    loop {
        match center.set("/k", Bytes::from_static(b"{\"v\":1}")).await {
            Ok(_) => break,
            Err(e) if started.elapsed() < Duration::from_secs(15) => {
                ensure!(e.is_retryable(), "{e}");
            }
            Err(e) => bail!("still blocked after {:?}: {e}", started.elapsed()),
        }
    }
    let waited = started.elapsed();
    ensure!(
        waited < Duration::from_secs(6),
        "the write waited {waited:?} for a silent client's lock"
    );
    ensure!(
        holder.await?.is_err(),
        "the silent client's session was ended by the server"
    );
    other.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rows_are_serialization_errors_naming_the_key() -> Result<()> {
    let _one_at_a_time = SERVER.lock().await;
    let Some(url) = server_or_skip("mysql", MYSQL_ENV) else {
        return Ok(());
    };
    let backend = backend(&url, "bad").await?;
    let ns = backend.settings().namespace.clone();
    let db = backend.db();
    let key = |k: &str| format!("{ns}{k}").into_bytes();

    // A config value that is not the JSON the reader expects.
    let center = backend.config().await?;
    center
        .set(
            "/cfg/typed",
            Bytes::from_static(b"{\"port\": \"not a number\"}"),
        )
        .await?;
    let err = center
        .get_json::<std::collections::HashMap<String, u16>>("/cfg/typed")
        .await
        .err()
        .ok_or_else(|| anyhow!("a malformed config value was accepted"))?;
    ensure!(
        err.kind() == ErrorKind::Serialization && err.to_string().contains("/cfg/typed"),
        "{err}"
    );

    // A once row in a state the backend never writes.
    db.exec(
        &format!(
            "INSERT INTO {TABLE_PREFIX}once (k, state, token, outcome, expires_at) \
             VALUES (?, 'x', NULL, NULL, NOW(6) + INTERVAL 1 MINUTE)"
        ),
        (key("job/odd"),),
    )
    .await?;
    let once = backend.once().await?;
    let err = once.claim("job/odd", Duration::from_secs(10)).await.err();
    let err = err.ok_or_else(|| anyhow!("a malformed once row was accepted"))?;
    ensure!(
        err.kind() == ErrorKind::Serialization && err.to_string().contains("job/odd"),
        "{err}"
    );
    // A completed row without its outcome.
    db.exec(
        &format!(
            "INSERT INTO {TABLE_PREFIX}once (k, state, token, outcome, expires_at) \
             VALUES (?, 'd', NULL, NULL, NOW(6) + INTERVAL 1 MINUTE)"
        ),
        (key("job/empty"),),
    )
    .await?;
    let err = once.outcome("job/empty").await.err();
    let err = err.ok_or_else(|| anyhow!("a completed row without outcome was accepted"))?;
    ensure!(
        err.kind() == ErrorKind::Serialization && err.to_string().contains("job/empty"),
        "{err}"
    );

    // A change-log entry of an unknown kind is skipped; the watch goes on.
    let mut events = center.watch_prefix("/w/", WatchOptions::default()).await?;
    db.exec(
        &format!("INSERT INTO {TABLE_PREFIX}config_log (k, kind, v) VALUES (?, 'z', NULL)"),
        (key("/w/broken"),),
    )
    .await?;
    let v = center.set("/w/good", Bytes::from_static(b"1")).await?;
    let e = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .map_err(|_| anyhow!("the watch stalled on a malformed change"))?
        .ok_or_else(|| anyhow!("the watch ended"))??;
    ensure!(
        e.key == "/w/good" && e.version == v && e.kind == ConfigEventKind::Put,
        "{e:?}"
    );

    backend.purge_namespace().await?;
    backend.close().await?;
    Ok(())
}

#[tokio::test]
async fn unreachable_server_at_build_is_a_retryable_error() {
    let err = MysqlBackend::builder()
        .url("mysql://u:p@127.0.0.1:1/db")
        .connect_timeout(Duration::from_millis(300))
        .build()
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.is_retryable(), "{err}");
}

#[tokio::test]
async fn a_wrong_password_is_a_config_error_and_is_never_printed() -> Result<()> {
    let _one_at_a_time = SERVER.lock().await;
    let Some(url) = server_or_skip("mysql", MYSQL_ENV) else {
        return Ok(());
    };
    let good = backend(&url, "auth").await?;
    good.health_check().await?;
    let password = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('@').next())
        .and_then(|cred| cred.split(':').nth(1))
        .ok_or_else(|| anyhow!("the test URL carries a password"))?
        .to_owned();
    ensure!(
        !format!("{good:?}").contains(&password),
        "the password must not be printed"
    );
    good.close().await?;

    let bad_url = url.replacen(&password, "wrong-password", 1);
    let err = MysqlBackend::builder()
        .url(&bad_url)
        .build()
        .await
        .err()
        .ok_or_else(|| anyhow!("a wrong password was accepted"))?;
    ensure!(
        err.kind() == ErrorKind::InvalidConfig && !err.is_retryable(),
        "{err}"
    );
    ensure!(
        !err.to_string().contains("wrong-password"),
        "the password must not be printed: {err}"
    );
    Ok(())
}
