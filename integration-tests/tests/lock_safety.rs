//! The lock-safety check across OS processes (DESIGN §8) on the real
//! servers from `scripts/services.sh`: four `lock_contender` processes
//! compete for one lock for 15 s while the holder is SIGKILLed, a holder is
//! cut off behind a frozen proxy for longer than the TTL, and a waiter's
//! answers are held back for longer than the TTL just as the lock is
//! released or its killed holder's lease runs out. A fenced store in
//! this process checks that no holder still believed it held the lock once
//! the next one had begun (see `im_infra_integration_tests::lock_safety`).
//!
//! `IMINFRA_LOCK_SAFETY_SEED` changes the seed of the random choices;
//! `IMINFRA_LOCK_SAFETY_LOG` the contenders' `RUST_LOG` (default `warn`).
//! Their output stays under `target/tmp/lock-safety/`.

use std::path::Path;
use std::time::Duration;

use im_infra_conformance::servers::{server_or_skip, ETCD_ENV, MYSQL_ENV, REDIS_ENV};
use im_infra_integration_tests::lock_safety::{run, RunConfig};

/// Each run uses several processes and tight timing: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn check(backend: &str, env: &str, ttl: Duration) {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(server) = server_or_skip(backend, env) else {
        return;
    };
    let mut cfg = RunConfig::new(backend, &server, env!("CARGO_BIN_EXE_lock_contender")).ttl(ttl);
    // Four, so that with one cut off and one just killed two still race.
    cfg.processes = 4;
    cfg.duration = Duration::from_secs(15);
    cfg.log_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("lock-safety")
        .join(backend);
    let report = run(&cfg).await.expect("the harness runs");
    eprintln!("{}", report.summary());
    let v = &report.verdict;

    let violations = v.violations();
    assert!(
        violations.is_empty(),
        "{backend}: the lock let two holders overlap:\n  {}\n(logs in {})",
        violations.join("\n  "),
        report.log_dir.display()
    );
    assert!(
        v.overlaps.is_empty() && v.rejected.is_empty() && v.late_losses.is_empty(),
        "{backend}: overlapping sections"
    );
    assert!(
        v.sections.windows(2).all(|w| w[0].token < w[1].token),
        "{backend}: tokens must strictly increase across sections"
    );
    assert!(
        v.completed >= 5,
        "{backend}: only {} completed critical sections",
        v.completed
    );
    assert!(
        report.kills.iter().any(|k| k.in_section),
        "{backend}: no holder was killed in its critical section ({} kills; notes: {:?})",
        report.kills.len(),
        report.notes
    );
    assert!(
        !report.freezes.is_empty(),
        "{backend}: nobody was frozen (notes: {:?})",
        report.notes
    );
    assert!(
        report.crashes.is_empty(),
        "{backend}: contenders failed: {:?}",
        report.crashes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lock_is_safe_across_killed_and_partitioned_processes() {
    check("redis", REDIS_ENV, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_lock_is_safe_across_killed_and_partitioned_processes() {
    // etcd leases are whole seconds, at least 2.
    check("etcd", ETCD_ENV, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_lock_is_safe_across_killed_and_partitioned_processes() {
    check("mysql", MYSQL_ENV, Duration::from_secs(2)).await;
}
