//! `ConfigCenter` on tables: current values with versions, and a change log
//! (id = version) that watches poll and resume from.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use bytes::Bytes;
use im_infra::config::watch::{WatchCursor, WatchTarget};
use im_infra::config::watch_driver::{spawn_watch, Batch, ConfigHistory, Continuity};
use im_infra::config::{
    ConfigCapabilities, ConfigCenter, ConfigEvent, Versioned, WatchOptions, WatchStream,
};
use im_infra::{Error, ErrorKind, Result};
use mysql_async::prelude::Queryable;
use mysql_async::{Params, Value};

use crate::db::first;
use crate::error::{malformed, ForKey};
use crate::shared::NOW_MICROS;
use crate::Shared;

/// Changes read by one poll of a watch.
const BATCH: usize = 256;

/// The config center of a [`MysqlBackend`](crate::MysqlBackend).
///
/// A write is one transaction that first takes the next version from the
/// `config_writer` row of `<prefix>meta`, which locks it (so writers commit
/// in the order of their versions), checks the expected version, appends
/// the change to `<prefix>config_log` under the version as its id and
/// stores the value with it. A version is the larger of the previous
/// version plus one and the server's clock (`UTC_TIMESTAMP(6)`) in
/// microseconds since 1970: strictly increasing, and after the database
/// comes back with older data (a restore from a backup, a failover to a
/// lagging replica) still above every version handed out before, as long
/// as the server's clock did not step back across the restore.
///
/// A watch polls the log after the last id it delivered, every
/// `config_poll_interval` (after a failed poll, with the backoff of the
/// `retry` setting), so a lost connection loses nothing; when the ids
/// it needs were purged (the `config_floor` row says up to where) it
/// re-reads the current state. When the database lost changes the watch
/// delivered — the newest id is behind the cursor, or the last change it
/// delivered is gone from a log not purged that far — it re-reads the
/// current state, reports every key that may differ from what it delivered
/// and continues from the database's revision
/// ([`WatchCursor::resync_regressed`]).
///
/// Raw operations: the backend hands it out layered
/// ([`ObservedConfigCenter`](im_infra::layer::ObservedConfigCenter):
/// argument checks, value sizes, telemetry).
pub(crate) struct MysqlConfigCenter {
    shared: Arc<Shared>,
    /// Built once per handle; a write's transaction holds a clone.
    sql: Arc<Statements>,
}

/// What a write did.
enum Written {
    /// Stored (or deleted) at this version.
    At(u64),
    /// A delete of a key that does not exist.
    Missing,
    /// The compare-and-set found this version.
    Conflict(u64),
}

/// The SQL of one table prefix.
struct Statements {
    get: String,
    next_version: String,
    versions: String,
    append: String,
    upsert: String,
    remove: String,
}

impl Statements {
    fn new(shared: &Shared) -> Self {
        let (config, log, meta) = (
            shared.table("config"),
            shared.table("config_log"),
            shared.table("meta"),
        );
        Statements {
            get: format!("SELECT v, version FROM {config} WHERE k = ?"),
            // Locks the writers' row until the transaction ends, and only
            // that row: a subquery on the log here would lock the log's end
            // before the writers' row, and deadlock with the insert of the
            // writer ahead.
            next_version: format!(
                "UPDATE {meta} SET value = GREATEST(value + 1, {NOW_MICROS}) \
                 WHERE name = 'config_writer'"
            ),
            versions: format!(
                "SELECT m.value, c.version FROM {meta} m LEFT JOIN {config} c ON c.k = ? \
                 WHERE m.name = 'config_writer' FOR UPDATE"
            ),
            append: format!("INSERT INTO {log} (id, k, kind, v) VALUES (?, ?, ?, ?)"),
            upsert: format!(
                "INSERT INTO {config} (k, v, version) VALUES (?, ?, ?) \
                 ON DUPLICATE KEY UPDATE v = VALUES(v), version = VALUES(version)"
            ),
            remove: format!("DELETE FROM {config} WHERE k = ?"),
        }
    }
}

impl MysqlConfigCenter {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let sql = Arc::new(Statements::new(&shared));
        MysqlConfigCenter { shared, sql }
    }

    async fn write(
        &self,
        key: &str,
        value: Option<Bytes>,
        expected: Option<u64>,
    ) -> Result<Written> {
        let sql = self.sql.clone();
        let k = self.shared.key(key);
        self.shared
            .db
            .transaction(move |tx| {
                Box::pin(async move {
                    tx.query_drop(sql.next_version.as_str()).await?;
                    let row: Option<(u64, Option<u64>)> =
                        first(&mut *tx, &sql.versions, (k.as_slice(),)).await?;
                    let Some((version, current)) = row else {
                        return Err(mysql_async::Error::Other(
                            "the config_writer row is missing".into(),
                        ));
                    };
                    if let Some(expected) = expected {
                        if current.unwrap_or(0) != expected {
                            return Ok(Written::Conflict(current.unwrap_or(0)));
                        }
                    }
                    match value {
                        None => {
                            if current.is_none() {
                                return Ok(Written::Missing);
                            }
                            tx.exec_drop(
                                sql.append.as_str(),
                                (version, k.as_slice(), "d", Value::NULL),
                            )
                            .await?;
                            tx.exec_drop(sql.remove.as_str(), (k.as_slice(),)).await?;
                            Ok(Written::At(version))
                        }
                        Some(v) => {
                            tx.exec_drop(
                                sql.append.as_str(),
                                (version, k.as_slice(), "p", v.as_ref()),
                            )
                            .await?;
                            tx.exec_drop(sql.upsert.as_str(), (k.as_slice(), v.as_ref(), version))
                                .await?;
                            Ok(Written::At(version))
                        }
                    }
                })
            })
            .await
    }

    async fn open_watch(&self, target: WatchTarget, opts: WatchOptions) -> Result<WatchStream> {
        self.shared.check_open()?;
        let history = History {
            shared: Arc::downgrade(&self.shared),
            wait: false,
        };
        let retry = self.shared.settings().retry.clone();
        let shutdown = self.shared.stop().clone();
        spawn_watch(history, target, opts, retry, shutdown).await
    }
}

/// `k = ?` or `k >= ? AND k < ?` on `column`, with its parameters.
fn key_filter(shared: &Shared, target: &WatchTarget, column: &str) -> (String, Vec<Value>) {
    match target {
        WatchTarget::Key(k) => (format!("{column} = ?"), vec![shared.key(k).into()]),
        WatchTarget::Prefix(p) => {
            let (low, high) = shared.key_range(p);
            (
                format!("{column} >= ? AND {column} < ?"),
                vec![low.into(), high.into()],
            )
        }
    }
}

/// The newest version the store has handed out (purged history included).
async fn current_revision(shared: &Shared) -> Result<u64> {
    let sql = format!(
        "SELECT GREATEST(value, (SELECT COALESCE(MAX(id), 0) FROM {})) FROM {} WHERE name = 'config_floor'",
        shared.table("config_log"),
        shared.table("meta")
    );
    let v: Option<u64> = shared.db.query_first(&sql, ()).await?;
    Ok(v.unwrap_or(0))
}

/// Every stored entry covered by `target` and the revision they are
/// current at, read in one statement (one consistent snapshot).
async fn snapshot(
    shared: &Shared,
    target: &WatchTarget,
) -> Result<(u64, Vec<(String, Versioned)>)> {
    let (filter, params) = key_filter(shared, target, "c.k");
    let sql = format!(
        "SELECT GREATEST(m.value, (SELECT COALESCE(MAX(id), 0) FROM {log})), c.k, c.v, c.version \
         FROM {meta} m LEFT JOIN {config} c ON {filter} WHERE m.name = 'config_floor'",
        log = shared.table("config_log"),
        meta = shared.table("meta"),
        config = shared.table("config"),
    );
    type Row = (u64, Option<Vec<u8>>, Option<Vec<u8>>, Option<u64>);
    let rows: Vec<Row> = shared.db.query(&sql, Params::Positional(params)).await?;
    let mut revision = 0;
    let mut entries = Vec::with_capacity(rows.len());
    for (rev, k, v, version) in rows {
        revision = rev;
        let (Some(k), Some(v), Some(version)) = (k, v, version) else {
            continue;
        };
        let Some(key) = shared.user_key(&k) else {
            tracing::warn!(key = %String::from_utf8_lossy(&k), "config row with a key that is not UTF-8 ignored");
            continue;
        };
        entries.push((
            key,
            Versioned {
                value: Bytes::from(v),
                version,
            },
        ));
    }
    Ok((revision, entries))
}

type LogRow = (
    u64,
    u64,
    bool,
    Option<u64>,
    Option<Vec<u8>>,
    Option<String>,
    Option<Vec<u8>>,
);

/// A change-log row as an event; `None` (with a warning) when malformed.
fn parse_change(
    shared: &Shared,
    id: u64,
    k: Vec<u8>,
    kind: Option<String>,
    v: Option<Vec<u8>>,
) -> Option<ConfigEvent> {
    let Some(key) = shared.user_key(&k) else {
        tracing::warn!(id, key = %String::from_utf8_lossy(&k), "config change with a key that is not UTF-8 ignored");
        return None;
    };
    match (kind.as_deref(), v) {
        (Some("p"), Some(v)) => Some(ConfigEvent::put(key, Bytes::from(v), id)),
        (Some("d"), _) => Some(ConfigEvent::delete(key, id)),
        (kind, _) => {
            tracing::warn!(id, key, ?kind, "malformed config change ignored");
            None
        }
    }
}

/// One poll: the changes after the cursor, the purge floor, the newest id
/// and whether the cursor's anchor is still logged, in one statement.
/// Returns the batch and whether to poll again at once (a full batch).
async fn poll(shared: &Shared, cursor: &WatchCursor) -> Result<(Batch, bool)> {
    let (filter, filter_params) = key_filter(shared, cursor.target(), "l.k");
    let sql = format!(
        "SELECT m.value, (SELECT COALESCE(MAX(id), 0) FROM {log}), \
         EXISTS(SELECT 1 FROM {log} WHERE id = ?), l.id, l.k, l.kind, l.v \
         FROM {meta} m LEFT JOIN {log} l ON l.id > ? AND {filter} \
         WHERE m.name = 'config_floor' ORDER BY l.id LIMIT {BATCH}",
        log = shared.table("config_log"),
        meta = shared.table("meta"),
    );
    let (last, anchor) = (cursor.last_version(), cursor.anchor());
    let mut params = vec![Value::from(anchor), Value::from(last)];
    params.extend(filter_params);
    let rows: Vec<LogRow> = shared.db.query(&sql, Params::Positional(params)).await?;
    let Some(&(floor, top, anchor_logged, ..)) = rows.first() else {
        return Err(
            Error::new(ErrorKind::InvalidState, "the config_floor row is missing")
                .with_backend(crate::NAME),
        );
    };
    if floor > last {
        return Ok((Batch::Trimmed, true));
    }
    // Ids are never reused and rows go only by a purge up to the floor: a
    // revision behind the cursor, or a delivered change missing above the
    // floor, means the database came back with older data.
    if floor.max(top) < last || (anchor > floor && !anchor_logged) {
        return Ok((Batch::Regressed, true));
    }
    let full = rows.len() >= BATCH;
    let mut newest = 0;
    let mut events = Vec::with_capacity(rows.len());
    for (_, _, _, id, k, kind, v) in rows {
        if let (Some(id), Some(k)) = (id, k) {
            newest = id;
            events.extend(parse_change(shared, id, k, kind, v));
        }
    }
    // Writers commit in id order, so nothing at or below `top` can appear
    // later: a batch that is not full skips past the other keys' changes.
    Ok((
        Batch::changes(events, if full { newest } else { top }),
        full,
    ))
}

/// The change log as one watch polls it, every `config_poll_interval`
/// while it is up to date.
struct History {
    shared: Weak<Shared>,
    /// Whether the last poll found the watch up to date.
    wait: bool,
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

    /// Every poll checks the continuity itself; after a failure the first
    /// poll runs at once.
    async fn connect(&mut self, _: &WatchCursor) -> Result<Continuity> {
        self.wait = false;
        Ok(Continuity::Continuous)
    }

    async fn next_batch(&mut self, cursor: &WatchCursor) -> Result<Batch> {
        if self.wait {
            let interval = self.shared()?.settings().config_poll_interval;
            tokio::time::sleep(interval).await;
        }
        let (batch, more) = poll(&*self.shared()?, cursor).await?;
        self.wait = !more;
        Ok(batch)
    }
}

/// Moves the purge floor to `upto` and deletes the log up to it (the floor
/// first, so that a poll that misses a row also sees the floor).
pub(crate) async fn purge_log(shared: &Shared, upto: u64) -> Result<u64> {
    let floor = format!(
        "UPDATE {} SET value = GREATEST(value, ?) WHERE name = 'config_floor'",
        shared.table("meta")
    );
    shared.db.exec(&floor, (upto,)).await?;
    let delete = format!(
        "DELETE FROM {} WHERE id <= ? LIMIT 10000",
        shared.table("config_log")
    );
    let mut total = 0;
    loop {
        let n = shared.db.exec(&delete, (upto,)).await?;
        total += n;
        if n < 10_000 {
            return Ok(total);
        }
    }
}

/// Keeps the newest `config_history` changes (ids are not consecutive: the
/// floor is the id of the newest change beyond them).
pub(crate) async fn trim_log(shared: &Shared) -> Result<u64> {
    let beyond: Option<u64> = shared
        .db
        .query_first(
            &format!(
                "SELECT id FROM {} ORDER BY id DESC LIMIT 1 OFFSET {}",
                shared.table("config_log"),
                shared.settings().config_history
            ),
            (),
        )
        .await?;
    match beyond {
        Some(upto) => purge_log(shared, upto).await,
        None => Ok(0),
    }
}

/// Drops the whole change history (watches behind it resynchronise).
pub(crate) async fn compact(shared: &Shared) -> Result<u64> {
    purge_log(shared, current_revision(shared).await?).await
}

#[async_trait]
impl ConfigCenter for MysqlConfigCenter {
    fn capabilities(&self) -> ConfigCapabilities {
        ConfigCapabilities::full(self.shared.settings().max_value_bytes)
    }

    async fn get_with_version(&self, key: &str) -> Result<Option<Versioned>> {
        let row: Option<(Vec<u8>, u64)> = self
            .shared
            .db
            .query_first(&self.sql.get, (self.shared.key(key),))
            .await
            .for_key(key)?;
        Ok(row.map(|(v, version)| Versioned {
            value: Bytes::from(v),
            version,
        }))
    }

    async fn set(&self, key: &str, value: Bytes) -> Result<u64> {
        match self.write(key, Some(value), None).await? {
            Written::At(v) => Ok(v),
            _ => Err(Error::new(
                ErrorKind::Internal,
                "an unconditional write did not happen",
            )),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        Ok(matches!(self.write(key, None, None).await?, Written::At(_)))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let (low, high) = self.shared.key_range(prefix);
        let sql = format!(
            "SELECT k FROM {} WHERE k >= ? AND k < ? ORDER BY k",
            self.shared.table("config")
        );
        let keys: Vec<Vec<u8>> = self.shared.db.query(&sql, (low, high)).await?;
        keys.into_iter()
            .map(|k| {
                self.shared
                    .user_key(&k)
                    .ok_or_else(|| malformed(&String::from_utf8_lossy(&k), "the key is not UTF-8"))
            })
            .collect()
    }

    async fn compare_and_set(&self, key: &str, value: Bytes, expected_version: u64) -> Result<u64> {
        match self.write(key, Some(value), Some(expected_version)).await? {
            Written::At(v) => Ok(v),
            Written::Conflict(found) => Err(im_infra::config::conflict(
                key,
                Some(found),
                expected_version,
            )),
            Written::Missing => Err(Error::new(
                ErrorKind::Internal,
                "a compare-and-set did not happen",
            )),
        }
    }

    async fn watch(&self, key: &str, opts: WatchOptions) -> Result<WatchStream> {
        self.open_watch(WatchTarget::key(key)?, opts).await
    }

    async fn watch_prefix(&self, prefix: &str, opts: WatchOptions) -> Result<WatchStream> {
        self.open_watch(WatchTarget::prefix(prefix)?, opts).await
    }
}
