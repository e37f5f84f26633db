//! A three-member etcd cluster on private Docker networks whose leader is
//! cut off from its peers with `docker network disconnect`.
//!
//! Each member is on two networks: `peer` (the Raft traffic: members know
//! each other only by their aliases there, `m0`..`m2`) and `client` (the
//! test process reaches every member at its address there). Cutting the
//! leader off `peer` partitions it from the other two while a client
//! pinned to it still reaches it through `client`.
//!
//! - the majority's client (the two other members) locks, writes config and
//!   registers again after a bounded stall (each measured);
//! - the pinned client's operations fail with retryable errors within a
//!   bound, and its lock guard reports the loss before the majority's
//!   client is granted the lock;
//! - after the reconnection the rejoined member serves every config version
//!   the majority wrote (a watch from before the cut delivers each one),
//!   the pinned client's registration comes back by itself, and every
//!   instance is listed once.
//!
//! Needs Docker and `im-infra/etcd:local` (`scripts/images.sh build`);
//! skipped without them unless `IMINFRA_REQUIRE_BACKENDS` is `all` (or
//! names `docker`). Prints what it measured (run with `--nocapture`).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use im_infra::backend::{Backend, Maintenance};
use im_infra::config::{ConfigCenterExt, WatchOptions};
use im_infra::lock::LockOptions;
use im_infra::registry::ServiceInstance;
use im_infra::{ErrorKind, RetrySettings};
use im_infra_conformance::faults::events_until;
use im_infra_etcd::{EtcdBackend, EtcdSettings};
use im_infra_integration_tests::docker::{docker_or_skip, Lab, Spec, ETCD_IMAGE};

/// TTL of the locks and registrations (etcd leases are whole seconds).
const TTL: Duration = Duration::from_secs(3);
/// Bound of one request of the pinned client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound of one request of the majority's client: short, so that the
/// stall it measures is the cluster's, not mostly its own timeout.
const MAJORITY_REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// Bound of a failing request of the pinned client: the request timeout
/// and some slack.
const FAIL_BOUND: Duration = Duration::from_millis(3500);
/// Bound of every wait (the cluster forming, the stall, the rejoin).
const BOUND: Duration = Duration::from_secs(30);
const SERVICE: &str = "orders";
/// The lock the pinned client holds when it is cut off.
const HELD: &str = "ledger";
/// Config keys the majority writes during the cut.
const KEYS: [&str; 3] = ["/app/flag", "/app/limits", "/app/routes"];
/// Writes per key during the cut.
const WRITES: u32 = 10;

struct Member {
    name: String,
    container: String,
    endpoint: String,
}

/// Starts the three members; returns the peer network and the members.
async fn start_cluster(lab: &Lab) -> Result<(String, Vec<Member>)> {
    let client_net = lab.network("client").await?;
    let peer_net = lab.network("peer").await?;
    let initial = (0..3)
        .map(|i| format!("m{i}=http://m{i}:2380"))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Vec::new();
    for i in 0..3 {
        let name = format!("m{i}");
        // The advertised client URL is informative only: the clients are
        // given the members' addresses on `client` and never sync the
        // member list (etcd-client uses the endpoints it is given).
        let spec = Spec::new(&name, ETCD_IMAGE, &client_net)
            .also_on(&peer_net, &name)
            .env("ETCD_NAME", &name)
            .env(
                "ETCD_INITIAL_ADVERTISE_PEER_URLS",
                format!("http://{name}:2380"),
            )
            .env("ETCD_ADVERTISE_CLIENT_URLS", format!("http://{name}:2379"))
            .env("ETCD_INITIAL_CLUSTER", &initial)
            .env("ETCD_INITIAL_CLUSTER_STATE", "new")
            .env("ETCD_INITIAL_CLUSTER_TOKEN", lab.name());
        let container = lab.start(&spec).await?;
        members.push(Member {
            name,
            container,
            endpoint: String::new(),
        });
    }
    for m in &mut members {
        // The start script prints it once the member answers a health
        // check, which needs a leader: the cluster has formed.
        lab.wait_for_line(&m.container, "im-infra: etcd ready", BOUND)
            .await?;
        m.endpoint = format!("http://{}:2379", lab.ip(&m.container, &client_net).await?);
    }
    Ok((peer_net, members))
}

/// The index of the member that is the leader.
async fn leader(members: &[Member]) -> Result<usize> {
    for (i, m) in members.iter().enumerate() {
        let status = async {
            let mut c = etcd_client::Client::connect([m.endpoint.as_str()], None).await?;
            c.status().await
        };
        let s = tokio::time::timeout(REQUEST_TIMEOUT, status)
            .await
            .context("status timed out")??;
        if s.header().map(|h| h.member_id()) == Some(s.leader()) {
            return Ok(i);
        }
    }
    bail!("no member says it is the leader")
}

async fn backend(endpoints: &[&str], ns: &str, request_timeout: Duration) -> Result<EtcdBackend> {
    let mut cfg = EtcdSettings::with_endpoints(endpoints.iter().map(|e| e.to_string()));
    cfg.namespace = ns.to_owned();
    cfg.request_timeout = request_timeout;
    cfg.connect_timeout = Duration::from_secs(3);
    cfg.health_check_interval = Duration::from_secs(1);
    cfg.health_check_timeout = Duration::from_secs(1);
    // Re-registration after a lost lease: quickly, forever.
    cfg.retry = RetrySettings {
        max_retries: 5,
        initial_interval: Duration::from_millis(100),
        max_interval: Duration::from_millis(500),
        multiplier: 2.0,
        jitter: true,
    };
    Ok(EtcdBackend::builder().settings(cfg).build().await?)
}

/// Calls `f` until it succeeds, every 50 ms while it fails retryably;
/// returns its value, when it succeeded (since `since`) and how many
/// retryable failures came first.
async fn first_success<T, F, Fut>(
    what: &str,
    since: Instant,
    mut f: F,
) -> Result<(T, Duration, u32)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = im_infra::Result<T>>,
{
    let mut failures = 0;
    loop {
        match f().await {
            Ok(v) => return Ok((v, since.elapsed(), failures)),
            Err(e) if e.is_retryable() => {
                failures += 1;
                ensure!(
                    since.elapsed() < BOUND,
                    "{what}: still failing {BOUND:?} after the cut: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => bail!("{what}: a non-retryable error: {e}"),
        }
    }
}

/// One operation of the pinned client during the cut: it must fail
/// retryably within [`FAIL_BOUND`]. Returns how long it took and the kind.
async fn fails_retryably<T: std::fmt::Debug>(
    what: &str,
    op: impl Future<Output = im_infra::Result<T>>,
) -> Result<(Duration, ErrorKind)> {
    let started = Instant::now();
    let r = tokio::time::timeout(FAIL_BOUND * 2, op)
        .await
        .with_context(|| format!("pinned {what}: no answer within {:?}", FAIL_BOUND * 2))?;
    let took = started.elapsed();
    match r {
        Ok(v) => bail!("pinned {what} succeeded on the cut-off member: {v:?}"),
        Err(e) => {
            ensure!(e.is_retryable(), "pinned {what}: {e} is not retryable");
            ensure!(
                took <= FAIL_BOUND,
                "pinned {what} failed only after {took:?} (bound {FAIL_BOUND:?})"
            );
            Ok((took, e.kind()))
        }
    }
}

fn instance(id: &str) -> ServiceInstance {
    ServiceInstance::new(SERVICE, id, format!("10.0.0.1:{}", 7000 + id.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_cut_off_from_its_peers() -> Result<()> {
    if !docker_or_skip("the etcd cluster partition test", &[ETCD_IMAGE]).await {
        return Ok(());
    }
    let lab = Lab::new("etcd-cut").await?;
    let started = Instant::now();
    let (peer_net, members) = start_cluster(&lab).await?;
    println!(
        "etcd cluster: three members formed a cluster in {:?}",
        started.elapsed()
    );
    let l = leader(&members).await?;
    let cut_off = &members[l];
    let others: Vec<&str> = members
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != l)
        .map(|(_, m)| m.endpoint.as_str())
        .collect();
    let ns = format!("/cut-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let pinned = backend(&[cut_off.endpoint.as_str()], &ns, REQUEST_TIMEOUT).await?;
    let majority = backend(&others, &ns, MAJORITY_REQUEST_TIMEOUT).await?;

    // Before the cut: the pinned client holds a lock, is registered and
    // has written config; the majority's client is registered too.
    let p_lock = pinned.lock().await?;
    let p_config = pinned.config().await?;
    let p_registry = pinned.registry().await?;
    let p_discovery = pinned.discovery().await?;
    let m_lock = majority.lock().await?;
    let m_config = majority.config().await?;
    let m_registry = majority.registry().await?;
    let m_discovery = majority.discovery().await?;
    let held = p_lock.acquire(HELD, LockOptions::new(TTL)).await?;
    let held_token = held.fencing_token();
    p_registry.register(&instance("pinned-1"), TTL).await?;
    m_registry.register(&instance("majority-1"), TTL).await?;
    let before = p_config.set_json(KEYS[0], &0u32).await?;
    let lost = held.lost();
    let lost_at = tokio::spawn(async move {
        lost.cancelled().await;
        Instant::now()
    });
    // A renewal or two while connected.
    tokio::time::sleep(TTL / 2).await;
    ensure!(held.is_held(), "the lock is renewed while connected");

    let asked = Instant::now();
    lab.disconnect(&peer_net, &cut_off.container).await?;
    let cut = Instant::now();
    println!(
        "etcd cluster: leader {} cut off from its peers (docker network disconnect took {:?})",
        cut_off.name,
        cut - asked
    );

    // The majority: a lock nobody holds, config and a registration, each
    // until it first succeeds; then the rest of the writes.
    let free_lock = first_success("majority lock", cut, || async {
        let g = m_lock.acquire("free", LockOptions::new(TTL)).await?;
        g.release().await
    });
    let config = async {
        let mut written: BTreeMap<&str, Vec<(u32, u64)>> = BTreeMap::new();
        let (v, stall, failures) = first_success("majority config set", cut, || {
            m_config.set_json(KEYS[0], &1u32)
        })
        .await?;
        written.entry(KEYS[0]).or_default().push((1, v));
        for n in 2..=WRITES {
            for key in KEYS {
                let (v, _, _) =
                    first_success("majority config set", cut, || m_config.set_json(key, &n))
                        .await?;
                written.entry(key).or_default().push((n, v));
            }
        }
        anyhow::Ok((written, stall, failures))
    };
    let majority_2 = instance("majority-2");
    let registration = first_success("majority registration", cut, || {
        m_registry.register(&majority_2, TTL)
    });
    // The lock the pinned client held: polled, so that the instant an
    // attempt began and what the pinned guard believed then are known.
    let taken_over = async {
        let mut failures = 0;
        loop {
            let attempt_at = Instant::now();
            let believed = held.is_held();
            match m_lock.try_acquire(HELD, LockOptions::new(TTL)).await {
                Ok(Some(g)) => {
                    ensure!(
                        !believed,
                        "the majority was granted the lock while the pinned holder still believed it held it"
                    );
                    return anyhow::Ok((g, attempt_at, Instant::now(), failures));
                }
                Ok(None) => {}
                Err(e) if e.is_retryable() => failures += 1,
                Err(e) => bail!("majority try_acquire: {e}"),
            }
            ensure!(cut.elapsed() < BOUND, "the held lock never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // The pinned client: every operation fails retryably, within a bound.
    let pinned_ops = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let pinned_2 = instance("pinned-2");
        let (get, set, lock, register, discover) = tokio::join!(
            fails_retryably("config get", p_config.get_json::<u32>(KEYS[0])),
            fails_retryably("config set", p_config.set_json(KEYS[1], &99u32)),
            fails_retryably("lock", async {
                let g = p_lock
                    .try_acquire("pinned-other", LockOptions::new(TTL))
                    .await?;
                Ok(g.map(|g| g.fencing_token()))
            }),
            fails_retryably("register", p_registry.register(&pinned_2, TTL)),
            fails_retryably("discover", p_discovery.instances(SERVICE)),
        );
        anyhow::Ok([
            ("config get", get?),
            ("config set", set?),
            ("lock", lock?),
            ("register", register?),
            ("discover", discover?),
        ])
    };
    let (free_lock, config, registration, taken_over, pinned_ops) =
        tokio::join!(free_lock, config, registration, taken_over, pinned_ops);
    let ((), lock_stall, lock_failures) = free_lock?;
    let (written, config_stall, config_failures) = config?;
    let ((), register_stall, register_failures) = registration?;
    let (next, attempt_at, granted_at, takeover_failures) = taken_over?;
    let pinned_ops = pinned_ops?;

    ensure!(
        lost_at.is_finished(),
        "the pinned guard's lost had not fired"
    );
    let lost_at = lost_at.await?;
    ensure!(
        lost_at <= attempt_at,
        "the pinned guard's lost fired after the majority's successful attempt began"
    );
    ensure!(!held.is_held(), "the pinned guard no longer holds the lock");
    ensure!(
        next.fencing_token() > held_token,
        "token {} after {held_token}",
        next.fencing_token()
    );
    println!(
        "etcd cluster: majority stall after the cut: lock {lock_stall:?} ({lock_failures} retryable failures), \
         config set {config_stall:?} ({config_failures}), registration {register_stall:?} ({register_failures})"
    );
    println!(
        "etcd cluster: the pinned guard's lost fired {:?} after the cut; the majority's winning attempt began {:?} later \
         (granted {:?} after the cut, {takeover_failures} retryable failures first)",
        lost_at - cut,
        attempt_at - lost_at,
        granted_at - cut
    );
    for (what, (took, kind)) in &pinned_ops {
        println!("etcd cluster: pinned {what} failed in {took:?} with {kind:?} (retryable)");
    }

    // The majority is done with the lock: a rejoining etcd 3.4 member
    // (pre-vote is off by default) may force an election that outlasts the
    // guard's TTL, and the guard would rightly report that loss.
    let next_token = next.fencing_token();
    next.release().await?;

    // Reconnect the cut-off member, while the majority keeps reading.
    let probing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let probe = tokio::spawn({
        let (center, probing) = (m_config.clone(), probing.clone());
        async move {
            // The longest time from a failure's start to the next success.
            let (mut longest, mut failing_since) = (Duration::ZERO, None::<Instant>);
            while probing.load(std::sync::atomic::Ordering::Relaxed) {
                let at = Instant::now();
                match center.get_json::<u32>(KEYS[0]).await {
                    Ok(_) => {
                        if let Some(since) = failing_since.take() {
                            longest = longest.max(since.elapsed());
                        }
                    }
                    Err(_) => {
                        failing_since.get_or_insert(at);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            longest.max(failing_since.map_or(Duration::ZERO, |s| s.elapsed()))
        }
    });
    lab.connect(&peer_net, &cut_off.container, &cut_off.name)
        .await?;
    let rejoined = Instant::now();
    let (_, answered, _) = first_success("pinned config get after the rejoin", rejoined, || {
        p_config.get_json::<u32>(KEYS[0])
    })
    .await?;
    let want: Vec<&str> = vec!["majority-1", "majority-2", "pinned-1"];
    let listed = |discovery: std::sync::Arc<dyn im_infra::registry::ServiceDiscovery>| async move {
        let mut ids: Vec<String> = discovery
            .instances(SERVICE)
            .await?
            .into_iter()
            .map(|i| i.id)
            .collect();
        ids.sort();
        anyhow::Ok(ids)
    };
    let mut ids = listed(m_discovery.clone()).await?;
    while ids != want {
        let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
        ensure!(
            unique.len() == ids.len(),
            "an instance listed twice: {ids:?}"
        );
        ensure!(
            ids.iter().all(|i| want.contains(&i.as_str())),
            "an instance that should not be registered: {ids:?}"
        );
        ensure!(
            rejoined.elapsed() < BOUND,
            "after the rejoin the instances are {ids:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        ids = listed(m_discovery.clone()).await?;
    }
    let registered_again = rejoined.elapsed();
    ensure!(
        listed(p_discovery.clone()).await? == want,
        "the rejoined member lists the same instances once each"
    );
    probing.store(false, std::sync::atomic::Ordering::Relaxed);
    let majority_gap = probe.await?;
    println!(
        "etcd cluster: after the reconnection the pinned client answered in {answered:?}; its registration was back after {registered_again:?}; instances {want:?} once each; the majority's reads stalled at most {majority_gap:?} meanwhile"
    );

    // No config version lost: the rejoined member serves the last version
    // of each key, and a watch from before the cut delivers every one.
    let last = written
        .values()
        .flat_map(|w| w.iter().map(|(_, v)| *v))
        .max()
        .context("nothing written")?;
    for (key, writes) in &written {
        ensure!(
            writes.windows(2).all(|w| w[0].1 < w[1].1) && writes[0].1 > before,
            "{key}: versions increase: {writes:?}"
        );
        let (n, v) = *writes.last().context("writes")?;
        for (side, center) in [("pinned", &p_config), ("majority", &m_config)] {
            let got = center.get_with_version(key).await?.context("the key")?;
            ensure!(
                got.version == v && got.value == serde_json::to_vec(&n)?,
                "{side}: {key} is {got:?}, not version {v} of {n}"
            );
        }
    }
    let mut watch = p_config
        .watch_prefix("/app/", WatchOptions::after(before))
        .await?;
    let seen: Vec<(String, u64)> = events_until(&mut watch, last, Duration::from_secs(10))
        .await?
        .into_iter()
        .map(|e| (e.key, e.version))
        .collect();
    let mut expected: Vec<(String, u64)> = written
        .iter()
        .flat_map(|(k, w)| w.iter().map(move |(_, v)| (k.to_string(), *v)))
        .collect();
    expected.sort_by_key(|(_, v)| *v);
    ensure!(
        seen == expected,
        "the watch from before the cut delivered {seen:?}, not {expected:?}"
    );
    println!(
        "etcd cluster: all {} config versions written during the cut are on the rejoined member (versions {}..={last})",
        expected.len(),
        expected[0].1
    );

    // The old guard's release is refused; the lock goes on in order.
    let released = held.release().await;
    ensure!(
        released.as_ref().err().map(|e| e.kind()) == Some(ErrorKind::LockNotHeld),
        "the old holder's release after the rejoin: {released:?}"
    );
    let again = p_lock.acquire(HELD, LockOptions::new(TTL)).await?;
    ensure!(again.fencing_token() > next_token, "tokens increase");
    again.release().await?;

    majority.purge_namespace().await?;
    let _ = tokio::time::timeout(Duration::from_secs(10), pinned.close()).await;
    majority.close().await?;
    drop(lab);
    Ok(())
}
