//! Snowflake id generation.
//!
//! ```text
//! cargo bench -p im-infra --bench snowflake
//! ```
//!
//! `next_id/uncontended` is the cost of one call (the target is under
//! 25 ns); `next_id/leased` the same on a leased worker id, which also
//! checks the lease's local deadline on every call. The sustained runs
//! generate ids back to back for two seconds and print the rate (target: at
//! least 4.0 M ids/s per generator; the default layout's bound is
//! 4.096 M/s, 4096 per millisecond).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use im_infra::uid::{IdGenerator, Layout, Snowflake, WorkerLease};

/// A generator on a worker lease (one that never ends: the deadline check
/// on the `next_id` path is the same for every lease).
fn leased() -> Snowflake {
    Snowflake::with_lease(Layout::default(), WorkerLease::fixed(1)).expect("valid layout")
}

fn uncontended(c: &mut Criterion) {
    let mut group = c.benchmark_group("snowflake");
    group.throughput(Throughput::Elements(1));
    for (name, g) in [
        (
            "next_id/uncontended",
            Snowflake::new(Layout::default(), 1).expect("valid layout"),
        ),
        ("next_id/leased", leased()),
    ] {
        per_call(&mut group, name, &g);
    }
    group.finish();
}

fn per_call(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    g: &Snowflake,
) {
    // Keep each sample short of exhausting a millisecond's 4096 ids so the
    // figure is the call cost, not the wait for the clock.
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let batch = left.min(2048);
                std::thread::sleep(Duration::from_millis(1));
                let t = Instant::now();
                for _ in 0..batch {
                    black_box(g.next_id().ok());
                }
                total += t.elapsed();
                left -= batch;
            }
            total
        })
    });
}

fn sustained(_c: &mut Criterion) {
    let plain = rate(&Snowflake::new(Layout::default(), 1).expect("valid layout"));
    let on_lease = rate(&leased());
    println!(
        "RATIO snowflake sustained: {:.3} M ids/s per generator (bound 4.096)",
        plain / 1e6
    );
    println!(
        "RATIO snowflake sustained on a lease: {:.3} M ids/s per generator ({:.3} of the plain one)",
        on_lease / 1e6,
        on_lease / plain
    );
}

fn rate(g: &Snowflake) -> f64 {
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < Duration::from_secs(2) {
            for _ in 0..4096 {
                black_box(g.next_id().ok());
            }
            n += 4096;
        }
        best = best.max(n as f64 / t.elapsed().as_secs_f64());
    }
    best
}

criterion_group!(benches, uncontended, sustained);
criterion_main!(benches);
