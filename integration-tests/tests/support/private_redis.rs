//! A `redis-server` of the test's own — its own port, its own directory —
//! that can take a snapshot and later crash and come back from that older
//! snapshot, losing every write made since: what a restore from an old RDB
//! file or a failover to a lagging replica does to the clients. The shared
//! servers of `scripts/services.sh` are never touched.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use im_infra_conformance::servers::required;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The server binary (installed by `scripts/services.sh install`).
const BINARY: &str = "redis-server";

/// A private Redis server, stopped when dropped.
pub struct PrivateRedis {
    binary: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

/// `redis-server` on `PATH`, or `None` (the test is skipped) — unless
/// `IMINFRA_REQUIRE_BACKENDS` requires Redis: then its absence panics.
fn binary_or_skip() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(BINARY))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => Some(p),
        None if required("redis") => panic!(
            "redis is required (IMINFRA_REQUIRE_BACKENDS) but {BINARY} is not on PATH \
             (scripts/services.sh install)"
        ),
        None => {
            eprintln!("SKIPPED redis regression test: {BINARY} is not on PATH");
            None
        }
    }
}

/// A port nothing listens on right now.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// One command in RESP; returns the first line of the reply.
async fn command(port: u16, args: &[&str]) -> Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).await?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 256];
    while !reply.ends_with(b"\r\n") {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            bail!("redis closed the connection after {args:?}");
        }
        reply.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&reply);
    Ok(line.lines().next().unwrap_or_default().to_owned())
}

impl PrivateRedis {
    /// Starts a server on a free port with an empty directory, persistence
    /// only by explicit `SAVE`; `None` when the binary is missing (and not
    /// required).
    pub async fn start_or_skip() -> Result<Option<Self>> {
        let Some(binary) = binary_or_skip() else {
            return Ok(None);
        };
        let server = PrivateRedis {
            binary,
            port: free_port()?,
            dir: tempfile::tempdir()?,
            child: Mutex::new(None),
        };
        server.spawn().await?;
        Ok(Some(server))
    }

    /// The URL of the server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn data_file(&self) -> PathBuf {
        self.dir.path().join("dump.rdb")
    }

    fn snapshot_file(&self) -> PathBuf {
        self.dir.path().join("snapshot.rdb")
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn spawn(&self) -> Result<()> {
        let log = std::fs::File::create(self.dir.path().join("redis.log"))?;
        let child = Command::new(&self.binary)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--dbfilename",
                "dump.rdb",
            ])
            .args(["--daemonize", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        *self.child() = Some(child);
        let started = Instant::now();
        loop {
            if let Ok(pong) = command(self.port, &["PING"]).await {
                if pong == "+PONG" {
                    return Ok(());
                }
            }
            let exited = self
                .child()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                bail!("{BINARY} exited with {status}: {}", self.log());
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!("{BINARY} did not answer PING within 20 s: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// `SAVE`s the data set and keeps a copy of the file aside (replacing
    /// an earlier one).
    pub async fn snapshot(&self) -> Result<()> {
        let reply = command(self.port, &["SAVE"]).await?;
        if reply != "+OK" {
            bail!("SAVE answered {reply:?}");
        }
        std::fs::copy(self.data_file(), self.snapshot_file())
            .context("copying the snapshot aside")?;
        Ok(())
    }

    /// Kills the server (no save on the way down), puts the copy of the
    /// last [`snapshot`](Self::snapshot) back as its data file and starts it
    /// again on the same port: every write acknowledged after the snapshot
    /// is gone.
    pub async fn crash_and_restore(&self) -> Result<()> {
        self.kill()?;
        std::fs::copy(self.snapshot_file(), self.data_file()).context("restoring the snapshot")?;
        self.spawn().await
    }

    fn kill(&self) -> Result<()> {
        let child = self.child().take();
        if let Some(mut child) = child {
            child.kill().map_err(|e| anyhow!("killing {BINARY}: {e}"))?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
