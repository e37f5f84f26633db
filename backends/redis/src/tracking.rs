//! Invalidations for a near cache, from Redis's client-side caching: a
//! RESP3 connection of its own in broadcast mode (`CLIENT TRACKING ON
//! BCAST PREFIX <ns>:c:`), so that every write to a cache key of the
//! namespace, by any client, is pushed to it. A node pushes only the
//! writes it applies, so on a cluster there is one such connection to
//! every primary of the moment.
//!
//! The connections are checked with a `PING` every `TRACKING_HEARTBEAT` (and, on a
//! cluster, the set of primaries with `CLUSTER SLOTS`); a push that says
//! one closed, a `PING` without an answer within `TRACKING_HEARTBEAT`, or a new
//! primary report the channel lost (the near cache empties and reads go to
//! the server), and the connections are made again with backoff. A frozen
//! network or a failover is noticed within two heartbeats, which bounds how
//! long a near cache can hold a value that a write meanwhile replaced.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use im_infra::cache::near::{InvalidationSink, InvalidationSource, Subscription};
use im_infra::{Error, ErrorKind, Result};
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio_util::sync::CancellationToken;

use crate::client::NodeAddr;
use crate::Shared;

/// How often the tracking connections are checked, and how long their
/// answer may take: a network that freezes without closing anything stops
/// a near cache from answering from memory within two of these.
pub const TRACKING_HEARTBEAT: Duration = Duration::from_millis(500);

/// The name the tracking connection gives itself (`CLIENT LIST`), followed
/// by `:` and the backend's namespace.
pub const TRACKING_CLIENT_NAME: &str = "im-infra-near-cache";

/// The invalidation source of one [`RedisBackend`](crate::RedisBackend)'s
/// cache: see the [module](self). One near cache per source: a second
/// `subscribe` is refused.
#[derive(Clone)]
pub(crate) struct RedisInvalidations {
    shared: Arc<Shared>,
    /// The live session (for `sync`).
    current: Arc<ArcSwapOption<Tracking>>,
    /// Which connection is the live one: a push of an older one is ignored.
    session: Arc<AtomicU64>,
    /// Tells the driver to make the connection again (a `sync` that could
    /// not confirm).
    reset: Arc<tokio::sync::Notify>,
    subscribed: Arc<AtomicBool>,
}

impl RedisInvalidations {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RedisInvalidations {
            shared,
            current: Arc::new(ArcSwapOption::empty()),
            session: Arc::new(AtomicU64::new(0)),
            reset: Arc::new(tokio::sync::Notify::new()),
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
            .filter_map(|k| match k {
                Value::BulkString(b) => std::str::from_utf8(b).ok(),
                Value::SimpleString(s) => Some(s.as_str()),
                _ => None,
            })
            .filter_map(|k| k.strip_prefix(prefix))
            .map(str::to_owned)
            .collect(),
    )
}

/// Applies pushes as they are read, before the answer of any command sent
/// after them: so a `PING` answered means every earlier push is applied.
/// A connection that closes while it is the live one (`session`) reports
/// the channel lost at once and wakes the driver.
fn push_handler(
    sink: InvalidationSink,
    prefix: String,
    closed: Arc<tokio::sync::Notify>,
    live: Arc<AtomicU64>,
    session: u64,
) -> impl Fn(PushInfo) -> std::result::Result<(), redis::aio::SendError> + Send + Sync + 'static {
    move |push: PushInfo| {
        match push.kind {
            PushKind::Invalidate => match invalidated(&push.data, &prefix) {
                Some(keys) => sink.invalidate(&keys),
                None => sink.invalidate_all(),
            },
            PushKind::Disconnection => {
                if live.load(Ordering::Acquire) == session {
                    sink.lost();
                }
                closed.notify_one();
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

async fn ping(conn: &mut MultiplexedConnection) -> Result<()> {
    match tokio::time::timeout(
        TRACKING_HEARTBEAT,
        redis::cmd("PING").query_async::<()>(conn),
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(crate::error::from_redis(e)),
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            "the tracking connection did not answer a PING in time",
        )),
    }
}

/// `PING`s every connection at once: `Ok` when all answered in time.
async fn ping_all(conns: &[MultiplexedConnection]) -> Result<()> {
    futures::future::try_join_all(
        conns
            .iter()
            .map(|c| async move { ping(&mut c.clone()).await }),
    )
    .await
    .map(drop)
}

/// The tracking connections of one session (one per primary on a
/// cluster), what tells that one of them closed, and the primaries they
/// were made for (`None` off a cluster).
struct Tracking {
    conns: Vec<MultiplexedConnection>,
    closed: Arc<tokio::sync::Notify>,
    primaries: Option<Vec<NodeAddr>>,
}

impl RedisInvalidations {
    /// The tracking connections of the next session, tracking.
    async fn connect(&self, sink: &InvalidationSink) -> Result<Arc<Tracking>> {
        let prefix = self.shared.keys.cache_prefix();
        let closed = Arc::new(tokio::sync::Notify::new());
        let session = self.session.load(Ordering::Acquire) + 1;
        let primaries = self.shared.client.cluster_primaries().await?;
        let nodes: Vec<Option<NodeAddr>> = match &primaries {
            Some(nodes) if nodes.is_empty() => {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    "the cluster serves no slots",
                ))
            }
            Some(nodes) => nodes.iter().cloned().map(Some).collect(),
            None => vec![None],
        };
        let conns = futures::future::try_join_all(nodes.iter().map(|node| {
            let handler = push_handler(
                sink.clone(),
                prefix.clone(),
                closed.clone(),
                self.session.clone(),
                session,
            );
            self.track(node.as_ref(), &prefix, handler)
        }))
        .await?;
        Ok(Arc::new(Tracking {
            conns,
            closed,
            primaries,
        }))
    }

    /// One connection to `node` (or the one node), named and tracking.
    async fn track(
        &self,
        node: Option<&NodeAddr>,
        prefix: &str,
        handler: impl redis::aio::AsyncPushSender,
    ) -> Result<MultiplexedConnection> {
        let mut conn = self.shared.client.resp3(node, handler).await?;
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(format!(
                "{TRACKING_CLIENT_NAME}:{}",
                self.shared.client.settings().namespace
            ))
            .query_async::<()>(&mut conn)
            .await
            .map_err(crate::error::from_redis)?;
        redis::cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .arg("BCAST")
            .arg("PREFIX")
            .arg(prefix)
            .query_async::<()>(&mut conn)
            .await
            .map_err(crate::error::from_redis)?;
        Ok(conn)
    }

    /// Makes `tracking` the live session and reports the channel up.
    fn go_live(&self, sink: &InvalidationSink, tracking: &Arc<Tracking>) {
        self.session.fetch_add(1, Ordering::AcqRel);
        self.current.store(Some(tracking.clone()));
        sink.ready();
    }

    /// One heartbeat: every connection answers, and on a cluster the
    /// primaries are those the connections were made to (a slot moved
    /// between them changes nothing: each pushes what it applies).
    async fn check(&self, tracking: &Tracking) -> Result<()> {
        ping_all(&tracking.conns).await?;
        if let Some(primaries) = &tracking.primaries {
            if self.shared.client.cluster_primaries().await?.as_ref() != Some(primaries) {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    "the cluster's primaries changed since the tracking connections were made",
                ));
            }
        }
        Ok(())
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
                        _ = tracking.closed.notified() => break,
                        _ = self.reset.notified() => break,
                        _ = tokio::time::sleep(TRACKING_HEARTBEAT) => {}
                    }
                    if let Err(e) = self.check(&tracking).await {
                        tracing::warn!(error = %e, "near cache: tracking failed; reads go to redis until it is back");
                        break;
                    }
                }
                self.current.store(None);
                sink.lost();
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(2));
            match self.connect(&sink).await {
                Ok(tracking) => {
                    self.go_live(&sink, &tracking);
                    live = Some(tracking);
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
        // The first connection is made here, so that a wrong setting fails
        // the build and the near cache starts live; the driver keeps it.
        let first = match self.connect(&sink).await {
            Ok(first) => first,
            Err(e) => {
                self.subscribed.store(false, Ordering::Release);
                return Err(e);
            }
        };
        self.go_live(&sink, &first);
        let stop = self.shared.client.shutdown.child_token();
        tokio::spawn(self.clone().drive(sink, stop.clone(), first));
        Ok(Subscription::new(stop.drop_guard()))
    }

    /// A `PING` on every live tracking connection (and on a cluster, the
    /// primaries checked). When there is none, or one does not answer, the
    /// driver is told to make them again (reporting the channel lost, then
    /// ready), and the error says so.
    async fn sync(&self) -> Result<()> {
        let result = match self.current.load_full() {
            Some(tracking) => self.check(&tracking).await,
            None => Err(Error::new(
                ErrorKind::Unavailable,
                "the tracking connection is down",
            )),
        };
        if result.is_err() {
            self.reset.notify_one();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
