//! Invalidations for a near cache, from Redis's client-side caching: one
//! RESP3 connection of its own in broadcast mode (`CLIENT TRACKING ON
//! BCAST PREFIX <ns>:c:`), so that every write to a cache key of the
//! namespace, by any client, is pushed to it.
//!
//! The connection is checked with a `PING` every `HEARTBEAT`; a push that
//! says it closed, or a `PING` without an answer within `HEARTBEAT`,
//! reports the channel lost (the near cache empties and reads go to the
//! server), and the connection is made again with backoff. A frozen
//! network is noticed within two heartbeats, which bounds how long a near
//! cache can hold a value that a write during the freeze replaced.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use im_infra::cache::near::{InvalidationSink, InvalidationSource, Subscription};
use im_infra::{Error, ErrorKind, Result};
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// How often the tracking connection is checked, and how long its answer
/// may take.
const HEARTBEAT: Duration = Duration::from_millis(500);

/// The name the tracking connection gives itself (`CLIENT LIST`), followed
/// by `:` and the backend's namespace.
pub const TRACKING_CLIENT_NAME: &str = "im-infra-near-cache";

/// The invalidation source of one [`RedisBackend`](crate::RedisBackend)'s
/// cache: see the [module](self). One sink per source.
#[derive(Clone)]
pub(crate) struct RedisInvalidations {
    shared: Arc<Shared>,
    current: Arc<ArcSwapOption<MultiplexedConnection>>,
}

impl RedisInvalidations {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RedisInvalidations {
            shared,
            current: Arc::new(ArcSwapOption::empty()),
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
fn push_handler(
    sink: InvalidationSink,
    prefix: String,
    closed: Arc<tokio::sync::Notify>,
) -> impl Fn(PushInfo) -> std::result::Result<(), redis::aio::SendError> + Send + Sync + 'static {
    move |push: PushInfo| {
        match push.kind {
            PushKind::Invalidate => match invalidated(&push.data, &prefix) {
                Some(keys) => sink.invalidate(&keys),
                None => sink.invalidate_all(),
            },
            PushKind::Disconnection => {
                sink.lost();
                closed.notify_one();
            }
            _ => {}
        }
        Ok(())
    }
}

async fn ping(conn: &mut MultiplexedConnection) -> Result<()> {
    match tokio::time::timeout(HEARTBEAT, redis::cmd("PING").query_async::<()>(conn)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(crate::error::from_redis(e)),
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            "the tracking connection did not answer a PING in time",
        )),
    }
}

impl RedisInvalidations {
    /// One tracking connection, tracking: `None` on a cluster.
    async fn connect(
        &self,
        sink: &InvalidationSink,
        closed: &Arc<tokio::sync::Notify>,
    ) -> Result<MultiplexedConnection> {
        let prefix = self.shared.keys.cache_prefix();
        let handler = push_handler(sink.clone(), prefix.clone(), closed.clone());
        let Some(mut conn) = self.shared.client.resp3(handler).await? else {
            return Err(unsupported());
        };
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
            .arg(&prefix)
            .query_async::<()>(&mut conn)
            .await
            .map_err(crate::error::from_redis)?;
        Ok(conn)
    }

    /// Keeps the channel up until `stop`: connects, reports ready, checks
    /// it, reports it lost, and again.
    async fn drive(
        self,
        sink: InvalidationSink,
        stop: CancellationToken,
        mut first: Option<(MultiplexedConnection, Arc<tokio::sync::Notify>)>,
    ) {
        let mut delay = Duration::from_millis(50);
        while !stop.is_cancelled() {
            let (connected, closed) = match first.take() {
                Some((conn, closed)) => (Ok(conn), closed),
                None => {
                    let closed = Arc::new(tokio::sync::Notify::new());
                    (self.connect(&sink, &closed).await, closed)
                }
            };
            match connected {
                Ok(mut conn) => {
                    delay = Duration::from_millis(50);
                    self.current.store(Some(Arc::new(conn.clone())));
                    sink.ready();
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = closed.notified() => break,
                            _ = tokio::time::sleep(HEARTBEAT) => {}
                        }
                        if let Err(e) = ping(&mut conn).await {
                            tracing::warn!(error = %e, "near cache: the tracking connection failed; reads go to redis until it is back");
                            break;
                        }
                    }
                    self.current.store(None);
                    sink.lost();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "near cache: no tracking connection; reads go to redis");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

fn unsupported() -> Error {
    Error::new(
        ErrorKind::Unsupported,
        "near cache invalidations on Redis Cluster are not supported (tracking is per node): use max_staleness",
    )
}

#[async_trait]
impl InvalidationSource for RedisInvalidations {
    async fn subscribe(&self, sink: InvalidationSink) -> Result<Subscription> {
        if self.shared.client.settings().is_cluster() {
            return Err(unsupported());
        }
        // The first connection is made here, so that a wrong setting fails
        // the build; the driver keeps it from then on.
        let stop = self.shared.client.shutdown.child_token();
        let closed = Arc::new(tokio::sync::Notify::new());
        let first = self.connect(&sink, &closed).await?;
        tokio::spawn(
            self.clone()
                .drive(sink, stop.clone(), Some((first, closed))),
        );
        Ok(Subscription::new(stop.drop_guard()))
    }

    async fn sync(&self) -> Result<()> {
        let conn = self.current.load_full();
        match conn {
            Some(conn) => ping(&mut (*conn).clone()).await,
            None => Err(Error::new(
                ErrorKind::Unavailable,
                "the tracking connection is down",
            )),
        }
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
