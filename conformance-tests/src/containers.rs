//! Test servers in containers (feature `containers`).
//!
//! With `IMINFRA_SERVERS=containers` ([`ServerSource::Containers`]) a
//! server backend's conformance runner does not read its server's address
//! from the environment: [`Servers::start`] starts the server from a local
//! image with [`testcontainers`], waits for the image's ready line on
//! stdout, builds the address in the format of the backend's endpoint
//! variable ([`address`]), and the harness runs the same trials under the
//! same names against it. Dropping the [`Servers`] removes the containers;
//! the harness keeps it until every trial has finished, failed or not.
//!
//! The images are the ones `scripts/images.sh build` makes without any
//! registry ([`ServerImage`]: `im-infra/etcd:local`, `im-infra/redis:local`,
//! `im-infra/mariadb:local`, `im-infra/tansu:local`). A missing image is
//! reported with that command, and nothing is pulled.
//!
//! Every port is a free loopback port picked here and mapped explicitly
//! (`127.0.0.1:PORT`), so that servers that tell clients where to connect
//! (Kafka's advertised listener, the Redis Cluster's slot map) can be told
//! the address the host reaches them on. The Redis Cluster is three
//! containers in cluster mode, each listening on its own host port inside
//! its container and announcing `127.0.0.1` as its endpoint
//! (`--cluster-announce-hostname`), while the nodes' cluster bus runs
//! between the containers' bridge addresses; `redis-cli --cluster create`
//! runs in the first container.
//!
//! Docker engines older than the API version testcontainers speaks (Debian
//! 12's `docker.io` 20.10 answers API 1.41 only) are reached through a
//! relay on a Unix socket of this process that rewrites the version in each
//! request path; see [`Servers::start`]. Its socket file
//! (`$TMPDIR/im-infra-docker-relay-PID.sock`, open to its owner only)
//! outlives the process and is removed by the next run.
//!
//! [`ServerSource::Containers`]: crate::servers::ServerSource::Containers

use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use testcontainers::core::{ExecCommand, IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{
    ContainerAsync, ContainerRequest, GenericImage, ImageExt, TestcontainersError,
};

/// The database the MariaDB image creates when it starts.
pub const MYSQL_DATABASE: &str = "iminfra";
/// The user the MariaDB image creates (all privileges on [`MYSQL_DATABASE`]).
pub const MYSQL_USER: &str = "iminfra";
/// The password of [`MYSQL_USER`].
pub const MYSQL_PASSWORD: &str = "iminfra-test-password";

/// How long one container may take from `docker start` to its ready line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(120);

/// The label every container started here carries, with the backend as
/// its value (`docker ps -a --filter label=im-infra.conformance` lists
/// them).
pub const LABEL: &str = "im-infra.conformance";

/// The label naming the runner process that started a container, so that
/// the runner can sweep what it created even when a start failed half-way.
const RUN_LABEL: &str = "im-infra.conformance.run";

/// How often a start is tried again on other ports when a picked port was
/// taken in the meantime.
const PORT_ATTEMPTS: usize = 3;

/// A local image of a test server, as `scripts/images.sh build` makes it.
///
/// ```
/// use im_infra_conformance::containers::{image_of, REDIS_IMAGE};
///
/// assert_eq!(image_of("redis-cluster"), Some(REDIS_IMAGE));
/// assert_eq!(REDIS_IMAGE.reference(), "im-infra/redis:local");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerImage {
    /// Repository name (`im-infra/redis`).
    pub name: &'static str,
    /// Tag (`local`: no registry has it, so nothing is ever pulled).
    pub tag: &'static str,
    /// The line the image's start script prints on stdout once the server
    /// answers.
    pub ready_line: &'static str,
    /// The port the server listens on inside the container.
    pub port: u16,
}

impl ServerImage {
    /// `name:tag`.
    ///
    /// ```
    /// use im_infra_conformance::containers::ETCD_IMAGE;
    ///
    /// assert_eq!(ETCD_IMAGE.reference(), "im-infra/etcd:local");
    /// ```
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.tag)
    }
}

/// etcd 3.4 (client port 2379).
///
/// ```
/// assert_eq!(im_infra_conformance::containers::ETCD_IMAGE.port, 2379);
/// ```
pub const ETCD_IMAGE: ServerImage = ServerImage {
    name: "im-infra/etcd",
    tag: "local",
    ready_line: "im-infra: etcd ready",
    port: 2379,
};

/// Redis 7.0 (port 6379), also the nodes of the Redis Cluster.
///
/// ```
/// assert_eq!(im_infra_conformance::containers::REDIS_IMAGE.port, 6379);
/// ```
pub const REDIS_IMAGE: ServerImage = ServerImage {
    name: "im-infra/redis",
    tag: "local",
    ready_line: "im-infra: redis ready",
    port: 6379,
};

/// MariaDB 10.11 (port 3306) with [`MYSQL_DATABASE`] and [`MYSQL_USER`].
///
/// ```
/// assert_eq!(im_infra_conformance::containers::MARIADB_IMAGE.port, 3306);
/// ```
pub const MARIADB_IMAGE: ServerImage = ServerImage {
    name: "im-infra/mariadb",
    tag: "local",
    ready_line: "im-infra: mariadb ready",
    port: 3306,
};

/// tansu, a Kafka-protocol broker (port 9092).
///
/// ```
/// assert_eq!(im_infra_conformance::containers::TANSU_IMAGE.port, 9092);
/// ```
pub const TANSU_IMAGE: ServerImage = ServerImage {
    name: "im-infra/tansu",
    tag: "local",
    ready_line: "im-infra: tansu ready",
    port: 9092,
};

/// The image `backend`'s server runs from (`None` for a backend without a
/// server).
///
/// ```
/// use im_infra_conformance::containers::{image_of, MARIADB_IMAGE};
///
/// assert_eq!(image_of("mysql"), Some(MARIADB_IMAGE));
/// assert_eq!(image_of("memory"), None);
/// ```
pub fn image_of(backend: &str) -> Option<ServerImage> {
    match backend {
        "etcd" => Some(ETCD_IMAGE),
        "redis" | "redis-cluster" => Some(REDIS_IMAGE),
        "mysql" => Some(MARIADB_IMAGE),
        "kafka" => Some(TANSU_IMAGE),
        _ => None,
    }
}

/// The address of `backend`'s server on loopback `ports`, in the format of
/// its endpoint variable (the one `scripts/services.sh` writes): one port,
/// or three for `redis-cluster`.
///
/// ```
/// use im_infra_conformance::containers::address;
///
/// assert_eq!(address("etcd", &[32001]).unwrap(), "http://127.0.0.1:32001");
/// assert_eq!(address("redis", &[32002]).unwrap(), "redis://127.0.0.1:32002/0");
/// assert_eq!(
///     address("mysql", &[32003]).unwrap(),
///     "mysql://iminfra:iminfra-test-password@127.0.0.1:32003/iminfra"
/// );
/// assert_eq!(address("kafka", &[32004]).unwrap(), "127.0.0.1:32004");
/// assert_eq!(
///     address("redis-cluster", &[1, 2, 3]).unwrap(),
///     "redis://127.0.0.1:1/0,redis://127.0.0.1:2/0,redis://127.0.0.1:3/0"
/// );
/// ```
pub fn address(backend: &str, ports: &[u16]) -> Result<String> {
    let one = || match ports {
        [p] => Ok(*p),
        _ => Err(anyhow!("{backend} has one server, not {}", ports.len())),
    };
    Ok(match backend {
        "etcd" => format!("http://127.0.0.1:{}", one()?),
        "redis" => format!("redis://127.0.0.1:{}/0", one()?),
        "mysql" => format!(
            "mysql://{MYSQL_USER}:{MYSQL_PASSWORD}@127.0.0.1:{}/{MYSQL_DATABASE}",
            one()?
        ),
        "kafka" => format!("127.0.0.1:{}", one()?),
        "redis-cluster" => {
            if ports.is_empty() {
                bail!("a Redis Cluster needs at least one node");
            }
            ports
                .iter()
                .map(|p| format!("redis://127.0.0.1:{p}/0"))
                .collect::<Vec<_>>()
                .join(",")
        }
        other => bail!("no server for backend {other}"),
    })
}

/// The servers of one conformance runner, in containers: started by
/// [`Servers::start`], removed when dropped.
///
/// ```no_run
/// use im_infra_conformance::containers::Servers;
///
/// let servers = Servers::start("redis")?;
/// assert!(servers.address().starts_with("redis://127.0.0.1:"));
/// drop(servers); // the container is removed
/// # anyhow::Ok(())
/// ```
pub struct Servers {
    backend: String,
    address: String,
    containers: Vec<ContainerAsync<GenericImage>>,
    run: String,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Servers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Servers")
            .field("backend", &self.backend)
            .field("address", &self.address)
            .field("containers", &self.container_ids())
            .finish()
    }
}

impl Servers {
    /// Starts `backend`'s server(s) from the local image: one container for
    /// `etcd`, `redis`, `mysql` and `kafka`, three made into one cluster for
    /// `redis-cluster`. Returns once every server has printed its ready line
    /// (within [`STARTUP_TIMEOUT`] each) and the cluster, if any, is formed.
    ///
    /// Fails, with nothing left behind, when the Docker engine does not
    /// answer or the image is missing (the message names
    /// `scripts/images.sh build`). The engine is the one testcontainers
    /// finds (`DOCKER_HOST`, else `/var/run/docker.sock`); when it answers
    /// an older API version than testcontainers speaks, `DOCKER_HOST` is
    /// pointed, for this process, at a relay that rewrites the version: make
    /// the first call before other threads that read the environment run
    /// (the harness calls it before it starts any).
    ///
    /// ```no_run
    /// use im_infra_conformance::containers::Servers;
    ///
    /// let cluster = Servers::start("redis-cluster")?;
    /// assert_eq!(cluster.address().split(',').count(), 3);
    /// # anyhow::Ok(())
    /// ```
    pub fn start(backend: &str) -> Result<Servers> {
        let image = image_of(backend)
            .ok_or_else(|| anyhow!("no container recipe for backend {backend}"))?;
        let engine = engine::prepare()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the runtime of the containers")?;
        let reference = image.reference();
        if let Some(false) = runtime.block_on(engine.has_image(&reference))? {
            bail!("{}", missing_image(&reference));
        }
        let run = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let t0 = Instant::now();
        let started = runtime.block_on(async {
            let (containers, ports) = match backend {
                "redis-cluster" => start_cluster(&run, image).await?,
                _ => start_single(&run, backend, image).await?,
            };
            // Dropped here on an error: removed while the runtime runs.
            anyhow::Ok((containers, address(backend, &ports)?))
        });
        let (containers, address) = match started {
            Ok(s) => s,
            Err(e) => {
                // A container created but not started (a start that failed
                // on a port, or timed out) is not removed by testcontainers.
                runtime.block_on(engine.remove_labelled(RUN_LABEL, &run));
                return Err(e);
            }
        };
        let servers = Servers {
            backend: backend.to_owned(),
            address,
            containers,
            run,
            runtime,
        };
        eprintln!(
            "[containers] {backend}: {} container(s) of {reference} ready at {} after {:.1} s",
            servers.containers.len(),
            servers.address,
            t0.elapsed().as_secs_f64()
        );
        Ok(servers)
    }

    /// The address in the format of the backend's endpoint variable
    /// (see [`address`]).
    ///
    /// ```no_run
    /// let servers = im_infra_conformance::containers::Servers::start("kafka")?;
    /// println!("brokers: {}", servers.address());
    /// # anyhow::Ok(())
    /// ```
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The ids of the containers.
    ///
    /// ```no_run
    /// let servers = im_infra_conformance::containers::Servers::start("etcd")?;
    /// assert_eq!(servers.container_ids().len(), 1);
    /// # anyhow::Ok(())
    /// ```
    pub fn container_ids(&self) -> Vec<String> {
        self.containers.iter().map(|c| c.id().to_owned()).collect()
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let t0 = Instant::now();
        let containers = std::mem::take(&mut self.containers);
        let n = containers.len();
        let run = self.run.clone();
        self.runtime.block_on(async move {
            let removals = containers.into_iter().map(|c| async move {
                let id = c.id().to_owned();
                if let Err(e) = c.rm().await {
                    eprintln!("[containers] removing {id} failed: {e}");
                }
            });
            futures::future::join_all(removals).await;
            if let Ok(engine) = engine::prepare() {
                engine.remove_labelled(RUN_LABEL, &run).await;
            }
        });
        eprintln!(
            "[containers] {}: removed {n} container(s) in {:.1} s",
            self.backend,
            t0.elapsed().as_secs_f64()
        );
    }
}

/// The message for an image the engine does not have.
fn missing_image(reference: &str) -> String {
    format!(
        "the image {reference} is not in the local Docker engine: build it with \
         'scripts/images.sh build' (no registry is used)"
    )
}

/// A free loopback port (the kernel's choice; a start that loses it to
/// another process in the meantime is tried again on another).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("picking a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The request common to every container: the image, its ready line, the
/// startup timeout, the labels, and `host_port` on loopback mapped to
/// `container_port`.
fn request(
    run: &str,
    backend: &str,
    image: ServerImage,
    host_port: u16,
    container_port: u16,
) -> ContainerRequest<GenericImage> {
    GenericImage::new(image.name, image.tag)
        .with_wait_for(WaitFor::message_on_stdout(image.ready_line))
        .with_mapped_port(host_port, container_port.tcp())
        .with_label(LABEL, backend)
        .with_label(RUN_LABEL, run)
        .with_startup_timeout(STARTUP_TIMEOUT)
        .with_host_config_modifier(|host| {
            // Published on loopback only, not on every interface.
            if let Some(bindings) = host.port_bindings.as_mut() {
                for binding in bindings.values_mut().flatten().flatten() {
                    binding.host_ip = Some("127.0.0.1".to_owned());
                }
            }
        })
}

/// Whether a start failed because a picked host port was taken.
fn port_taken(e: &TestcontainersError) -> bool {
    let text = e.to_string();
    text.contains("port is already allocated") || text.contains("address already in use")
}

/// Adds what the engine said to a start error, with the cure for the
/// usual ones.
fn explain(reference: &str, e: TestcontainersError) -> anyhow::Error {
    use testcontainers::core::error::ClientError;
    match e {
        TestcontainersError::Client(ClientError::PullImage { .. }) => {
            anyhow!("{}; pulling it failed: {e}", missing_image(reference))
        }
        e if e.to_string().contains("too new") => anyhow!(
            "starting {reference}: {e} (the Docker engine is older than the API testcontainers speaks)"
        ),
        e => anyhow!("starting {reference}: {e}"),
    }
}

/// Starts the container `make(host_port)` describes on a free host port,
/// trying other ports when the picked one is taken before Docker binds it.
async fn start_on_free_port(
    reference: &str,
    make: impl Fn(u16) -> ContainerRequest<GenericImage>,
) -> Result<(ContainerAsync<GenericImage>, u16)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = free_port()?;
        match make(port).start().await {
            Ok(container) => return Ok((container, port)),
            Err(e) if attempt < PORT_ATTEMPTS && port_taken(&e) => {
                eprintln!("[containers] port {port} was taken, trying another: {e}");
            }
            Err(e) => return Err(explain(reference, e)),
        }
    }
}

/// One server: etcd, Redis, MariaDB or tansu.
async fn start_single(
    run: &str,
    backend: &str,
    image: ServerImage,
) -> Result<(Vec<ContainerAsync<GenericImage>>, Vec<u16>)> {
    let (container, port) = start_on_free_port(&image.reference(), |port| {
        let req = request(run, backend, image, port, image.port);
        match backend {
            // What etcd tells clients that ask for the members' URLs.
            "etcd" => req.with_env_var(
                "ETCD_ADVERTISE_CLIENT_URLS",
                format!("http://127.0.0.1:{port}"),
            ),
            "mysql" => req
                .with_env_var("MARIADB_DATABASE", MYSQL_DATABASE)
                .with_env_var("MARIADB_USER", MYSQL_USER)
                .with_env_var("MARIADB_PASSWORD", MYSQL_PASSWORD),
            // Clients connect where the broker's metadata says: the
            // host-mapped address, not the container's port.
            "kafka" => req.with_env_var("KAFKA_ADVERTISED_URL", format!("tcp://127.0.0.1:{port}")),
            _ => req,
        }
    })
    .await?;
    Ok((vec![container], vec![port]))
}

/// Three Redis nodes made into a cluster of three primaries.
async fn start_cluster(
    run: &str,
    image: ServerImage,
) -> Result<(Vec<ContainerAsync<GenericImage>>, Vec<u16>)> {
    let reference = image.reference();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        // Each node listens on its host port inside its own container too,
        // so that the port it announces (in the slot map and in MOVED
        // replies) is the one the host reaches it on.
        let node = start_on_free_port(&reference, |port| {
            request(run, "redis-cluster", image, port, port)
                .with_network("bridge")
                .with_cmd(cluster_node_args(port))
        })
        .await?;
        nodes.push(node);
    }
    let mut members = Vec::new();
    for (container, port) in &nodes {
        let ip = container
            .get_bridge_ip_address()
            .await
            .with_context(|| format!("the bridge address of {}", container.id()))?;
        members.push(format!("{ip}:{port}"));
    }
    let mut create = vec!["redis-cli", "--cluster", "create"];
    create.extend(members.iter().map(String::as_str));
    create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
    let first = &nodes[0].0;
    exec_ok(first, &create)
        .await
        .context("redis-cli --cluster create")?;
    // Every node must see every slot served, and know the other nodes'
    // announced endpoints, before the client reads the slot map.
    let deadline = Instant::now() + Duration::from_secs(30);
    for (container, port) in &nodes {
        let port = port.to_string();
        loop {
            let info = exec_ok(container, &["redis-cli", "-p", &port, "cluster", "info"]).await?;
            let slots = exec_ok(container, &["redis-cli", "-p", &port, "cluster", "slots"]).await?;
            if info.contains("cluster_state:ok") && cluster_slots_announced(&slots, 3) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the Redis Cluster did not form within 30 s: node {port} says {info:?}, slots {slots:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let ports = nodes.iter().map(|(_, p)| *p).collect();
    Ok((nodes.into_iter().map(|(c, _)| c).collect(), ports))
}

/// The command of a cluster node listening on `port` (the image's start
/// script passes extra arguments to redis-server; later ones win).
fn cluster_node_args(port: u16) -> Vec<String> {
    let port = port.to_string();
    [
        "/usr/local/bin/im-infra-start",
        "--port",
        &port,
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "2000",
        // Clients are sent 127.0.0.1 and the node's port; the cluster bus
        // keeps using the containers' own addresses.
        "--cluster-announce-hostname",
        "127.0.0.1",
        "--cluster-preferred-endpoint-type",
        "hostname",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

/// Whether `redis-cli cluster slots` output lists `nodes` slot ranges,
/// each served at the announced 127.0.0.1 (a node whose endpoint has not
/// reached this node yet shows as `?`).
fn cluster_slots_announced(slots: &str, nodes: usize) -> bool {
    let endpoints = slots.lines().filter(|l| l.trim() == "127.0.0.1").count();
    endpoints == nodes && !slots.lines().any(|l| l.trim() == "?")
}

/// Runs `cmd` in `container`; its stdout, or an error with its output when
/// it exits non-zero.
async fn exec_ok(container: &ContainerAsync<GenericImage>, cmd: &[&str]) -> Result<String> {
    let mut exec = container
        .exec(ExecCommand::new(cmd.iter().copied()))
        .await
        .with_context(|| format!("running {cmd:?} in {}", container.id()))?;
    let stdout = String::from_utf8_lossy(&exec.stdout_to_vec().await?).into_owned();
    let stderr = String::from_utf8_lossy(&exec.stderr_to_vec().await?).into_owned();
    // The exit code is recorded just after the output ends.
    let mut code = exec.exit_code().await?;
    for _ in 0..50 {
        if code.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        code = exec.exit_code().await?;
    }
    if code != Some(0) {
        bail!("{cmd:?} exited with {code:?}: {stdout}{stderr}");
    }
    Ok(stdout)
}

/// The Docker engine, reached directly over its Unix socket for what
/// testcontainers does not offer: its API version, whether an image is
/// there, and a sweep of labelled containers. Also the relay for engines
/// older than testcontainers' API version.
mod engine {
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;
    use std::time::Duration;

    use anyhow::{anyhow, bail, Context, Result};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::UnixStream;

    /// The engine as found once per process.
    pub(super) struct Engine {
        /// The engine's Unix socket (`None` for a `DOCKER_HOST` of another
        /// kind: then only testcontainers talks to it).
        socket: Option<PathBuf>,
    }

    static ENGINE: OnceLock<std::result::Result<Engine, String>> = OnceLock::new();

    /// The relay's socket is `$TMPDIR/im-infra-docker-relay-PID.sock`.
    const RELAY_PREFIX: &str = "im-infra-docker-relay-";

    /// Finds the engine and, if it is older than testcontainers, starts the
    /// relay and points `DOCKER_HOST` at it. Done once, on the first
    /// call, before testcontainers first reads `DOCKER_HOST`.
    pub(super) fn prepare() -> Result<&'static Engine> {
        ENGINE
            .get_or_init(|| find().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    /// The relay sockets of runner processes that are gone (a socket file
    /// outlives its process; each run removes those of earlier ones).
    fn remove_stale_relays(dir: &Path) {
        // Whether a process lives is read from /proc: without it, nothing
        // is removed.
        if !Path::new("/proc/self").exists() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix(RELAY_PREFIX))
                .and_then(|n| n.strip_suffix(".sock"))
            else {
                continue;
            };
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// The engine's socket as testcontainers resolves it: `DOCKER_HOST`
    /// (`unix://PATH`; another scheme gives `None`), else the first
    /// socket that exists of `/var/run/docker.sock` and the rootless ones.
    fn socket_path() -> Result<Option<PathBuf>> {
        if let Some(host) = std::env::var("DOCKER_HOST")
            .ok()
            .filter(|h| !h.trim().is_empty())
        {
            return Ok(host.strip_prefix("unix://").map(PathBuf::from));
        }
        let mut candidates = vec![PathBuf::from("/var/run/docker.sock")];
        if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
            candidates.push(PathBuf::from(dir).join(".docker/run/docker.sock"));
        }
        if let Some(home) = std::env::var_os("HOME") {
            candidates.push(PathBuf::from(&home).join(".docker/run/docker.sock"));
            candidates.push(PathBuf::from(&home).join(".docker/desktop/docker.sock"));
        }
        candidates
            .into_iter()
            .find(|p| p.exists())
            .map(Some)
            .ok_or_else(|| {
                anyhow!("no Docker engine: DOCKER_HOST is not set and /var/run/docker.sock does not exist")
            })
    }

    fn find() -> Result<Engine> {
        let Some(socket) = socket_path()? else {
            return Ok(Engine { socket: None });
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (status, body) = rt.block_on(get(&socket, "/version")).with_context(|| {
            format!("the Docker engine at {} does not answer", socket.display())
        })?;
        if status != 200 {
            bail!(
                "the Docker engine at {} answered {status} to /version",
                socket.display()
            );
        }
        let version: serde_json::Value =
            serde_json::from_slice(&body).context("the engine's /version answer")?;
        let engine_api = version["ApiVersion"]
            .as_str()
            .ok_or_else(|| anyhow!("the engine's /version answer has no ApiVersion"))?
            .to_owned();
        let ours = testcontainers::bollard::API_DEFAULT_VERSION;
        let ours = (ours.major_version, ours.minor_version);
        let Some(theirs) = parse_version(&engine_api) else {
            bail!("the engine's API version {engine_api:?} is not understood");
        };
        if theirs >= ours {
            return Ok(Engine {
                socket: Some(socket),
            });
        }
        let from = format!("/v{}.{}/", ours.0, ours.1);
        let to = format!("/v{engine_api}/");
        let dir = std::env::temp_dir();
        remove_stale_relays(&dir);
        let relay = dir.join(format!("{RELAY_PREFIX}{}.sock", std::process::id()));
        let listener = bind_relay(&relay)?;
        // Set before any other thread of the runner exists (the relay's
        // starts below): nothing reads the environment concurrently.
        std::env::set_var("DOCKER_HOST", format!("unix://{}", relay.display()));
        run_relay(listener, socket.clone(), from.into_bytes(), to.into_bytes())?;
        eprintln!(
            "[containers] the Docker engine speaks API {engine_api}, testcontainers {}.{}: \
             its requests go through a relay that rewrites the version ({})",
            ours.0,
            ours.1,
            relay.display()
        );
        Ok(Engine {
            socket: Some(socket),
        })
    }

    /// `"1.41"` as `(1, 41)`.
    pub(super) fn parse_version(v: &str) -> Option<(usize, usize)> {
        let (major, minor) = v.trim().split_once('.')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    }

    impl Engine {
        /// Whether the engine has `reference` (`None`: not known, the
        /// engine is not on a Unix socket).
        pub(super) async fn has_image(&self, reference: &str) -> Result<Option<bool>> {
            let Some(socket) = &self.socket else {
                return Ok(None);
            };
            let (status, body) = get(socket, &format!("/images/{reference}/json")).await?;
            match status {
                200 => Ok(Some(true)),
                404 => Ok(Some(false)),
                other => bail!(
                    "the engine answered {other} about {reference}: {}",
                    String::from_utf8_lossy(&body)
                ),
            }
        }

        /// Removes, with their volumes, the containers whose label `key`
        /// is `value`, running or not. Best effort: problems are printed.
        pub(super) async fn remove_labelled(&self, key: &str, value: &str) {
            let Some(socket) = &self.socket else {
                return;
            };
            let filter = format!(r#"{{"label":["{key}={value}"]}}"#);
            let path = format!("/containers/json?all=1&filters={}", percent_encode(&filter));
            let listed = match get(socket, &path).await {
                Ok((200, body)) => serde_json::from_slice::<Vec<serde_json::Value>>(&body),
                Ok((status, body)) => {
                    eprintln!(
                        "[containers] listing containers answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    );
                    return;
                }
                Err(e) => {
                    eprintln!("[containers] listing containers failed: {e:#}");
                    return;
                }
            };
            for c in listed.unwrap_or_default() {
                let Some(id) = c["Id"].as_str() else { continue };
                match request(socket, "DELETE", &format!("/containers/{id}?force=1&v=1")).await {
                    Ok((204 | 404, _)) => {}
                    Ok((status, body)) => eprintln!(
                        "[containers] removing {id} answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    ),
                    Err(e) => eprintln!("[containers] removing {id} failed: {e:#}"),
                }
            }
        }
    }

    fn percent_encode(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    async fn get(socket: &Path, path: &str) -> Result<(u16, Vec<u8>)> {
        request(socket, "GET", path).await
    }

    /// One HTTP/1.0 request to the engine (unversioned path: the engine's
    /// own API version); the status and the body.
    async fn request(socket: &Path, method: &str, path: &str) -> Result<(u16, Vec<u8>)> {
        let exchange = async {
            let mut s = UnixStream::connect(socket)
                .await
                .with_context(|| format!("connecting to {}", socket.display()))?;
            s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: docker\r\n\r\n").as_bytes())
                .await?;
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).await?;
            let head_end = answer
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .ok_or_else(|| anyhow!("no HTTP header in the engine's answer"))?;
            let head = String::from_utf8_lossy(&answer[..head_end]);
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow!("no status in {head:?}"))?;
            Ok((status, answer[head_end + 4..].to_vec()))
        };
        tokio::time::timeout(Duration::from_secs(30), exchange)
            .await
            .map_err(|_| anyhow!("{method} {path}: no answer within 30 s"))?
    }

    /// The relay's socket at `path`, open to its owner only.
    fn bind_relay(path: &Path) -> Result<std::os::unix::net::UnixListener> {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::remove_file(path);
        let listener = std::os::unix::net::UnixListener::bind(path)
            .with_context(|| format!("binding {}", path.display()))?;
        // Whoever may use the engine may use its relay, and no one else.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    }

    /// Serves `listener` on a thread of its own, relaying every connection
    /// to the engine at `upstream` and rewriting `from` into `to` in what
    /// clients send.
    fn run_relay(
        listener: std::os::unix::net::UnixListener,
        upstream: PathBuf,
        from: Vec<u8>,
        to: Vec<u8>,
    ) -> Result<()> {
        std::thread::Builder::new()
            .name("im-infra-docker-relay".to_owned())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    eprintln!("[containers] the relay's runtime could not be built");
                    return;
                };
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::UnixListener::from_std(listener) else {
                        eprintln!("[containers] the relay's socket could not be registered");
                        return;
                    };
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        let upstream = upstream.clone();
                        let rewriter = Rewriter::new(from.clone(), to.clone());
                        tokio::spawn(async move {
                            let _ = relay(client, &upstream, rewriter).await;
                        });
                    }
                });
            })?;
        Ok(())
    }

    async fn relay(client: UnixStream, upstream: &Path, rewriter: Rewriter) -> std::io::Result<()> {
        let server = UnixStream::connect(upstream).await?;
        let (mut client_r, mut client_w) = client.into_split();
        let (mut server_r, mut server_w) = server.into_split();
        let up = async {
            let res = rewrite_copy(&mut client_r, &mut server_w, rewriter).await;
            let _ = server_w.shutdown().await;
            res
        };
        let down = async {
            let res = tokio::io::copy(&mut server_r, &mut client_w).await;
            let _ = client_w.shutdown().await;
            res
        };
        let (up, down) = tokio::join!(up, down);
        up?;
        down.map(drop)
    }

    /// Copies `r` to `w` through `rewriter`; bytes held back as a possible
    /// start of the pattern go out after 20 ms without more input.
    async fn rewrite_copy(
        r: &mut (impl AsyncRead + Unpin),
        w: &mut (impl AsyncWrite + Unpin),
        mut rewriter: Rewriter,
    ) -> std::io::Result<()> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = if rewriter.holding() {
                match tokio::time::timeout(Duration::from_millis(20), r.read(&mut buf)).await {
                    Ok(n) => n?,
                    Err(_) => {
                        w.write_all(&rewriter.flush()).await?;
                        continue;
                    }
                }
            } else {
                r.read(&mut buf).await?
            };
            if n == 0 {
                w.write_all(&rewriter.flush()).await?;
                return Ok(());
            }
            let out = rewriter.push(&buf[..n]);
            w.write_all(&out).await?;
        }
    }

    /// Replaces every `from` by `to` in a byte stream that arrives in
    /// pieces, also when a piece ends inside `from`.
    pub(super) struct Rewriter {
        from: Vec<u8>,
        to: Vec<u8>,
        pending: Vec<u8>,
    }

    impl Rewriter {
        pub(super) fn new(from: Vec<u8>, to: Vec<u8>) -> Rewriter {
            Rewriter {
                from,
                to,
                pending: Vec::new(),
            }
        }

        /// Whether bytes are held back.
        pub(super) fn holding(&self) -> bool {
            !self.pending.is_empty()
        }

        /// The rewritten bytes that can go out after `input`; a tail that
        /// may be the start of `from` is held back.
        pub(super) fn push(&mut self, input: &[u8]) -> Vec<u8> {
            self.pending.extend_from_slice(input);
            let mut out = Vec::with_capacity(self.pending.len());
            let mut i = 0;
            while i < self.pending.len() {
                let rest = &self.pending[i..];
                if rest.starts_with(&self.from) {
                    out.extend_from_slice(&self.to);
                    i += self.from.len();
                } else if self.from.starts_with(rest) {
                    break;
                } else {
                    out.push(rest[0]);
                    i += 1;
                }
            }
            self.pending.drain(..i);
            out
        }

        /// The bytes held back.
        pub(super) fn flush(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.pending)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::engine::{parse_version, Rewriter};
    use super::*;

    #[test]
    fn addresses_in_the_endpoint_variables_format() {
        assert_eq!(address("etcd", &[2379]).unwrap(), "http://127.0.0.1:2379");
        assert_eq!(
            address("redis", &[6380]).unwrap(),
            "redis://127.0.0.1:6380/0"
        );
        assert_eq!(
            address("mysql", &[3307]).unwrap(),
            "mysql://iminfra:iminfra-test-password@127.0.0.1:3307/iminfra"
        );
        assert_eq!(address("kafka", &[9093]).unwrap(), "127.0.0.1:9093");
        assert_eq!(
            address("redis-cluster", &[7001, 7002, 7003]).unwrap(),
            "redis://127.0.0.1:7001/0,redis://127.0.0.1:7002/0,redis://127.0.0.1:7003/0"
        );
        assert!(address("redis", &[1, 2]).is_err());
        assert!(address("redis-cluster", &[]).is_err());
        assert!(address("memory", &[1]).is_err());
        // Every address is one the probes and fixtures parse.
        for (backend, ports) in [
            ("etcd", &[1][..]),
            ("redis", &[2]),
            ("mysql", &[3]),
            ("kafka", &[4]),
            ("redis-cluster", &[5, 6, 7]),
        ] {
            for url in address(backend, ports).unwrap().split(',') {
                assert!(crate::servers::host_port(url)
                    .unwrap()
                    .starts_with("127.0.0.1:"));
            }
        }
    }

    #[test]
    fn every_server_backend_has_an_image() {
        for backend in ["etcd", "redis", "redis-cluster", "mysql", "kafka"] {
            let image = image_of(backend).unwrap();
            assert_eq!(image.tag, "local", "{backend}");
            assert!(image.ready_line.starts_with("im-infra: "), "{backend}");
        }
        assert_eq!(image_of("noop"), None);
    }

    #[test]
    fn cluster_nodes_announce_loopback_on_their_own_port() {
        let args = cluster_node_args(30123);
        assert_eq!(args[0], "/usr/local/bin/im-infra-start");
        let joined = args.join(" ");
        assert!(joined.contains("--port 30123 "), "{joined}");
        assert!(joined.contains("--cluster-enabled yes"), "{joined}");
        assert!(
            joined.contains("--cluster-announce-hostname 127.0.0.1"),
            "{joined}"
        );
        assert!(
            joined.contains("--cluster-preferred-endpoint-type hostname"),
            "{joined}"
        );
    }

    #[test]
    fn cluster_slots_need_every_endpoint() {
        let formed = "0\n5460\n127.0.0.1\n7001\nid1\n5461\n10922\n127.0.0.1\n7002\nid2\n10923\n16383\n127.0.0.1\n7003\nid3\n";
        assert!(cluster_slots_announced(formed, 3));
        let unknown = formed.replacen("127.0.0.1", "?", 1);
        assert!(!cluster_slots_announced(&unknown, 3));
        assert!(!cluster_slots_announced("", 3));
    }

    #[test]
    fn api_versions() {
        assert_eq!(parse_version("1.41"), Some((1, 41)));
        assert_eq!(parse_version(" 1.52 "), Some((1, 52)));
        assert_eq!(parse_version("1"), None);
        assert!(parse_version("1.41").unwrap() < (1, 52));
        assert!(parse_version("1.9").unwrap() < (1, 41));
    }

    #[test]
    fn rewriter_replaces_the_version_in_any_cut() {
        let input = b"GET /v1.52/containers/json HTTP/1.1\r\n\r\nPOST /v1.52/exec HTTP/1.1\r\n\r\n";
        let want = b"GET /v1.41/containers/json HTTP/1.1\r\n\r\nPOST /v1.41/exec HTTP/1.1\r\n\r\n";
        for cut in 0..input.len() {
            let mut r = Rewriter::new(b"/v1.52/".to_vec(), b"/v1.41/".to_vec());
            let mut out = r.push(&input[..cut]);
            out.extend(r.push(&input[cut..]));
            out.extend(r.flush());
            assert_eq!(out, want, "cut at {cut}");
        }
        // Byte by byte, and a held-back tail that turns out not to be the
        // pattern.
        let mut r = Rewriter::new(b"/v1.52/".to_vec(), b"/v1.41/".to_vec());
        let mut out = Vec::new();
        for b in b"x /v1.5 /v1.52/ /v" {
            out.extend(r.push(&[*b]));
        }
        assert!(r.holding());
        out.extend(r.flush());
        assert_eq!(out, b"x /v1.5 /v1.41/ /v");
    }
}
