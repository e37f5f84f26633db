//! Invalidations for a near cache, from Redis's client-side caching: a
//! RESP3 connection of its own in broadcast mode (`CLIENT TRACKING ON
//! BCAST PREFIX <ns>:c:`), so that every write to a cache key of the
//! namespace, by any client, is pushed to it. A node pushes only the
//! writes it applies, so on a cluster there is one such connection to
//! every primary (every node `CLUSTER NODES` flags `master`, with slots
//! or not yet).
//!
//! Every `TRACKING_HEARTBEAT` the connections are checked, the whole check
//! bounded by one heartbeat: each answers (`PING`; `ROLE`, which must say
//! primary, behind Sentinel and on a cluster), and on a cluster the
//! primaries are still those tracked (`CLUSTER NODES`, asked of a tracked
//! node). On one node the reads must also still reach the server that is
//! tracked: a URL whose name or proxy moves to another server (a managed
//! endpoint's failover, a Kubernetes service) reconnects the reads there
//! while the tracking connection stays on the old one, whose pushes no
//! longer cover what is read. So every check compares the server's
//! `run_id` (`INFO server`) on the reads' connection with the tracking
//! connection's (skipped, with a warning when the session is made, where
//! `INFO` is refused). A push that says a connection closed, a check that
//! fails or does not finish in time, reports the channel lost (the near cache
//! empties and reads go to the server), and the connections are made
//! again with backoff. A connection that closes or stops answering, a
//! tracked node that turns replica, or a change in the tracked node's
//! list of primaries is noticed within two heartbeats; `sync` runs the
//! same check. What no tracked node can see is not noticed: a primary cut
//! off with a minority of a cluster that still says primary, or
//! sentinels that promoted another node while ours still answers as
//! primary. Redis bounds those windows itself: a cluster primary in a
//! minority stops taking writes after `cluster-node-timeout`, and behind
//! Sentinel `min-replicas-to-write` does the same.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use im_infra::cache::near::{InvalidationSink, InvalidationSource, Subscription};
use im_infra::{Error, ErrorKind, Result};
use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio_util::sync::CancellationToken;

use crate::client::NodeAddr;
use crate::{topology, Shared};

/// How often the tracking connections are checked, and how long the check
/// may take: a network that freezes without closing anything stops a near
/// cache from answering from memory within two of these.
pub const TRACKING_HEARTBEAT: Duration = Duration::from_millis(500);

/// The name the tracking connection gives itself (`CLIENT LIST`), followed
/// by `:` and the backend's namespace.
pub const TRACKING_CLIENT_NAME: &str = "im-infra-near-cache";

/// The live session's id (0: none), and the lock that orders reporting it
/// lost (a push of its connection) against a newer one going live.
type LiveSession = Arc<Mutex<u64>>;

/// That a connection of a session closed: set under the [`LiveSession`]
/// lock, so a session that lost a connection before going live never does.
#[derive(Default)]
struct Closed {
    flag: AtomicBool,
    notify: tokio::sync::Notify,
}

/// The invalidation source of one [`RedisBackend`](crate::RedisBackend)'s
/// cache: see the [module](self). One near cache per source: a second
/// `subscribe` is refused.
#[derive(Clone)]
pub(crate) struct RedisInvalidations {
    shared: Arc<Shared>,
    /// The live session (for `sync`).
    current: Arc<ArcSwapOption<Tracking>>,
    /// Which session is live: a push of an older one is ignored.
    live: LiveSession,
    /// Session ids handed out, one per attempt to connect.
    sessions: Arc<AtomicU64>,
    /// Tells the driver to make the connections again (a `sync` that could
    /// not confirm)...
    reset: Arc<tokio::sync::Notify>,
    /// ...of this session: a request left stored after the driver gave up
    /// that session on its own ends no later one.
    reset_session: Arc<AtomicU64>,
    subscribed: Arc<AtomicBool>,
}

impl RedisInvalidations {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RedisInvalidations {
            shared,
            current: Arc::new(ArcSwapOption::empty()),
            live: Arc::new(Mutex::new(0)),
            sessions: Arc::new(AtomicU64::new(0)),
            reset: Arc::new(tokio::sync::Notify::new()),
            reset_session: Arc::new(AtomicU64::new(0)),
            subscribed: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// The keys of an `invalidate` push under `prefix`, without it; `None`
/// for a push that invalidates everything (a flush).
fn invalidated(data: &[Value], prefix: &str) -> Option<Vec<String>> {
    let Some(Value::Array(keys)) = data.first() else {
        return None;
    };
    Some(
        keys.iter()
            .filter_map(topology::text)
            .filter_map(|k| k.strip_prefix(prefix))
            .map(str::to_owned)
            .collect(),
    )
}

/// Applies pushes as they are read, before the answer of any command sent
/// after them: so a command answered means every earlier push is applied.
/// A connection that closes while its session is the live one reports the
/// channel lost at once and wakes the driver.
fn push_handler(
    sink: InvalidationSink,
    prefix: String,
    closed: Arc<Closed>,
    live: LiveSession,
    session: u64,
) -> impl Fn(PushInfo) -> std::result::Result<(), redis::aio::SendError> + Send + Sync + 'static {
    move |push: PushInfo| {
        match push.kind {
            PushKind::Invalidate => match invalidated(&push.data, &prefix) {
                Some(keys) => sink.invalidate(&keys),
                None => sink.invalidate_all(),
            },
            PushKind::Disconnection => {
                let live = live.lock();
                closed.flag.store(true, Ordering::Release);
                if *live == session {
                    sink.lost();
                }
                drop(live);
                closed.notify.notify_one();
            }
            _ => {}
        }
        Ok(())
    }
}

/// Reports the channel lost when the driver ends, however it ends (its
/// task aborted with the runtime included): nothing reads pushes then.
struct LostOnExit(InvalidationSink);

impl Drop for LostOnExit {
    fn drop(&mut self) {
        self.0.lost();
    }
}

/// Gives a refused or cancelled `subscribe` back its source.
struct Unsubscribed<'a>(&'a AtomicBool);

impl Drop for Unsubscribed<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// One tracking connection, to `node` (`None`: the one node, or the
/// primary Sentinel names).
struct Tracked {
    node: Option<NodeAddr>,
    conn: MultiplexedConnection,
}

/// The tracking connections of one session (one per primary on a
/// cluster), what tells that one of them closed, the primaries they were
/// made for (`None` off a cluster), and on one node the `run_id` of the
/// server tracked (`None` on a cluster, behind Sentinel, or where `INFO`
/// is refused).
struct Tracking {
    session: u64,
    conns: Vec<Tracked>,
    closed: Arc<Closed>,
    primaries: Option<Vec<NodeAddr>>,
    server: Option<String>,
}

/// The `run_id` line of an `INFO server` answer.
fn run_id(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(str::trim)
}

/// The server's `run_id` from an `INFO server` answer; `None` when the
/// server refuses `INFO` (`NOPERM`, or renamed away: unknown command). A
/// transient failure (connection, timeout) fails the session, which is
/// made again.
fn server_id(info: Result<String>) -> Result<Option<String>> {
    match info {
        Ok(info) => Ok(run_id(&info).map(str::to_owned)),
        Err(e) if e.is_retryable() => Err(e),
        Err(_) => Ok(None),
    }
}

fn info_server() -> redis::Cmd {
    let mut cmd = redis::cmd("INFO");
    cmd.arg("server");
    cmd
}

fn from_redis(e: redis::RedisError) -> Error {
    crate::error::from_redis(e)
}

impl RedisInvalidations {
    /// The primaries of the cluster now, asked of the first seed node that
    /// answers.
    async fn discover(&self) -> Result<Vec<NodeAddr>> {
        let mut last = Error::new(ErrorKind::InvalidConfig, "no cluster node to ask");
        for seed in self.shared.client.seeds() {
            let asked = async {
                let mut conn = self.shared.client.node_connection(&seed).await?;
                let nodes: Value = redis::cmd("CLUSTER")
                    .arg("NODES")
                    .query_async(&mut conn)
                    .await
                    .map_err(from_redis)?;
                let nodes = topology::text(&nodes).ok_or_else(|| {
                    Error::new(ErrorKind::Internal, "CLUSTER NODES answered no text")
                })?;
                topology::primaries(nodes, &seed)
            };
            match asked.await {
                Ok(p) if !p.is_empty() => return Ok(p),
                Ok(_) => last = Error::new(ErrorKind::Unavailable, "the cluster lists no primary"),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The tracking connections of a new session, tracking and checked.
    async fn connect(&self, sink: &InvalidationSink) -> Result<Arc<Tracking>> {
        let prefix = self.shared.keys.cache_prefix();
        let closed = Arc::new(Closed::default());
        let session = self.sessions.fetch_add(1, Ordering::AcqRel) + 1;
        let primaries = match self.shared.client.settings().is_cluster() {
            true => Some(self.discover().await?),
            false => None,
        };
        let nodes: Vec<Option<NodeAddr>> = match &primaries {
            Some(nodes) => nodes.iter().cloned().map(Some).collect(),
            None => vec![None],
        };
        let conns = futures::future::try_join_all(nodes.into_iter().map(|node| {
            let handler = push_handler(
                sink.clone(),
                prefix.clone(),
                closed.clone(),
                self.live.clone(),
                session,
            );
            self.track(node, &prefix, handler)
        }))
        .await?;
        let settings = self.shared.client.settings();
        let server = match &conns[..] {
            [one] if !settings.is_cluster() && !settings.is_sentinel() => {
                let info = info_server()
                    .query_async(&mut one.conn.clone())
                    .await
                    .map_err(from_redis);
                let server = server_id(info)?;
                if server.is_none() {
                    tracing::warn!(
                        "near cache: INFO is refused, so it cannot be checked that reads reach \
                         the server tracked (a URL that moves to another server goes unnoticed)"
                    );
                }
                server
            }
            _ => None,
        };
        let tracking = Tracking {
            session,
            conns,
            closed,
            primaries,
            server,
        };
        // Made on a node that is no longer a primary (a Sentinel that has
        // not yet seen the failover), or while the primaries changed: not
        // tracking what it should.
        self.check(&tracking).await?;
        Ok(Arc::new(tracking))
    }

    /// One connection to `node` (or the one node), named and tracking.
    async fn track(
        &self,
        node: Option<NodeAddr>,
        prefix: &str,
        handler: impl redis::aio::AsyncPushSender,
    ) -> Result<Tracked> {
        let mut conn = self.shared.client.resp3(node.as_ref(), handler).await?;
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(format!(
                "{TRACKING_CLIENT_NAME}:{}",
                self.shared.client.settings().namespace
            ))
            .query_async::<()>(&mut conn)
            .await
            .map_err(from_redis)?;
        redis::cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .arg("BCAST")
            .arg("PREFIX")
            .arg(prefix)
            .query_async::<()>(&mut conn)
            .await
            .map_err(from_redis)?;
        Ok(Tracked { node, conn })
    }

    /// Makes `tracking` the live session and reports the channel up;
    /// refused (`false`) when one of its connections already closed.
    fn go_live(&self, sink: &InvalidationSink, tracking: &Arc<Tracking>) -> bool {
        let mut live = self.live.lock();
        if tracking.closed.flag.load(Ordering::Acquire) {
            return false;
        }
        *live = tracking.session;
        self.current.store(Some(tracking.clone()));
        sink.ready();
        true
    }

    fn closed_early() -> Error {
        Error::new(
            ErrorKind::Unavailable,
            "a tracking connection closed as the session was made",
        )
    }

    /// The live session is over: reports the channel lost.
    fn go_down(&self, sink: &InvalidationSink) {
        let mut live = self.live.lock();
        *live = 0;
        self.current.store(None);
        sink.lost();
    }

    /// One connection answers (after every push it sent before), and is a
    /// primary where that can change under it.
    async fn confirm(&self, tracked: &Tracked) -> Result<()> {
        let mut conn = tracked.conn.clone();
        let settings = self.shared.client.settings();
        if !settings.is_cluster() && !settings.is_sentinel() {
            return redis::cmd("PING")
                .query_async::<()>(&mut conn)
                .await
                .map_err(from_redis);
        }
        let role: Value = redis::cmd("ROLE")
            .query_async(&mut conn)
            .await
            .map_err(from_redis)?;
        if topology::is_primary(&role)? {
            Ok(())
        } else {
            self.shared.client.primary_demoted();
            Err(Error::new(
                ErrorKind::Unavailable,
                "a tracking connection's node is no longer a primary",
            ))
        }
    }

    /// The check of a heartbeat and of `sync`, bounded by one heartbeat:
    /// every connection confirms, on a cluster the primaries are those
    /// tracked, and on one node the reads reach the server tracked.
    async fn check(&self, tracking: &Tracking) -> Result<()> {
        let confirmed =
            futures::future::try_join_all(tracking.conns.iter().map(|t| self.confirm(t)));
        let same_primaries = async {
            let Some(tracked) = &tracking.primaries else {
                return Ok(());
            };
            let Some((first, Some(asked))) = tracking.conns.first().map(|t| (t, &t.node)) else {
                return Err(Error::new(
                    ErrorKind::Internal,
                    "a cluster session without a tracked node",
                ));
            };
            let nodes: Value = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut first.conn.clone())
                .await
                .map_err(from_redis)?;
            let nodes = topology::text(&nodes)
                .ok_or_else(|| Error::new(ErrorKind::Internal, "CLUSTER NODES answered no text"))?;
            if topology::primaries(nodes, asked)? == *tracked {
                Ok(())
            } else {
                Err(Error::new(
                    ErrorKind::Unavailable,
                    "the cluster's primaries changed since the tracking connections were made",
                ))
            }
        };
        // Only a different server fails it: the reads' connection being
        // slow or down is the reads' business (they fail or wait on their
        // own), and must not empty the near cache.
        let same_server = async {
            let Some(tracked) = &tracking.server else {
                return Ok(());
            };
            let info = info_server();
            let asked = self.shared.client.query::<String>(&info);
            match tokio::time::timeout(TRACKING_HEARTBEAT / 2, asked).await {
                Ok(Ok(info)) if run_id(&info).is_some_and(|reads| reads != tracked) => {
                    Err(Error::new(
                        ErrorKind::Unavailable,
                        "reads reach another server than the one tracked (the URL moved)",
                    ))
                }
                _ => Ok(()),
            }
        };
        match tokio::time::timeout(TRACKING_HEARTBEAT, async {
            futures::try_join!(confirmed, same_primaries, same_server)
        })
        .await
        {
            Ok(done) => done.map(drop),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                "the tracking connections did not answer in time",
            )),
        }
    }

    /// Keeps the channel up until `stop`: checks the live session, reports
    /// it lost when it fails (or a `sync` could not confirm), and makes
    /// another with backoff.
    async fn drive(self, sink: InvalidationSink, stop: CancellationToken, first: Arc<Tracking>) {
        let _lost_on_exit = LostOnExit(sink.clone());
        let mut live = Some(first);
        let mut delay = Duration::from_millis(50);
        while !stop.is_cancelled() {
            if let Some(tracking) = live.take() {
                delay = Duration::from_millis(50);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tracking.closed.notify.notified() => break,
                        _ = self.reset.notified() => {
                            if self.reset_session.load(Ordering::Acquire) == tracking.session {
                                break;
                            }
                            continue;
                        }
                        _ = tokio::time::sleep(TRACKING_HEARTBEAT) => {}
                    }
                    if let Err(e) = self.check(&tracking).await {
                        tracing::warn!(error = %e, "near cache: tracking failed; reads go to redis until it is back");
                        break;
                    }
                }
                self.go_down(&sink);
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(2));
            match self.connect(&sink).await {
                Ok(tracking) if self.go_live(&sink, &tracking) => live = Some(tracking),
                Ok(_) => {
                    tracing::warn!(error = %Self::closed_early(), "near cache: no tracking connection; reads go to redis");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "near cache: no tracking connection; reads go to redis");
                }
            }
        }
    }
}

#[async_trait]
impl InvalidationSource for RedisInvalidations {
    async fn subscribe(&self, sink: InvalidationSink) -> Result<Subscription> {
        if self.subscribed.swap(true, Ordering::AcqRel) {
            return Err(Error::new(
                ErrorKind::InvalidState,
                "this invalidation source already feeds a near cache: take another from RedisBackend::invalidations",
            ));
        }
        let unsubscribed = Unsubscribed(&self.subscribed);
        // The first session is made here, so that a wrong setting fails the
        // build and the near cache starts live; the driver keeps it.
        let first = self.connect(&sink).await?;
        if !self.go_live(&sink, &first) {
            return Err(Self::closed_early());
        }
        std::mem::forget(unsubscribed);
        let stop = self.shared.client.stop().child_token();
        tokio::spawn(self.clone().drive(sink, stop.clone(), first));
        Ok(Subscription::new(stop.drop_guard()))
    }

    /// The heartbeat's check, now. When it fails and its session is still
    /// the live one, the driver is told to make the connections again
    /// (reporting the channel lost, then ready); the error says so. With
    /// no live session the driver is already at it.
    async fn sync(&self) -> Result<()> {
        let Some(tracking) = self.current.load_full() else {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "the tracking connection is down",
            ));
        };
        let result = self.check(&tracking).await;
        // Under the lock that orders sessions going live: a request for an
        // older session cannot overwrite a newer one's.
        let live = self.live.lock();
        if result.is_err() && *live == tracking.session {
            self.reset_session
                .store(tracking.session, Ordering::Release);
            self.reset.notify_one();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server is named by `run_id`; a refused `INFO` leaves it
    /// unknown (the check is skipped), a transient failure fails the
    /// session.
    #[test]
    fn the_server_is_its_run_id_and_a_refused_info_leaves_it_unknown() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:4f2a9c\r\ntcp_port:6379\r\n";
        assert_eq!(run_id(info), Some("4f2a9c"));
        assert_eq!(
            server_id(Ok(info.into())).unwrap().as_deref(),
            Some("4f2a9c")
        );
        assert_eq!(run_id("# Server\r\n"), None);
        let refused = Error::new(ErrorKind::InvalidConfig, "NOPERM");
        assert_eq!(server_id(Err(refused)).unwrap(), None);
        let renamed = Error::new(ErrorKind::Internal, "ERR unknown command 'INFO'");
        assert_eq!(server_id(Err(renamed)).unwrap(), None);
        let down = Error::new(ErrorKind::Connection, "refused");
        assert!(server_id(Err(down)).is_err());
    }

    #[test]
    fn pushed_keys_lose_the_namespace_and_others_are_ignored() {
        let data = vec![Value::Array(vec![
            Value::BulkString(b"ns:c:user:1".to_vec()),
            Value::BulkString(b"ns:rl:x".to_vec()),
        ])];
        assert_eq!(
            invalidated(&data, "ns:c:"),
            Some(vec!["user:1".to_string()])
        );
        assert_eq!(invalidated(&[Value::Nil], "ns:c:"), None);
    }
}
