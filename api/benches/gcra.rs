//! The pure GCRA decision (no map, no clock).
//!
//! ```text
//! cargo bench -p im-infra --bench gcra
//! ```

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use im_infra::ratelimit::{gcra, Rule};

fn decide(c: &mut Criterion) {
    let p = gcra::Params::new(&Rule::per_second(1_000_000), 1).expect("valid rule");
    let mut now = 1u64;
    let mut tat = None;
    c.bench_function("gcra/decide", |b| {
        b.iter(|| {
            now += 1_000;
            let (d, next) = gcra::decide(black_box(&p), tat, black_box(now), 1);
            tat = next.or(tat);
            black_box(d.remaining)
        })
    });
}

criterion_group!(benches, decide);
criterion_main!(benches);
