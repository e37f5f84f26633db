//! The near cache against the raw client's `GET`, side by side in one run:
//! a hot key, and a Zipf-distributed read-mostly workload over 1 M keys
//! with a near cache of 10 % of them, while another client writes. Prints
//! the ratios, the write rate and the invalidation delay.
//!
//! ```text
//! cargo bench -p im-infra-redis --features near-cache --bench near_cache
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use im_infra::backend::{Backend, Maintenance};
use im_infra::cache::near::NearCache;
use im_infra::cache::Cache;
use im_infra_bench_support::{compare_throughput, server_env, Rounds};
use im_infra_redis::RedisBackend;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

const KEYS: usize = 1_000_000;
const NEAR_ENTRIES: u64 = 100_000;
const ZIPF_EXPONENT: f64 = 0.99;
const WRITES_PER_SECOND: u64 = 200;
const ROUNDS: Rounds = Rounds {
    tasks: 64,
    round: Duration::from_millis(1500),
    pairs: 5,
};

/// Zipf ranks by inverse transform over the cumulative weights.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for k in 1..=n {
            sum += 1.0 / (k as f64).powf(s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Zipf { cdf }
    }

    fn sample(&self) -> usize {
        let u = fastrand::f64();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }

    /// `n` ranks drawn ahead, in random order: a read takes the next one
    /// instead of a binary search over 8 MB of weights (a few cache misses
    /// that both sides would pay and that would hide the difference between
    /// them). Drawn by walking the sorted uniforms along the weights once.
    fn draws(&self, n: usize) -> Vec<u32> {
        let mut u: Vec<f64> = (0..n).map(|_| fastrand::f64()).collect();
        u.sort_by(f64::total_cmp);
        let mut rank = 0;
        let mut out: Vec<u32> = u
            .iter()
            .map(|u| {
                while rank < self.cdf.len() - 1 && self.cdf[rank] < *u {
                    rank += 1;
                }
                rank as u32
            })
            .collect();
        fastrand::shuffle(&mut out);
        out
    }
}

/// Ranks drawn ahead. Each thread reads on from where it stopped (from a
/// random start), so every round reads fresh draws, not the ones the near
/// cache was warmed with.
struct Draws(Vec<u32>);

thread_local! {
    static CURSOR: std::cell::Cell<usize> = std::cell::Cell::new(fastrand::usize(..));
}

impl Draws {
    fn next(&self) -> u32 {
        let i = CURSOR.with(|c| {
            let i = c.get();
            c.set(i.wrapping_add(1));
            i
        });
        self.0[i % self.0.len()]
    }
}

fn main() {
    let Some(url) = server_env("IMINFRA_REDIS_URL") else {
        return;
    };
    im_infra_bench_support::runtime().block_on(async move {
        let ns = format!("bench-near-{}", std::process::id());
        let backend = RedisBackend::builder()
            .url(&url)
            .namespace(&ns)
            .build()
            .await
            .expect("connect");
        let client = redis::Client::open(url.as_str()).expect("url");
        let raw = ConnectionManager::new_with_config(client, ConnectionManagerConfig::new())
            .await
            .expect("connect");
        let value = Bytes::from(vec![b'x'; 100]);
        let full = |i: usize| format!("{ns}:c:k{i}");

        // 1 M keys, through the raw connection in pipelines.
        let loading = Instant::now();
        for chunk in (0..KEYS).collect::<Vec<_>>().chunks(10_000) {
            let mut pipe = redis::pipe();
            for i in chunk {
                pipe.cmd("SET").arg(full(*i)).arg(value.as_ref()).ignore();
            }
            pipe.query_async::<()>(&mut raw.clone()).await.expect("load");
        }
        println!("loaded {KEYS} keys of 100 B in {:?}", loading.elapsed());

        let near: Arc<dyn Cache> = Arc::new(
            NearCache::builder(backend.cache().await.expect("cache"))
                .invalidation(backend.invalidations())
                .max_entries(NEAR_ENTRIES)
                .max_bytes(NEAR_ENTRIES * 256)
                .build()
                .await
                .expect("near cache"),
        );

        // The caches are called the way a service calls the `Arc<dyn Cache>`
        // it holds (`self.cache.get(..)`): through a reference, not cloning
        // the `Arc` for every call (its count would be one more cache line
        // both cores write on every read).
        let held: &'static Arc<dyn Cache> = Box::leak(Box::new(near.clone()));

        // Hot key.
        let ours = Arc::new(move |_i: usize| async move {
            held.get("k0").await.map(|v| v.is_some()).unwrap_or(false)
        });
        let (r, k0) = (raw.clone(), full(0));
        let raw_get = Arc::new(move |_i: usize| {
            let (mut r, k) = (r.clone(), k0.clone());
            async move {
                redis::cmd("GET")
                    .arg(&k)
                    .query_async::<Option<Vec<u8>>>(&mut r)
                    .await
                    .map(|v| v.is_some())
                    .unwrap_or(false)
            }
        });
        compare_throughput("near cache: hot key vs raw GET", ROUNDS, raw_get, ours).await;
        // The ceiling of this loop on this machine: the in-process backend's
        // cache (a map lookup) through the same `Arc<dyn Cache>` call.
        let memory: &'static Arc<dyn Cache> = Box::leak(Box::new(
            im_infra_memory::MemoryBackend::new().cache().await.expect("cache"),
        ));
        memory.set("k0", value.clone(), None).await.expect("set");
        let ceiling = im_infra_bench_support::throughput(
            ROUNDS.tasks,
            ROUNDS.round,
            Arc::new(move |_i: usize| async move {
                memory.get("k0").await.map(|v| v.is_some()).unwrap_or(false)
            }),
        )
        .await;
        println!(
            "ceiling: the in-process cache's get through the same loop: {:.0} ops/s, client cpu {:.1} us/op",
            ceiling.ops_per_sec, ceiling.cpu_us_per_op
        );

        // Zipf over 1 M keys, another client writing meanwhile.
        let zipf = Arc::new(Zipf::new(KEYS, ZIPF_EXPONENT));
        let draws = Arc::new(Draws(zipf.draws(1 << 23)));
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let writer = {
            let (mut r, z, stop, writes, ns) = (raw.clone(), zipf.clone(), stop.clone(), writes.clone(), ns.clone());
            tokio::spawn(async move {
                let every = Duration::from_micros(1_000_000 / WRITES_PER_SECOND);
                let mut tick = tokio::time::interval(every);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let key = format!("{ns}:c:k{}", z.sample());
                    let _: () = redis::cmd("SET").arg(&key).arg(b"y".repeat(100)).query_async(&mut r).await.expect("write");
                    writes.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        // Warm: the near cache is measured full, as a service runs it.
        let warm = Instant::now();
        let d = draws.clone();
        im_infra_bench_support::throughput(
            64,
            Duration::from_secs(4),
            Arc::new(move |_i: usize| {
                let key = format!("k{}", d.next());
                async move { held.get(&key).await.is_ok() }
            }),
        )
        .await;
        println!("warmed the near cache for {:?}", warm.elapsed());
        let started = Instant::now();
        let d = draws.clone();
        let ours = Arc::new(move |_i: usize| {
            let key = format!("k{}", d.next());
            async move { held.get(&key).await.map(|v| v.is_some()).unwrap_or(false) }
        });
        let (r, d, ns2) = (raw.clone(), draws.clone(), ns.clone());
        let raw_get = Arc::new(move |_i: usize| {
            let (mut r, key) = (r.clone(), format!("{ns2}:c:k{}", d.next()));
            async move {
                redis::cmd("GET")
                    .arg(&key)
                    .query_async::<Option<Vec<u8>>>(&mut r)
                    .await
                    .map(|v| v.is_some())
                    .unwrap_or(false)
            }
        });
        compare_throughput(
            "near cache: Zipf 0.99 over 1 M keys, near 10 %, vs raw GET",
            ROUNDS,
            raw_get,
            ours,
        )
        .await;
        // The hit rate: the near cache alone for one round, against the
        // GETs Redis counted meanwhile (a miss is one GET and one PTTL).
        let gets = |info: String| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
                .and_then(|v| v.split(',').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let mut r = raw.clone();
        let info = |r: &mut ConnectionManager| {
            let mut r = r.clone();
            async move {
                redis::cmd("INFO")
                    .arg("commandstats")
                    .query_async::<String>(&mut r)
                    .await
                    .expect("info")
            }
        };
        let before = gets(info(&mut r).await);
        let d = draws.clone();
        let alone = im_infra_bench_support::throughput(
            ROUNDS.tasks,
            ROUNDS.round,
            Arc::new(move |_i: usize| {
                let key = format!("k{}", d.next());
                async move { held.get(&key).await.is_ok() }
            }),
        )
        .await;
        let reads = alone.ops_per_sec * ROUNDS.round.as_secs_f64();
        let misses = (gets(info(&mut r).await) - before) as f64;
        println!(
            "near cache alone, Zipf: {:.0} reads/s, hit rate {:.1} % ({misses:.0} GETs reached Redis for {reads:.0} reads)",
            alone.ops_per_sec,
            100.0 * (1.0 - misses / reads)
        );
        stop.store(true, Ordering::Relaxed);
        writer.await.expect("writer");
        println!(
            "writes by another client during the Zipf rounds: {:.0}/s",
            writes.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
        );

        // The invalidation delay: a write by another client until a near
        // read sees it.
        let mut delays = Vec::new();
        let mut r = raw.clone();
        for i in 0..200 {
            near.get("k1").await.expect("read");
            let v = format!("d{i}");
            let _: () = redis::cmd("SET").arg(full(1)).arg(&v).query_async(&mut r).await.expect("write");
            let t = Instant::now();
            while near.get("k1").await.expect("read").as_deref() != Some(v.as_bytes()) {
                tokio::task::yield_now().await;
            }
            delays.push(t.elapsed());
        }
        delays.sort();
        println!(
            "invalidation delay over 200 writes: p50 {:?} p99 {:?}",
            delays[100],
            delays[197]
        );
        backend.purge_namespace().await.expect("purge");
        backend.close().await.expect("close");
    });
}
