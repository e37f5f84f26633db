//! The near cache on the real Redis (required under
//! `IMINFRA_REQUIRE_BACKENDS`): invalidations from writes of other
//! clients, the tracking connection cut, the network frozen, the URL
//! moved to another server, the bounds, misses read together (a freeze
//! among them), and the same on a cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use im_infra::backend::{Backend, Maintenance};
use im_infra::cache::near::NearCache;
use im_infra::cache::Cache;
use im_infra::ErrorKind;
use im_infra_conformance::cases::eventually;
use im_infra_conformance::proxy::FreezeProxy;
use im_infra_conformance::servers::{server_or_skip, REDIS_CLUSTER_ENV, REDIS_ENV};
use im_infra_redis::{RedisBackend, TRACKING_CLIENT_NAME, TRACKING_HEARTBEAT};
use redis::AsyncCommands;

// Only starting a server and its URL are used here.
#[allow(dead_code)]
#[path = "support/private_redis.rs"]
mod private_redis;
use private_redis::PrivateRedis;

struct Setup {
    backend: RedisBackend,
    near: NearCache,
    raw: redis::aio::MultiplexedConnection,
    ns: String,
}

async fn setup(
    url: &str,
    near: impl FnOnce(
        im_infra::cache::near::NearCacheBuilder,
    ) -> im_infra::cache::near::NearCacheBuilder,
) -> Result<Setup> {
    let ns = format!("near-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let backend = RedisBackend::builder()
        .url(url)
        .namespace(&ns)
        .build()
        .await?;
    let builder = NearCache::builder(backend.cache().await?).invalidation(backend.invalidations());
    let near = near(builder).build().await?;
    let raw = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    Ok(Setup {
        backend,
        near,
        raw,
        ns,
    })
}

impl Setup {
    /// The key `key` of the cache as other clients write it.
    fn full(&self, key: &str) -> String {
        format!("{}:c:{key}", self.ns)
    }

    async fn close(self) -> Result<()> {
        self.backend.purge_namespace().await?;
        self.backend.close().await?;
        Ok(())
    }
}

/// Kills the tracking connection of namespace `ns` on the node `conn` is
/// connected to (`CLIENT KILL ID`, found by its name in `CLIENT LIST`).
async fn kill_tracking_connection(
    conn: &mut redis::aio::MultiplexedConnection,
    ns: &str,
) -> Result<()> {
    let name = format!("name={TRACKING_CLIENT_NAME}:{ns}");
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(conn).await?;
    let id = list
        .lines()
        .find(|l| l.split(' ').any(|f| f == name))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .context("the tracking connection is listed")?
        .to_owned();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&id)
        .query_async(conn)
        .await?;
    ensure!(killed == 1, "CLIENT KILL ID {id} killed {killed}");
    Ok(())
}

/// Waits until `near` is live again (within `within`); how long it took.
async fn live_again(near: &NearCache, within: Duration) -> Result<Duration> {
    let start = Instant::now();
    eventually(within, "the near cache live again", || async {
        Ok(near.is_live())
    })
    .await?;
    Ok(start.elapsed())
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q) as usize]
}

/// Another client writes a key the near cache holds: once the invalidation
/// arrives the new value is read (the delay is measured), and after
/// `sync()` it is read at once, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_by_another_client_is_not_read_stale_once_its_invalidation_arrived() -> Result<()> {
    let Some(url) = server_or_skip("redis", REDIS_ENV) else {
        return Ok(());
    };
    let mut s = setup(&url, |b| b).await?;
    let key = s.full("profile");
    let _: () = s.raw.set(&key, "v0").await?;
    let mut delays = Vec::new();
    for i in 1..=300 {
        // Held near: after a sync (the previous write's invalidation is in)
        // the read keeps the key near.
        s.near.sync().await;
        s.near.get("profile").await?.context("the key exists")?;
        ensure!(s.near.size().0 == 1, "write {i}: the key is not held near");
        let value = format!("v{i}");
        let _: () = s.raw.set(&key, &value).await?;
        let written = Instant::now();
        loop {
            if s.near.get("profile").await?.as_deref() == Some(value.as_bytes()) {
                delays.push(written.elapsed());
                break;
            }
            ensure!(
                written.elapsed() < Duration::from_secs(2),
                "write {i} still not seen after 2 s"
            );
            tokio::task::yield_now().await;
        }
        // With sync(): never stale, not even once.
        let value = format!("w{i}");
        let _: () = s.raw.set(&key, &value).await?;
        s.near.sync().await;
        let read = s.near.get("profile").await?;
        ensure!(
            read.as_deref() == Some(value.as_bytes()),
            "stale after sync: {read:?}, wrote {value}"
        );
    }
    delays.sort();
    println!(
        "invalidation delay (write acknowledged -> near read sees it), 300 writes: p50 {:?} p99 {:?} max {:?}",
        quantile(&delays, 0.5),
        quantile(&delays, 0.99),
        delays[delays.len() - 1]
    );
    s.close().await
}

/// The tracking connection is killed; a write lands while it is down: after
/// `sync()` the new value is read, reads go to Redis until the channel is
/// back, and then keys are held near again and still invalidated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_tracking_connection_leaves_nothing_stale_behind() -> Result<()> {
    let Some(url) = server_or_skip("redis", REDIS_ENV) else {
        return Ok(());
    };
    let mut s = setup(&url, |b| b).await?;
    let key = s.full("session");
    let _: () = s.raw.set(&key, "before").await?;
    ensure!(s.near.get("session").await?.as_deref() == Some(&b"before"[..]));
    ensure!(s.near.is_live());

    kill_tracking_connection(&mut s.raw, &s.ns).await?;
    let _: () = s.raw.set(&key, "during").await?;
    s.near.sync().await;
    let read = s.near.get("session").await?;
    ensure!(
        read.as_deref() == Some(&b"during"[..]),
        "stale after the cut: {read:?}"
    );

    let back = live_again(&s.near, Duration::from_secs(5)).await?;
    println!("tracking back {back:?} after the cut was noticed");
    s.near.sync().await;
    ensure!(s.near.get("session").await?.as_deref() == Some(&b"during"[..]));
    ensure!(s.near.size().0 >= 1, "held near again");
    let _: () = s.raw.set(&key, "after").await?;
    s.near.sync().await;
    ensure!(s.near.get("session").await?.as_deref() == Some(&b"after"[..]));
    s.close().await
}

/// The network to Redis freezes without closing anything, and another
/// client writes meanwhile: within two heartbeats the near cache stops
/// answering from memory (its reads then wait on Redis rather than return
/// the old value); after the thaw it is live again and reads the new value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_network_stops_answers_from_memory_within_two_heartbeats() -> Result<()> {
    let Some(url) = server_or_skip("redis", REDIS_ENV) else {
        return Ok(());
    };
    let proxy = FreezeProxy::for_url(&url).await?;
    let s = setup(&proxy.url(&url)?, |b| b).await?;
    let mut direct = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let key = s.full("profile");
    let _: () = direct.set(&key, "before").await?;
    s.near.sync().await;
    ensure!(s.near.get("profile").await?.as_deref() == Some(&b"before"[..]));
    ensure!(s.near.size().0 == 1 && s.near.is_live(), "held near, live");

    proxy.freeze();
    let _: () = direct.set(&key, "after").await?;
    let frozen = Instant::now();
    let mut stale_reads = 0u32;
    while s.near.is_live() {
        ensure!(
            frozen.elapsed() < Duration::from_secs(5),
            "still live 5 s into the freeze"
        );
        if let Ok(Ok(Some(v))) =
            tokio::time::timeout(Duration::from_millis(20), s.near.get("profile")).await
        {
            ensure!(
                v.as_ref() == b"before",
                "read {v:?} through a frozen network"
            );
            stale_reads += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let noticed = frozen.elapsed();
    println!("freeze noticed after {noticed:?} ({stale_reads} reads answered from memory before)");
    ensure!(
        noticed < TRACKING_HEARTBEAT * 2 + Duration::from_secs(1),
        "the freeze was noticed only after {noticed:?}"
    );
    ensure!(s.near.size().0 == 0, "emptied when the freeze was noticed");
    // From now on no read is answered from memory: they wait on Redis.
    for _ in 0..5 {
        let read = tokio::time::timeout(Duration::from_millis(100), s.near.get("profile")).await;
        ensure!(
            !matches!(read, Ok(Ok(Some(ref v))) if v.as_ref() == b"before"),
            "the old value read after the freeze was noticed"
        );
    }

    proxy.thaw();
    live_again(&s.near, Duration::from_secs(10)).await?;
    s.near.sync().await;
    let read = s.near.get("profile").await?;
    ensure!(
        read.as_deref() == Some(&b"after"[..]),
        "after the thaw: {read:?}"
    );
    s.close().await
}

/// The URL moves to another server (a managed endpoint's failover, a
/// load balancer): the reads' connection, cut, comes back on server B while
/// the tracking connection stays on server A, whose pushes say nothing of
/// B's writes. Within two heartbeats the near cache notices that the
/// servers differ, and a write acknowledged by B is read, never A's value
/// held in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_moved_to_another_server_is_noticed_within_two_heartbeats() -> Result<()> {
    let (Some(a), Some(b)) = (
        PrivateRedis::start_or_skip().await?,
        PrivateRedis::start_or_skip().await?,
    ) else {
        return Ok(());
    };
    let proxy = FreezeProxy::for_url(&a.url()).await?;
    let s = setup(&proxy.url(&a.url())?, |n| n).await?;
    let key = s.full("profile");
    let mut on_a = redis::Client::open(a.url())?
        .get_multiplexed_async_connection()
        .await?;
    let _: () = on_a.set(&key, "on a").await?;
    s.near.sync().await;
    ensure!(s.near.get("profile").await?.as_deref() == Some(&b"on a"[..]));
    ensure!(s.near.size().0 == 1 && s.near.is_live(), "held near, live");

    // The name moves to B; every connection on A but the tracking one
    // (and this test's own) is cut, so the reads reconnect, to B.
    proxy.retarget(&im_infra_conformance::servers::host_port(&b.url())?);
    let tracking = format!("name={TRACKING_CLIENT_NAME}:{}", s.ns);
    let mine: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut on_a)
        .await?;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut on_a)
        .await?;
    for line in list
        .lines()
        .filter(|l| !l.split(' ').any(|f| f == tracking))
    {
        let Some(id) = line.split(' ').find_map(|f| f.strip_prefix("id=")) else {
            continue;
        };
        if id != mine.to_string() {
            let _: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async(&mut on_a)
                .await?;
        }
    }
    let cache = s.backend.cache().await?;
    let moved = Instant::now();
    eventually(Duration::from_secs(10), "a write reaches B", || {
        let cache = cache.clone();
        async move {
            Ok(cache
                .set("profile", Bytes::from_static(b"on b"), None)
                .await
                .is_ok())
        }
    })
    .await?;
    let on_b: Option<String> = redis::Client::open(b.url())?
        .get_multiplexed_async_connection()
        .await?
        .get(&key)
        .await?;
    ensure!(
        on_b.as_deref() == Some("on b"),
        "the write went to B: {on_b:?}"
    );
    let written = Instant::now();

    let mut old_reads = 0u32;
    loop {
        let read = s.near.get("profile").await;
        if matches!(&read, Ok(Some(v)) if v.as_ref() == b"on b") {
            break;
        }
        old_reads += 1;
        ensure!(
            written.elapsed() < TRACKING_HEARTBEAT * 2 + Duration::from_secs(1),
            "still {read:?} {:?} after B acknowledged the write",
            written.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "B's write read {:?} after it was acknowledged ({:?} after the move; {old_reads} older reads before)",
        written.elapsed(),
        moved.elapsed()
    );
    live_again(&s.near, Duration::from_secs(10)).await?;
    s.near.sync().await;
    ensure!(s.near.get("profile").await?.as_deref() == Some(&b"on b"[..]));
    s.backend.close().await?;
    Ok(())
}

/// The network to Redis freezes while 32 readers' misses are being read
/// together, and another client rewrites every key meanwhile: no read
/// hangs (each ends, with a value or an error, within a bound set by the
/// request timeout), and after the thaw every key reads its new value, so
/// no read was lost from the batcher's bound of reads at once and nothing
/// read before the freeze was kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_frozen_mid_batch_ends_every_read_in_time_and_keeps_nothing_old() -> Result<()> {
    let Some(url) = server_or_skip("redis", REDIS_ENV) else {
        return Ok(());
    };
    const KEYS: usize = 400;
    const TIMEOUT: Duration = Duration::from_millis(500);
    let proxy = FreezeProxy::for_url(&url).await?;
    let ns = format!("near-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let backend = RedisBackend::builder()
        .url(proxy.url(&url)?)
        .namespace(&ns)
        .request_timeout(TIMEOUT)
        .build()
        .await?;
    let near = NearCache::builder(backend.cache().await?)
        .invalidation(backend.invalidations())
        .max_entries(50)
        .build()
        .await?;
    let mut direct = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let full = |i: usize| format!("{ns}:c:k{i}");
    for i in 0..KEYS {
        let _: () = direct.set(full(i), "before").await?;
    }
    near.sync().await;

    let stop = std::sync::atomic::AtomicBool::new(false);
    let failed = std::sync::atomic::AtomicUsize::new(0);
    let slowest = parking_lot::Mutex::new(Duration::ZERO);
    let readers = futures::future::join_all((0..32usize).map(|t| {
        let (near, stop, failed, slowest) = (&near, &stop, &failed, &slowest);
        async move {
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let i = (t * 7919 + n * 104_729) % KEYS;
                let started = Instant::now();
                if near.get(&format!("k{i}")).await.is_err() {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let took = started.elapsed();
                let mut worst = slowest.lock();
                *worst = (*worst).max(took);
                n += 1;
            }
        }
    }));
    let control = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.freeze();
        for i in 0..KEYS {
            let _: () = direct.set(full(i), "after").await?;
        }
        tokio::time::sleep(TIMEOUT * 4 + TRACKING_HEARTBEAT * 2).await;
        proxy.thaw();
        live_again(&near, Duration::from_secs(10)).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok::<(), anyhow::Error>(())
    };
    let (_, controlled) = tokio::join!(readers, control);
    controlled?;
    let (failed, slowest) = (failed.into_inner(), slowest.into_inner());
    println!("{failed} reads failed during the freeze; the slowest read took {slowest:?}");
    ensure!(failed > 0, "the freeze reached reads in flight");
    // A miss may wait on the flight of its key, whose reader waits for a
    // read of the server to end before it reads: three request timeouts
    // at most (1.5 s measured), and a second of slack.
    let bound = TIMEOUT * 3 + Duration::from_secs(1);
    ensure!(slowest < bound, "a read took {slowest:?} (bound {bound:?})");

    near.sync().await;
    let reads = (0..KEYS).map(|i| {
        let near = &near;
        async move {
            let got = tokio::time::timeout(Duration::from_secs(5), near.get(&format!("k{i}")))
                .await
                .context("a read after the thaw waits for nothing lost")??;
            ensure!(
                got.as_deref() == Some(&b"after"[..]),
                "k{i} read {got:?} after the thaw"
            );
            Ok::<(), anyhow::Error>(())
        }
    });
    futures::future::try_join_all(reads).await?;
    backend.purge_namespace().await?;
    backend.close().await?;
    Ok(())
}

/// 2,000 values of 1 KiB through a near cache of 256 KiB: it never holds
/// more, and every read is still right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_near_cache_under_its_bounds() -> Result<()> {
    let Some(url) = server_or_skip("redis", REDIS_ENV) else {
        return Ok(());
    };
    let s = setup(&url, |b| b.max_bytes(256 << 10).max_entries(1_000)).await?;
    let value = Bytes::from(vec![b'x'; 1024]);
    let entries: Vec<(String, Bytes)> = (0..2_000)
        .map(|i| (format!("k{i}"), value.clone()))
        .collect();
    let refs: Vec<(&str, Bytes)> = entries
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    s.near.set_many(&refs, None).await?;
    for round in 0..2 {
        for (k, v) in &entries {
            ensure!(
                s.near.get(k).await?.as_ref() == Some(v),
                "round {round}: {k}"
            );
        }
    }
    let (n, bytes) = s.near.size();
    println!("near cache after 4,000 reads of 2,000 keys of 1 KiB: {n} entries, {bytes} bytes (bound 262144)");
    ensure!(
        bytes <= 256 << 10 && n <= 1_000 && n > 0,
        "{n} entries, {bytes} bytes"
    );
    s.close().await
}

/// On Redis Cluster every primary pushes the writes it applies: keys on
/// every node are invalidated by another client's writes; the tracking
/// connection to one node killed leaves nothing stale after `sync()`, and
/// the channel comes back; a staleness bound alone works too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_every_primary_invalidates_its_keys() -> Result<()> {
    let Some(urls) = server_or_skip("redis-cluster", REDIS_CLUSTER_ENV) else {
        return Ok(());
    };
    let urls: Vec<String> = urls.split(',').map(str::to_owned).collect();
    let ns = format!("near-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let backend = RedisBackend::builder()
        .cluster(urls.iter().map(String::as_str))
        .namespace(&ns)
        .build()
        .await?;
    let cache: Arc<dyn Cache> = backend.cache().await?;
    let near = NearCache::builder(cache.clone())
        .invalidation(backend.invalidations())
        .build()
        .await?;
    ensure!(near.is_live());
    let mut other = redis::cluster::ClusterClient::new(urls.clone())?
        .get_async_connection()
        .await?;
    // 30 keys: every node owns some (a node answers only for its own).
    let keys: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
    let full = |k: &str| format!("{ns}:c:{k}");
    for k in &keys {
        let _: () = other.set(full(k), "v0").await?;
    }
    for url in &urls {
        let mut node = redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        let mut owned = 0;
        for k in &keys {
            if let Ok(true) = node.exists::<_, bool>(full(k)).await {
                owned += 1;
            }
        }
        ensure!(owned > 0, "{url} owns none of the keys");
    }
    for round in 1..=3 {
        for k in &keys {
            near.get(k).await?.context("the key exists")?;
        }
        ensure!(
            near.size().0 == keys.len() as u64,
            "round {round}: not all held near"
        );
        let value = format!("v{round}");
        for k in &keys {
            let _: () = other.set(full(k), &value).await?;
        }
        near.sync().await;
        for k in &keys {
            let read = near.get(k).await?;
            ensure!(
                read.as_deref() == Some(value.as_bytes()),
                "round {round}, {k}: stale after sync: {read:?}"
            );
        }
    }

    // One node's tracking connection killed, then writes everywhere.
    let mut node = redis::Client::open(urls[1].as_str())?
        .get_multiplexed_async_connection()
        .await?;
    kill_tracking_connection(&mut node, &ns).await?;
    for k in &keys {
        let _: () = other.set(full(k), "during").await?;
    }
    near.sync().await;
    for k in &keys {
        let read = near.get(k).await?;
        ensure!(
            read.as_deref() == Some(&b"during"[..]),
            "{k}: stale after the cut: {read:?}"
        );
    }
    live_again(&near, Duration::from_secs(5)).await?;
    for k in &keys {
        near.get(k).await?;
    }
    ensure!(near.size().0 >= 1, "held near again");
    for k in &keys {
        let _: () = other.set(full(k), "after").await?;
    }
    near.sync().await;
    for k in &keys {
        ensure!(
            near.get(k).await?.as_deref() == Some(&b"after"[..]),
            "{k}: stale after recovery"
        );
    }
    drop(near);

    // Without invalidations, a staleness bound.
    let bounded = NearCache::builder(cache.clone())
        .max_staleness(Duration::from_millis(200))
        .build()
        .await?;
    cache.set("k", "v1".into(), None).await?;
    ensure!(bounded.get("k").await?.as_deref() == Some(&b"v1"[..]));
    cache.set("k", "v2".into(), None).await?;
    tokio::time::sleep(Duration::from_millis(250)).await;
    ensure!(
        bounded.get("k").await?.as_deref() == Some(&b"v2"[..]),
        "older than the bound"
    );
    backend.purge_namespace().await?;
    backend.close().await?;
    Ok(())
}

/// A Redis source feeds one near cache: a second one on it is refused
/// (its `sync` would confirm on another cache's connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_redis_source_feeds_one_near_cache() -> Result<()> {
    let Some(url) = server_or_skip("redis", REDIS_ENV) else {
        return Ok(());
    };
    let s = setup(&url, |b| b).await?;
    let source = s.backend.invalidations();
    let first = NearCache::builder(s.backend.cache().await?)
        .invalidation(source.clone())
        .build()
        .await?;
    let e = NearCache::builder(s.backend.cache().await?)
        .invalidation(source)
        .build()
        .await
        .expect_err("a second near cache on one source");
    ensure!(e.kind() == ErrorKind::InvalidState, "{e}");
    ensure!(first.is_live());
    drop(first);
    s.close().await
}

/// Reads of many keys from many tasks at once, through a near cache too
/// small to hold them, so most reads miss and the misses are read
/// together: every read gets its own key's value (or its absence), on a
/// single node and on a cluster.
async fn concurrent_misses_each_get_their_own_key(
    cache: Arc<dyn Cache>,
    near: &NearCache,
) -> Result<()> {
    const KEYS: usize = 2_000;
    let entries: Vec<(String, Bytes)> = (0..KEYS)
        .filter(|i| !i.is_multiple_of(7)) // every seventh key is absent
        .map(|i| (format!("k{i}"), Bytes::from(format!("value of k{i}"))))
        .collect();
    for chunk in entries.chunks(200) {
        let chunk: Vec<(&str, Bytes)> =
            chunk.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        cache.set_many(&chunk, None).await?;
    }
    // 32 readers at once: their misses queue behind the four reads of the
    // server allowed at once, and are read together.
    let readers = (0..32usize).map(|t| async move {
        for n in 0..300usize {
            let i = (t * 7919 + n * 104_729) % KEYS;
            let got = near.get(&format!("k{i}")).await?;
            let want = (!i.is_multiple_of(7)).then(|| format!("value of k{i}"));
            ensure!(
                got.as_deref() == want.as_deref().map(str::as_bytes),
                "reader {t}, read {n}: k{i} read {got:?}, expected {want:?}"
            );
        }
        Ok::<(), anyhow::Error>(())
    });
    futures::future::try_join_all(readers).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_each_get_their_own_key_on_one_node() -> Result<()> {
    let Some(url) = server_or_skip("redis", REDIS_ENV) else {
        return Ok(());
    };
    let s = setup(&url, |b| b.max_entries(50)).await?;
    concurrent_misses_each_get_their_own_key(s.backend.cache().await?, &s.near).await?;
    s.close().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_each_get_their_own_key_on_a_cluster() -> Result<()> {
    let Some(urls) = server_or_skip("redis-cluster", REDIS_CLUSTER_ENV) else {
        return Ok(());
    };
    let ns = format!("near-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let backend = RedisBackend::builder()
        .cluster(urls.split(','))
        .namespace(&ns)
        .build()
        .await?;
    let cache = backend.cache().await?;
    let near = NearCache::builder(cache.clone())
        .invalidation(backend.invalidations())
        .max_entries(50)
        .build()
        .await?;
    concurrent_misses_each_get_their_own_key(cache, &near).await?;
    backend.purge_namespace().await?;
    backend.close().await?;
    Ok(())
}

/// Values and TTLs are read by one script call (`EVALSHA`): after the
/// server forgot its scripts (`SCRIPT FLUSH`, as after a restart or a
/// failover) the call loads the script again and answers. A key of
/// another type fails the whole call; read through the near cache among
/// many misses read together, it fails only its own read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_with_ttls_reload_a_forgotten_script_and_fail_only_a_key_of_another_type(
) -> Result<()> {
    use im_infra::cache::KeyTtl;
    let Some(url) = server_or_skip("redis", REDIS_ENV) else {
        return Ok(());
    };
    let s = setup(&url, |b| b).await?;
    let cache = s.backend.cache().await?;
    cache
        .set(
            "short",
            Bytes::from_static(b"s"),
            Some(Duration::from_secs(60)),
        )
        .await?;
    cache.set("kept", Bytes::from_static(b"k"), None).await?;
    let mut raw = s.raw.clone();
    // Once only: the other tests of this file run meanwhile, and a read
    // reloads the script at most twice.
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await?;
    let read = cache
        .get_many_with_ttl(&["kept", "absent", "short"])
        .await?;
    ensure!(read.len() == 3, "{read:?}");
    ensure!(
        read[0] == (Some(Bytes::from_static(b"k")), KeyTtl::Persistent),
        "kept read {:?}",
        read[0]
    );
    ensure!(
        read[1] == (None, KeyTtl::Missing),
        "absent read {:?}",
        read[1]
    );
    ensure!(
        read[2].0.as_deref() == Some(&b"s"[..])
            && matches!(read[2].1, KeyTtl::Expires(d) if d <= Duration::from_secs(60) && d > Duration::from_secs(50)),
        "short read {:?}",
        read[2]
    );
    let (value, ttl) = cache.get_with_ttl("short").await?;
    ensure!(value.as_deref() == Some(&b"s"[..]), "short read {value:?}");
    ensure!(
        matches!(ttl, KeyTtl::Expires(d) if d <= Duration::from_secs(60) && d > Duration::from_secs(50)),
        "short has TTL {ttl:?}"
    );

    // A hash under a cache key: the one command fails as a whole.
    let _: () = raw.hset(s.full("hash"), "f", "v").await?;
    let e = cache
        .get_many_with_ttl(&["kept", "hash"])
        .await
        .expect_err("a hash read as a string");
    ensure!(!e.is_retryable(), "{e}");
    // Through the near cache: 40 misses at once, the hash last. The first
    // four read alone; the rest queue and are read together, the hash
    // among them, and every other key still gets its value.
    let keys: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    let entries: Vec<(&str, Bytes)> = keys
        .iter()
        .map(|k| (k.as_str(), Bytes::from(format!("value of {k}"))))
        .collect();
    cache.set_many(&entries, None).await?;
    let reads = futures::future::join_all(
        keys.iter()
            .map(String::as_str)
            .chain(["hash"])
            .map(|k| s.near.get(k)),
    )
    .await;
    for (k, read) in keys.iter().zip(&reads) {
        let want = format!("value of {k}");
        ensure!(
            read.as_ref().ok() == Some(&Some(Bytes::from(want))),
            "{k} read {read:?}"
        );
    }
    ensure!(
        reads[40].is_err(),
        "the hash read as a value: {:?}",
        reads[40]
    );
    s.close().await
}
