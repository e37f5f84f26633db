//! The cost of the span and metrics around an operation, with no
//! subscriber and no recorder installed (the default).
//!
//! ```text
//! cargo bench -p im-infra --bench telemetry
//! ```

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use futures::FutureExt;
use im_infra::telemetry::OpMetrics;

fn run(c: &mut Criterion) {
    let m = OpMetrics::new("bench", "cache", "cache.get");
    c.bench_function("telemetry/op_metrics_run", |b| {
        b.iter(|| {
            let fut = m.run(async { Ok::<_, im_infra::Error>(black_box(1)) });
            black_box(fut.now_or_never())
        })
    });
    c.bench_function("telemetry/bare_future", |b| {
        b.iter(|| {
            let fut = async { Ok::<_, im_infra::Error>(black_box(1)) };
            black_box(fut.now_or_never())
        })
    });
}

fn run_pending(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let m = OpMetrics::new("bench", "cache", "cache.get");
    c.bench_function("telemetry/op_metrics_run_yielding", |b| {
        b.iter(|| {
            rt.block_on(m.run(async {
                tokio::task::yield_now().await;
                Ok::<_, im_infra::Error>(black_box(1))
            }))
        })
    });
    c.bench_function("telemetry/bare_yielding", |b| {
        b.iter(|| {
            rt.block_on(async {
                tokio::task::yield_now().await;
                Ok::<_, im_infra::Error>(black_box(1))
            })
        })
    });
}

criterion_group!(benches, run, run_pending);
criterion_main!(benches);
