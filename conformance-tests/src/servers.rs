//! Where the test servers are and whether they answer.
//!
//! The servers come from the environment (written by
//! `scripts/services.sh up`): `IMINFRA_ETCD_ENDPOINTS`, `IMINFRA_REDIS_URL`,
//! `IMINFRA_MYSQL_URL`, `IMINFRA_KAFKA_BROKERS`, `IMINFRA_REDIS_CLUSTER_URLS`;
//! or, with `IMINFRA_SERVERS=containers` ([`ServerSource`]), each
//! conformance runner starts its own from a local image (feature
//! `containers`, module `containers`).
//! Each probe speaks the
//! server's own protocol (an etcd `/health` request, a Redis `PING`, the
//! MySQL handshake greeting, a Kafka `ApiVersions` request), so "reachable"
//! means "the right server answers", not just "a port is open".

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Environment variable naming the etcd endpoints (comma-separated URLs).
pub const ETCD_ENV: &str = "IMINFRA_ETCD_ENDPOINTS";
/// Environment variable naming the Redis URL.
pub const REDIS_ENV: &str = "IMINFRA_REDIS_URL";
/// Environment variable naming the Redis Cluster's nodes (comma-separated
/// URLs).
pub const REDIS_CLUSTER_ENV: &str = "IMINFRA_REDIS_CLUSTER_URLS";
/// Environment variable naming the MySQL/MariaDB URL.
pub const MYSQL_ENV: &str = "IMINFRA_MYSQL_URL";
/// Environment variable naming the Kafka bootstrap brokers.
pub const KAFKA_ENV: &str = "IMINFRA_KAFKA_BROKERS";
/// `all`, or a comma-separated list of backends that must be tested.
pub const REQUIRE_ENV: &str = "IMINFRA_REQUIRE_BACKENDS";
/// Where a conformance runner gets its server: unset (or `env`) for the
/// endpoint variables above, `containers` for a container of its own.
pub const SERVERS_ENV: &str = "IMINFRA_SERVERS";

/// Where a conformance runner gets its server from, as `IMINFRA_SERVERS`
/// says.
///
/// ```
/// use im_infra_conformance::servers::ServerSource;
///
/// assert_eq!(ServerSource::parse(None).unwrap(), ServerSource::Environment);
/// assert_eq!(ServerSource::parse(Some("")).unwrap(), ServerSource::Environment);
/// assert_eq!(ServerSource::parse(Some("env")).unwrap(), ServerSource::Environment);
/// assert_eq!(ServerSource::parse(Some("containers")).unwrap(), ServerSource::Containers);
/// assert!(ServerSource::parse(Some("docker")).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerSource {
    /// The server named by the backend's endpoint variable
    /// (`IMINFRA_REDIS_URL`, ...), as `scripts/services.sh up` writes them.
    Environment,
    /// A server started for the runner from a local image with
    /// testcontainers, removed when the runner ends. Endpoint variables are
    /// then ignored.
    Containers,
}

impl ServerSource {
    /// Reads `IMINFRA_SERVERS`.
    ///
    /// ```
    /// use im_infra_conformance::servers::ServerSource;
    ///
    /// // Unset in a plain `cargo test`: the endpoint variables.
    /// let source = ServerSource::from_env().unwrap();
    /// # let _ = source;
    /// ```
    pub fn from_env() -> Result<ServerSource> {
        ServerSource::parse(std::env::var(SERVERS_ENV).ok().as_deref())
    }

    /// Parses a value of `IMINFRA_SERVERS` (`None` when it is unset):
    /// empty or `env` for [`ServerSource::Environment`], `containers` for
    /// [`ServerSource::Containers`], case and surrounding space ignored.
    ///
    /// ```
    /// use im_infra_conformance::servers::ServerSource;
    ///
    /// assert_eq!(ServerSource::parse(Some(" Containers ")).unwrap(), ServerSource::Containers);
    /// ```
    pub fn parse(value: Option<&str>) -> Result<ServerSource> {
        let value = value.map(str::trim).unwrap_or_default();
        if value.is_empty() || value.eq_ignore_ascii_case("env") {
            Ok(ServerSource::Environment)
        } else if value.eq_ignore_ascii_case("containers") {
            Ok(ServerSource::Containers)
        } else {
            bail!("{SERVERS_ENV}={value:?} is not understood: leave it unset (or 'env') for the endpoint variables, or set it to 'containers'")
        }
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `IMINFRA_REQUIRE_BACKENDS` makes `backend` mandatory.
pub fn required(backend: &str) -> bool {
    std::env::var(REQUIRE_ENV)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .any(|b| b.eq_ignore_ascii_case("all") || b.eq_ignore_ascii_case(backend))
        })
        .unwrap_or(false)
}

/// Checks that `backend`'s server answers at `address`.
pub async fn probe(backend: &str, address: &str) -> Result<()> {
    let check = async {
        match backend {
            "etcd" => etcd(address).await,
            "redis" => redis(address).await,
            "redis-cluster" => {
                for url in address.split(',') {
                    redis(url.trim()).await?;
                }
                Ok(())
            }
            "mysql" => mysql(address).await,
            "kafka" => kafka(address).await,
            other => bail!("no probe for backend {other}"),
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, check)
        .await
        .map_err(|_| anyhow!("no answer within {PROBE_TIMEOUT:?}"))?
}

/// `host:port` of a URL like `scheme://user:pass@host:port/path`.
pub fn host_port(url: &str) -> Result<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let hp = rest.split(['/', '?']).next().unwrap_or_default();
    if hp.is_empty() || !hp.contains(':') {
        bail!("{url:?} has no host:port");
    }
    Ok(hp.to_owned())
}

async fn connect(url: &str) -> Result<TcpStream> {
    let hp = host_port(url)?;
    TcpStream::connect(&hp)
        .await
        .with_context(|| format!("connecting to {hp}"))
}

async fn etcd(endpoints: &str) -> Result<()> {
    let first = endpoints.split(',').next().unwrap_or_default().trim();
    let mut s = connect(first).await?;
    let hp = host_port(first)?;
    s.write_all(format!("GET /health HTTP/1.0\r\nHost: {hp}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    if !body.contains("\"health\":\"true\"") {
        bail!("etcd /health answered {body:?}");
    }
    Ok(())
}

async fn redis(url: &str) -> Result<()> {
    let mut s = connect(url).await?;
    s.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await?;
    let reply = String::from_utf8_lossy(&buf[..n]);
    // An unauthenticated PING against a server with a password answers
    // NOAUTH: that is still Redis answering.
    if !(reply.starts_with("+PONG") || reply.starts_with("-NOAUTH")) {
        bail!("redis answered {reply:?} to PING");
    }
    Ok(())
}

async fn mysql(url: &str) -> Result<()> {
    let mut s = connect(url).await?;
    let mut header = [0u8; 4];
    s.read_exact(&mut header).await?;
    let len = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
    let mut payload = vec![0u8; len.min(1024)];
    s.read_exact(&mut payload).await?;
    match payload.first() {
        Some(10) => Ok(()),
        Some(0xff) => bail!(
            "server refused the connection: {}",
            String::from_utf8_lossy(payload.get(3..).unwrap_or_default())
        ),
        other => bail!("not a MySQL handshake (first byte {other:?})"),
    }
}

async fn kafka(brokers: &str) -> Result<()> {
    let first = brokers.split(',').next().unwrap_or_default().trim();
    let mut s = connect(first).await?;
    // ApiVersions (key 18) v0, correlation id 7, client id "im-infra-probe".
    let client = b"im-infra-probe";
    let mut req = Vec::new();
    req.extend_from_slice(&18i16.to_be_bytes());
    req.extend_from_slice(&0i16.to_be_bytes());
    req.extend_from_slice(&7i32.to_be_bytes());
    req.extend_from_slice(&(client.len() as i16).to_be_bytes());
    req.extend_from_slice(client);
    let mut framed = (req.len() as i32).to_be_bytes().to_vec();
    framed.extend_from_slice(&req);
    s.write_all(&framed).await?;
    let mut size = [0u8; 4];
    s.read_exact(&mut size).await?;
    let size = i32::from_be_bytes(size);
    if !(6..=1 << 20).contains(&size) {
        bail!("implausible ApiVersions response size {size}");
    }
    let mut body = vec![0u8; size as usize];
    s.read_exact(&mut body).await?;
    let correlation = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let error = i16::from_be_bytes([body[4], body[5]]);
    if correlation != 7 {
        bail!("ApiVersions answer carries correlation id {correlation}, not 7");
    }
    // 0: fine; 35 (UNSUPPORTED_VERSION): a broker that wants a newer request.
    if error != 0 && error != 35 {
        bail!("ApiVersions failed with error code {error}");
    }
    Ok(())
}

/// The address of `backend`'s server from `var`, for a test that needs it.
/// Without it the test is skipped (with a message), unless
/// `IMINFRA_REQUIRE_BACKENDS` requires the backend: then this panics, which
/// fails the test and names the backend.
pub fn server_or_skip(backend: &str, var: &str) -> Option<String> {
    match std::env::var(var).ok().filter(|v| !v.trim().is_empty()) {
        Some(v) => Some(v),
        None if required(backend) => {
            panic!("{backend} is required (IMINFRA_REQUIRE_BACKENDS) but {var} is not set")
        }
        None => {
            eprintln!("SKIPPED {backend} fault test: {var} is not set (scripts/services.sh up)");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_of_urls() {
        assert_eq!(
            host_port("redis://127.0.0.1:6380/0").unwrap(),
            "127.0.0.1:6380"
        );
        assert_eq!(
            host_port("mysql://u:p@127.0.0.1:3307/db").unwrap(),
            "127.0.0.1:3307"
        );
        assert_eq!(
            host_port("http://127.0.0.1:2379").unwrap(),
            "127.0.0.1:2379"
        );
        assert_eq!(host_port("127.0.0.1:9092").unwrap(), "127.0.0.1:9092");
        assert!(host_port("redis://nohost").is_err());
    }

    #[test]
    fn server_source_values() {
        assert_eq!(
            ServerSource::parse(None).unwrap(),
            ServerSource::Environment
        );
        assert_eq!(
            ServerSource::parse(Some("  ")).unwrap(),
            ServerSource::Environment
        );
        assert_eq!(
            ServerSource::parse(Some("ENV")).unwrap(),
            ServerSource::Environment
        );
        assert_eq!(
            ServerSource::parse(Some("containers")).unwrap(),
            ServerSource::Containers
        );
        let err = ServerSource::parse(Some("container"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("IMINFRA_SERVERS") && err.contains("containers"),
            "{err}"
        );
    }
}
