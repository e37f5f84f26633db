//! Partitions, not crashes: one client of Redis, etcd or MySQL talks to its
//! server through a proxy that freezes its traffic without closing its
//! connections; another client talks to the server directly. Whatever the
//! cut-off client holds — a lock, a worker id, a registration, a once-claim
//! — it must learn it lost it before the other client can be granted it,
//! and what it registered comes back by itself after the thaw.
//!
//! Each test prints what it measured (run with `--nocapture`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use im_infra::backend::Backend;
use im_infra::lock::LockOptions;
use im_infra::once::{OnceExt, OnceOptions, Outcome, RunError};
use im_infra::registry::ServiceInstance;
use im_infra::uid::{IdGenerator, Layout, Snowflake};
use im_infra::ErrorKind;
use im_infra_conformance::proxy::FreezeProxy;
use im_infra_conformance::servers::{server_or_skip, ETCD_ENV, MYSQL_ENV, REDIS_ENV};
use im_infra_etcd::{EtcdBackend, EtcdSettings};
use im_infra_mysql::MysqlBackend;
use im_infra_redis::RedisBackend;

/// The TTL of everything held in these tests (etcd's shortest lease).
const TTL: Duration = Duration::from_secs(2);
/// How long a proxied client waits for one answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound of every wait for the server to expire something.
const BOUND: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Redis,
    Etcd,
    Mysql,
}

/// A client cut off behind a proxy, and a client that talks to the server
/// directly, on one namespace.
struct Sides {
    proxy: FreezeProxy,
    cut: Arc<dyn Backend>,
    direct: Arc<dyn Backend>,
}

impl Sides {
    async fn new(kind: Kind) -> Result<Option<Sides>> {
        let (name, env) = match kind {
            Kind::Redis => ("redis", REDIS_ENV),
            Kind::Etcd => ("etcd", ETCD_ENV),
            Kind::Mysql => ("mysql", MYSQL_ENV),
        };
        let Some(address) = server_or_skip(name, env) else {
            return Ok(None);
        };
        // etcd endpoints may be a list: the first one is enough here.
        let address = address.split(',').next().unwrap_or_default().to_owned();
        let proxy = FreezeProxy::for_url(&address).await?;
        let ns = format!(
            "partition-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let cut = connect(kind, &proxy.url(&address)?, &ns).await?;
        let direct = connect(kind, &address, &ns).await?;
        Ok(Some(Sides { proxy, cut, direct }))
    }

    async fn close(self) {
        self.proxy.thaw();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.cut.close()).await;
        let _ = self.direct.close().await;
    }
}

async fn connect(kind: Kind, address: &str, ns: &str) -> Result<Arc<dyn Backend>> {
    Ok(match kind {
        Kind::Redis => Arc::new(
            RedisBackend::builder()
                .url(address)
                .namespace(ns)
                .request_timeout(REQUEST_TIMEOUT)
                .build()
                .await?,
        ),
        Kind::Etcd => {
            let mut cfg = EtcdSettings::with_endpoints([address.to_owned()]);
            cfg.namespace = format!("/{ns}");
            cfg.request_timeout = REQUEST_TIMEOUT;
            cfg.connect_timeout = Duration::from_secs(3);
            Arc::new(EtcdBackend::builder().settings(cfg).build().await?)
        }
        Kind::Mysql => Arc::new(
            MysqlBackend::builder()
                .url(address)
                .namespace(format!("{ns}/"))
                .table_prefix("iminfra_test_")
                .request_timeout(REQUEST_TIMEOUT)
                .connect_timeout(REQUEST_TIMEOUT)
                .build()
                .await?,
        ),
    })
}

/// A lock holder behind the frozen proxy: its `lost` fires and `is_held()`
/// turns false before a client connected directly acquires the lock, and
/// the new token is larger.
async fn lock_holder_learns_first(kind: Kind) -> Result<()> {
    let Some(s) = Sides::new(kind).await? else {
        return Ok(());
    };
    let key = "partitioned-lock";
    let held = s
        .cut
        .lock()
        .await?
        .acquire(key, LockOptions::new(TTL))
        .await?;
    let token = held.fencing_token();
    let lost = held.lost();
    let noticed = tokio::spawn(async move {
        lost.cancelled().await;
        Instant::now()
    });
    // Let a renewal or two go through, then cut the holder off.
    tokio::time::sleep(TTL / 2).await;
    ensure!(held.is_held(), "renewed while connected");
    s.proxy.freeze();
    let frozen_at = Instant::now();
    let other = s.direct.lock().await?;
    let (next, attempt_at) = loop {
        let attempt_at = Instant::now();
        let believed = held.is_held();
        if let Some(g) = other.try_acquire(key, LockOptions::new(TTL)).await? {
            ensure!(
                !believed,
                "{kind:?}: granted to another client while the cut-off holder still believed it held the lock"
            );
            break (g, attempt_at);
        }
        ensure!(
            frozen_at.elapsed() < BOUND,
            "{kind:?}: the lock never expired"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    ensure!(noticed.is_finished(), "{kind:?}: lost had not fired");
    let lost_at = noticed.await?;
    ensure!(
        lost_at <= attempt_at,
        "{kind:?}: lost fired after the other client's successful attempt began"
    );
    ensure!(
        next.fencing_token() > token,
        "{kind:?}: token {} after {token}",
        next.fencing_token()
    );
    println!(
        "{kind:?} lock: holder's lost {:?} after the freeze; the other client acquired {:?} after that (margin)",
        lost_at - frozen_at,
        attempt_at - lost_at
    );
    s.proxy.thaw();
    let released = held.release().await;
    ensure!(
        released.as_ref().err().map(|e| e.kind()) == Some(ErrorKind::LockNotHeld),
        "{kind:?}: the old holder's release after the thaw: {released:?}"
    );
    next.release().await?;
    s.close().await;
    Ok(())
}

/// A lock release that never reached the server (the holder was cut off,
/// the release timed out, its request was lost with the connection) is
/// asked again: by a second `release`, and by dropping the guard. Either
/// frees the lock long before its TTL. (Not on etcd: there a release also
/// revokes the waiter's own lease in the background, which frees the lock
/// by itself once the connection is back; a second release may then find
/// nothing left to release.)
async fn a_release_that_never_arrived_is_asked_again(kind: Kind) -> Result<()> {
    let Some(s) = Sides::new(kind).await? else {
        return Ok(());
    };
    let long = LockOptions::new(Duration::from_secs(60));
    let locks = s.cut.lock().await?;
    let (retried, dropped) = (
        locks.acquire("released-again", long).await?,
        locks.acquire("dropped-after", long).await?,
    );
    s.proxy.freeze();
    for guard in [&retried, &dropped] {
        let err = guard.release().await.expect_err("the release is cut off");
        ensure!(err.is_retryable(), "{kind:?}: {err}");
        ensure!(!guard.is_held(), "{kind:?}: given up locally at once");
    }
    // The held requests go with their connections.
    s.proxy.cut();
    s.proxy.thaw();
    let started = Instant::now();
    let answer = loop {
        match retried.release().await {
            Err(e) if e.is_retryable() && started.elapsed() < BOUND => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => break other,
        }
    };
    ensure!(
        answer.is_ok(),
        "{kind:?}: the second release answered {answer:?}"
    );
    drop(dropped);
    let other = s.direct.lock().await?;
    for key in ["released-again", "dropped-after"] {
        let taken = loop {
            if let Some(g) = other.try_acquire(key, LockOptions::new(TTL)).await? {
                break g;
            }
            ensure!(
                started.elapsed() < BOUND,
                "{kind:?}: {key:?} stayed held after its release was asked again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        taken.release().await?;
    }
    println!(
        "{kind:?} lock: both locks free {:?} after the thaw (TTL 60 s)",
        started.elapsed()
    );
    s.close().await;
    Ok(())
}

/// Redis cut off while its connection is re-established (the connection
/// closed, the server then silent): every command still answers within the
/// request timeout, rather than waiting for each connection attempt of the
/// client's reconnection in turn.
async fn commands_during_a_reconnection_keep_their_deadline(kind: Kind) -> Result<()> {
    let Some(s) = Sides::new(kind).await? else {
        return Ok(());
    };
    let cache = s.cut.cache().await?;
    cache
        .set("k", bytes::Bytes::from_static(b"v"), None)
        .await?;
    s.proxy.freeze();
    s.proxy.cut();
    let mut slowest = Duration::ZERO;
    for _ in 0..4 {
        let started = Instant::now();
        let answer = cache.get("k").await;
        slowest = slowest.max(started.elapsed());
        ensure!(
            answer.as_ref().is_err_and(|e| e.is_retryable()),
            "{kind:?}: {answer:?}"
        );
    }
    ensure!(
        slowest < REQUEST_TIMEOUT + Duration::from_millis(500),
        "{kind:?}: a command took {slowest:?} (request timeout {REQUEST_TIMEOUT:?})"
    );
    s.proxy.thaw();
    let started = Instant::now();
    loop {
        match cache.get("k").await {
            Ok(v) => {
                ensure!(v.as_deref() == Some(&b"v"[..]), "{v:?}");
                break;
            }
            Err(e) if e.is_retryable() && started.elapsed() < BOUND => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
    println!(
        "{kind:?}: slowest command while reconnecting {slowest:?}; back {:?} after the thaw",
        started.elapsed()
    );
    s.close().await;
    Ok(())
}

/// A Snowflake generator whose worker lease is behind the frozen proxy
/// stops issuing ids before another allocator receives the same worker id.
async fn generator_stops_before_its_id_is_reused(kind: Kind) -> Result<()> {
    let Some(s) = Sides::new(kind).await? else {
        return Ok(());
    };
    let layout = Layout::default();
    // One id only (0), so the other allocator can only get the same one.
    let lease = s.cut.worker_ids().await?.allocate(0, TTL).await?;
    let generator = Snowflake::with_lease(layout, lease)?;
    generator.next_id()?;
    tokio::time::sleep(TTL / 2).await;
    s.proxy.freeze();
    let frozen_at = Instant::now();
    let other = s.direct.worker_ids().await?;
    let mut stopped_at = None;
    let (reused, attempt_at) = loop {
        let attempt_at = Instant::now();
        match generator.next_id() {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::LeaseLost => {
                stopped_at.get_or_insert(attempt_at);
            }
            Err(e) => bail!("{kind:?}: next_id: {e}"),
        }
        match other.allocate(0, TTL).await {
            Ok(lease) => break (lease, attempt_at),
            Err(e) if e.kind() == ErrorKind::ResourceExhausted => {}
            Err(e) => bail!("{kind:?}: allocate: {e}"),
        }
        ensure!(
            frozen_at.elapsed() < BOUND,
            "{kind:?}: the worker id never expired"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let stopped_at = stopped_at.context("the generator still issued ids when its id was reused")?;
    ensure!(reused.worker_id() == generator.worker_id());
    ensure!(
        generator.next_id().is_err(),
        "{kind:?}: no id once the id is someone else's"
    );
    println!(
        "{kind:?} worker id: the generator stopped {:?} after the freeze; the id was reused {:?} after that",
        stopped_at - frozen_at,
        attempt_at - stopped_at
    );
    drop(reused);
    drop(generator);
    s.close().await;
    Ok(())
}

/// A registered instance behind the frozen proxy expires on the server and
/// is registered again after the thaw, with no call from the service.
async fn registration_comes_back_after_the_thaw(kind: Kind) -> Result<()> {
    let Some(s) = Sides::new(kind).await? else {
        return Ok(());
    };
    let registry = s.cut.registry().await?;
    let discovery = s.direct.discovery().await?;
    let instance = ServiceInstance::new("partitioned", "node-1", "127.0.0.1:7000");
    registry.register(&instance, TTL).await?;
    let listed = |present: bool| {
        let discovery = discovery.clone();
        async move {
            let live = discovery.instances("partitioned").await?;
            anyhow::Ok(live.iter().any(|i| i.id == "node-1") == present)
        }
    };
    ensure!(listed(true).await?, "registered");
    s.proxy.freeze();
    let frozen_at = Instant::now();
    while !listed(false).await? {
        ensure!(frozen_at.elapsed() < BOUND, "{kind:?}: never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expired_after = frozen_at.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.proxy.thaw();
    let thawed_at = Instant::now();
    while !listed(true).await? {
        ensure!(
            thawed_at.elapsed() < BOUND,
            "{kind:?}: not registered again after the thaw"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{kind:?} registry: expired {expired_after:?} after the freeze; registered again {:?} after the thaw",
        thawed_at.elapsed()
    );
    registry.deregister("partitioned", "node-1").await?;
    s.close().await;
    Ok(())
}

/// A once-claim behind the frozen proxy: after it expires another caller
/// runs the work, and the first caller's completion is refused.
async fn once_claim_expires_and_the_completion_is_refused(kind: Kind) -> Result<()> {
    let Some(s) = Sides::new(kind).await? else {
        return Ok(());
    };
    let key = "partitioned-job";
    let hour = Duration::from_secs(3600);
    let cut = s.cut.once().await?;
    let (finish, finished) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn(async move {
        let opts = OnceOptions::new(hour).claim_ttl(TTL);
        cut.run_with(key, opts, || async move {
            let _ = finished.await;
            Ok::<_, std::io::Error>("first".to_string())
        })
        .await
    });
    tokio::time::sleep(TTL / 2).await;
    s.proxy.freeze();
    let frozen_at = Instant::now();
    let direct = s.direct.once().await?;
    loop {
        let r = direct
            .run(key, hour, || async {
                Ok::<_, std::io::Error>("second".to_string())
            })
            .await;
        match r {
            Ok(Outcome::Executed(v)) if v == "second" => break,
            Err(RunError::Infra(e)) if e.kind() == ErrorKind::InProgress => {}
            other => bail!("{kind:?}: the second caller got {other:?}"),
        }
        ensure!(
            frozen_at.elapsed() < BOUND,
            "{kind:?}: the claim never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ran_after = frozen_at.elapsed();
    s.proxy.thaw();
    let _ = finish.send(());
    let r = first.await?;
    ensure!(
        matches!(&r, Err(RunError::Infra(e)) if e.kind() == ErrorKind::LockNotHeld),
        "{kind:?}: the first caller's completion must be refused, got {r:?}"
    );
    let stored = direct
        .outcome(key)
        .await?
        .context("the second outcome is stored")?;
    ensure!(&stored[..] == b"\"second\"", "{stored:?}");
    println!("{kind:?} once: the second caller ran the work {ran_after:?} after the freeze");
    s.close().await;
    Ok(())
}

macro_rules! per_backend {
    ($($name:ident => $check:ident($kind:expr);)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() -> Result<()> {
            $check($kind).await
        }
    )*};
}

per_backend! {
    redis_lock_holder_learns_first => lock_holder_learns_first(Kind::Redis);
    etcd_lock_holder_learns_first => lock_holder_learns_first(Kind::Etcd);
    mysql_lock_holder_learns_first => lock_holder_learns_first(Kind::Mysql);
    redis_a_release_that_never_arrived_is_asked_again => a_release_that_never_arrived_is_asked_again(Kind::Redis);
    redis_commands_during_a_reconnection_keep_their_deadline => commands_during_a_reconnection_keep_their_deadline(Kind::Redis);
    mysql_a_release_that_never_arrived_is_asked_again => a_release_that_never_arrived_is_asked_again(Kind::Mysql);
    redis_generator_stops_before_its_id_is_reused => generator_stops_before_its_id_is_reused(Kind::Redis);
    etcd_generator_stops_before_its_id_is_reused => generator_stops_before_its_id_is_reused(Kind::Etcd);
    mysql_generator_stops_before_its_id_is_reused => generator_stops_before_its_id_is_reused(Kind::Mysql);
    redis_registration_comes_back_after_the_thaw => registration_comes_back_after_the_thaw(Kind::Redis);
    etcd_registration_comes_back_after_the_thaw => registration_comes_back_after_the_thaw(Kind::Etcd);
    redis_once_claim_expires_and_the_completion_is_refused => once_claim_expires_and_the_completion_is_refused(Kind::Redis);
    etcd_once_claim_expires_and_the_completion_is_refused => once_claim_expires_and_the_completion_is_refused(Kind::Etcd);
    mysql_once_claim_expires_and_the_completion_is_refused => once_claim_expires_and_the_completion_is_refused(Kind::Mysql);
}
