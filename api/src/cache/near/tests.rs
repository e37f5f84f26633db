//! The near cache's rules, on a counting cache in a map and a source
//! driven by hand.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use super::*;

/// A cache in a map that counts its reads and can hold a read until told.
#[derive(Default)]
struct MapCache {
    values: Mutex<HashMap<String, (Bytes, Option<Instant>)>>,
    gets: AtomicUsize,
    hold: Mutex<Option<Arc<tokio::sync::Notify>>>,
    /// `ttl` is `Unsupported`.
    no_ttl: std::sync::atomic::AtomicBool,
    /// The keys of each `get_many_with_ttl`.
    batches: Mutex<Vec<Vec<String>>>,
}

impl MapCache {
    fn put(&self, key: &str, value: &str, ttl: Option<Duration>) {
        self.values.lock().insert(
            key.into(),
            (
                Bytes::from(value.to_owned()),
                ttl.map(|t| Instant::now() + t),
            ),
        );
    }
}

#[async_trait]
impl Cache for MapCache {
    fn capabilities(&self) -> CacheCapabilities {
        CacheCapabilities::storing(1 << 20)
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        if key.starts_with("bad") {
            return Err(crate::Error::new(
                crate::ErrorKind::InvalidState,
                "a key of another type",
            ));
        }
        let value = self.values.lock().get(key).map(|(v, _)| v.clone());
        let hold = self.hold.lock().clone();
        if let Some(hold) = hold {
            hold.notified().await;
        }
        Ok(value)
    }
    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.values
            .lock()
            .insert(key.into(), (value, ttl.map(|t| Instant::now() + t)));
        Ok(())
    }
    async fn set_nx(&self, _: &str, _: Bytes, _: Option<Duration>) -> Result<bool> {
        unimplemented!()
    }
    async fn delete<'k>(&self, keys: &[&'k str]) -> Result<u64> {
        let mut v = self.values.lock();
        Ok(keys.iter().filter(|k| v.remove(**k).is_some()).count() as u64)
    }
    async fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.values.lock().contains_key(key))
    }
    async fn expire(&self, _: &str, _: Duration) -> Result<bool> {
        unimplemented!()
    }
    async fn ttl(&self, key: &str) -> Result<KeyTtl> {
        if self.no_ttl.load(Ordering::SeqCst) {
            return Err(crate::Error::new(
                crate::ErrorKind::Unsupported,
                "no TTLs here",
            ));
        }
        Ok(match self.values.lock().get(key) {
            None => KeyTtl::Missing,
            Some((_, None)) => KeyTtl::Persistent,
            Some((_, Some(at))) => KeyTtl::Expires(at.saturating_duration_since(Instant::now())),
        })
    }
    async fn incr_by(&self, _: &str, _: i64) -> Result<i64> {
        unimplemented!()
    }
    async fn get_many_with_ttl<'k>(
        &self,
        keys: &[&'k str],
    ) -> Result<Vec<(Option<Bytes>, KeyTtl)>> {
        self.batches
            .lock()
            .push(keys.iter().map(|k| (*k).to_owned()).collect());
        futures::future::try_join_all(keys.iter().map(|k| self.get_with_ttl(k))).await
    }
    async fn get_many<'k>(&self, keys: &[&'k str]) -> Result<Vec<Option<Bytes>>> {
        let v = self.values.lock();
        Ok(keys
            .iter()
            .map(|k| v.get(*k).map(|(b, _)| b.clone()))
            .collect())
    }
    async fn set_many<'k>(&self, _: &[(&'k str, Bytes)], _: Option<Duration>) -> Result<()> {
        unimplemented!()
    }
}

/// A source whose sink the test drives.
#[derive(Default)]
struct HandSource {
    sink: Mutex<Option<InvalidationSink>>,
    /// `sync` fails; with `Some(true)` the channel is lost and back up
    /// again before it returns (a source that recovered meanwhile).
    failing_sync: Mutex<Option<bool>>,
}

#[async_trait]
impl InvalidationSource for HandSource {
    async fn subscribe(&self, sink: InvalidationSink) -> Result<Subscription> {
        sink.ready();
        *self.sink.lock() = Some(sink);
        Ok(Subscription::new(()))
    }
    async fn sync(&self) -> Result<()> {
        let failing = *self.failing_sync.lock();
        match failing {
            None => Ok(()),
            Some(recovered) => {
                if recovered {
                    self.sink().lost();
                    self.sink().ready();
                }
                Err(crate::Error::new(
                    crate::ErrorKind::Unavailable,
                    "no answer",
                ))
            }
        }
    }
}

impl HandSource {
    fn sink(&self) -> InvalidationSink {
        self.sink.lock().clone().expect("subscribed")
    }
}

/// A `sync` that cannot confirm leaves the cache bypassed, unless the
/// source recovered (lost, then ready) before the failure came back: then
/// it stays live.
#[tokio::test]
async fn a_failed_sync_bypasses_unless_the_source_recovered_meanwhile() {
    let (_, source, near) = fresh().await;
    *source.failing_sync.lock() = Some(true);
    near.sync().await;
    assert!(near.is_live(), "recovered before the failure was reported");
    *source.failing_sync.lock() = Some(false);
    near.sync().await;
    assert!(
        !near.is_live(),
        "a failure that nothing recovered from bypasses"
    );
    source.sink().ready();
    assert!(near.is_live());
}

/// Over a cache that cannot tell TTLs, reads are answered from it and
/// nothing is kept near (an entry could outlive its key).
#[tokio::test]
async fn a_cache_without_ttls_is_read_through_and_nothing_is_kept() {
    let (inner, source) = parts();
    inner.no_ttl.store(true, Ordering::SeqCst);
    inner.put("k", "v", None);
    let near = near(&inner, &source).await;
    for _ in 0..3 {
        assert_eq!(near.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    }
    assert_eq!(
        inner.gets.load(Ordering::SeqCst),
        // Each read: the default `get_with_ttl` (a get and the failed
        // ttl), then the plain get.
        6,
        "every read reached the cache"
    );
    assert_eq!(near.size().0, 0, "nothing kept");
}

async fn near(inner: &Arc<MapCache>, source: &Arc<HandSource>) -> NearCache {
    NearCache::builder(inner.clone())
        .invalidation(source.clone())
        .build()
        .await
        .unwrap()
}

/// An empty cache in a map and a source driven by hand.
fn parts() -> (Arc<MapCache>, Arc<HandSource>) {
    (
        Arc::new(MapCache::default()),
        Arc::new(HandSource::default()),
    )
}

/// [`parts`] and a near cache over them.
async fn fresh() -> (Arc<MapCache>, Arc<HandSource>, NearCache) {
    let (inner, source) = parts();
    let near = near(&inner, &source).await;
    (inner, source, near)
}

/// A near cache over a fresh map holding `k` = `value`, and a read of `k`
/// started in a task and held in the server's read until `hold` is
/// notified (or the map's hold cleared before the read gets there).
async fn held_read(
    value: &str,
) -> (
    Arc<MapCache>,
    Arc<HandSource>,
    Arc<NearCache>,
    Arc<tokio::sync::Notify>,
    tokio::task::JoinHandle<Result<Option<Bytes>>>,
) {
    let (inner, source) = parts();
    let near = Arc::new(near(&inner, &source).await);
    inner.put("k", value, None);
    let hold = Arc::new(tokio::sync::Notify::new());
    *inner.hold.lock() = Some(hold.clone());
    let reader = {
        let near = near.clone();
        tokio::spawn(async move { near.get("k").await })
    };
    while inner.gets.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    (inner, source, near, hold, reader)
}

fn text(v: Option<Bytes>) -> Option<String> {
    v.map(|b| String::from_utf8(b.to_vec()).unwrap())
}

#[tokio::test]
async fn a_hot_key_is_read_from_the_server_once_until_it_is_invalidated() {
    let (inner, source, near) = fresh().await;
    inner.put("k", "v1", None);
    for _ in 0..10 {
        assert_eq!(text(near.get("k").await.unwrap()).as_deref(), Some("v1"));
    }
    assert_eq!(inner.gets.load(Ordering::SeqCst), 1);
    inner.put("k", "v2", None); // another client's write...
    source.sink().invalidate(&["k"]); // ...and its invalidation
    assert_eq!(text(near.get("k").await.unwrap()).as_deref(), Some("v2"));
    assert_eq!(inner.gets.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_write_through_the_near_cache_is_read_back_at_once() {
    let (_, _, near) = fresh().await;
    near.set("k", Bytes::from_static(b"v1"), None)
        .await
        .unwrap();
    assert_eq!(text(near.get("k").await.unwrap()).as_deref(), Some("v1"));
    near.set("k", Bytes::from_static(b"v2"), None)
        .await
        .unwrap();
    assert_eq!(text(near.get("k").await.unwrap()).as_deref(), Some("v2"));
    near.delete(&["k"]).await.unwrap();
    assert_eq!(near.get("k").await.unwrap(), None);
}

#[tokio::test]
async fn a_fill_overtaken_by_an_invalidation_does_not_keep_what_it_read() {
    let (inner, source, near, hold, reader) = held_read("old").await;
    // The read has the old value in hand; the write and its invalidation
    // come in before it returns.
    inner.put("k", "new", None);
    source.sink().invalidate(&["k"]);
    hold.notify_one();
    assert_eq!(text(reader.await.unwrap().unwrap()).as_deref(), Some("old"));
    *inner.hold.lock() = None;
    assert_eq!(text(near.get("k").await.unwrap()).as_deref(), Some("new"));
}

#[tokio::test]
async fn while_the_channel_is_lost_every_read_goes_to_the_server() {
    let (inner, source, near) = fresh().await;
    inner.put("k", "v1", None);
    near.get("k").await.unwrap();
    source.sink().lost();
    assert!(!near.is_live());
    inner.put("k", "v2", None); // a write whose invalidation is lost
    for _ in 0..3 {
        assert_eq!(text(near.get("k").await.unwrap()).as_deref(), Some("v2"));
    }
    assert_eq!(
        inner.gets.load(Ordering::SeqCst),
        4,
        "bypassed: one read each"
    );
    source.sink().ready();
    near.get("k").await.unwrap();
    near.get("k").await.unwrap();
    assert_eq!(
        inner.gets.load(Ordering::SeqCst),
        5,
        "kept again once the channel is back"
    );
}

#[tokio::test]
async fn an_entry_lives_no_longer_than_the_key_on_the_server() {
    let (inner, _, near) = fresh().await;
    inner.put("k", "v", Some(Duration::from_millis(50)));
    near.get("k").await.unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    inner.values.lock().clear(); // expired on the server
    assert_eq!(near.get("k").await.unwrap(), None);
}

#[tokio::test]
async fn an_entry_leaves_a_margin_for_the_two_clocks_drifting_apart() {
    let (_, _, near) = fresh().await;
    let asked = quanta::Instant::now();
    let left = Duration::from_secs(100);
    let entry = near
        .entry(
            Some(&Bytes::from_static(b"v")),
            KeyTtl::Expires(left),
            asked,
        )
        .expect("kept");
    // 500 ppm of drift over 100 s is 50 ms; the margin is 1 ‰ and 1 ms.
    assert_eq!(entry.expires, asked + left - Duration::from_millis(101));
    let short = near
        .entry(
            Some(&Bytes::from_static(b"v")),
            KeyTtl::Expires(Duration::from_micros(500)),
            asked,
        )
        .expect("kept");
    assert!(
        short.expires <= asked,
        "less than the margin left: gone at once"
    );
}

#[tokio::test]
async fn misses_are_remembered_only_when_asked() {
    let (inner, source) = parts();
    let plain = near(&inner, &source).await;
    plain.get("absent").await.unwrap();
    plain.get("absent").await.unwrap();
    assert_eq!(inner.gets.load(Ordering::SeqCst), 2);
    let negative = NearCache::builder(inner.clone())
        .invalidation(source.clone())
        .negative(true)
        .build()
        .await
        .unwrap();
    negative.get("absent").await.unwrap();
    negative.get("absent").await.unwrap();
    assert_eq!(inner.gets.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn without_a_channel_a_staleness_bound_is_required() {
    let inner: Arc<dyn Cache> = Arc::new(MapCache::default());
    let e = NearCache::builder(inner.clone()).build().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig);
    assert!(e.to_string().contains("max_staleness"), "{e}");
    let near = NearCache::builder(inner)
        .max_staleness(Duration::from_millis(30))
        .build()
        .await
        .unwrap();
    assert!(near.is_live());
    assert_eq!(near.ttl, Duration::from_millis(30));
}

#[tokio::test]
async fn the_bounds_hold_entries_and_bytes() {
    let inner = Arc::new(MapCache::default());
    for i in 0..2_000 {
        inner.put(&format!("k{i}"), &"x".repeat(100), None);
    }
    let source = Arc::new(HandSource::default());
    let near = NearCache::builder(inner.clone())
        .invalidation(source)
        .max_entries(100)
        .max_bytes(50_000)
        .build()
        .await
        .unwrap();
    for i in 0..2_000 {
        near.get(&format!("k{i}")).await.unwrap();
    }
    let (entries, bytes) = near.size();
    assert!(
        entries <= 100 && bytes <= 50_000,
        "{entries} entries, {bytes} bytes"
    );
    let small = NearCache::builder(inner)
        .invalidation(Arc::new(HandSource::default()))
        .max_entries(1_000)
        .max_bytes(10_000)
        .build()
        .await
        .unwrap();
    for i in 0..2_000 {
        small.get(&format!("k{i}")).await.unwrap();
    }
    let (entries, bytes) = small.size();
    assert!(
        bytes <= 10_000 && entries <= 100,
        "{entries} entries, {bytes} bytes"
    );
}

#[tokio::test]
async fn get_or_load_through_the_near_cache_loads_a_missing_key() {
    use crate::cache::{CacheExt, LoadOptions};
    let (_, _, near) = fresh().await;
    let loaded = tokio::time::timeout(
        Duration::from_secs(5),
        near.get_or_load(
            "absent",
            LoadOptions::ttl(Duration::from_secs(60)),
            || async { Ok(Some(Bytes::from_static(b"loaded"))) },
        ),
    )
    .await
    .expect("get_or_load must not wait on its own flight")
    .unwrap();
    assert_eq!(text(loaded).as_deref(), Some("loaded"));
}

#[tokio::test]
async fn a_read_after_an_invalidation_does_not_join_a_fill_that_began_before_it() {
    let (inner, source, near, hold, first) = held_read("old").await;
    // The first read holds "old"; the write and its invalidation come in.
    inner.put("k", "new", None);
    source.sink().invalidate(&["k"]);
    *inner.hold.lock() = None;
    let second = near.get("k").await.unwrap();
    assert_eq!(
        text(second).as_deref(),
        Some("new"),
        "a read after the invalidation"
    );
    hold.notify_one();
    assert_eq!(text(first.await.unwrap().unwrap()).as_deref(), Some("old"));
}

#[tokio::test]
async fn a_read_after_the_channel_came_back_does_not_join_a_fill_from_before_the_loss() {
    let (inner, source, near, hold, first) = held_read("old").await;
    // The first read holds "old"; the channel drops, a write goes unseen,
    // the channel comes back.
    source.sink().lost();
    inner.put("k", "new", None);
    source.sink().ready();
    *inner.hold.lock() = None;
    let second = tokio::time::timeout(Duration::from_secs(5), near.get("k"))
        .await
        .expect("a read after the recovery waits for no read from before the loss");
    assert_eq!(
        text(second.unwrap()).as_deref(),
        Some("new"),
        "a read after the recovery"
    );
    hold.notify_one();
    assert_eq!(text(first.await.unwrap().unwrap()).as_deref(), Some("old"));
    assert_eq!(
        text(near.get("k").await.unwrap()).as_deref(),
        Some("new"),
        "the older read was not kept"
    );
}

#[tokio::test]
async fn callers_waiting_on_a_cancelled_read_read_again() {
    let (inner, _source, near, _hold, first) = held_read("v").await;
    // A second caller joins the read in flight, then that read's caller is
    // cancelled mid-read.
    let second = {
        let near = near.clone();
        tokio::spawn(async move { near.get("k").await })
    };
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    // Reads from now on are not held (the first stays held).
    *inner.hold.lock() = None;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    let got = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the waiting caller is not left behind by the cancelled read")
        .unwrap()
        .unwrap();
    assert_eq!(text(got).as_deref(), Some("v"));
    assert_eq!(
        inner.gets.load(Ordering::SeqCst),
        2,
        "it read the key again itself"
    );
}

#[test]
fn hits_misses_bypasses_invalidations_and_evictions_are_counted() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (inner, source) = (
                Arc::new(MapCache::default()),
                Arc::new(HandSource::default()),
            );
            for i in 0..50 {
                inner.put(&format!("k{i}"), &"x".repeat(50), None);
            }
            let near = NearCache::builder(inner.clone())
                .invalidation(source.clone())
                .max_entries(10)
                .max_bytes(1_000)
                .build()
                .await
                .unwrap();
            near.get("k0").await.unwrap(); // miss
            near.get("k0").await.unwrap(); // hit
            source.sink().invalidate(&["k0"]);
            for i in 1..50 {
                near.get(&format!("k{i}")).await.unwrap(); // misses, evictions
            }
            source.sink().lost();
            near.get("k0").await.unwrap(); // bypassed
        });
    });
    // One snapshot drains the counters: read each name once.
    let all: std::collections::BTreeMap<String, u64> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(k, _, _, v)| match v {
            DebugValue::Counter(c) => Some((k.key().name().to_owned(), c)),
            _ => None,
        })
        .collect();
    let get = |n: &str| all.get(n).copied().unwrap_or(0);
    assert_eq!(get("im_infra_near_cache_hits_total"), 1, "{all:?}");
    assert_eq!(get("im_infra_near_cache_misses_total"), 50, "{all:?}");
    assert_eq!(get("im_infra_near_cache_invalidations_total"), 1, "{all:?}");
    assert_eq!(get("im_infra_near_cache_bypassed_total"), 1, "{all:?}");
    assert!(get("im_infra_near_cache_evictions_total") >= 30, "{all:?}");
}

/// Reads of the batcher, polled by hand: `MAX_IN_FLIGHT` readers held at
/// the server, `waiting` more queued behind them.
struct HeldReads {
    inner: Arc<MapCache>,
    hold: Arc<tokio::sync::Notify>,
    batcher: Arc<super::batch::Batcher>,
}

impl HeldReads {
    fn new(keys: usize) -> HeldReads {
        let inner = Arc::new(MapCache::default());
        for i in 0..keys {
            inner.put(&format!("k{i}"), &format!("v{i}"), None);
        }
        let hold = Arc::new(tokio::sync::Notify::new());
        *inner.hold.lock() = Some(hold.clone());
        HeldReads {
            inner,
            hold,
            batcher: Arc::default(),
        }
    }

    fn read(&self, i: usize) -> futures::future::BoxFuture<'static, String> {
        let (batcher, inner) = (self.batcher.clone(), self.inner.clone());
        Box::pin(async move {
            let (value, _) = batcher
                .read(inner.as_ref(), &format!("k{i}"))
                .await
                .unwrap();
            text(value).unwrap()
        })
    }

    /// Lets every held read and every later one through.
    fn open(&self) {
        *self.inner.hold.lock() = None;
        self.hold.notify_waiters();
    }
}

#[tokio::test]
async fn misses_that_wait_for_a_free_read_are_read_together() {
    use super::batch::MAX_IN_FLIGHT;
    let reads = HeldReads::new(MAX_IN_FLIGHT + 10);
    let mut futs: Vec<_> = (0..MAX_IN_FLIGHT + 10).map(|i| reads.read(i)).collect();
    for f in &mut futs {
        assert!(futures::poll!(f.as_mut()).is_pending());
    }
    assert_eq!(reads.batcher.in_flight(), MAX_IN_FLIGHT);
    assert!(
        reads.inner.batches.lock().is_empty(),
        "the first reads are alone"
    );
    reads.open();
    let got = futures::future::join_all(futs).await;
    let want: Vec<String> = (0..MAX_IN_FLIGHT + 10).map(|i| format!("v{i}")).collect();
    assert_eq!(got, want, "each caller gets its own key's value");
    let batches = reads.inner.batches.lock().clone();
    let queued: Vec<String> = (MAX_IN_FLIGHT..MAX_IN_FLIGHT + 10)
        .map(|i| format!("k{i}"))
        .collect();
    assert_eq!(batches, vec![queued], "the ten queued misses are one read");
    assert_eq!(reads.batcher.in_flight(), 0);
}

#[tokio::test]
async fn callers_of_a_dropped_read_are_read_for_by_the_next_of_them() {
    use super::batch::MAX_IN_FLIGHT;
    let n = MAX_IN_FLIGHT + 3;
    let reads = HeldReads::new(n);
    let mut futs: Vec<_> = (0..n).map(|i| Some(reads.read(i))).collect();
    for f in futs.iter_mut().flatten() {
        assert!(futures::poll!(f.as_mut()).is_pending());
    }
    // The first reader goes: the first queued caller reads for the others.
    futs[0] = None;
    let leader = MAX_IN_FLIGHT;
    assert!(futures::poll!(futs[leader].as_mut().unwrap().as_mut()).is_pending());
    assert_eq!(
        reads.inner.batches.lock().len(),
        1,
        "it reads for all three"
    );
    // It goes too, mid-read: the next of the two it read for reads for
    // both, on the right to read it leaves, so no more reads are out at
    // once than the bound.
    futs[leader] = None;
    assert_eq!(reads.batcher.in_flight(), MAX_IN_FLIGHT);
    reads.open();
    for (i, f) in futs.into_iter().enumerate() {
        if let Some(f) = f {
            assert_eq!(f.await, format!("v{i}"));
        }
    }
    let second: Vec<String> = (leader + 1..n).map(|i| format!("k{i}")).collect();
    assert_eq!(
        reads.inner.batches.lock().get(1),
        Some(&second),
        "the two left are read together"
    );
    assert_eq!(
        reads.batcher.in_flight(),
        0,
        "every right to read came back"
    );
}

#[tokio::test]
async fn a_caller_dropped_when_its_turn_came_hands_the_turn_on() {
    use super::batch::MAX_IN_FLIGHT;
    let n = MAX_IN_FLIGHT + 2;
    let reads = HeldReads::new(n);
    let mut futs: Vec<_> = (0..n).map(|i| Some(reads.read(i))).collect();
    for f in futs.iter_mut().flatten() {
        assert!(futures::poll!(f.as_mut()).is_pending());
    }
    reads.open();
    // The first read ends and hands the turn to the first queued caller,
    // which is dropped before it runs.
    assert_eq!(futs[0].take().unwrap().await, "v0");
    futs[MAX_IN_FLIGHT] = None;
    // The turn went on to the last caller: it finishes.
    let last = futs[n - 1].take().unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), last)
            .await
            .ok()
            .as_deref(),
        Some(format!("v{}", n - 1).as_str()),
        "the last caller was left waiting"
    );
    for f in futs.into_iter().flatten() {
        f.await;
    }
    assert_eq!(reads.batcher.in_flight(), 0);
}

/// A hot key read again and again on one thread (so it is in that
/// thread's front) is read fresh after its invalidation, after the
/// channel is lost and back, and not after it expired.
#[tokio::test]
async fn a_key_held_in_the_threads_front_follows_invalidations_and_expiry() {
    let (inner, source, near) = fresh().await;
    inner.put("k", "v1", None);
    for _ in 0..10 {
        assert_eq!(text(near.get("k").await.unwrap()).as_deref(), Some("v1"));
    }
    let id = near.state.id;
    let (epoch, hash) = (near.state.epoch(), front::hash("k"));
    assert!(
        front::get(id, epoch, hash, "k", quanta::Instant::now()).is_some(),
        "a key read ten times is in the thread's front"
    );
    inner.put("k", "v2", None);
    source.sink().invalidate(&["k"]);
    assert_eq!(text(near.get("k").await.unwrap()).as_deref(), Some("v2"));
    for _ in 0..3 {
        near.get("k").await.unwrap();
    }
    inner.put("k", "v3", None);
    source.sink().lost();
    source.sink().ready();
    assert_eq!(text(near.get("k").await.unwrap()).as_deref(), Some("v3"));
    inner.put("brief", "b", Some(Duration::from_millis(60)));
    for _ in 0..3 {
        assert_eq!(text(near.get("brief").await.unwrap()).as_deref(), Some("b"));
    }
    tokio::time::sleep(Duration::from_millis(90)).await;
    inner.values.lock().clear(); // expired on the server
    assert_eq!(near.get("brief").await.unwrap(), None);
    assert_eq!(
        front::get(
            id,
            near.state.epoch(),
            front::hash("brief"),
            "brief",
            quanta::Instant::now()
        ),
        None,
        "an expired copy does not answer"
    );
}

/// Two near caches on one thread each read their own value of one key,
/// and a large value is read through the shared store, not copied.
#[tokio::test]
async fn the_front_tells_near_caches_apart_and_keeps_no_large_value() {
    let source = Arc::new(HandSource::default());
    let (a, b) = (Arc::new(MapCache::default()), Arc::new(MapCache::default()));
    a.put("k", "from a", None);
    b.put("k", "from b", None);
    let (near_a, near_b) = (near(&a, &source).await, near(&b, &source).await);
    for _ in 0..5 {
        assert_eq!(
            text(near_a.get("k").await.unwrap()).as_deref(),
            Some("from a")
        );
        assert_eq!(
            text(near_b.get("k").await.unwrap()).as_deref(),
            Some("from b")
        );
    }
    let big = "x".repeat(front::MAX_VALUE + 1);
    a.put("big", &big, None);
    for _ in 0..5 {
        assert_eq!(
            near_a.get("big").await.unwrap().map(|v| v.len()),
            Some(big.len())
        );
    }
    let (id, epoch) = (near_a.state.id, near_a.state.epoch());
    assert!(front::get(id, epoch, front::hash("big"), "big", quanta::Instant::now()).is_none());
}

#[tokio::test]
async fn one_bad_key_in_a_batch_fails_only_its_caller() {
    use super::batch::MAX_IN_FLIGHT;
    let n = MAX_IN_FLIGHT + 4;
    let reads = HeldReads::new(n);
    let mut futs: Vec<_> = (0..n).map(|i| reads.read(i)).collect();
    for f in &mut futs {
        assert!(futures::poll!(f.as_mut()).is_pending());
    }
    // A caller of a bad key queues behind the others.
    let bad = {
        let (batcher, inner) = (reads.batcher.clone(), reads.inner.clone());
        let mut bad = Box::pin(async move { batcher.read(inner.as_ref(), "bad").await });
        assert!(futures::poll!(bad.as_mut()).is_pending());
        bad
    };
    reads.open();
    let got = futures::future::join_all(futs).await;
    let want: Vec<String> = (0..n).map(|i| format!("v{i}")).collect();
    assert_eq!(got, want, "the good keys are read");
    assert_eq!(
        bad.await.unwrap_err().kind(),
        crate::ErrorKind::InvalidState,
        "the bad key's caller gets its error"
    );
    assert_eq!(
        reads.inner.batches.lock().len(),
        1,
        "they were read together first"
    );
    assert_eq!(reads.batcher.in_flight(), 0);
}

#[tokio::test]
async fn get_many_with_ttl_checks_its_keys_and_reads_the_server() {
    let (inner, _, near) = fresh().await;
    inner.put("a", "1", None);
    let e = near.get_many_with_ttl(&[]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "no keys");
    let e = near.get_many_with_ttl(&["a", ""]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "an empty key");
    let read = near.get_many_with_ttl(&["a", "b"]).await.unwrap();
    assert_eq!(
        read,
        vec![
            (Some(Bytes::from_static(b"1")), KeyTtl::Persistent),
            (None, KeyTtl::Missing)
        ]
    );
}
