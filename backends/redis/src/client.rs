//! The connection to Redis (one node, the primary Redis Sentinel names, or
//! a cluster), with a deadline and error mapping on every command.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use im_infra::backend::Shutdown;
use im_infra::{Error, ErrorKind, Result};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, RedisFuture, Script, Value};
use tokio_util::sync::CancellationToken;

use crate::error::from_redis;
use crate::sentinel::SentinelConn;
use crate::settings::RedisSettings;

/// A multiplexed connection: a reconnecting manager to one node, the
/// primary the sentinels name (asked again after a failure), or a cluster
/// connection.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Sentinel(Arc<SentinelConn>),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Sentinel(s) => Box::pin(s.command(cmd)),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Sentinel(s) => Box::pin(s.commands(cmd, offset, count)),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Sentinel(s) => s.db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The shared connection state of one backend instance.
pub(crate) struct Client {
    conn: Conn,
    single: Option<redis::Client>,
    settings: RedisSettings,
    /// Closed on close: stops keep-alives, renewals and watches.
    shutdown: Shutdown,
}

impl Client {
    pub(crate) async fn connect(settings: RedisSettings) -> Result<Client> {
        settings.validate()?;
        let certs = settings
            .tls
            .as_ref()
            .map(|t| t.certificates())
            .transpose()?;
        let connect = async {
            if settings.is_cluster() {
                let mut b = ClusterClient::builder(settings.urls.clone())
                    .connection_timeout(settings.connect_timeout)
                    .response_timeout(settings.request_timeout)
                    .retries(settings.retry.max_retries);
                if let Some(u) = &settings.username {
                    b = b.username(u);
                }
                if let Some(p) = &settings.password {
                    b = b.password(p.expose());
                }
                if let Some(certs) = &certs {
                    b = b.certs(certs.clone());
                }
                let client = b.build()?;
                let conn = client.get_async_connection().await?;
                Ok::<_, redis::RedisError>((Conn::Cluster(conn), None))
            } else if settings.is_sentinel() {
                let sentinel = SentinelConn::connect(&settings, certs.clone()).await?;
                Ok((Conn::Sentinel(Arc::new(sentinel)), None))
            } else {
                let info = settings.urls[0].as_str().into_connection_info()?;
                let client = node_client(&settings, info, None, certs.clone())?;
                // One plain attempt first: the manager would retry a wrong
                // password with backoff until the deadline; this surfaces it.
                let probe = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(settings.connect_timeout))
                    .set_response_timeout(Some(settings.request_timeout));
                drop(
                    client
                        .get_multiplexed_async_connection_with_config(&probe)
                        .await?,
                );
                let mgr_cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(settings.connect_timeout))
                    .set_response_timeout(Some(settings.request_timeout))
                    .set_number_of_retries(settings.retry.max_retries as usize)
                    .set_min_delay(settings.retry.initial_interval)
                    .set_max_delay(settings.retry.max_interval);
                let mgr = ConnectionManager::new_with_config(client.clone(), mgr_cfg).await?;
                Ok((Conn::Single(mgr), Some(client)))
            }
        };
        let bound = settings.connect_timeout * 2 + Duration::from_millis(100);
        let (conn, single) = match tokio::time::timeout(bound, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let mut err = from_redis(e);
                if err.kind() == ErrorKind::Internal {
                    err = Error::new(ErrorKind::Connection, "could not connect to redis")
                        .with_backend(crate::NAME)
                        .with_source(err);
                }
                return Err(err.with_operation("redis.connect"));
            }
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("no connection to redis within {bound:?}"),
                )
                .with_backend(crate::NAME)
                .with_operation("redis.connect"))
            }
        };
        Ok(Client {
            conn,
            single,
            settings,
            shutdown: Shutdown::new(crate::NAME),
        })
    }

    pub(crate) fn settings(&self) -> &RedisSettings {
        &self.settings
    }

    pub(crate) fn ns(&self) -> &str {
        &self.settings.namespace
    }

    pub(crate) fn close(&self) {
        self.shutdown.close();
    }

    #[inline]
    pub(crate) fn check_open(&self) -> Result<()> {
        self.shutdown.check_open()
    }

    /// Cancelled on close: keep-alives, renewals and watches stop on it.
    pub(crate) fn stop(&self) -> &CancellationToken {
        self.shutdown.token()
    }

    fn timeout_error(&self) -> Error {
        Error::new(
            ErrorKind::Timeout,
            format!(
                "redis did not answer within {:?}",
                self.settings.request_timeout
            ),
        )
        .with_backend(crate::NAME)
    }

    /// One request, bounded by the request timeout
    /// (`RedisSettings::request_timeout`) on a single node: the connection
    /// manager's response timeout starts only once the request is sent,
    /// and a request queued behind its reconnection (several connection
    /// attempts with backoff) would otherwise wait for all of them. The
    /// cluster client bounds a whole request itself; behind Sentinel the
    /// primary's look-up has its own bound (`connect_timeout`) and must be
    /// allowed to finish, and its connection's response timeout tells it a
    /// primary went silent. A timeout surfaces as `Timeout`.
    async fn bounded<T>(&self, request: impl Future<Output = redis::RedisResult<T>>) -> Result<T> {
        self.bounded_answer(request).await?.map_err(from_redis)
    }

    /// [`bounded`](Self::bounded), the server's answer unmapped (`Err`: no
    /// answer in time).
    async fn bounded_answer<T>(
        &self,
        request: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<redis::RedisResult<T>> {
        if !matches!(self.conn, Conn::Single(_)) {
            return Ok(request.await);
        }
        tokio::time::timeout(self.settings.request_timeout, request)
            .await
            .map_err(|_| self.timeout_error())
    }

    /// Runs one command.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        self.check_open()?;
        let mut c = self.conn.clone();
        self.bounded(cmd.query_async(&mut c)).await
    }

    /// Runs a pipeline in one round trip.
    pub(crate) async fn pipe<T: FromRedisValue>(&self, p: &Pipeline) -> Result<T> {
        self.check_open()?;
        let mut c = self.conn.clone();
        self.bounded(p.query_async(&mut c)).await
    }

    /// Runs `cmd`, an `EVALSHA` of `script` ([`evalsha`]). On NOSCRIPT (a
    /// restarted, flushed or failed-over server) loads the script and runs
    /// `cmd` again, up to twice; a third NOSCRIPT is `Unavailable`
    /// (retryable). The one way every script of the backend runs.
    ///
    /// On a cluster `SCRIPT LOAD` goes to every node of the slot map; it
    /// fails if a node cannot be reached, or if the node whose answer the
    /// client reports (the last) refused it (a replica still syncing, a
    /// node's own ACL). The key's primary may have loaded it all the same,
    /// so `cmd` is run again whatever the load answered.
    pub(crate) async fn script<T: FromRedisValue>(&self, script: &Script, cmd: &Cmd) -> Result<T> {
        const LOADS: usize = 2;
        self.check_open()?;
        let mut c = self.conn.clone();
        let mut loads = 0;
        loop {
            match self.bounded_answer(cmd.query_async(&mut c)).await? {
                Err(e)
                    if loads < LOADS
                        && e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    loads += 1;
                    if let Err(e) = self.bounded(script.load_async(&mut c)).await {
                        if !self.settings.is_cluster() {
                            return Err(e);
                        }
                    }
                }
                read => return read.map_err(from_redis),
            }
        }
    }

    /// The client of the one node connections of their own go to: the
    /// server, or the primary the sentinels name now; `None` on a cluster.
    async fn node(&self) -> Result<Option<redis::Client>> {
        match &self.conn {
            Conn::Sentinel(s) => match s.primary().await {
                Ok(p) => Ok(Some(p.client.clone())),
                Err(e) => Err(from_redis(e)),
            },
            _ => Ok(self.single.clone()),
        }
    }

    /// A connection of its own, for blocking reads (watch streams) and
    /// pub/sub; `None` on a cluster (those poll instead).
    pub(crate) async fn dedicated(
        &self,
        request_timeout: Duration,
    ) -> Result<Option<MultiplexedConnection>> {
        self.check_open()?;
        let Some(client) = self.node().await? else {
            return Ok(None);
        };
        let options = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.connect_timeout))
            .set_response_timeout(Some(request_timeout));
        client
            .get_multiplexed_async_connection_with_config(&options)
            .await
            .map(Some)
            .map_err(from_redis)
    }

    /// The node that connections of their own go to says it is no longer
    /// the primary: behind Sentinel, ask the sentinels again.
    #[cfg(feature = "near-cache")]
    pub(crate) fn primary_demoted(&self) {
        if let Conn::Sentinel(s) = &self.conn {
            s.forget_primary();
        }
    }

    /// The addresses the settings name (a cluster's seed nodes).
    #[cfg(feature = "near-cache")]
    pub(crate) fn seeds(&self) -> Vec<NodeAddr> {
        use redis::ConnectionAddr;
        self.settings
            .urls
            .iter()
            .filter_map(|u| u.as_str().into_connection_info().ok())
            .filter_map(|info| match info.addr() {
                ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                    Some(NodeAddr {
                        host: host.clone(),
                        port: *port,
                    })
                }
                _ => None,
            })
            .collect()
    }

    /// A client of `node` (or of the node connections of their own go to)
    /// with this backend's credentials and TLS, speaking `protocol`.
    #[cfg(feature = "near-cache")]
    async fn client_of(
        &self,
        node: Option<&NodeAddr>,
        protocol: redis::ProtocolVersion,
    ) -> Result<redis::Client> {
        use redis::ConnectionAddr;
        self.check_open()?;
        let info = match (node, self.node().await?) {
            (None, Some(client)) => client.get_connection_info().clone(),
            (None, None) => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "a connection to a cluster names its node",
                ))
            }
            (Some(node), _) => {
                let info = self.settings.urls[0]
                    .as_str()
                    .into_connection_info()
                    .map_err(from_redis)?;
                let addr = match info.addr() {
                    ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
                        host: node.host.clone(),
                        port: node.port,
                        insecure: *insecure,
                        tls_params: None,
                    },
                    _ => ConnectionAddr::Tcp(node.host.clone(), node.port),
                };
                info.set_addr(addr)
            }
        };
        let certs = self
            .settings
            .tls
            .as_ref()
            .map(|t| t.certificates())
            .transpose()?;
        node_client(&self.settings, info, Some(protocol), certs).map_err(from_redis)
    }

    #[cfg(feature = "near-cache")]
    fn node_connection_config(&self) -> redis::AsyncConnectionConfig {
        redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.settings.connect_timeout))
            .set_response_timeout(Some(self.settings.request_timeout))
    }

    /// A RESP3 connection of its own to `node` (or to the node connections
    /// of their own go to) whose server pushes go to `push` (client-side
    /// caching).
    #[cfg(feature = "near-cache")]
    pub(crate) async fn resp3(
        &self,
        node: Option<&NodeAddr>,
        push: impl redis::aio::AsyncPushSender,
    ) -> Result<MultiplexedConnection> {
        let client = self.client_of(node, redis::ProtocolVersion::RESP3).await?;
        client
            .get_multiplexed_async_connection_with_config(
                &self.node_connection_config().set_push_sender(push),
            )
            .await
            .map_err(from_redis)
    }

    /// A plain connection of its own to `node`.
    #[cfg(feature = "near-cache")]
    pub(crate) async fn node_connection(&self, node: &NodeAddr) -> Result<MultiplexedConnection> {
        let client = self
            .client_of(Some(node), redis::ProtocolVersion::RESP2)
            .await?;
        client
            .get_multiplexed_async_connection_with_config(&self.node_connection_config())
            .await
            .map_err(from_redis)
    }

    /// A pub/sub connection (single node only).
    pub(crate) async fn pubsub(&self) -> Result<Option<redis::aio::PubSub>> {
        self.check_open()?;
        let Some(client) = self.node().await? else {
            return Ok(None);
        };
        match tokio::time::timeout(self.settings.connect_timeout, client.get_async_pubsub()).await {
            Ok(r) => r.map(Some).map_err(from_redis),
            Err(_) => Err(self.timeout_error()),
        }
    }
}

/// The `EVALSHA` of `script` over `keys` (each one argument; their number
/// is the array's, so it cannot disagree with them): the caller appends
/// the arguments (room for a few and about a hundred bytes is made at
/// once) and runs it with [`Client::script`].
pub(crate) fn evalsha<K: redis::ToRedisArgs, const N: usize>(script: &Script, keys: [K; N]) -> Cmd {
    let mut cmd = evalsha_sized(script, N, N + 6, 96);
    for key in keys {
        cmd.arg(key);
    }
    cmd
}

/// [`evalsha`] sized once for `args` keys and arguments of `bytes` in all.
pub(crate) fn evalsha_sized(script: &Script, keys: usize, args: usize, bytes: usize) -> Cmd {
    let mut cmd = Cmd::with_capacity(args + 3, bytes + 64);
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
    cmd
}

/// A client of the node `info` names, with the settings' credentials (over
/// those of the URL), `protocol` when given, and TLS with `certs`.
fn node_client(
    settings: &RedisSettings,
    info: redis::ConnectionInfo,
    protocol: Option<redis::ProtocolVersion>,
    certs: Option<redis::TlsCertificates>,
) -> redis::RedisResult<redis::Client> {
    let mut node = info.redis_settings().clone();
    if let Some(protocol) = protocol {
        node = node.set_protocol(protocol);
    }
    if let Some(u) = &settings.username {
        node = node.set_username(u);
    }
    if let Some(p) = &settings.password {
        node = node.set_password(p.expose());
    }
    let info = info.set_redis_settings(node);
    match certs {
        Some(certs) => redis::Client::build_with_tls(info, certs),
        None => redis::Client::open(info),
    }
}

/// The address of one node.
#[cfg(feature = "near-cache")]
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct NodeAddr {
    pub(crate) host: String,
    pub(crate) port: u16,
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use im_infra_conformance::servers::{server_or_skip, REDIS_CLUSTER_ENV, REDIS_ENV};

    use super::*;

    /// A script the server forgets again after every load (here: the
    /// command names the hash of a body that is never loaded) is loaded
    /// twice, then the call fails as `Unavailable`, retryable.
    #[tokio::test]
    async fn a_script_forgotten_after_every_load_is_loaded_twice_then_unavailable() {
        let Some(url) = server_or_skip("redis", REDIS_ENV) else {
            return;
        };
        let marker = uuid::Uuid::new_v4().simple().to_string();
        let mut monitor = redis::Client::open(url.as_str())
            .unwrap()
            .get_async_monitor()
            .await
            .unwrap()
            .into_on_message::<String>();
        let client = Client::connect(RedisSettings::new(url)).await.unwrap();
        let script = Script::new(&format!("return 'loaded {marker}'"));
        let never_loaded = Script::new(&format!("return 'never loaded {marker}'"));
        let cmd = evalsha::<String, 0>(&never_loaded, []);

        let e = client.script::<String>(&script, &cmd).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.is_retryable());

        // MONITOR shows every command, these before the call returned:
        // count this script's loads and calls until the feed is quiet.
        let (mut loads, mut calls) = (0, 0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while let Ok(Some(line)) = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(500)),
            monitor.next(),
        )
        .await
        {
            if line.contains("\"SCRIPT\" \"LOAD\"") && line.contains(&marker) {
                loads += 1;
            } else if line.contains("\"EVALSHA\"") && line.contains(never_loaded.get_hash()) {
                calls += 1;
            }
        }
        assert_eq!((loads, calls), (2, 3), "SCRIPT LOADs and calls");
    }

    /// On a cluster a node that refuses `SCRIPT LOAD` (ACL users are per
    /// node: here every node but the first denies this test's user the
    /// load) fails the cluster-wide load whenever its answer is the one
    /// the client reports, which depends on each client's order of
    /// nodes: so six clients, each with a script of its own. The call is
    /// made again whatever the load answered: a key on the node that
    /// loaded the script runs, and a key on a refusing node is
    /// `Unavailable` once the two loads are spent.
    #[tokio::test]
    async fn on_a_cluster_a_failed_load_still_runs_where_the_keys_node_loaded_it() {
        let Some(urls) = server_or_skip("redis-cluster", REDIS_CLUSTER_ENV) else {
            return;
        };
        let urls: Vec<String> = urls.split(',').map(str::to_owned).collect();
        let marker = uuid::Uuid::new_v4().simple().to_string();
        let user = format!("script-load-{marker}");
        let mut nodes = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let mut node = redis::Client::open(url.as_str())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let mut acl = redis::cmd("ACL");
            acl.arg("SETUSER").arg(&user).arg("on").arg(">pw");
            acl.arg("~*").arg("&*").arg("+@all");
            if i > 0 {
                acl.arg("-script|load");
            }
            acl.query_async::<()>(&mut node).await.unwrap();
            nodes.push(node);
        }
        // A plain connection to the first node answers a key of its own
        // slots and redirects (MOVED) any other.
        let (mut loading_key, mut refusing_key) = (None, None);
        for n in 0..1000 {
            let key = format!("{marker}:{n}");
            let mut exists = redis::cmd("EXISTS");
            exists.arg(&key);
            match exists.query_async::<i64>(&mut nodes[0]).await {
                Ok(_) => loading_key.get_or_insert(key),
                Err(_) => refusing_key.get_or_insert(key),
            };
        }
        let (loading_key, refusing_key) = (loading_key.unwrap(), refusing_key.unwrap());

        let mut outcomes = Vec::new();
        for n in 0..6 {
            let mut settings = RedisSettings::new(&urls[0]);
            settings.urls = urls.clone();
            settings.username = Some(user.clone());
            settings.password = Some("pw".into());
            let client = Client::connect(settings).await.unwrap();
            let script = Script::new(&format!("return 'ran {marker} {n}'"));
            let (on_loading, on_refusing) = (
                evalsha(&script, [&loading_key]),
                evalsha(&script, [&refusing_key]),
            );
            let loading = client.script::<String>(&script, &on_loading).await;
            let refusing = client.script::<String>(&script, &on_refusing).await;
            outcomes.push((n, loading, refusing));
        }
        // Every refusing node logged this user's refused loads.
        let mut logged = Vec::new();
        for node in &mut nodes[1..] {
            let log: Value = redis::cmd("ACL")
                .arg("LOG")
                .query_async(node)
                .await
                .unwrap();
            logged.push(format!("{log:?}").contains(&user));
        }
        for node in &mut nodes {
            let mut del = redis::cmd("ACL");
            del.arg("DELUSER").arg(&user);
            del.query_async::<i64>(node).await.unwrap();
        }

        assert!(logged.iter().all(|l| *l), "loads refused: {logged:?}");
        for (n, loading, refusing) in outcomes {
            assert_eq!(loading.unwrap(), format!("ran {marker} {n}"));
            let e = refusing.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        }
    }
}
