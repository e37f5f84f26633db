//! Fault tests against the real Redis from `scripts/services.sh`: the server
//! is killed in the middle of a run and started again.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use bytes::Bytes;
use im_infra::backend::{Backend, Maintenance};
use im_infra::config::ConfigCenterExt;
use im_infra::ErrorKind;
use im_infra_conformance::cases::eventually;
use im_infra_conformance::faults::{
    events_until, expect_retryable, set_retrying, until, PolicyLimiters,
};
use im_infra_conformance::servers::{server_or_skip, REDIS_ENV};
use im_infra_integration_tests::services;
use im_infra_redis::RedisBackend;

/// The fault tests stop and start the shared server: one at a time.
static SERVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_fails_retryably_and_the_same_instance_recovers() -> Result<()> {
    let _one_at_a_time = SERVER.lock().await;
    let Some(url) = server_or_skip("redis", REDIS_ENV) else {
        return Ok(());
    };
    let ns = format!("fault-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let backend = RedisBackend::builder()
        .url(&url)
        .namespace(&ns)
        .request_timeout(Duration::from_secs(1))
        .build()
        .await?;
    let cache = backend.cache().await?;
    let config = backend.config().await?;
    let limiters = PolicyLimiters::of(&backend).await?;
    // Closed during the outage, while its limiters decide by their policy.
    let closing = RedisBackend::builder()
        .url(&url)
        .namespace(&ns)
        .request_timeout(Duration::from_secs(1))
        .build()
        .await?;
    let closing_limiters = PolicyLimiters::of(&closing).await?;

    cache.set("k", Bytes::from_static(b"before"), None).await?;
    config.set_json("/cfg/k", &1).await?;
    limiters.expect_backend().await?;
    // Readiness asks the server (a PING), not a flag.
    let coordinator = im_infra::coord::Coordinator::new(std::sync::Arc::new(backend.clone()));
    ensure!(coordinator.is_ready().await, "ready while Redis answers");

    services(&["kill", "redis"])?;
    let result = async {
        ensure!(
            !coordinator.is_ready().await,
            "not ready while Redis is down"
        );
        // Every operation fails with a retryable error; nothing panics.
        for _ in 0..5 {
            expect_retryable("cache.get", cache.get("k").await)?;
        }
        expect_retryable("config.get", config.get_with_version("/cfg/k").await)?;
        let l = backend.lock().await?;
        let opts = im_infra::lock::LockOptions::new(Duration::from_secs(5));
        expect_retryable(
            "lock.try_acquire",
            l.try_acquire("job", opts).await.map(|g| g.is_some()),
        )?;
        // The limiters decide by their failure policy.
        limiters.expect_policies().await?;
        // A closed backend's limiters answer Closed, not their policy.
        closing_limiters.expect_policies().await?;
        closing.close().await?;
        closing_limiters.expect_closed().await
    }
    .await;
    // Whatever happened, bring the server back for the tests that follow.
    services(&["up", "redis"])?;
    result?;

    let started = Instant::now();
    until(
        Duration::from_secs(30),
        "cache works again on the same instance",
        || {
            let cache = cache.clone();
            async move {
                cache
                    .set("k", Bytes::from_static(b"after"), None)
                    .await
                    .is_ok()
            }
        },
    )
    .await?;
    println!(
        "redis: operations recovered {:?} after the restart",
        started.elapsed()
    );
    ensure!(cache.get("k").await?.as_deref() == Some(&b"after"[..]));
    let v = config.set_json("/cfg/k", &2).await?;
    ensure!(config.get_json_with_version::<i32>("/cfg/k").await? == Some((2, v)));
    limiters.expect_recovery(Duration::from_secs(10)).await?;
    backend.purge_namespace().await?;
    backend.close().await?;
    Ok(())
}

#[tokio::test]
async fn unreachable_redis_at_build_is_a_retryable_error() {
    let err = RedisBackend::builder()
        .url("redis://127.0.0.1:1/0")
        .connect_timeout(Duration::from_millis(300))
        .build()
        .await
        .expect_err("nothing listens on port 1");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::Connection | ErrorKind::Timeout | ErrorKind::Unavailable
        ),
        "{err}"
    );
    assert!(err.is_retryable());
}

/// The ACL user `scripts/services.sh` creates.
const ACL_USER: &str = "iminfra";
const ACL_PASSWORD: &str = "iminfra-test-password";

#[tokio::test]
async fn acl_user_authenticates_and_a_wrong_password_is_a_config_error() -> Result<()> {
    let _one_at_a_time = SERVER.lock().await;
    let Some(url) = server_or_skip("redis", REDIS_ENV) else {
        return Ok(());
    };
    let ns = format!("acl-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let good = RedisBackend::builder()
        .url(&url)
        .namespace(&ns)
        .auth(ACL_USER, ACL_PASSWORD)
        .build()
        .await?;
    good.health_check().await?;
    ensure!(
        !format!("{good:?}").contains(ACL_PASSWORD),
        "the password must not be printed"
    );
    good.purge_namespace().await?;
    good.close().await?;
    let err = RedisBackend::builder()
        .url(&url)
        .auth(ACL_USER, "wrong-password")
        .build()
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("a wrong password was accepted"))?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_watch_resumes_across_a_restart_and_loses_nothing() -> Result<()> {
    use im_infra::config::WatchOptions;
    let _one_at_a_time = SERVER.lock().await;
    let Some(url) = server_or_skip("redis", REDIS_ENV) else {
        return Ok(());
    };
    let ns = format!("watch-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let backend = RedisBackend::builder()
        .url(&url)
        .namespace(&ns)
        .request_timeout(Duration::from_secs(1))
        .build()
        .await?;
    let center = backend.config().await?;
    let mut events = center.watch("/svc/flag", WatchOptions::default()).await?;
    for i in 0..50 {
        center.set_json("/svc/flag", &i).await?;
    }
    // A graceful restart: the append-only file keeps every write.
    services(&["restart", "redis"])?;
    let writer = async {
        let mut last = 0;
        for i in 50..100 {
            last = set_retrying(&*center, "/svc/flag", &i, Duration::from_millis(100)).await?;
        }
        anyhow::Ok(last)
    };
    let last = tokio::time::timeout(Duration::from_secs(60), writer).await??;
    let seen: Vec<u64> = events_until(&mut events, last, Duration::from_secs(30))
        .await?
        .iter()
        .map(|e| e.version)
        .collect();
    ensure!(seen.len() == 100, "{} of 100 changes seen", seen.len());
    ensure!(seen.windows(2).all(|w| w[0] < w[1]), "in order");
    backend.purge_namespace().await?;
    backend.close().await?;
    Ok(())
}

/// A near cache over a Redis that restarts: a value it held from before is
/// not served once another client changed it after the restart (after
/// `sync()` at once, and without it once tracking is back), and keys are
/// held near again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_cache_serves_nothing_stale_across_a_redis_restart() -> Result<()> {
    use im_infra::cache::near::NearCache;
    use im_infra::cache::Cache;
    use redis::AsyncCommands;

    let _one_at_a_time = SERVER.lock().await;
    let Some(url) = server_or_skip("redis", REDIS_ENV) else {
        return Ok(());
    };
    let ns = format!("near-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let backend = RedisBackend::builder()
        .url(&url)
        .namespace(&ns)
        .request_timeout(Duration::from_secs(1))
        .build()
        .await?;
    let near = NearCache::builder(backend.cache().await?)
        .invalidation(backend.invalidations())
        .build()
        .await?;
    ensure!(near.is_live(), "tracking is up once built");
    near.set("k", Bytes::from_static(b"before"), None).await?;
    // The write's own invalidation comes back on the tracking connection;
    // a fill it overtook would not be kept.
    near.sync().await;
    ensure!(near.get("k").await?.as_deref() == Some(&b"before"[..]));
    ensure!(near.size().0 == 1, "held near");

    // A graceful restart (the append-only file keeps "before"), then
    // another client's write.
    services(&["restart", "redis"])?;
    let key = format!("{ns}:c:k");
    let mut raw = retry_for(Duration::from_secs(30), || async {
        redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await
            .map_err(anyhow::Error::from)
    })
    .await?;
    let _: () = raw.set(&key, "after").await?;
    near.sync().await;
    let read = retry_for(Duration::from_secs(30), || async {
        near.get("k").await.map_err(anyhow::Error::from)
    })
    .await?;
    ensure!(
        read.as_deref() == Some(&b"after"[..]),
        "stale after the restart: {read:?}"
    );

    eventually(
        Duration::from_secs(10),
        "the near cache live again",
        || async { Ok(near.is_live()) },
    )
    .await?;
    ensure!(near.get("k").await?.as_deref() == Some(&b"after"[..]));
    let _: () = raw.set(&key, "again").await?;
    near.sync().await;
    ensure!(near.get("k").await?.as_deref() == Some(&b"again"[..]));
    backend.purge_namespace().await?;
    backend.close().await?;
    Ok(())
}

/// `f`'s first success within `within` (tried every 100 ms).
async fn retry_for<T, F, Fut>(within: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > within => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
