//! One contender of the multi-process lock-safety check
//! (`im_infra_integration_tests::lock_safety`): builds a backend, then until the
//! end of its run acquires the lock, writes `BEGIN` with the fencing token
//! to the fenced store, works a little while watching `is_held()`, writes
//! `END` (or reports `LOST`), and releases. One line per event on stdout.
//!
//! ```text
//! lock_contender --backend redis|etcd|mysql --url URL --namespace NS --name LOCK
//!     --id p0 --store 127.0.0.1:PORT --ttl-ms 2000 --timeout-ms 1000
//!     --duration-ms 15000 [--long-work-percent 15] [--long-work-ms 3000] [--seed 1]
//! ```
//!
//! Exits 0 at the end of the duration, 2 on bad arguments, 1 if the fenced
//! store cannot be reached. Backend errors (expected while the proxy in
//! front of the server is frozen) are printed and the loop goes on.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use im_infra::lock::{DistributedLock, LockGuard, LockOptions};
use im_infra_integration_tests::lock_safety::{LockBackend, StoreClient};

#[derive(Debug)]
struct Args {
    backend: String,
    url: String,
    namespace: String,
    name: String,
    id: String,
    store: String,
    ttl: Duration,
    timeout: Duration,
    duration: Duration,
    long_work_percent: u32,
    long_work: Duration,
    seed: u64,
}

impl Args {
    fn parse() -> Result<Args> {
        let mut map = std::collections::HashMap::new();
        let mut it = std::env::args().skip(1);
        while let Some(k) = it.next() {
            let Some(name) = k.strip_prefix("--") else {
                bail!("unexpected argument {k:?}");
            };
            let v = it.next().with_context(|| format!("{k} needs a value"))?;
            map.insert(name.to_owned(), v);
        }
        let mut take = |k: &str| map.remove(k).with_context(|| format!("--{k} is required"));
        let ms = |v: String, k: &str| -> Result<Duration> {
            Ok(Duration::from_millis(
                v.parse().with_context(|| format!("--{k} {v:?}"))?,
            ))
        };
        let args = Args {
            backend: take("backend")?,
            url: take("url")?,
            namespace: take("namespace")?,
            name: take("name")?,
            id: take("id")?,
            store: take("store")?,
            ttl: ms(take("ttl-ms")?, "ttl-ms")?,
            timeout: ms(take("timeout-ms")?, "timeout-ms")?,
            duration: ms(take("duration-ms")?, "duration-ms")?,
            long_work_percent: take("long-work-percent")
                .unwrap_or_else(|_| "0".to_owned())
                .parse()
                .context("--long-work-percent")?,
            long_work: take("long-work-ms")
                .map_or(Ok(Duration::ZERO), |v| ms(v, "long-work-ms"))?,
            seed: take("seed")
                .unwrap_or_else(|_| "1".to_owned())
                .parse()
                .context("--seed")?,
        };
        if let Some(k) = map.keys().next() {
            bail!("unknown option --{k}");
        }
        Ok(args)
    }
}

/// Prints one event line: milliseconds since the start, the process, what.
struct Log {
    id: String,
    started: Instant,
}

impl Log {
    fn line(&self, what: std::fmt::Arguments<'_>) {
        println!(
            "{:>7} {} {what}",
            self.started.elapsed().as_millis(),
            self.id
        );
    }
}

macro_rules! event {
    ($log:expr, $($arg:tt)*) => { $log.line(format_args!($($arg)*)) };
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lock_contender: {e:#}");
            return ExitCode::from(2);
        }
    };
    let log = Log {
        id: args.id.clone(),
        started: Instant::now(),
    };
    event!(
        log,
        "start {} {} ttl={:?}",
        args.backend,
        args.url,
        args.ttl
    );
    // The loop stops starting work at the deadline; this bounds whatever
    // is in progress then.
    let hard_stop = args.duration + args.ttl * 2 + args.timeout * 4;
    match tokio::time::timeout(hard_stop, contend(&args, &log)).await {
        Ok(Ok(())) => {
            event!(log, "done");
            ExitCode::SUCCESS
        }
        Err(_) => {
            event!(log, "done (stopped in progress)");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            event!(log, "FAILED {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn contend(args: &Args, log: &Log) -> Result<()> {
    let deadline = Instant::now() + args.duration;
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let mut store = StoreClient::connect(args.store.as_str(), &args.id).await?;

    // The backend, even if the network is frozen for a while.
    let (backend, lock): (LockBackend, std::sync::Arc<dyn DistributedLock>) = loop {
        if Instant::now() >= deadline {
            return Ok(());
        }
        let attempt = async {
            let b = LockBackend::connect(&args.backend, &args.url, &args.namespace, args.timeout)
                .await?;
            let l = b.lock().await?;
            anyhow::Ok((b, l))
        };
        match tokio::time::timeout(args.timeout * 3, attempt).await {
            Ok(Ok(built)) => break built,
            Ok(Err(e)) => event!(log, "backend-error {e:#}"),
            Err(_) => event!(log, "backend-error connecting timed out"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    event!(log, "ready");

    while Instant::now() < deadline {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let wait = remaining.min((args.ttl * 3).max(Duration::from_secs(5)));
        let opts = LockOptions::new(args.ttl).wait(wait);
        let acquired =
            tokio::time::timeout(wait + args.timeout * 2, lock.acquire(&args.name, opts)).await;
        let guard = match acquired {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => {
                event!(log, "acquire-error {:?} {e}", e.kind());
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(_) => {
                event!(log, "acquire-error the call did not return in time");
                continue;
            }
        };
        let token = guard.fencing_token();
        if !guard.is_held() {
            event!(log, "acquired token={token} but already not held; skipping");
            release(&*guard, args, log, token).await;
            continue;
        }
        let planned = if rng.u32(0..100) < args.long_work_percent {
            args.long_work
        } else {
            Duration::from_millis(rng.u64(5..=50))
        };
        if !store.begin(token, planned).await? {
            event!(log, "BEGIN token={token} REJECTED");
            release(&*guard, args, log, token).await;
            continue;
        }
        event!(log, "BEGIN token={token} ok work={planned:?}");
        let (lost, last_held) = work(&*guard, planned).await;
        if !lost && guard.is_held() {
            if store.end(token).await? {
                event!(log, "END token={token} ok");
            } else {
                event!(log, "END token={token} REJECTED");
            }
        } else {
            let since = last_held.elapsed();
            store.lost(token, since).await?;
            event!(
                log,
                "LOST token={token} noticed during the work, last seen held {since:?} before"
            );
        }
        release(&*guard, args, log, token).await;
    }
    let _ = tokio::time::timeout(args.timeout, backend.close()).await;
    Ok(())
}

/// Works for `planned`, checking every millisecond that the lock is held.
/// Returns whether it was lost, and when it was last seen held (an instant
/// just before an `is_held()` that answered `true`).
async fn work(guard: &dyn LockGuard, planned: Duration) -> (bool, Instant) {
    let lost = guard.lost();
    let until = Instant::now() + planned;
    let mut last_held = Instant::now();
    loop {
        let seen = Instant::now();
        if !guard.is_held() {
            return (true, last_held);
        }
        last_held = seen;
        if seen >= until {
            return (false, last_held);
        }
        tokio::select! {
            _ = lost.cancelled() => {}
            _ = tokio::time::sleep((until - seen).min(Duration::from_millis(1))) => {}
        }
    }
}

async fn release(guard: &dyn LockGuard, args: &Args, log: &Log, token: u64) {
    match tokio::time::timeout(args.timeout * 3, guard.release()).await {
        Ok(Ok(())) => event!(log, "released token={token}"),
        Ok(Err(e)) => event!(log, "release token={token} failed {:?} {e}", e.kind()),
        Err(_) => event!(log, "release token={token} did not return in time"),
    }
}
