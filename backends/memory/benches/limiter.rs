//! The in-process limiter decision against `governor`, side by side.
//!
//! ```text
//! cargo bench -p im-infra-memory --bench limiter
//! ```
//!
//! Both limiters decide on the same keys with the same quota, keyed by
//! string, in the same loop. `im-infra/check` is what a service does:
//! `limiter.check(…).await` in an `async fn`, on the `Arc<dyn Limiter>`
//! that `Backend::limiter` hands out (argument checks, span and metrics
//! included, no subscriber or recorder installed); the task never waits,
//! as an in-process decision is ready at once. `im-infra/check-polled-alone`
//! polls each call's future on its own (`now_or_never`, a waker made per
//! call), which no service does; `im-infra/decision-alone` is the bucket
//! decision without the call around it. The multi-threaded group runs two
//! threads on disjoint key sets of one shared limiter. At the end the run
//! prints the throughput ratio against governor.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::FutureExt;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use im_infra::backend::Backend;
use im_infra::ratelimit::{Limiter, LocalLimiter, Rule, Rules};
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

/// The next key of `from..from + len`, round and round (no division
/// on the way, the same on both sides).
#[inline(always)]
fn next_key<'k>(keys: &'k [String], i: &mut usize, from: usize, len: usize) -> &'k String {
    let key = &keys[from + *i];
    *i += 1;
    if *i == len {
        *i = 0;
    }
    key
}

/// `n` decisions of governor; how many were allowed.
fn governor_loop(
    gov: &DefaultKeyedRateLimiter<String>,
    keys: &[String],
    from: usize,
    len: usize,
    n: u64,
) -> u64 {
    let (mut i, mut allowed) = (0, 0);
    for _ in 0..n {
        let key = next_key(keys, &mut i, from, len);
        allowed += u64::from(gov.check_key(key).is_ok());
    }
    allowed
}

/// `n` decisions awaited in one task, as a service's `async fn` awaits
/// them; how many were allowed. The task never waits: it is polled once.
fn ours_loop(lim: &dyn Limiter, keys: &[String], from: usize, len: usize, n: u64) -> u64 {
    let task = async {
        let (mut i, mut allowed) = (0, 0);
        for _ in 0..n {
            let key = next_key(keys, &mut i, from, len);
            allowed += u64::from(lim.check("api", key, 1).await.is_ok_and(|d| d.allowed));
        }
        allowed
    };
    task.now_or_never()
        .expect("an in-process decision never waits")
}

/// `n` decisions, each call's future polled on its own; how many were
/// allowed.
fn ours_polled_alone(lim: &dyn Limiter, keys: &[String], n: u64) -> u64 {
    let (mut i, mut allowed) = (0, 0);
    for _ in 0..n {
        let key = next_key(keys, &mut i, 0, KEYS);
        let check = lim.check("api", key, 1).now_or_never();
        allowed += u64::from(check.is_some_and(|r| r.is_ok_and(|d| d.allowed)));
    }
    allowed
}

/// `n` bucket decisions without the call around them; how many were
/// allowed.
fn decision_alone(local: &LocalLimiter, keys: &[String], n: u64) -> u64 {
    let (mut i, mut allowed) = (0, 0);
    for _ in 0..n {
        let key = next_key(keys, &mut i, 0, KEYS);
        allowed += u64::from(
            local
                .decide_unchecked("api", key, 1)
                .is_ok_and(|d| d.allowed),
        );
    }
    allowed
}

/// Times `f(iters)`, keeping its result.
fn timed(iters: u64, f: impl FnOnce(u64) -> u64) -> Duration {
    let start = Instant::now();
    black_box(f(iters));
    start.elapsed()
}

fn single_thread(c: &mut Criterion) {
    let keys = keys();
    let mut g = c.benchmark_group("limiter/1-thread-1024-keys");
    g.throughput(Throughput::Elements(1));
    let gov = RateLimiter::keyed(quota());
    g.bench_function("governor/check_key", |b| {
        b.iter_custom(|iters| timed(iters, |n| governor_loop(&gov, &keys, 0, KEYS, n)))
    });
    let lim = ours();
    g.bench_function("im-infra/check", |b| {
        b.iter_custom(|iters| timed(iters, |n| ours_loop(&*lim, &keys, 0, KEYS, n)))
    });
    g.bench_function("im-infra/check-polled-alone", |b| {
        b.iter_custom(|iters| timed(iters, |n| ours_polled_alone(&*lim, &keys, n)))
    });
    // The decision alone, without the trait call around it (argument
    // checks, `Check`, the dynamic call, the telemetry layer): what the
    // layering costs is the difference with `im-infra/check`.
    let local =
        LocalLimiter::new(Rules::single("api", Rule::per_second(1_000_000)).expect("valid rule"));
    g.bench_function("im-infra/decision-alone", |b| {
        b.iter_custom(|iters| timed(iters, |n| decision_alone(&local, &keys, n)))
    });
    g.finish();
}

/// Runs `run(first key, key count, n)` on two threads over disjoint key
/// halves, `iters / 2` each; returns the time.
fn two_threads(iters: u64, run: Arc<dyn Fn(usize, usize, u64) -> u64 + Send + Sync>) -> Duration {
    let start = Instant::now();
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let run = run.clone();
            std::thread::spawn(move || black_box(run(t * KEYS / 2, KEYS / 2, iters / 2)))
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
    let (k, l) = (keys.clone(), gov.clone());
    let run: Arc<dyn Fn(usize, usize, u64) -> u64 + Send + Sync> =
        Arc::new(move |from, len, n| governor_loop(&l, &k, from, len, n));
    g.bench_function("governor/check_key", |b| {
        b.iter_custom(|iters| two_threads(iters, run.clone()))
    });
    let lim = ours();
    let k = keys.clone();
    let run: Arc<dyn Fn(usize, usize, u64) -> u64 + Send + Sync> =
        Arc::new(move |from, len, n| ours_loop(&*lim, &k, from, len, n));
    g.bench_function("im-infra/check", |b| {
        b.iter_custom(|iters| two_threads(iters, run.clone()))
    });
    g.finish();
}

/// Prints decisions per second of each side measured back to back (best
/// of three rounds), and the ratio.
fn ratio(_c: &mut Criterion) {
    let keys = keys();
    let n = 5_000_000u64;
    let gov = RateLimiter::keyed(quota());
    let lim = ours();
    let mut best = (0f64, 0f64);
    for _ in 0..3 {
        let g = n as f64 / timed(n, |n| governor_loop(&gov, &keys, 0, KEYS, n)).as_secs_f64();
        let o = n as f64 / timed(n, |n| ours_loop(&*lim, &keys, 0, KEYS, n)).as_secs_f64();
        best = (best.0.max(g), best.1.max(o));
    }
    println!(
        "RATIO limiter 1-thread, Limiter::check through Arc<dyn Limiter> awaited in an async fn: im-infra {:.2} M decisions/s, governor {:.2} M/s, ratio {:.2}",
        best.1 / 1e6,
        best.0 / 1e6,
        best.1 / best.0
    );
}

criterion_group!(benches, single_thread, multi_thread, ratio);
criterion_main!(benches);
