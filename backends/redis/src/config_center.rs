//! `ConfigCenter` on Redis: values in a hash, a global revision counter,
//! and a change stream that watches read and resume from.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use im_infra::config::watch::{WatchCursor, WatchTarget};
use im_infra::config::watch_driver::{spawn_watch, Batch, ConfigHistory, Continuity};
use im_infra::config::{
    ConfigCapabilities, ConfigCenter, ConfigEvent, Versioned, WatchOptions, WatchStream,
};
use im_infra::{Error, ErrorKind, Result};
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokio::time::Instant;

use crate::client;
use crate::error::{decode, from_redis};
use crate::Shared;

static WRITE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("scripts/config_write.lua")));
static SNAPSHOT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("scripts/config_snapshot.lua")));

/// How long one blocking read of the change stream waits.
const BLOCK: Duration = Duration::from_millis(1000);

/// The config center of a [`RedisBackend`](crate::RedisBackend).
///
/// Every change takes a new revision from one counter: the larger of the
/// previous revision + 1 and the server's clock in microseconds, so
/// revisions strictly increase and, after Redis comes back with older data
/// (a restart from an old RDB/AOF file, a failover to a lagging replica),
/// still exceed every version handed out before — provided the server's
/// clock did not step back across the restore. The value and its version
/// (the revision) go to a hash, and the change to a stream under the id
/// `<revision>-1`, with the revision before it, trimmed to `config_history`
/// entries.
///
/// A watch reads the stream from its last revision on a connection of its
/// own, reconnects with backoff after any failure and resumes where it
/// stopped. Each entry names its predecessor, so the watch knows whether
/// the history continues from its cursor: when the entries it needs were
/// trimmed it re-reads the current state; when the server lost changes the
/// watch delivered (its revision is behind the cursor, or the history after
/// the cursor continues from an earlier revision) it re-reads the current
/// state, reports every key that may differ from what it delivered, and
/// continues from the server's revision
/// ([`WatchCursor::resync_regressed`]).
///
/// Handed out inside
/// [`ObservedConfigCenter`](im_infra::layer::ObservedConfigCenter), which
/// checks keys, prefixes and value sizes.
pub(crate) struct RedisConfigCenter {
    shared: Arc<Shared>,
}

fn internal(msg: &str) -> Error {
    Error::new(ErrorKind::Internal, msg.to_owned()).with_backend(crate::NAME)
}

impl RedisConfigCenter {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RedisConfigCenter { shared }
    }

    async fn write(
        &self,
        key: &str,
        value: Option<&Bytes>,
        expected: Option<u64>,
    ) -> Result<(i64, i64)> {
        let k = &self.shared.keys;
        let keys = [k.cfg("rev"), k.cfg("data"), k.cfg("index"), k.cfg("log")];
        let mut cmd = client::evalsha(&WRITE, keys);
        cmd.arg(key)
            .arg(if value.is_some() { "p" } else { "d" })
            .arg(value.map(|v| v.as_ref()).unwrap_or_default())
            .arg(expected.map(|e| e.to_string()).unwrap_or_default())
            .arg(self.shared.client.settings().config_history);
        self.shared.client.script(&WRITE, &cmd).await
    }

    async fn open_watch(&self, target: WatchTarget, opts: WatchOptions) -> Result<WatchStream> {
        // A watch from a given version reads nothing before its task runs.
        self.shared.client.check_open()?;
        let history = History {
            shared: Arc::downgrade(&self.shared),
            conn: None,
            checked: Instant::now(),
        };
        let client = &self.shared.client;
        let (retry, shutdown) = (client.settings().retry.clone(), client.stop().clone());
        spawn_watch(history, target, opts, retry, shutdown).await
    }
}

/// Reads the current state covered by `target`, with the revision.
async fn snapshot(
    shared: &Shared,
    target: &WatchTarget,
) -> Result<(u64, Vec<(String, Versioned)>)> {
    let k = &shared.keys;
    let (mode, arg) = match target {
        WatchTarget::Key(key) => ("key", key.as_str()),
        WatchTarget::Prefix(p) => ("prefix", p.as_str()),
    };
    let keys = [k.cfg("rev"), k.cfg("data"), k.cfg("index")];
    let mut cmd = client::evalsha(&SNAPSHOT, keys);
    cmd.arg(mode).arg(arg);
    let raw: Vec<Value> = shared.client.script(&SNAPSHOT, &cmd).await?;
    let mut it = raw.into_iter();
    let rev: u64 = it.next().map(decode).transpose()?.unwrap_or(0);
    let mut entries = Vec::new();
    while let (Some(k), Some(v), Some(ver)) = (it.next(), it.next(), it.next()) {
        let key: String = decode(k)?;
        let value: Vec<u8> = decode(v)?;
        let version: u64 = decode(ver)?;
        entries.push((
            key,
            Versioned {
                value: Bytes::from(value),
                version,
            },
        ));
    }
    Ok((rev, entries))
}

/// A change read from the stream.
fn parse_entry(id: &str, fields: &std::collections::HashMap<String, Value>) -> Option<ConfigEvent> {
    let version: u64 = id.split('-').next()?.parse().ok()?;
    let field = |name: &str| {
        fields
            .get(name)
            .and_then(|v| redis::from_redis_value::<Vec<u8>>(v.clone()).ok())
    };
    let key = String::from_utf8(field("k")?).ok()?;
    let kind = field("t")?;
    Some(if kind == b"d" {
        ConfigEvent::delete(key, version)
    } else {
        ConfigEvent::put(key, Bytes::from(field("v").unwrap_or_default()), version)
    })
}

/// The revision of a stream entry and the revision before it (entries
/// written before the field existed had consecutive revisions).
fn entry_link(id: &str, fields: &std::collections::HashMap<String, Value>) -> Option<(u64, u64)> {
    let version: u64 = id.split('-').next()?.parse().ok()?;
    let prev = match fields.get("pr") {
        Some(v) => redis::from_redis_value::<u64>(v.clone()).ok()?,
        None => version.checked_sub(1)?,
    };
    Some((version, prev))
}

/// Where the entry after `last` says it comes from.
fn continuity(last: u64, link: Option<(u64, u64)>) -> Continuity {
    match link {
        None => Continuity::Continuous,
        Some((_, prev)) if prev == last => Continuity::Continuous,
        Some((_, prev)) if prev > last => Continuity::Trimmed,
        Some(_) => Continuity::Regressed,
    }
}

/// One read of the change stream after `last`: blocking on a dedicated
/// connection, or a plain read (then a pause) on a cluster.
async fn read_after(
    shared: &Shared,
    conn: &mut Option<MultiplexedConnection>,
    last: u64,
) -> Result<Vec<(String, std::collections::HashMap<String, Value>)>> {
    let log = shared.keys.cfg("log");
    let mut cmd = redis::cmd("XREAD");
    if conn.is_some() {
        cmd.arg("BLOCK").arg(BLOCK.as_millis() as u64);
    }
    cmd.arg("COUNT")
        .arg(512)
        .arg("STREAMS")
        .arg(&log)
        .arg(format!("{last}-1"));
    let reply: Option<redis::streams::StreamReadReply> = match conn {
        Some(c) => cmd.query_async(c).await.map_err(from_redis)?,
        None => {
            let r = shared.client.query(&cmd).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            r
        }
    };
    Ok(reply
        .map(|r| {
            r.keys
                .into_iter()
                .flat_map(|k| k.ids.into_iter().map(|e| (e.id, e.map)))
                .collect()
        })
        .unwrap_or_default())
}

/// The first entry of the stream after `version`, as (its revision, the
/// revision before it).
async fn first_after(shared: &Shared, version: u64) -> Result<Option<(u64, u64)>> {
    // Every id is `<revision>-1`: `<version>-2` starts right after ours.
    let r: redis::streams::StreamRangeReply = shared
        .client
        .query(
            redis::cmd("XRANGE")
                .arg(shared.keys.cfg("log"))
                .arg(format!("{version}-2"))
                .arg("+")
                .arg("COUNT")
                .arg(1),
        )
        .await?;
    Ok(r.ids.first().and_then(|e| entry_link(&e.id, &e.map)))
}

async fn current_revision(shared: &Shared) -> Result<u64> {
    let rev: Option<u64> = shared
        .client
        .query(redis::cmd("GET").arg(shared.keys.cfg("rev")))
        .await?;
    Ok(rev.unwrap_or(0))
}

/// How often an idle watch checks that the server's revision is not behind
/// its cursor (the server came back with older data and nothing was
/// written since).
const REGRESSION_CHECK: Duration = Duration::from_secs(1);

/// The change stream as one watch reads it: on a connection of its own
/// (`None` on a cluster, which polls), checking on every connection, on
/// every read and every [`REGRESSION_CHECK`] while idle that the history
/// continues from the cursor.
struct History {
    shared: Weak<Shared>,
    conn: Option<MultiplexedConnection>,
    /// When the idle regression check last ran.
    checked: Instant,
}

impl History {
    fn shared(&self) -> Result<Arc<Shared>> {
        im_infra::backend::upgrade(&self.shared, crate::NAME)
    }
}

#[async_trait]
impl ConfigHistory for History {
    async fn revision(&mut self) -> Result<u64> {
        current_revision(&*self.shared()?).await
    }

    async fn snapshot(&mut self, target: &WatchTarget) -> Result<(u64, Vec<(String, Versioned)>)> {
        snapshot(&*self.shared()?, target).await
    }

    async fn connect(&mut self, cursor: &WatchCursor) -> Result<Continuity> {
        let s = self.shared()?;
        let block = BLOCK + s.client.settings().request_timeout;
        self.conn = s.client.dedicated(block).await?;
        self.checked = Instant::now();
        let last = cursor.last_version();
        let rev = current_revision(&s).await?;
        Ok(match rev.cmp(&last) {
            std::cmp::Ordering::Less => Continuity::Regressed,
            std::cmp::Ordering::Equal => Continuity::Continuous,
            // The revision moved on but nothing follows us: trimmed.
            std::cmp::Ordering::Greater => match first_after(&s, last).await? {
                None => Continuity::Trimmed,
                link => continuity(last, link),
            },
        })
    }

    async fn next_batch(&mut self, cursor: &WatchCursor) -> Result<Batch> {
        let s = self.shared()?;
        let last = cursor.last_version();
        let entries = read_after(&s, &mut self.conn, last).await?;
        let Some((first_id, first_fields)) = entries.first() else {
            if self.checked.elapsed() < REGRESSION_CHECK {
                return Ok(Batch::idle());
            }
            self.checked = Instant::now();
            let behind = current_revision(&s).await? < last;
            return Ok(if behind {
                Batch::Regressed
            } else {
                Batch::idle()
            });
        };
        let how = continuity(last, entry_link(first_id, first_fields));
        if how != Continuity::Continuous {
            return Ok(Batch::from(how));
        }
        let events = entries
            .iter()
            .filter_map(|(id, fields)| {
                let event = parse_entry(id, fields);
                if event.is_none() {
                    tracing::warn!(id, "unreadable config change ignored");
                }
                event
            })
            .collect();
        // Entries of other keys (and unreadable ones) still move the cursor.
        let upto = entries
            .last()
            .and_then(|(id, _)| id.split('-').next()?.parse().ok());
        Ok(Batch::changes(events, upto.unwrap_or(0)))
    }
}

#[async_trait]
impl ConfigCenter for RedisConfigCenter {
    fn capabilities(&self) -> ConfigCapabilities {
        ConfigCapabilities::full(self.shared.client.settings().max_value_bytes)
    }

    async fn get_with_version(&self, key: &str) -> Result<Option<Versioned>> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.shared.keys.cfg("data"))
            .arg(format!("v:{key}"))
            .arg(format!("r:{key}"));
        let (value, version): (Option<Vec<u8>>, Option<u64>) =
            self.shared.client.query(&cmd).await?;
        Ok(match (value, version) {
            (Some(v), Some(version)) => Some(Versioned {
                value: Bytes::from(v),
                version,
            }),
            _ => None,
        })
    }

    async fn set(&self, key: &str, value: Bytes) -> Result<u64> {
        let (_, rev) = self.write(key, Some(&value), None).await?;
        u64::try_from(rev).map_err(|_| internal("negative revision"))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let (status, _) = self.write(key, None, None).await?;
        Ok(status == 1)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let mut cmd = redis::cmd("ZRANGEBYLEX");
        cmd.arg(self.shared.keys.cfg("index"));
        if prefix.is_empty() {
            cmd.arg("-").arg("+");
        } else {
            let mut end = format!("[{prefix}").into_bytes();
            end.push(0xff);
            cmd.arg(format!("[{prefix}")).arg(end);
        }
        let keys: Vec<String> = self.shared.client.query(&cmd).await?;
        Ok(keys.into_iter().filter(|k| k.starts_with(prefix)).collect())
    }

    async fn compare_and_set(&self, key: &str, value: Bytes, expected_version: u64) -> Result<u64> {
        let (status, n) = self
            .write(key, Some(&value), Some(expected_version))
            .await?;
        if status == -1 {
            return Err(im_infra::config::conflict(
                key,
                u64::try_from(n).ok(),
                expected_version,
            ));
        }
        u64::try_from(n).map_err(|_| internal("negative revision"))
    }

    async fn watch(&self, key: &str, opts: WatchOptions) -> Result<WatchStream> {
        self.open_watch(WatchTarget::key(key)?, opts).await
    }

    async fn watch_prefix(&self, prefix: &str, opts: WatchOptions) -> Result<WatchStream> {
        self.open_watch(WatchTarget::prefix(prefix)?, opts).await
    }
}
