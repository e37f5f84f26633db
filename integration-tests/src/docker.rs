//! Several servers on private Docker networks, for the cluster fault tests
//! (`tests/etcd_cluster_faults.rs`, `tests/redis_sentinel_faults.rs`),
//! driven through the `docker` CLI on the local images that
//! `scripts/images.sh build` makes (none can be pulled).
//!
//! A [`Lab`] names everything it creates `iminfra-<test>-<random>-...`,
//! labels it `im-infra.lab` (its name) and `im-infra.pid` (this process),
//! and removes its containers and networks when dropped — also when the
//! test fails or panics. A lab whose process died without dropping it (a
//! killed test) is removed by the next [`Lab::new`] in any test process.
//!
//! The test process reaches a container at its address on one of its
//! networks (the host routes to Docker's bridge networks), so nothing is
//! published on host ports; a container on two networks stays reachable
//! through one while it is cut off from the other
//! ([`Lab::disconnect`]).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use im_infra_conformance::servers::required;
use parking_lot::Mutex;

/// The image of etcd (3.4, `etcd` and `etcdctl`; client port 2379, peer
/// port 2380; reads `ETCD_*` variables).
pub const ETCD_IMAGE: &str = "im-infra/etcd:local";
/// The image of Redis (7.0, `redis-server`, `redis-sentinel`,
/// `redis-cli`; port 6379).
pub const REDIS_IMAGE: &str = "im-infra/redis:local";

/// The label every lab puts on what it creates (value: the lab's name).
const LAB_LABEL: &str = "im-infra.lab";
/// The label holding the pid of the process that owns the lab.
const PID_LABEL: &str = "im-infra.pid";

/// The bound of one `docker` command: a stuck engine fails the test (and
/// its clean-up) instead of hanging it.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);

/// The standard output (trimmed) of a finished `docker args`; fails with
/// its standard error.
fn finish(args: &[&str], out: std::io::Result<std::process::Output>) -> Result<String> {
    let out = out.context("running docker")?;
    if !out.status.success() {
        bail!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs `docker args` (within [`DOCKER_TIMEOUT`]) and returns its standard
/// output (trimmed); fails with its standard error.
pub async fn docker(args: &[&str]) -> Result<String> {
    let run = tokio::process::Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DOCKER_TIMEOUT, run)
        .await
        .with_context(|| {
            format!(
                "docker {} did not end within {DOCKER_TIMEOUT:?}",
                args.join(" ")
            )
        })?;
    finish(args, out)
}

/// The same, blocking (for `Drop`), killed after [`DOCKER_TIMEOUT`].
fn docker_blocking(args: &[&str]) -> Result<String> {
    let mut child = std::process::Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running docker")?;
    let deadline = Instant::now() + DOCKER_TIMEOUT;
    while child.try_wait().context("waiting for docker")?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "docker {} did not end within {DOCKER_TIMEOUT:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    finish(args, child.wait_with_output())
}

/// Why the Docker tests cannot run here (no `docker`, no engine, an image
/// missing), or `None` when they can.
pub async fn missing(images: &[&str]) -> Option<String> {
    if let Err(e) = docker(&["version", "--format", "{{.Server.Version}}"]).await {
        return Some(format!("no Docker engine answers ({e:#})"));
    }
    for image in images {
        if docker(&["image", "inspect", "--format", "{{.Id}}", image])
            .await
            .is_err()
        {
            return Some(format!("the image {image} does not exist"));
        }
    }
    None
}

/// Whether the test `what` can run: Docker and `images` are there. If not,
/// skips it loudly (prints why and returns `false`), unless
/// `IMINFRA_REQUIRE_BACKENDS` is `all` or names `docker`: then panics,
/// naming the command that makes the images.
pub async fn docker_or_skip(what: &str, images: &[&str]) -> bool {
    let Some(why) = missing(images).await else {
        return true;
    };
    if required("docker") {
        panic!(
            "{what} needs Docker and the local images (IMINFRA_REQUIRE_BACKENDS): {why}; \
             run scripts/images.sh build"
        );
    }
    eprintln!("SKIPPED {what}: {why} (scripts/images.sh build makes the images)");
    false
}

/// What to run in one container.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    /// Short name; the container is `<lab>-<name>`.
    pub name: String,
    /// The image.
    pub image: String,
    /// The network it starts on.
    pub network: String,
    /// Its alias on `network` (a name other containers of that network
    /// reach it by).
    pub alias: Option<String>,
    /// Further networks it is connected to before it starts, each with an
    /// alias.
    pub more_networks: Vec<(String, String)>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// The command, replacing the image's (empty: the image's own).
    pub command: Vec<String>,
}

impl Spec {
    /// A container `name` of `image` on `network` (no alias there).
    pub fn new(name: &str, image: &str, network: &str) -> Spec {
        Spec {
            name: name.to_owned(),
            image: image.to_owned(),
            network: network.to_owned(),
            ..Spec::default()
        }
    }

    /// Gives it `alias` on its first network.
    #[must_use]
    pub fn alias(mut self, alias: &str) -> Spec {
        self.alias = Some(alias.to_owned());
        self
    }

    /// Adds an environment variable.
    #[must_use]
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Spec {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// Replaces the image's command.
    #[must_use]
    pub fn command<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Spec {
        self.command = args.into_iter().map(Into::into).collect();
        self
    }

    /// Also connects it to `network` (before it starts), as `alias`.
    #[must_use]
    pub fn also_on(mut self, network: &str, alias: &str) -> Spec {
        self.more_networks
            .push((network.to_owned(), alias.to_owned()));
        self
    }
}

/// Containers and networks of one test, removed when dropped.
pub struct Lab {
    name: String,
    containers: Mutex<Vec<String>>,
    networks: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab").field("name", &self.name).finish()
    }
}

impl Lab {
    /// A lab for the test `test` (letters, digits, `-`), after removing
    /// what labs of dead processes left behind.
    pub async fn new(test: &str) -> Result<Lab> {
        remove_orphans().await;
        let id = uuid::Uuid::new_v4().simple().to_string();
        Ok(Lab {
            name: format!("iminfra-{test}-{}", &id[..8]),
            containers: Mutex::new(Vec::new()),
            networks: Mutex::new(Vec::new()),
        })
    }

    /// The lab's name, the prefix of everything it creates.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn labels(&self) -> [String; 4] {
        [
            "--label".into(),
            format!("{LAB_LABEL}={}", self.name),
            "--label".into(),
            format!("{PID_LABEL}={}", std::process::id()),
        ]
    }

    /// Creates the network `<lab>-<suffix>`; returns its name.
    pub async fn network(&self, suffix: &str) -> Result<String> {
        let name = format!("{}-{suffix}", self.name);
        let labels = self.labels();
        let mut args = vec!["network", "create"];
        args.extend(labels.iter().map(String::as_str));
        args.push(&name);
        docker(&args).await?;
        self.networks.lock().push(name.clone());
        Ok(name)
    }

    /// The full name of the container `name`.
    pub fn container(&self, name: &str) -> String {
        format!("{}-{name}", self.name)
    }

    /// Creates the container of `spec`, connects it to its further
    /// networks, and starts it; returns its full name.
    pub async fn start(&self, spec: &Spec) -> Result<String> {
        let name = self.container(&spec.name);
        let labels = self.labels();
        let mut args: Vec<String> = vec![
            "create".into(),
            "--name".into(),
            name.clone(),
            "--network".into(),
            spec.network.clone(),
        ];
        if let Some(alias) = &spec.alias {
            args.extend(["--network-alias".into(), alias.clone()]);
        }
        args.extend(labels);
        for (k, v) in &spec.env {
            args.extend(["--env".into(), format!("{k}={v}")]);
        }
        args.push(spec.image.clone());
        args.extend(spec.command.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args).await?;
        self.containers.lock().push(name.clone());
        for (network, alias) in &spec.more_networks {
            self.connect(network, &name, alias).await?;
        }
        docker(&["start", &name]).await?;
        Ok(name)
    }

    /// The container's address on `network`.
    pub async fn ip(&self, container: &str, network: &str) -> Result<String> {
        let format = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
        let ip = docker(&["inspect", "--format", &format, container]).await?;
        if ip.is_empty() {
            bail!("{container} has no address on {network}");
        }
        Ok(ip)
    }

    /// Waits until `line` appears in the container's output; returns how
    /// long that took. Fails (with the output) after `within` or when the
    /// container stops.
    pub async fn wait_for_line(
        &self,
        container: &str,
        line: &str,
        within: Duration,
    ) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let logs = self.logs(container).await;
            if logs.lines().any(|l| l.trim() == line) {
                return Ok(started.elapsed());
            }
            let running = docker(&["inspect", "--format", "{{.State.Running}}", container]).await?;
            if running != "true" || started.elapsed() > within {
                bail!(
                    "{container} did not print {line:?} within {within:?} (running: {running}); its output:\n{logs}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The container's standard output and error so far.
    pub async fn logs(&self, container: &str) -> String {
        let run = tokio::process::Command::new("docker")
            .args(["logs", container])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(DOCKER_TIMEOUT, run).await {
            Err(_) => format!("docker logs {container} did not end within {DOCKER_TIMEOUT:?}"),
            Ok(Ok(o)) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Ok(Err(e)) => format!("(docker logs failed: {e})"),
        }
    }

    /// Runs `args` in the container; returns its output.
    pub async fn exec(&self, container: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["exec", container];
        all.extend_from_slice(args);
        docker(&all).await
    }

    /// Cuts the container off `network` (its other networks stay).
    pub async fn disconnect(&self, network: &str, container: &str) -> Result<()> {
        docker(&["network", "disconnect", network, container])
            .await
            .map(drop)
    }

    /// Connects the container to `network` again, as `alias`.
    pub async fn connect(&self, network: &str, container: &str, alias: &str) -> Result<()> {
        docker(&["network", "connect", "--alias", alias, network, container])
            .await
            .map(drop)
    }

    /// Stops the container (SIGTERM, then SIGKILL after `grace`).
    pub async fn stop(&self, container: &str, grace: Duration) -> Result<()> {
        let secs = grace.as_secs().max(1).to_string();
        docker(&["stop", "--time", &secs, container])
            .await
            .map(drop)
    }
}

impl Drop for Lab {
    /// Removes the containers (with their volumes), then the networks.
    fn drop(&mut self) {
        let containers = std::mem::take(&mut *self.containers.lock());
        if !containers.is_empty() {
            let mut args = vec!["rm", "--force", "--volumes"];
            args.extend(containers.iter().map(String::as_str));
            if let Err(e) = docker_blocking(&args) {
                eprintln!("lab {}: removing its containers: {e}", self.name);
            }
        }
        for network in std::mem::take(&mut *self.networks.lock()) {
            if let Err(e) = docker_blocking(&["network", "rm", &network]) {
                eprintln!("lab {}: removing network {network}: {e}", self.name);
            }
        }
    }
}

/// Removes the containers and networks of labs whose process is gone (a
/// test killed before it could drop its lab).
async fn remove_orphans() {
    let format = format!("{{{{.ID}}}} {{{{.Label \"{PID_LABEL}\"}}}}");
    let filter = format!("label={LAB_LABEL}");
    let dead = |line: &str| -> Option<String> {
        let (id, pid) = line.split_once(' ')?;
        let pid: u32 = pid.trim().parse().ok()?;
        (!alive(pid)).then(|| id.to_owned())
    };
    if let Ok(out) = docker(&["ps", "-a", "--filter", &filter, "--format", &format]).await {
        let ids: Vec<String> = out.lines().filter_map(dead).collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "--force", "--volumes"];
            args.extend(ids.iter().map(String::as_str));
            let _ = docker(&args).await;
        }
    }
    let format = format!("{{{{.ID}}}} {{{{.Label \"{PID_LABEL}\"}}}}");
    if let Ok(out) = docker(&["network", "ls", "--filter", &filter, "--format", &format]).await {
        for id in out.lines().filter_map(dead) {
            let _ = docker(&["network", "rm", &id]).await;
        }
    }
}

/// Whether process `pid` runs (a zombie, killed but not yet reaped, does
/// not).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the command name "(...)".
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}
