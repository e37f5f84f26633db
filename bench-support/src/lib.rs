//! The measuring loop of the backends' benchmarks against their raw client
//! libraries: both sides run the same work at the same concurrency in one
//! process, in alternating rounds, and a `RATIO` line reports the median of
//! the per-pair ratios (robust to the drift and noise of shared machines).
//!
//! ```no_run
//! use std::sync::Arc;
//! use im_infra_bench_support::{compare_throughput, Rounds};
//!
//! let rt = im_infra_bench_support::runtime();
//! rt.block_on(async {
//!     let raw = Arc::new(|_i: usize| async { true });
//!     let ours = Arc::new(|_i: usize| async { true });
//!     let c = compare_throughput("demo no-op", Rounds::default(), raw, ours).await;
//!     assert!(c.ratio > 0.0);
//! });
//! ```
#![deny(missing_docs)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The shape of a paired throughput comparison.
#[derive(Debug, Clone, Copy)]
pub struct Rounds {
    /// Concurrent tasks on each side.
    pub tasks: usize,
    /// Length of one round.
    pub round: Duration,
    /// Rounds per side (odd, so the median is one of them).
    pub pairs: usize,
}

impl Default for Rounds {
    fn default() -> Self {
        Rounds {
            tasks: 32,
            round: Duration::from_millis(1500),
            pairs: 7,
        }
    }
}

/// The outcome of [`compare_throughput`].
#[derive(Debug, Clone, Copy)]
pub struct Comparison {
    /// Median ops/s of im-infra.
    pub ours: f64,
    /// Median ops/s of the raw client.
    pub raw: f64,
    /// Median of the per-pair ratios im-infra / raw (above 1: im-infra faster).
    pub ratio: f64,
    /// Median client CPU per operation of im-infra, in microseconds.
    pub ours_cpu_us: f64,
    /// Median client CPU per operation of the raw client, in microseconds.
    pub raw_cpu_us: f64,
}

/// The server address in `var`, or `None` (with a message) when it is not
/// set or when the bench binary runs in test mode (`cargo test --benches`).
pub fn server_env(var: &str) -> Option<String> {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return None;
    }
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Some(v),
        _ => {
            eprintln!("{var} is not set: start the servers with scripts/services.sh up");
            None
        }
    }
}

/// A two-worker runtime, like the machines the figures are taken on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The median (the upper one for an even count); 0 for no values.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// CPU time (user + system) of this process so far, in seconds, from
/// `/proc/self/stat` (clock ticks of 10 ms); 0 where that file is missing.
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// What one round measured.
#[derive(Debug, Clone, Copy)]
pub struct Round {
    /// Operations per second.
    pub ops_per_sec: f64,
    /// CPU time of this process per operation, in microseconds (the
    /// client's cost; the server runs in another process).
    pub cpu_us_per_op: f64,
}

/// One round of `tasks` tasks calling `op(i)` (i counts per task, from the
/// task's index, in steps of `tasks`) for `round`. Panics when `op` reports
/// a failure: a benchmark of failing calls measures nothing.
pub async fn throughput<F, Fut>(tasks: usize, round: Duration, op: Arc<F>) -> Round
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let cpu = cpu_seconds();
    let start = Instant::now();
    // Each task counts its own operations: one counter shared by all would
    // be a cache line both cores fight over on every call, a cost of the
    // loop and not of what it measures.
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let op = op.clone();
            tokio::spawn(async move {
                let (mut i, mut done) = (t, 0u64);
                while start.elapsed() < round {
                    assert!(op(i).await, "operation failed");
                    i += tasks;
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut n = 0u64;
    for h in handles {
        n += h.await.expect("a benchmark task panicked");
    }
    let n = n.max(1) as f64;
    Round {
        ops_per_sec: n / start.elapsed().as_secs_f64(),
        cpu_us_per_op: (cpu_seconds() - cpu) * 1e6 / n,
    }
}

/// Paired rounds of `raw` and `ours`, alternating which goes first; prints
/// `RATIO <label>: ...` and returns the medians.
pub async fn compare_throughput<R, RF, O, OF>(
    label: &str,
    rounds: Rounds,
    raw: Arc<R>,
    ours: Arc<O>,
) -> Comparison
where
    R: Fn(usize) -> RF + Send + Sync + 'static,
    RF: Future<Output = bool> + Send,
    O: Fn(usize) -> OF + Send + Sync + 'static,
    OF: Future<Output = bool> + Send,
{
    let (mut raws, mut ourss, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..rounds.pairs {
        let (r, o) = if i % 2 == 0 {
            let r = throughput(rounds.tasks, rounds.round, raw.clone()).await;
            (
                r,
                throughput(rounds.tasks, rounds.round, ours.clone()).await,
            )
        } else {
            let o = throughput(rounds.tasks, rounds.round, ours.clone()).await;
            (throughput(rounds.tasks, rounds.round, raw.clone()).await, o)
        };
        ratios.push(o.ops_per_sec / r.ops_per_sec);
        raws.push(r);
        ourss.push(o);
    }
    let c = Comparison {
        ours: median(ourss.iter().map(|r| r.ops_per_sec).collect()),
        raw: median(raws.iter().map(|r| r.ops_per_sec).collect()),
        ratio: median(ratios),
        ours_cpu_us: median(ourss.iter().map(|r| r.cpu_us_per_op).collect()),
        raw_cpu_us: median(raws.iter().map(|r| r.cpu_us_per_op).collect()),
    };
    println!(
        "RATIO {label}: im-infra {:.0} ops/s, raw {:.0} ops/s (medians), ratio {:.3} (median of {} paired rounds, {} tasks); client cpu {:.1} vs {:.1} us/op",
        c.ours, c.raw, c.ratio, rounds.pairs, rounds.tasks, c.ours_cpu_us, c.raw_cpu_us
    );
    c
}

/// Median latency in milliseconds of `cycles` sequential calls of `op` on
/// each of `tasks` concurrent tasks.
pub async fn latency_ms<F, Fut>(tasks: usize, cycles: usize, op: Arc<F>) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut v = Vec::with_capacity(cycles);
                for _ in 0..cycles {
                    let t = Instant::now();
                    assert!(op().await, "operation failed");
                    v.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                v
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.expect("a benchmark task panicked"));
    }
    median(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_picks_the_middle() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![]), 0.0);
    }

    #[tokio::test]
    async fn equal_sides_compare_near_one() {
        let rounds = Rounds {
            tasks: 2,
            round: Duration::from_millis(50),
            pairs: 3,
        };
        let op = Arc::new(|_i: usize| async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            true
        });
        let c = compare_throughput("test", rounds, op.clone(), op).await;
        assert!(c.ours > 0.0 && c.raw > 0.0);
        assert!(c.ratio > 0.3 && c.ratio < 3.0, "{c:?}");
    }
}
