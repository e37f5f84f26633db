//! `Cache` in a table, with expiry by the server's clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use im_infra::cache::{Cache, CacheCapabilities, KeyTtl};
use im_infra::{validate, Error, ErrorKind, Result};
use mysql_async::prelude::Queryable;
use mysql_async::{Params, Value};

use crate::db::first;
use crate::error::ForKey;
use crate::Shared;

/// The condition of a live row.
const LIVE: &str = "(expires_at IS NULL OR expires_at > NOW(6))";

/// A live row's lifetime from `TIMESTAMPDIFF(MICROSECOND, NOW(6), expires_at)`
/// (`NULL`: no expiry).
fn lifetime(us: Option<i64>) -> KeyTtl {
    match us {
        None => KeyTtl::Persistent,
        Some(us) => KeyTtl::Expires(Duration::from_micros(us.max(0) as u64)),
    }
}

/// The cache of a [`MysqlBackend`](crate::MysqlBackend): one row per key in
/// `<prefix>cache`, expiring by the server's `NOW(6)`; expired rows are
/// never returned and are deleted in the background.
///
/// Raw operations: the backend hands it out layered
/// ([`ObservedCache`](im_infra::layer::ObservedCache): argument checks,
/// value sizes, telemetry).
pub(crate) struct MysqlCache {
    shared: Arc<Shared>,
    sql: Statements,
}

/// The statements of the single-key calls, built once per handle.
struct Statements {
    get: String,
    get_with_ttl: String,
    exists: String,
    ttl: String,
    expire: String,
    set: String,
    set_nx: String,
}

fn micros(ttl: Option<Duration>) -> Option<u64> {
    ttl.map(validate::ttl_micros)
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

impl MysqlCache {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let table = shared.table("cache");
        let sql = Statements {
            get: format!("SELECT v FROM {table} WHERE k = ? AND {LIVE}"),
            get_with_ttl: format!(
                "SELECT v, TIMESTAMPDIFF(MICROSECOND, NOW(6), expires_at) FROM {table} WHERE k = ? AND {LIVE}"
            ),
            exists: format!("SELECT 1 FROM {table} WHERE k = ? AND {LIVE}"),
            ttl: format!(
                "SELECT TIMESTAMPDIFF(MICROSECOND, NOW(6), expires_at) FROM {table} WHERE k = ? AND {LIVE}"
            ),
            expire: format!(
                "UPDATE {table} SET expires_at = NOW(6) + INTERVAL ? MICROSECOND WHERE k = ? AND {LIVE}"
            ),
            set: upsert_sql(&table, 1, false),
            set_nx: upsert_sql(&table, 1, true),
        };
        MysqlCache { shared, sql }
    }

    fn key(&self, key: &str) -> Vec<u8> {
        self.shared.key(key)
    }

    fn table(&self) -> String {
        self.shared.table("cache")
    }
}

/// `INSERT ... ON DUPLICATE KEY UPDATE` of one or more rows into `table`;
/// with `only_if_expired` the existing live row is left alone.
fn upsert_sql(table: &str, rows: usize, only_if_expired: bool) -> String {
    let values =
        vec!["(?, ?, IF(? IS NULL, NULL, NOW(6) + INTERVAL ? MICROSECOND))"; rows].join(",");
    let update = if only_if_expired {
        "v = IF(expires_at IS NOT NULL AND expires_at <= NOW(6), VALUES(v), v), \
         expires_at = IF(expires_at IS NOT NULL AND expires_at <= NOW(6), VALUES(expires_at), expires_at)"
    } else {
        "v = VALUES(v), expires_at = VALUES(expires_at)"
    };
    format!(
        "INSERT INTO {table} (k, v, expires_at) VALUES {values} ON DUPLICATE KEY UPDATE {update}"
    )
}

fn row_params(k: Vec<u8>, v: &Bytes, ttl: Option<u64>) -> [Value; 4] {
    [k.into(), v.to_vec().into(), ttl.into(), ttl.into()]
}

#[async_trait]
impl Cache for MysqlCache {
    fn capabilities(&self) -> CacheCapabilities {
        CacheCapabilities::storing(self.shared.settings().max_value_bytes)
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let k = self.key(key);
        let v: Option<Vec<u8>> = self
            .shared
            .db
            .query_first(&self.sql.get, (k,))
            .await
            .for_key(key)?;
        Ok(v.map(Bytes::from))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        let k = self.key(key);
        let params = Params::Positional(row_params(k, &value, micros(ttl)).to_vec());
        self.shared.db.exec(&self.sql.set, params).await.map(drop)
    }

    async fn set_nx(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<bool> {
        let k = self.key(key);
        let params = Params::Positional(row_params(k, &value, micros(ttl)).to_vec());
        // Affected rows: 1 inserted, 2 replaced an expired row, 0 left a live one.
        Ok(self.shared.db.exec(&self.sql.set_nx, params).await? > 0)
    }

    async fn delete<'k>(&self, keys: &[&'k str]) -> Result<u64> {
        let ks: Vec<Value> = keys.iter().map(|k| self.shared.key(k).into()).collect();
        let sql = format!(
            "DELETE FROM {} WHERE k IN ({}) AND {LIVE}",
            self.table(),
            placeholders(keys.len())
        );
        self.shared.db.exec(&sql, Params::Positional(ks)).await
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let k = self.key(key);
        let v: Option<i64> = self.shared.db.query_first(&self.sql.exists, (k,)).await?;
        Ok(v.is_some())
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        let k = self.key(key);
        let params = (micros(Some(ttl)), k);
        Ok(self.shared.db.exec(&self.sql.expire, params).await? > 0)
    }

    async fn ttl(&self, key: &str) -> Result<KeyTtl> {
        let k = self.key(key);
        let row: Option<(Option<i64>,)> = self
            .shared
            .db
            .query_first(&self.sql.ttl, (k,))
            .await
            .for_key(key)?;
        Ok(row.map_or(KeyTtl::Missing, |(us,)| lifetime(us)))
    }

    /// The value and its lifetime in one statement: one consistent read.
    async fn get_with_ttl(&self, key: &str) -> Result<(Option<Bytes>, KeyTtl)> {
        let k = self.key(key);
        let row: Option<(Vec<u8>, Option<i64>)> = self
            .shared
            .db
            .query_first(&self.sql.get_with_ttl, (k,))
            .await
            .for_key(key)?;
        Ok(row.map_or((None, KeyTtl::Missing), |(v, us)| {
            (Some(Bytes::from(v)), lifetime(us))
        }))
    }

    /// Every key's value and lifetime in one statement.
    async fn get_many_with_ttl<'k>(
        &self,
        keys: &[&'k str],
    ) -> Result<Vec<(Option<Bytes>, KeyTtl)>> {
        let ks: Vec<Vec<u8>> = keys.iter().map(|k| self.shared.key(k)).collect();
        let sql = format!(
            "SELECT k, v, TIMESTAMPDIFF(MICROSECOND, NOW(6), expires_at) FROM {} WHERE k IN ({}) AND {LIVE}",
            self.table(),
            placeholders(keys.len())
        );
        let params: Vec<Value> = ks.iter().cloned().map(Value::from).collect();
        let rows: Vec<(Vec<u8>, Vec<u8>, Option<i64>)> = self
            .shared
            .db
            .query(&sql, Params::Positional(params))
            .await?;
        let found: HashMap<Vec<u8>, (Vec<u8>, Option<i64>)> =
            rows.into_iter().map(|(k, v, us)| (k, (v, us))).collect();
        Ok(ks
            .iter()
            .map(|k| match found.get(k) {
                Some((v, us)) => (Some(Bytes::from(v.clone())), lifetime(*us)),
                None => (None, KeyTtl::Missing),
            })
            .collect())
    }

    async fn incr_by(&self, key: &str, delta: i64) -> Result<i64> {
        let k = self.key(key);
        let table = self.table();
        // Make sure a row exists, so that the transaction locks a row
        // (not a gap: concurrent first increments would deadlock). The seed
        // is born expired: no read sees it, and a failed increment leaves
        // nothing a reader could take for a value.
        let seed = format!("INSERT IGNORE INTO {table} (k, v, expires_at) VALUES (?, '0', NOW(6))");
        self.shared.db.exec(&seed, (k.clone(),)).await?;
        let select = format!("SELECT v, {LIVE} FROM {table} WHERE k = ? FOR UPDATE");
        let update = format!(
            "UPDATE {table} SET v = ?, expires_at = IF({LIVE}, expires_at, NULL) WHERE k = ?"
        );
        // The row went between the seed and the lock (a delete, or the
        // purge of the expired seed): inserted again; a duplicate or a
        // deadlock with a concurrent first increment fails the call
        // (retryable) instead of losing the increment.
        let insert = format!("INSERT INTO {table} (k, v, expires_at) VALUES (?, ?, NULL)");
        let key_name = key.to_owned();
        let outcome = self
            .shared
            .db
            .transaction(move |tx| {
                Box::pin(async move {
                    let row: Option<(Vec<u8>, i64)> =
                        first(&mut *tx, &select, (k.clone(),)).await?;
                    let exists = row.is_some();
                    let current = match row {
                        Some((v, 1)) => match std::str::from_utf8(&v)
                            .ok()
                            .and_then(|s| s.parse::<i64>().ok())
                        {
                            Some(n) => n,
                            None => {
                                return Ok(Err(format!(
                                    "value of {key_name:?} is not a decimal integer"
                                )))
                            }
                        },
                        _ => 0,
                    };
                    let Some(next) = current.checked_add(delta) else {
                        return Ok(Err(format!("incrementing {key_name:?} overflows i64")));
                    };
                    let v = next.to_string().into_bytes();
                    if exists {
                        tx.exec_drop(update, (v, k)).await?;
                    } else {
                        tx.exec_drop(insert, (k, v)).await?;
                    }
                    Ok(Ok(next))
                })
            })
            .await?;
        outcome.map_err(|msg| Error::new(ErrorKind::InvalidState, msg))
    }

    /// The one statement of `get_many_with_ttl`, lifetimes left out.
    async fn get_many<'k>(&self, keys: &[&'k str]) -> Result<Vec<Option<Bytes>>> {
        let read = self.get_many_with_ttl(keys).await?;
        Ok(read.into_iter().map(|(value, _)| value).collect())
    }

    async fn set_many<'k>(
        &self,
        entries: &[(&'k str, Bytes)],
        ttl: Option<Duration>,
    ) -> Result<()> {
        let mut params = Vec::with_capacity(entries.len() * 4);
        for (k, v) in entries {
            params.extend(row_params(self.shared.key(k), v, micros(ttl)));
        }
        self.shared
            .db
            .exec(
                &upsert_sql(&self.table(), entries.len(), false),
                Params::Positional(params),
            )
            .await
            .map(drop)
    }
}
