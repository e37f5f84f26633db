//! `DistributedLock` on a row lease: owner, expiry on the server's clock,
//! and a fencing counter that only grows.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use im_infra::lease::LeaseBackend;
use im_infra::lock::attempts::{self, Attempt, TokenLock};
use im_infra::lock::{DistributedLock, LockCapabilities, LockGuard, LockInfo, LockOptions};
use im_infra::{validate, Result};
use mysql_async::prelude::Queryable;
use tokio_util::sync::CancellationToken;

use crate::db::first;
use crate::error::ForKey;
use crate::shared::NOW_MICROS;
use crate::Shared;

/// The lock service of a [`MysqlBackend`](crate::MysqlBackend).
///
/// A lock is a row `(key, owner, fence, expires_at)`. Taking it is one
/// `UPDATE` that succeeds only when the row has no live owner (or is
/// already the caller's: an attempt whose answer was lost) and sets `fence`
/// to the larger of `fence + 1` and the server's clock in microseconds
/// (returned through `LAST_INSERT_ID`), so the fencing token strictly
/// increases per key, also after the database was restored from older
/// data; the row stays after release, keeping the counter. Release and
/// renewal check the owner. Waiters poll with the shared acquisition loop
/// ([`attempts`]): a jittered backoff, never past the holder's expiry or
/// their deadline.
///
/// Raw operations: the backend hands it out layered
/// ([`ObservedLock`](im_infra::layer::ObservedLock): argument checks and
/// telemetry).
pub(crate) struct MysqlLock {
    shared: Arc<Shared>,
    sql: Arc<LockSql>,
}

/// The statements of one table prefix, built once per lock service.
struct LockSql {
    take: String,
    seed: String,
    left: String,
    extend: String,
    release: String,
    is_locked: String,
    info: String,
}

impl LockSql {
    fn new(shared: &Shared) -> Self {
        let t = shared.table("locks");
        LockSql {
            take: format!(
                "UPDATE {t} SET owner = ?, fence = LAST_INSERT_ID(GREATEST(fence + 1, {NOW_MICROS})), \
                 expires_at = NOW(6) + INTERVAL ? MICROSECOND, acquired_at = NOW(6) \
                 WHERE k = ? AND (owner IS NULL OR expires_at <= NOW(6) OR owner = ?)"
            ),
            seed: format!(
                "INSERT IGNORE INTO {t} (k, owner, fence, expires_at) VALUES (?, NULL, 0, NOW(6))"
            ),
            left: format!(
                "SELECT TIMESTAMPDIFF(MICROSECOND, NOW(6), expires_at) FROM {t} WHERE k = ?"
            ),
            extend: format!(
                "UPDATE {t} SET expires_at = NOW(6) + INTERVAL ? MICROSECOND \
                 WHERE k = ? AND owner = ? AND expires_at > NOW(6)"
            ),
            release: format!(
                "UPDATE {t} SET owner = NULL WHERE k = ? AND owner = ? AND expires_at > NOW(6)"
            ),
            is_locked: format!(
                "SELECT 1 FROM {t} WHERE k = ? AND owner IS NOT NULL AND expires_at > NOW(6)"
            ),
            info: format!(
                "SELECT owner, fence, TIMESTAMPDIFF(MICROSECOND, NOW(6), expires_at), \
                 CAST(UNIX_TIMESTAMP(acquired_at) * 1000000 AS SIGNED) \
                 FROM {t} WHERE k = ? AND owner IS NOT NULL AND expires_at > NOW(6)"
            ),
        }
    }
}

/// A fresh owner token: 128 random bits in hex. It identifies the holder
/// (release and renewal check it); it is not a secret.
fn new_token() -> String {
    format!("{:032x}", fastrand::u128(..))
}

impl MysqlLock {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MysqlLock {
            sql: Arc::new(LockSql::new(&shared)),
            shared,
        }
    }
}

#[async_trait]
impl TokenLock for MysqlLock {
    type Held = Held;

    fn backend(&self) -> &'static str {
        crate::NAME
    }

    fn holder(&self, key: &str) -> Held {
        Held {
            shared: self.shared.clone(),
            sql: self.sql.clone(),
            key: key.to_owned(),
            token: new_token(),
        }
    }

    async fn attempt(&self, held: &Held, ttl: Duration) -> Result<Attempt> {
        let k = self.shared.key(&held.key);
        let sql = self.sql.clone();
        let token = held.token.clone();
        let ttl_us = validate::ttl_micros(ttl);
        self.shared
            .db
            .with_conn(move |c| {
                Box::pin(async move {
                    for _ in 0..2 {
                        let params = (token.as_str(), ttl_us, k.as_slice(), token.as_str());
                        c.exec_drop(sql.take.as_str(), params).await?;
                        if c.affected_rows() == 1 {
                            return Ok(Attempt::Acquired(c.last_insert_id().unwrap_or(0)));
                        }
                        // No row yet (first use of the key), or held.
                        c.exec_drop(sql.seed.as_str(), (k.as_slice(),)).await?;
                        if c.affected_rows() == 0 {
                            let us: Option<Option<i64>> =
                                first(c, &sql.left, (k.as_slice(),)).await?;
                            let us = us.flatten().unwrap_or(0).max(1);
                            return Ok(Attempt::Held(Duration::from_micros(us as u64)));
                        }
                    }
                    Ok(Attempt::Held(Duration::from_millis(1)))
                })
            })
            .await
    }

    fn closed(&self) -> &CancellationToken {
        self.shared.stop()
    }
}

#[async_trait]
impl DistributedLock for MysqlLock {
    fn capabilities(&self) -> LockCapabilities {
        LockCapabilities::default().with_info().with_fencing()
    }

    async fn acquire(&self, key: &str, opts: LockOptions) -> Result<Box<dyn LockGuard>> {
        attempts::acquire(self, key, opts).await
    }

    async fn try_acquire(
        &self,
        key: &str,
        opts: LockOptions,
    ) -> Result<Option<Box<dyn LockGuard>>> {
        attempts::try_acquire(self, key, opts).await
    }

    async fn is_locked(&self, key: &str) -> Result<bool> {
        let v: Option<i64> = self
            .shared
            .db
            .query_first(&self.sql.is_locked, (self.shared.key(key),))
            .await?;
        Ok(v.is_some())
    }

    async fn info(&self, key: &str) -> Result<Option<LockInfo>> {
        let row: Option<(String, u64, i64, Option<i64>)> = self
            .shared
            .db
            .query_first(&self.sql.info, (self.shared.key(key),))
            .await
            .for_key(key)?;
        Ok(row.map(|(owner, fence, left, at)| LockInfo {
            key: key.to_owned(),
            owner,
            fencing_token: fence,
            ttl: Some(Duration::from_micros(left.max(0) as u64)),
            acquired_at: at.map(|us| UNIX_EPOCH + Duration::from_micros(us.max(0) as u64)),
        }))
    }
}

/// One holding of a lock (key and owner token), as the lease core sees it.
pub(crate) struct Held {
    shared: Arc<Shared>,
    sql: Arc<LockSql>,
    key: String,
    token: String,
}

#[async_trait]
impl LeaseBackend for Held {
    fn describe(&self) -> String {
        format!("lock {:?}", self.key)
    }

    /// Extends the lock when this holder still has it.
    async fn extend(&self, ttl: Duration) -> Result<bool> {
        let params = (
            validate::ttl_micros(ttl),
            self.shared.key(&self.key),
            self.token.as_str(),
        );
        Ok(self.shared.db.exec(&self.sql.extend, params).await? == 1)
    }

    /// Releases the lock when this holder still has it (the row stays: its
    /// fence counter must not go back).
    async fn release(&self) -> Result<bool> {
        let params = (self.shared.key(&self.key), self.token.as_str());
        Ok(self.shared.db.exec(&self.sql.release, params).await? == 1)
    }
}
