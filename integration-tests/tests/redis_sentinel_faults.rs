//! Redis with a replica and three Sentinels on a private Docker network:
//! the primary is stopped while one backend instance takes fencing tokens
//! in a loop. The backend (settings `sentinels` + `master_name`) follows
//! the replica the sentinels promote without being restarted; the failover
//! gap is measured, and every token is larger than the one before, across
//! the failover too.
//!
//! The test process reaches the servers at their addresses on the Docker
//! network, which are also the addresses the sentinels report (they monitor
//! the primary by its address, and learn the replica's from the primary).
//!
//! Needs Docker and `im-infra/redis:local` (`scripts/images.sh build`);
//! skipped without them unless `IMINFRA_REQUIRE_BACKENDS` is `all` (or
//! names `docker`). Prints what it measured (run with `--nocapture`).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use im_infra::backend::{Backend, Maintenance};
use im_infra::cache::near::NearCache;
use im_infra::cache::Cache;
use im_infra::config::ConfigCenterExt;
use im_infra::lock::LockOptions;
use im_infra::ErrorKind;
use im_infra_conformance::cases::eventually;
use im_infra_integration_tests::docker::{docker_or_skip, Lab, Spec, REDIS_IMAGE};
use im_infra_redis::RedisBackend;

const MASTER: &str = "mymaster";
/// Bound of every wait (servers starting, sentinels meeting, the failover).
const BOUND: Duration = Duration::from_secs(60);
/// TTL of the lock taken in the loop.
const LOCK_TTL: Duration = Duration::from_secs(2);
/// Acquisitions before the primary is stopped, and after the failover.
const BEFORE: usize = 30;
const AFTER: usize = 30;
const KEY: &str = "fenced";

/// One Sentinel: its configuration is written by the container's command
/// (sentinel rewrites it, so it must be its own file), then
/// `redis-sentinel` runs in the foreground; the ready line is printed once
/// it answers.
fn sentinel_command(primary_ip: &str) -> Vec<String> {
    let script = format!(
        r#"cat > /tmp/sentinel.conf <<EOF
port 26379
bind 0.0.0.0
protected-mode no
sentinel monitor {MASTER} {primary_ip} 6379 2
sentinel down-after-milliseconds {MASTER} 1000
sentinel failover-timeout {MASTER} 5000
sentinel parallel-syncs {MASTER} 1
EOF
(until [ "$(redis-cli -p 26379 ping 2>/dev/null)" = PONG ]; do sleep 0.1; done; echo "im-infra: sentinel ready") &
exec redis-sentinel /tmp/sentinel.conf"#
    );
    vec!["bash".into(), "-c".into(), script]
}

/// `redis-cli` answers of alternating field and value lines, as a map.
fn fields(out: &str) -> BTreeMap<String, String> {
    let lines: Vec<&str> = out.lines().collect();
    lines
        .chunks(2)
        .filter_map(|p| Some((p[0].trim().to_owned(), p.get(1)?.trim().to_owned())))
        .collect()
}

struct Topology {
    primary: String,
    replica: String,
    replica_ip: String,
    sentinels: Vec<(String, String)>,
}

async fn start(lab: &Lab) -> Result<Topology> {
    let net = lab.network("net").await?;
    let ready = "im-infra: redis ready";
    let primary = lab.start(&Spec::new("r0", REDIS_IMAGE, &net)).await?;
    lab.wait_for_line(&primary, ready, BOUND).await?;
    let primary_ip = lab.ip(&primary, &net).await?;
    let replica = lab
        .start(&Spec::new("r1", REDIS_IMAGE, &net).command([
            "/usr/local/bin/im-infra-start",
            "--replicaof",
            &primary_ip,
            "6379",
        ]))
        .await?;
    lab.wait_for_line(&replica, ready, BOUND).await?;
    let replica_ip = lab.ip(&replica, &net).await?;
    let mut sentinels = Vec::new();
    for i in 0..3 {
        let spec =
            Spec::new(&format!("s{i}"), REDIS_IMAGE, &net).command(sentinel_command(&primary_ip));
        let s = lab.start(&spec).await?;
        sentinels.push(s);
    }
    let mut out = Vec::new();
    for s in sentinels {
        lab.wait_for_line(&s, "im-infra: sentinel ready", BOUND)
            .await?;
        let ip = lab.ip(&s, &net).await?;
        out.push((s, ip));
    }
    let started = Instant::now();
    // The replica is in sync, and every sentinel knows the replica and the
    // two other sentinels (hello messages every 2 s, INFO every 10 s).
    loop {
        let replication = lab
            .exec(&replica, &["redis-cli", "info", "replication"])
            .await?;
        let mut ready = replication.contains("master_link_status:up");
        for (s, _) in &out {
            let m = fields(
                &lab.exec(
                    s,
                    &["redis-cli", "-p", "26379", "sentinel", "master", MASTER],
                )
                .await?,
            );
            ready &= m.get("num-slaves").map(String::as_str) == Some("1")
                && m.get("num-other-sentinels").map(String::as_str) == Some("2");
        }
        if ready {
            break;
        }
        ensure!(
            started.elapsed() < BOUND,
            "the sentinels did not find the replica and each other within {BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "redis sentinel: the replica synced and the three sentinels met in {:?}",
        started.elapsed()
    );
    Ok(Topology {
        primary,
        replica,
        replica_ip,
        sentinels: out,
    })
}

/// One acquisition attempt of the loop.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Token(u64),
    /// Still held (a release lost in the failover; it expires).
    Held,
    Failed(ErrorKind),
}

/// A token and when the attempt that took it began.
type Taken = (Instant, u64);

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    done: Instant,
    outcome: Outcome,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_follows_a_sentinel_failover() -> Result<()> {
    if !docker_or_skip("the Redis Sentinel failover test", &[REDIS_IMAGE]).await {
        return Ok(());
    }
    let lab = Lab::new("redis-sentinel").await?;
    let top = start(&lab).await?;
    let ns = format!(
        "sentinel-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let sentinel_urls: Vec<String> = top
        .sentinels
        .iter()
        .map(|(_, ip)| format!("redis://{ip}:26379"))
        .collect();
    let backend = RedisBackend::builder()
        .sentinel(sentinel_urls, MASTER)
        .namespace(&ns)
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(1))
        .build()
        .await?;
    let lock = backend.lock().await?;
    let config = backend.config().await?;
    let cache = backend.cache().await?;
    config.set_json("/app/flag", &0u32).await?;
    // A near cache, tracking on the primary the sentinels name.
    let near = NearCache::builder(cache.clone())
        .invalidation(backend.invalidations())
        .build()
        .await?;
    ensure!(near.is_live(), "tracking before the failover");

    // One task takes and releases the lock in a loop; the other stops the
    // primary once enough tokens were taken.
    let successes = Cell::new(0usize);
    let stop: Cell<Option<(Instant, Instant)>> = Cell::new(None);
    let taking = async {
        let mut samples = Vec::new();
        let mut after = 0;
        loop {
            let at = Instant::now();
            let outcome = match lock.try_acquire(KEY, LockOptions::new(LOCK_TTL)).await {
                Ok(Some(g)) => {
                    let token = g.fencing_token();
                    // The primary may go away between the two: a failed
                    // release leaves the lock to expire.
                    let _ = g.release().await;
                    Outcome::Token(token)
                }
                Ok(None) => Outcome::Held,
                Err(e) if e.is_retryable() => Outcome::Failed(e.kind()),
                Err(e) => bail!("try_acquire: a non-retryable error: {e}"),
            };
            let done = Instant::now();
            samples.push(Sample { at, done, outcome });
            if let Outcome::Token(_) = outcome {
                successes.set(successes.get() + 1);
                if stop.get().is_some() {
                    after += 1;
                }
            }
            if let Some((asked, _)) = stop.get() {
                if after >= AFTER {
                    return anyhow::Ok(samples);
                }
                ensure!(
                    asked.elapsed() < BOUND,
                    "no failover within {BOUND:?}: {after} acquisitions after the stop"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    // Meanwhile a sentinel is asked every 20 ms which primary it names.
    let mut asking = redis::Client::open(format!("redis://{}:26379", top.sentinels[0].1))?
        .get_multiplexed_async_connection()
        .await?;
    let stopping = async {
        while successes.get() < BEFORE {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let asked = Instant::now();
        let switched = async {
            loop {
                let (ip, _): (String, u16) = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(MASTER)
                    .query_async(&mut asking)
                    .await?;
                if ip == top.replica_ip {
                    return anyhow::Ok(Instant::now());
                }
                ensure!(
                    asked.elapsed() < BOUND,
                    "the sentinels never named the replica"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let stopping = async {
            lab.stop(&top.primary, Duration::from_secs(10)).await?;
            stop.set(Some((asked, Instant::now())));
            anyhow::Ok(())
        };
        let (stopped, switched) = tokio::join!(stopping, switched);
        stopped?;
        switched
    };
    let (samples, switched) = tokio::join!(taking, stopping);
    let samples = samples?;
    let switched = switched?;
    let (asked, stopped) = stop.get().context("the primary was stopped")?;

    // Tokens strictly increase across the failover.
    let tokens: Vec<Taken> = samples
        .iter()
        .filter_map(|s| match s.outcome {
            Outcome::Token(t) => Some((s.at, t)),
            _ => None,
        })
        .collect();
    for w in tokens.windows(2) {
        ensure!(
            w[0].1 < w[1].1,
            "token {} after {}: not strictly increasing",
            w[1].1,
            w[0].1
        );
    }
    // The outage: from the first attempt after the stop that did not get
    // the lock to the first one that did again.
    let first_bad = samples
        .iter()
        .position(|s| s.at >= asked && !matches!(s.outcome, Outcome::Token(_)));
    let (gap, from_stop, failed, held, kinds) = match first_bad {
        Some(i) => {
            let end = samples[i..]
                .iter()
                .find(|s| matches!(s.outcome, Outcome::Token(_)))
                .context("no token after the outage")?;
            let outage = &samples[i..];
            let failed: Vec<ErrorKind> = outage
                .iter()
                .take_while(|s| !matches!(s.outcome, Outcome::Token(_)))
                .filter_map(|s| match s.outcome {
                    Outcome::Failed(k) => Some(k),
                    _ => None,
                })
                .collect();
            let held = outage
                .iter()
                .take_while(|s| !matches!(s.outcome, Outcome::Token(_)))
                .filter(|s| matches!(s.outcome, Outcome::Held))
                .count();
            let mut kinds: Vec<ErrorKind> = failed.clone();
            kinds.sort_by_key(|k| format!("{k:?}"));
            kinds.dedup();
            (
                end.done - samples[i].at,
                end.done - asked,
                failed.len(),
                held,
                kinds,
            )
        }
        None => (Duration::ZERO, Duration::ZERO, 0, 0, Vec::new()),
    };
    // The tokens on either side of the outage (the primary answered for a
    // while after the stop was asked: it shuts down gracefully).
    let split = first_bad.map_or(asked, |i| samples[i].at);
    let (before, after): (Vec<Taken>, Vec<Taken>) = tokens.iter().partition(|(at, _)| *at < split);
    ensure!(
        after.len() >= AFTER,
        "{} tokens after the outage",
        after.len()
    );
    let (last_before_at, last_before) = *before.last().context("tokens before the outage")?;
    let (first_after_at, first_after) = after[0];
    let show = |t: &[Taken]| t.iter().map(|(_, t)| *t).collect::<Vec<_>>();
    // The backend's own lag behind the sentinels (negative: it found the
    // new primary before the 20 ms poll saw the switch).
    let lag_ms = from_stop.as_secs_f64() * 1e3 - (switched - asked).as_secs_f64() * 1e3;
    println!(
        "redis sentinel: primary stopped (docker stop took {:?}); the sentinels named the replica {:?} after the stop was asked; the backend got the lock again {gap:?} after its first failed attempt ({from_stop:?} after the stop was asked, {lag_ms:+.0} ms from the switch; {failed} retryable failures {kinds:?}, {held} attempts found it held)",
        stopped - asked,
        switched - asked,
    );
    println!(
        "redis sentinel: tokens around the outage: ...{:?} | {:?}... (+{} µs across {:?}); {} tokens, all strictly increasing",
        show(&before[before.len().saturating_sub(3)..]),
        show(&after[..3.min(after.len())]),
        first_after - last_before,
        first_after_at - last_before_at,
        tokens.len()
    );

    // The backend now talks to the promoted replica.
    let role = lab.exec(&top.replica, &["redis-cli", "role"]).await?;
    ensure!(
        role.lines().next() == Some("master"),
        "the replica was promoted: {role}"
    );
    let named = lab
        .exec(
            &top.sentinels[0].0,
            &[
                "redis-cli",
                "-p",
                "26379",
                "sentinel",
                "get-master-addr-by-name",
                MASTER,
            ],
        )
        .await?;
    ensure!(
        named.lines().next() == Some(top.replica_ip.as_str()),
        "the sentinels name the replica: {named}"
    );
    // Did the promoted replica have the counter's last increments? (The
    // tokens increase either way: each is at least the server's clock in
    // µs, and the containers share the host's clock.)
    let fence_key = format!("{ns}:l:{{L{KEY}}}:f");
    let counter = lab
        .exec(&top.replica, &["redis-cli", "get", &fence_key])
        .await?;
    let counter: u64 = counter.trim().parse().unwrap_or(0);
    let replica_had = counter >= last_before;
    println!(
        "redis sentinel: the promoted replica's fencing counter {} the last token issued before the stop ({})",
        if replica_had {
            "had reached"
        } else {
            "was behind"
        },
        last_before
    );
    let v = config.set_json("/app/flag", &1u32).await?;
    ensure!(config.get_json::<u32>("/app/flag").await? == Some(1));
    cache
        .set(
            "k",
            Bytes::from_static(b"after"),
            Some(Duration::from_secs(60)),
        )
        .await?;
    ensure!(cache.get("k").await?.as_deref() == Some(&b"after"[..]));
    println!("redis sentinel: config (version {v}) and cache work on the same backend instance after the failover");
    // The near cache tracks the promoted primary (its connection checked
    // with ROLE): another write there is not read stale after `sync()`.
    let back = Instant::now();
    eventually(
        Duration::from_secs(15),
        "the near cache live again",
        || async { Ok(near.is_live()) },
    )
    .await?;
    near.sync().await;
    ensure!(near.get("k").await?.as_deref() == Some(&b"after"[..]));
    ensure!(near.size().0 == 1, "held near on the new primary");
    cache
        .set("k", Bytes::from_static(b"after, again"), None)
        .await?;
    near.sync().await;
    let read = near.get("k").await?;
    ensure!(
        read.as_deref() == Some(&b"after, again"[..]),
        "stale after the failover: {read:?}"
    );
    println!(
        "redis sentinel: the near cache was live again {:?} after the backend worked, tracking the new primary",
        back.elapsed()
    );
    drop(near);
    backend.purge_namespace().await?;
    backend.close().await?;
    drop(lab);
    Ok(())
}
