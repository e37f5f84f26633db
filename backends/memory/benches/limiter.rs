//! The in-process limiter decision against `governor`, side by side.
//!
//! ```text
//! cargo bench -p im-infra-memory --bench limiter
//! ```
//!
//! Both limiters decide on the same keys with the same quota, keyed by
//! string. `im-infra/check` is what a service calls: `Limiter::check`
//! through the `Arc<dyn Limiter>` that `Backend::limiter` hands out
//! (argument checks, span and metrics included, no subscriber or recorder
//! installed), awaited in place; `im-infra/decision-alone` is the bucket
//! decision without that call around it. The multi-threaded group runs two threads
//! on disjoint key sets of one shared limiter. At the end the run prints
//! the throughput ratios against governor.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::FutureExt;
use governor::{Quota, RateLimiter};
use im_infra::backend::Backend;
use im_infra::ratelimit::{Limiter, Rule, Rules};
use im_infra_memory::MemoryBackend;

const KEYS: usize = 1024;

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("user:{i}")).collect()
}

fn quota() -> Quota {
    // Generous enough that the measured path is the bookkeeping, and equal
    // on both sides: 1,000,000 per second, burst 1,000,000.
    Quota::per_second(NonZeroU32::new(1_000_000).expect("non-zero"))
}

/// The public trait object, as a service receives it.
fn ours() -> Arc<dyn Limiter> {
    let rules = Rules::single("api", Rule::per_second(1_000_000)).expect("valid rule");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(MemoryBackend::new().limiter(rules))
        .expect("a limiter")
}

/// One decision, awaited in place (the check of an in-process limiter is
/// ready at once: one poll).
#[inline]
fn allowed(lim: &dyn Limiter, key: &str) -> bool {
    lim.check("api", key, 1)
        .now_or_never()
        .and_then(|r| r.ok())
        .is_some_and(|d| d.allowed)
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
    g.bench_function("im-infra/check", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(allowed(&*lim, &keys[i]))
        })
    });
    // The decision alone, without the trait call around it (argument
    // checks, `Check`, the dynamic call, the telemetry layer): what the
    // layering costs is the difference with `im-infra/check`.
    let local = im_infra::ratelimit::LocalLimiter::new(
        Rules::single("api", Rule::per_second(1_000_000)).expect("valid rule"),
    );
    let mut i = 0usize;
    g.bench_function("im-infra/decision-alone", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(
                local
                    .decide_unchecked("api", &keys[i], 1)
                    .is_ok_and(|d| d.allowed),
            )
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
    let lim = ours();
    g.bench_function("im-infra/check", |b| {
        let lim = lim.clone();
        let keys2 = keys.clone();
        b.iter_custom(move |iters| {
            let lim = lim.clone();
            let f: Arc<dyn Fn(&String) -> bool + Send + Sync> =
                Arc::new(move |k: &String| allowed(&*lim, k));
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
            black_box(allowed(&*lim, &keys[i % KEYS]));
        }
        let o = n as f64 / t.elapsed().as_secs_f64();
        best = (best.0.max(g), best.1.max(o));
    }
    println!(
        "RATIO limiter 1-thread, Limiter::check through Arc<dyn Limiter>: im-infra {:.2} M decisions/s, governor {:.2} M/s, ratio {:.2}",
        best.1 / 1e6,
        best.0 / 1e6,
        best.1 / best.0
    );
}

criterion_group!(benches, single_thread, multi_thread, ratio);
criterion_main!(benches);
