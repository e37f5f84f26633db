//! Fault tests against real etcd: a restart during a watch, a lock holder's
//! lease revoked, and a three-member cluster losing its leader.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use im_infra::backend::{Backend, Maintenance};
use im_infra::config::{ConfigCenterExt, WatchOptions};
use im_infra::lock::LockOptions;
use im_infra_conformance::faults::{events_until, set_retrying};
use im_infra_conformance::servers::{server_or_skip, ETCD_ENV};
use im_infra_etcd::{EtcdBackend, EtcdSettings};
use im_infra_integration_tests::services;

/// The tests stop and start the shared server: one at a time.
static SERVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn backend(endpoints: &str, ns: &str) -> Result<EtcdBackend> {
    let mut cfg = EtcdSettings::with_endpoints(endpoints.split(',').map(str::to_owned));
    cfg.namespace = ns.to_owned();
    cfg.request_timeout = Duration::from_secs(2);
    cfg.connect_timeout = Duration::from_secs(3);
    Ok(EtcdBackend::builder().settings(cfg).build().await?)
}

fn ns() -> String {
    format!("/fault-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_across_an_etcd_restart_loses_no_update() -> Result<()> {
    let _one = SERVER.lock().await;
    let Some(eps) = server_or_skip("etcd", ETCD_ENV) else {
        return Ok(());
    };
    let ns = ns();
    let etcd = backend(&eps, &ns).await?;
    let center = etcd.config().await?;
    let mut events = center.watch("/svc/flag", WatchOptions::default()).await?;
    let mut last = 0;
    let writes = async {
        for i in 0..1000u32 {
            if i == 500 {
                services(&["restart", "etcd"])?;
            }
            last = set_retrying(&*center, "/svc/flag", &i, Duration::from_millis(50)).await?;
        }
        anyhow::Ok(last)
    };
    let last = tokio::time::timeout(Duration::from_secs(120), writes).await??;
    let seen: Vec<u64> = events_until(&mut events, last, Duration::from_secs(30))
        .await?
        .iter()
        .map(|e| e.version)
        .collect();
    ensure!(seen.len() == 1000, "{} of 1000 updates seen", seen.len());
    ensure!(seen.windows(2).all(|w| w[0] < w[1]), "updates in order");
    ensure!(
        center.get_json::<u32>("/svc/flag").await? == Some(999),
        "the final value"
    );
    println!("etcd: the watch saw all 1000 updates across the restart, ending on revision {last}");
    etcd.purge_namespace().await?;
    etcd.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_holder_lease_reports_loss_and_the_waiter_takes_over() -> Result<()> {
    let _one = SERVER.lock().await;
    let Some(eps) = server_or_skip("etcd", ETCD_ENV) else {
        return Ok(());
    };
    let ns = ns();
    let holder_side = backend(&eps, &ns).await?;
    let waiter_side = backend(&eps, &ns).await?;
    let opts = LockOptions::new(Duration::from_secs(30)).wait(Duration::from_secs(30));
    let held = holder_side.lock().await?.acquire("ledger", opts).await?;
    let token = held.fencing_token();
    let waiter_locks = waiter_side.lock().await?;
    let waiter = tokio::spawn(async move { waiter_locks.acquire("ledger", opts).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        !waiter.is_finished(),
        "the waiter waits while the lock is held"
    );

    // Revoke the holder's lease behind its back.
    let mut raw = holder_side.client()?;
    let owner = raw
        .get(
            format!("{ns}/locks/ledger/"),
            Some(etcd_client::GetOptions::new().with_prefix().with_sort(
                etcd_client::SortTarget::Create,
                etcd_client::SortOrder::Ascend,
            )),
        )
        .await?;
    let lease = owner.kvs().first().context("the holder's key")?.lease();
    holder_side.leases().revoke(lease).await?;

    let lost = held.lost();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), lost.cancelled())
        .await
        .context("the guard did not report the loss")?;
    println!(
        "etcd: the holder learned of its lost lease after {:?}",
        started.elapsed()
    );
    ensure!(!held.is_held());
    let next = tokio::time::timeout(Duration::from_secs(10), waiter).await???;
    ensure!(
        next.fencing_token() > token,
        "{} after {token}",
        next.fencing_token()
    );
    next.release().await?;
    holder_side.purge_namespace().await?;
    holder_side.close().await?;
    waiter_side.close().await?;
    Ok(())
}

/// Three etcd members on free loopback ports in a temporary folder.
struct Cluster {
    dir: tempfile::TempDir,
    members: Vec<(String, Child, u16)>,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Cluster {
    fn start() -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let ports: Vec<(u16, u16)> = (0..3)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<Result<_>>()?;
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let log = std::fs::File::create(dir.path().join(format!("{name}.log")))?;
            let child = Command::new("etcd")
                .args(["--name", &name])
                .arg("--data-dir")
                .arg(dir.path().join(&name))
                .args([
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                ])
                .args([
                    "--initial-cluster",
                    &initial,
                    "--initial-cluster-state",
                    "new",
                ])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting etcd (installed by scripts/services.sh)")?;
            members.push((name, child, *client));
        }
        Ok(Cluster { dir, members })
    }

    fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|(_, _, p)| format!("http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.members {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = &self.dir;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_cluster_keeps_working_when_its_leader_stops() -> Result<()> {
    // Needs the etcd binary the servers script installs; skipped with it.
    if server_or_skip("etcd", ETCD_ENV).is_none() {
        return Ok(());
    }
    let mut cluster = Cluster::start()?;
    let eps = cluster.endpoints();
    let started = Instant::now();
    let etcd = loop {
        match backend(&eps, "/cluster").await {
            Ok(b) => break b,
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => bail!("the cluster did not form: {e}"),
        }
    };
    let center = etcd.config().await?;
    // A member that is still starting refuses connections: the cluster is
    // ready once a write goes through.
    loop {
        match center.set_json("/k", &0).await {
            Ok(_) => break,
            Err(e) if e.is_retryable() && started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => bail!("the cluster took no write: {e}"),
        }
    }

    // Find the leader: ask each member for its status.
    let mut leader = None;
    for (i, (_, _, port)) in cluster.members.iter().enumerate() {
        let mut c =
            etcd_client::Client::connect([format!("http://127.0.0.1:{port}")], None).await?;
        let s = c.status().await?;
        if s.leader() == s.header().map(|h| h.member_id()).unwrap_or(0) {
            leader = Some(i);
        }
    }
    let leader = leader.context("no leader found")?;
    let (name, child, _) = &mut cluster.members[leader];
    child.kill()?;
    child.wait()?;
    let killed = Instant::now();
    println!("etcd cluster: leader {name} stopped");

    // Writes continue once the remaining two elect a new leader.
    let mut failures = 0;
    let mut first_success = None;
    let mut writes = 0;
    while killed.elapsed() < Duration::from_secs(20) && writes < 50 {
        match center.set_json("/k", &writes).await {
            Ok(_) => {
                writes += 1;
                first_success.get_or_insert_with(|| killed.elapsed());
            }
            Err(e) => {
                ensure!(
                    e.is_retryable(),
                    "a write failed with a non-retryable error: {e}"
                );
                failures += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let stall = first_success.context("no write succeeded after the leader stopped")?;
    ensure!(
        writes == 50,
        "only {writes} writes succeeded after the leader stopped"
    );
    // Reads too may first reach the stopped member: retry those.
    let mut value = None;
    for _ in 0..50 {
        match center.get_json::<u32>("/k").await {
            Ok(v) => {
                value = v;
                break;
            }
            Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => return Err(e.into()),
        }
    }
    ensure!(value == Some(49), "the last write is read back: {value:?}");
    println!("etcd cluster: writes stalled {stall:?} ({failures} retryable failures) after the leader stopped");
    etcd.close().await?;
    Ok(())
}
