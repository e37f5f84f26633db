//! The in-process limiter decision against `governor`, side by side.
//!
//! ```text
//! cargo bench -p im-infra-memory --bench limiter
//! ```
//!
//! Both limiters decide on the same keys with the same quota, keyed by
//! string. `im-infra/check_now` is the decision itself; `im-infra/check`
//! is the full trait call (span and metrics included, no recorder
//! installed), polled to completion in place. The multi-threaded group runs
//! two threads on disjoint key sets of one shared limiter. At the end the
//! run prints the throughput ratios against governor.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::FutureExt;
use governor::{Quota, RateLimiter};
use im_infra::ratelimit::{Limiter, Rule, Rules};
use im_infra_memory::{MemoryBackend, MemoryLimiter};

const KEYS: usize = 1024;

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("user:{i}")).collect()
}

fn quota() -> Quota {
    // Generous enough that the measured path is the bookkeeping, and equal
    // on both sides: 1,000,000 per second, burst 1,000,000.
    Quota::per_second(NonZeroU32::new(1_000_000).expect("non-zero"))
}

fn ours() -> MemoryLimiter {
    let rules = Rules::single("api", Rule::per_second(1_000_000)).expect("valid rule");
    MemoryBackend::new().memory_limiter(rules)
}

fn single_thread(c: &mut Criterion) {
    let keys = keys();
    let mut g = c.benchmark_group("limiter/1-thread-1024-keys");
    g.throughput(Throughput::Elements(1));
    let gov = RateLimiter::keyed(quota());
    let mut i = 0usize;
    g.bench_function("governor/check_key", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(gov.check_key(&keys[i]).is_ok())
        })
    });
    let lim = ours();
    let mut i = 0usize;
    g.bench_function("im-infra/check_now", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(
                lim.check_now("api", &keys[i], 1)
                    .map(|d| d.allowed)
                    .unwrap_or(false),
            )
        })
    });
    let mut i = 0usize;
    g.bench_function("im-infra/check", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let fut = lim.check("api", &keys[i], 1);
            black_box(fut.now_or_never().and_then(|r| r.ok()).map(|d| d.allowed))
        })
    });
    g.finish();
}

/// Runs `f(key)` on two threads over disjoint key halves; returns the time.
fn two_threads(
    iters: u64,
    keys: &Arc<Vec<String>>,
    f: Arc<dyn Fn(&String) -> bool + Send + Sync>,
) -> Duration {
    let start = Instant::now();
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let keys = keys.clone();
            let f = f.clone();
            std::thread::spawn(move || {
                let half = KEYS / 2;
                for n in 0..iters / 2 {
                    black_box(f(&keys[t * half + (n as usize % half)]));
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    start.elapsed()
}

fn multi_thread(c: &mut Criterion) {
    let keys = Arc::new(keys());
    let mut g = c.benchmark_group("limiter/2-threads-1024-keys");
    g.throughput(Throughput::Elements(1));
    let gov = Arc::new(RateLimiter::keyed(quota()));
    g.bench_function("governor/check_key", |b| {
        let gov = gov.clone();
        let keys2 = keys.clone();
        b.iter_custom(move |iters| {
            let gov = gov.clone();
            let f: Arc<dyn Fn(&String) -> bool + Send + Sync> =
                Arc::new(move |k: &String| gov.check_key(k).is_ok());
            two_threads(iters, &keys2, f)
        })
    });
    let lim = Arc::new(ours());
    g.bench_function("im-infra/check_now", |b| {
        let lim = lim.clone();
        let keys2 = keys.clone();
        b.iter_custom(move |iters| {
            let lim = lim.clone();
            let f: Arc<dyn Fn(&String) -> bool + Send + Sync> = Arc::new(move |k: &String| {
                lim.check_now("api", k, 1)
                    .map(|d| d.allowed)
                    .unwrap_or(false)
            });
            two_threads(iters, &keys2, f)
        })
    });
    g.finish();
}

/// Prints ops/s of each side measured back to back, and the ratio.
fn ratio(_c: &mut Criterion) {
    let keys = keys();
    let n = 5_000_000usize;
    let gov = RateLimiter::keyed(quota());
    let lim = ours();
    let mut best = (0f64, 0f64);
    for _ in 0..3 {
        let t = Instant::now();
        for i in 0..n {
            black_box(gov.check_key(&keys[i % KEYS]).is_ok());
        }
        let g = n as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..n {
            black_box(lim.check_now("api", &keys[i % KEYS], 1).is_ok());
        }
        let o = n as f64 / t.elapsed().as_secs_f64();
        best = (best.0.max(g), best.1.max(o));
    }
    println!(
        "RATIO limiter 1-thread: im-infra {:.2} M decisions/s, governor {:.2} M/s, ratio {:.2}",
        best.1 / 1e6,
        best.0 / 1e6,
        best.1 / best.0
    );
}

criterion_group!(benches, single_thread, multi_thread, ratio);
criterion_main!(benches);
