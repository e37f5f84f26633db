//! The platform end to end on the real servers (etcd, Redis, MariaDB,
//! Kafka protocol), each role its own process: two logic instances, a
//! gateway and a task consumer. 1,000 sends of which 100 repeat an earlier
//! client message id; one logic instance killed halfway; a rule written to
//! the config center; the metrics endpoints; a graceful stop.
//! Required under `IMINFRA_REQUIRE_BACKENDS`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use im_infra::backend::{Backend, Maintenance};
use im_infra::config::ConfigCenterExt;
use im_infra::ratelimit::{LimiterSettings, Rule};
use im_infra_conformance::servers::server_or_skip;
use im_infra_examples_chat::proto::gateway_client::GatewayClient;
use im_infra_examples_chat::proto::{SendReply, SendRequest};
use im_infra_examples_chat::servers::{config, SERVER_VARS};
use im_infra_examples_chat::{MessageStore, MysqlStore};
use parking_lot::Mutex;
use tonic::transport::Channel;

const SENDS: u32 = 1000;
const KILL_AFTER: usize = 500;

/// One role's process and where it listens.
struct Proc {
    name: &'static str,
    child: Child,
    gateway: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
}

impl Proc {
    /// Starts `chat <role>` with the configuration file `file`; waits for
    /// its ready line.
    fn start(name: &'static str, role: &str, file: &std::path::Path) -> Result<Proc> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chat"))
            .arg(role)
            .env("IMINFRA_CONFIG", file)
            .env(
                "RUST_LOG",
                std::env::var("CHAT_RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if line.starts_with("chat ready:") {
                    let _ = tx.send(line);
                } else {
                    println!("[{name}] {line}");
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                bail!(
                    "{name} did not get ready within 60 s (status {:?})",
                    child.try_wait()
                );
            }
        };
        println!("[{name}] {line}");
        let field = |key: &str| -> Option<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
        };
        Ok(Proc {
            name,
            gateway: field("gateway="),
            metrics: field("metrics="),
            child,
        })
    }

    /// SIGTERM, then the exit status within `bound`.
    fn terminate(mut self, bound: Duration) -> Result<(Duration, std::process::ExitStatus)> {
        let began = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill -TERM {}", self.name);
        while began.elapsed() < bound {
            if let Some(status) = self.child.try_wait()? {
                return Ok((began.elapsed(), status));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        bail!("{} did not exit within {bound:?} of SIGTERM", self.name)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn request(o: u32) -> SendRequest {
    SendRequest {
        user: format!("u{}", o % 10),
        conversation: format!("c{}", o % 20),
        client_msg_id: format!("m{o}"),
        body: format!("message {o}"),
    }
}

/// What the sends saw.
#[derive(Default)]
struct Seen {
    replies: Vec<(u32, SendReply)>,
    failed_calls: usize,
    failures_after_kill: Vec<Duration>,
    slowest_after_kill: Duration,
}

/// Sends `o`'s request until it is answered (a failed call is counted and
/// tried again after 50 ms, with the same client message id, as a client
/// would; 10 s at most).
async fn send_until_answered(
    mut client: GatewayClient<Channel>,
    o: u32,
    seen: &Mutex<Seen>,
    killed_at: &Mutex<Option<Instant>>,
) -> Result<()> {
    let began = Instant::now();
    loop {
        match client.send(request(o)).await {
            Ok(reply) => {
                let mut seen = seen.lock();
                seen.replies.push((o, reply.into_inner()));
                if killed_at.lock().is_some() {
                    seen.slowest_after_kill = seen.slowest_after_kill.max(began.elapsed());
                }
                return Ok(());
            }
            Err(status) => {
                let mut seen = seen.lock();
                seen.failed_calls += 1;
                if let Some(at) = *killed_at.lock() {
                    seen.failures_after_kill.push(at.elapsed());
                }
                println!(
                    "send m{o} failed ({:?} after the kill): {status}",
                    killed_at.lock().map(|t| t.elapsed())
                );
                ensure!(
                    began.elapsed() < Duration::from_secs(10),
                    "m{o} failed for 10 s: {status}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_logic_instances_a_gateway_and_task_store_each_send_once_through_a_failover(
) -> Result<()> {
    for (backend, var) in SERVER_VARS {
        if server_or_skip(backend, var).is_none() {
            return Ok(());
        }
    }
    let run = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let settings = config(&run, |v| std::env::var(v).ok())?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("chat.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&settings)?)?;

    // The store the test reads directly, and the config center it writes.
    let db_settings: im_infra_mysql::MysqlSettings =
        serde_json::from_value(settings["db"].clone())?;
    let db = Arc::new(im_infra_mysql::Db::connect(db_settings).await?);
    let store = MysqlStore::open(
        db.clone(),
        settings["chat"]["table"].as_str().context("table")?,
    )
    .await?;
    let etcd_settings: im_infra_etcd::EtcdSettings =
        serde_json::from_value(settings["etcd"].clone())?;
    let etcd = im_infra_etcd::EtcdBackend::builder()
        .settings(etcd_settings)
        .build()
        .await?;
    let env = settings["env"].as_str().context("env")?.to_owned();

    let task = Proc::start("task", "task", &file)?;
    let logic_a = Proc::start("logic-a", "logic", &file)?;
    let logic_b = Proc::start("logic-b", "logic", &file)?;
    let gateway = Proc::start("gateway", "gateway", &file)?;
    let gateway_addr = gateway.gateway.context("the gateway's address")?;
    let client = GatewayClient::connect(format!("http://{gateway_addr}")).await?;

    // 1,000 sends, 8 at a time; every tenth repeats the client message id
    // of the send five before it. Logic a is killed (SIGKILL: no
    // deregistration) once 500 have been answered.
    let seen = Mutex::new(Seen::default());
    let killed_at: Mutex<Option<Instant>> = Mutex::new(None);
    let answered = AtomicUsize::new(0);
    let mut logic_a = Some(logic_a);
    let began = Instant::now();
    let results: Vec<Result<()>> = futures::stream::iter(0..SENDS)
        .map(|i| {
            let client = client.clone();
            let (seen, killed_at, answered) = (&seen, &killed_at, &answered);
            let o = if i % 10 == 9 { i - 5 } else { i };
            async move {
                send_until_answered(client, o, seen, killed_at).await?;
                Ok(answered.fetch_add(1, Ordering::SeqCst) + 1)
            }
        })
        .buffer_unordered(8)
        .map(|r: Result<usize>| {
            if let Ok(KILL_AFTER) = r {
                if let Some(mut a) = logic_a.take() {
                    a.child.kill().expect("killing logic a");
                    *killed_at.lock() = Some(Instant::now());
                    println!("killed logic a after {KILL_AFTER} answers");
                }
            }
            r.map(drop)
        })
        .collect()
        .await;
    let elapsed = began.elapsed();
    results.into_iter().collect::<Result<Vec<()>>>()?;
    ensure!(logic_a.is_none(), "logic a was never killed");

    let seen = std::mem::take(&mut *seen.lock());
    let mut ids: BTreeMap<u32, u64> = BTreeMap::new();
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for (o, reply) in &seen.replies {
        let first = *ids.entry(*o).or_insert(reply.id);
        ensure!(
            first == reply.id,
            "m{o} got two ids: {first} and {}",
            reply.id
        );
        *served.entry(reply.served_by.clone()).or_default() += 1;
    }
    ensure!(
        ids.len() == 900,
        "{} distinct client messages answered",
        ids.len()
    );
    ensure!(
        served.len() == 2,
        "both logic instances must have served: {served:?}"
    );
    let last_failure = seen.failures_after_kill.iter().max().copied();
    println!(
        "1000 sends in {elapsed:?} ({:.0}/s); served by {served:?}; failed calls seen by the client: {} ({} after the kill, the last {last_failure:?} after it)",
        f64::from(SENDS) / elapsed.as_secs_f64(),
        seen.failed_calls,
        seen.failures_after_kill.len(),
    );
    // The gateway tries a send that could not reach its instance on
    // another: no client sees the kill.
    ensure!(seen.failed_calls == 0, "{} failed calls", seen.failed_calls);
    let slowest = seen.slowest_after_kill;
    println!("the slowest send answered after the kill took {slowest:?} (it waited for the dead instance's claim or lock to lapse)");

    // Exactly the 900 answered messages are stored: none lost, none twice.
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.count().await? < 900 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stored: Vec<u64> = db
        .query(&format!("SELECT id FROM `chat_{run}`"), ())
        .await?;
    let stored: BTreeSet<u64> = stored.into_iter().collect();
    ensure!(
        store.count().await? == 900,
        "{} rows stored",
        store.count().await?
    );
    ensure!(
        stored == ids.values().copied().collect::<BTreeSet<u64>>(),
        "the stored ids are not the answered ids"
    );

    // A rule written to the config center limits a user within a second.
    let center = etcd.config().await?;
    let written = Instant::now();
    center
        .set_json(
            &format!("/config/{env}/im-logic/ratelimit"),
            &LimiterSettings::with_rule("send", Rule::per_minute(1)),
        )
        .await?;
    let mut client_b = client.clone();
    let mut n = 0;
    let limited_after = loop {
        n += 1;
        let req = SendRequest {
            user: "burst".into(),
            conversation: "c-burst".into(),
            client_msg_id: format!("b{n}"),
            body: String::new(),
        };
        match client_b.send(req).await {
            Err(s) if s.code() == tonic::Code::ResourceExhausted => break written.elapsed(),
            Err(s) => bail!("send b{n}: {s}"),
            Ok(_) => {}
        }
        ensure!(
            written.elapsed() < Duration::from_secs(1),
            "not limited a second after the rule was written ({n} sends)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!("a rule written to the center limited the user {limited_after:?} later ({n} sends)");

    // The metrics endpoints show the traffic.
    let scrape = |p: &Proc| -> Result<SocketAddr> {
        p.metrics
            .with_context(|| format!("{}'s metrics address", p.name))
    };
    let (status, body) =
        im_infra_integration_tests::http::get(scrape(&logic_b)?, "/metrics").await?;
    ensure!(status == 200, "logic b /metrics: {status}");
    for needle in [
        "chat_sends_total{",
        "outcome=\"accepted\"",
        "outcome=\"duplicate\"",
        "im_infra_ops_total{",
        "backend=\"redis\"",
        "backend=\"kafka\"",
    ] {
        ensure!(body.contains(needle), "logic b's metrics lack {needle}");
    }
    let (_, body) = im_infra_integration_tests::http::get(scrape(&gateway)?, "/metrics").await?;
    let retries = body
        .lines()
        .find(|l| l.starts_with("chat_gateway_retries_total"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("0");
    println!("the gateway tried {retries} sends again on another instance");
    ensure!(
        retries.parse::<f64>().unwrap_or(0.0) >= 1.0,
        "the kill must have met traffic the gateway moved: {retries} retries"
    );
    let (_, body) = im_infra_integration_tests::http::get(scrape(&task)?, "/metrics").await?;
    ensure!(
        body.contains("chat_stored_total{"),
        "task's metrics lack chat_stored_total"
    );

    // SIGTERM: every remaining role stops cleanly.
    for p in [gateway, logic_b, task] {
        let name = p.name;
        let (took, status) = p.terminate(Duration::from_secs(15))?;
        ensure!(status.success(), "{name} exited with {status}");
        println!("{name} stopped {took:?} after SIGTERM");
    }

    store.drop_table().await?;
    db.close().await?;
    etcd.purge_namespace().await?;
    etcd.close().await?;
    Ok(())
}
