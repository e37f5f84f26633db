//! Snowflake id generation.
//!
//! ```text
//! cargo bench -p im-infra --bench snowflake
//! ```
//!
//! `next_id/uncontended` is the cost of one call (the target is under
//! 25 ns); the sustained run generates ids back to back for two seconds and
//! prints the rate (target: at least 4.0 M ids/s per generator; the default
//! layout's bound is 4.096 M/s, 4096 per millisecond).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use im_infra::uid::{IdGenerator, Layout, Snowflake};

fn uncontended(c: &mut Criterion) {
    let g = Snowflake::new(Layout::default(), 1).expect("valid layout");
    let mut group = c.benchmark_group("snowflake");
    group.throughput(Throughput::Elements(1));
    // Keep each sample short of exhausting a millisecond's 4096 ids so the
    // figure is the call cost, not the wait for the clock.
    group.bench_function("next_id/uncontended", |b| {
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
    group.finish();
}

fn sustained(_c: &mut Criterion) {
    let g = Snowflake::new(Layout::default(), 1).expect("valid layout");
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
    println!(
        "RATIO snowflake sustained: {:.3} M ids/s per generator (bound 4.096)",
        best / 1e6
    );
}

criterion_group!(benches, uncontended, sustained);
criterion_main!(benches);
