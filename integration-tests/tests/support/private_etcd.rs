//! An `etcd` of the test's own — its own ports, its own directory — that
//! can save a snapshot and later crash and come back restored from it
//! (`etcdctl snapshot restore`), losing every write made since and with
//! its revision back where the snapshot was. The shared server of
//! `scripts/services.sh` is never touched.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use im_infra_conformance::servers::required;

/// The member name, also in `--initial-cluster`.
const NAME: &str = "private";

/// A private single-member etcd, stopped when dropped.
pub struct PrivateEtcd {
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

/// Whether `etcd` and `etcdctl` are on `PATH`; when not, `false` (the
/// test is skipped) — unless `IMINFRA_REQUIRE_BACKENDS` requires etcd:
/// then their absence panics.
fn binaries_or_skip() -> bool {
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
    };
    if on_path("etcd") && on_path("etcdctl") {
        return true;
    }
    if required("etcd") {
        panic!(
            "etcd is required (IMINFRA_REQUIRE_BACKENDS) but etcd or etcdctl is not on PATH \
             (scripts/services.sh install)"
        );
    }
    eprintln!("SKIPPED etcd regression test: etcd or etcdctl is not on PATH");
    false
}

/// A port nothing listens on right now.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Runs `etcdctl` with `args`; fails with its output when it fails.
fn etcdctl(args: &[&str]) -> Result<()> {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(args)
        .output()
        .context("running etcdctl")?;
    if !out.status.success() {
        bail!(
            "etcdctl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl PrivateEtcd {
    /// Starts a member on free ports with an empty data directory; `None`
    /// when the binaries are missing (and not required).
    pub async fn start_or_skip() -> Result<Option<Self>> {
        if !binaries_or_skip() {
            return Ok(None);
        }
        let server = PrivateEtcd {
            client_port: free_port()?,
            peer_port: free_port()?,
            dir: tempfile::tempdir()?,
            child: Mutex::new(None),
        };
        server.spawn().await?;
        Ok(Some(server))
    }

    /// The client endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn snapshot_file(&self) -> PathBuf {
        self.dir.path().join("snapshot.db")
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn spawn(&self) -> Result<()> {
        let log = std::fs::File::create(self.dir.path().join("etcd.log"))?;
        let (client, peer) = (self.endpoint(), self.peer_url());
        let child = Command::new("etcd")
            .args(["--name", NAME, "--data-dir"])
            .arg(self.data_dir())
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("{NAME}={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting etcd")?;
        *self.child() = Some(child);
        let started = Instant::now();
        let endpoints = format!("--endpoints={client}");
        while etcdctl(&[&endpoints, "--dial-timeout=1s", "endpoint", "health"]).is_err() {
            let exited = self
                .child()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                bail!("etcd exited with {status}: {}", self.log());
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!("etcd was not healthy within 20 s: {}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Saves a snapshot of the data (replacing an earlier one).
    pub async fn snapshot(&self) -> Result<()> {
        let file = self.snapshot_file();
        let _ = std::fs::remove_file(&file);
        let endpoints = format!("--endpoints={}", self.endpoint());
        etcdctl(&[&endpoints, "snapshot", "save", path(&file)?])
    }

    /// Kills the member, restores the last [`snapshot`](Self::snapshot)
    /// into a fresh data directory and starts it again on the same ports:
    /// every write acknowledged after the snapshot is gone, and the
    /// revision is the snapshot's again.
    pub async fn crash_and_restore(&self) -> Result<()> {
        self.kill()?;
        std::fs::remove_dir_all(self.data_dir()).context("removing the data directory")?;
        let (data, snapshot) = (self.data_dir(), self.snapshot_file());
        let cluster = format!("--initial-cluster={NAME}={}", self.peer_url());
        let peer = format!("--initial-advertise-peer-urls={}", self.peer_url());
        let data = format!("--data-dir={}", path(&data)?);
        let name = format!("--name={NAME}");
        etcdctl(&[
            "snapshot",
            "restore",
            path(&snapshot)?,
            &data,
            &name,
            &cluster,
            &peer,
        ])?;
        self.spawn().await
    }

    fn kill(&self) -> Result<()> {
        let child = self.child().take();
        if let Some(mut child) = child {
            child.kill().map_err(|e| anyhow!("killing etcd: {e}"))?;
            child.wait()?;
        }
        Ok(())
    }
}

fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
}

impl Drop for PrivateEtcd {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
