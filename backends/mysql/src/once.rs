//! `Once` on a table: claim, complete and abandon as single statements.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use im_infra::once::{claim_lease, Claim, ClaimLease, ClaimStore, Once, OnceCapabilities};
use im_infra::{validate, Result};
use mysql_async::prelude::Queryable;

use crate::db::first;
use crate::error::{malformed, ForKey};
use crate::Shared;

/// Idempotency on a [`MysqlBackend`](crate::MysqlBackend): a row
/// `(key, state, token, outcome, expires_at)` per key, expiring by the
/// server's clock. A claim is an upsert that only takes an expired row.
///
/// Raw operations: the backend hands it out layered
/// ([`ObservedOnce`](im_infra::layer::ObservedOnce): argument checks,
/// outcome sizes, telemetry).
pub(crate) struct MysqlOnce {
    shared: Arc<Shared>,
}

impl MysqlOnce {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MysqlOnce { shared }
    }
}

/// Deletes `token`'s live claim on `key`.
async fn abandon(shared: &Shared, key: &str, token: &str) -> Result<bool> {
    let sql = format!(
        "DELETE FROM {} WHERE k = ? AND state = 'c' AND token = ? AND expires_at > NOW(6)",
        shared.table("once")
    );
    Ok(shared.db.exec(&sql, (shared.key(key), token)).await? == 1)
}

#[async_trait]
impl ClaimStore for Shared {
    /// Extends the live claim; true also when this token completed it.
    async fn renew_claim(&self, key: &str, token: &str, ttl: Duration) -> Result<bool> {
        let table = self.table("once");
        let k = self.key(key);
        let extend = format!(
            "UPDATE {table} SET expires_at = NOW(6) + INTERVAL ? MICROSECOND \
             WHERE k = ? AND state = 'c' AND token = ? AND expires_at > NOW(6)"
        );
        if self
            .db
            .exec(&extend, (validate::ttl_micros(ttl), k.as_slice(), token))
            .await?
            == 1
        {
            return Ok(true);
        }
        let done = format!("SELECT 1 FROM {table} WHERE k = ? AND state = 'd' AND token = ?");
        let v: Option<i64> = self.db.query_first(&done, (k.as_slice(), token)).await?;
        Ok(v.is_some())
    }

    async fn abandon_claim(&self, key: &str, token: &str) -> Result<bool> {
        abandon(self, key, token).await
    }

    async fn complete_claim(
        &self,
        key: &str,
        token: &str,
        outcome: Bytes,
        ttl: Duration,
    ) -> Result<()> {
        // The token stays on the done row: completing again (a retry
        // after a lost answer) is recognised as this caller's.
        let sql = format!(
            "UPDATE {} SET state = 'd', outcome = ?, expires_at = NOW(6) + INTERVAL ? MICROSECOND \
             WHERE k = ? AND token = ? AND (state = 'd' OR expires_at > NOW(6))",
            self.table("once")
        );
        let n = self
            .db
            .exec(
                &sql,
                (
                    outcome.to_vec(),
                    validate::ttl_micros(ttl),
                    self.key(key),
                    token,
                ),
            )
            .await?;
        if n == 1 {
            Ok(())
        } else {
            Err(im_infra::once::not_held(key))
        }
    }
}

#[async_trait]
impl Once for MysqlOnce {
    fn capabilities(&self) -> OnceCapabilities {
        OnceCapabilities::default().with_max_outcome(self.shared.settings().max_value_bytes)
    }

    fn claim_lease(&self, key: &str, token: &str) -> Arc<dyn ClaimLease> {
        claim_lease(self.shared.clone(), key, token)
    }

    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim> {
        let table = self.shared.table("once");
        let k = self.shared.key(key);
        let token = uuid::Uuid::new_v4().simple().to_string();
        // `expires_at` is assigned last, so every condition reads the old row.
        let upsert = format!(
            "INSERT INTO {table} (k, state, token, outcome, expires_at) \
             VALUES (?, 'c', ?, NULL, NOW(6) + INTERVAL ? MICROSECOND) \
             ON DUPLICATE KEY UPDATE \
               state = IF(expires_at <= NOW(6), 'c', state), \
               token = IF(expires_at <= NOW(6), VALUES(token), token), \
               outcome = IF(expires_at <= NOW(6), NULL, outcome), \
               expires_at = IF(expires_at <= NOW(6), VALUES(expires_at), expires_at)"
        );
        let read = format!("SELECT state, token, outcome FROM {table} WHERE k = ?");
        let mine = token.clone();
        let row: Option<(String, Option<String>, Option<Vec<u8>>)> = self
            .shared
            .db
            .with_conn(move |c| {
                Box::pin(async move {
                    c.exec_drop(
                        upsert,
                        (k.as_slice(), mine.as_str(), validate::ttl_micros(ttl)),
                    )
                    .await?;
                    first(c, &read, (k.as_slice(),)).await
                })
            })
            .await?;
        match row {
            Some((state, _, Some(outcome))) if state == "d" => {
                Ok(Claim::Done(Bytes::from(outcome)))
            }
            Some((state, Some(t), _)) if state == "c" && t == token => {
                Ok(Claim::Acquired { token })
            }
            Some((state, Some(_), _)) if state == "c" => Ok(Claim::InProgress),
            // Just deleted by an abandon or a reset: someone else's business.
            None => Ok(Claim::InProgress),
            Some((state, t, outcome)) => Err(malformed(
                key,
                format_args!(
                    "state {state:?}, token {}, outcome {}",
                    if t.is_some() { "set" } else { "missing" },
                    if outcome.is_some() { "set" } else { "missing" }
                ),
            )),
        }
    }

    async fn complete(&self, key: &str, token: &str, outcome: Bytes, ttl: Duration) -> Result<()> {
        self.shared.complete_claim(key, token, outcome, ttl).await
    }

    async fn abandon(&self, key: &str, token: &str) -> Result<()> {
        if abandon(&self.shared, key, token).await? {
            Ok(())
        } else {
            Err(im_infra::once::not_held(key))
        }
    }

    async fn outcome(&self, key: &str) -> Result<Option<Bytes>> {
        let sql = format!(
            "SELECT outcome FROM {} WHERE k = ? AND state = 'd' AND expires_at > NOW(6)",
            self.shared.table("once")
        );
        let v: Option<Option<Vec<u8>>> = self
            .shared
            .db
            .query_first(&sql, (self.shared.key(key),))
            .await
            .for_key(key)?;
        match v {
            None => Ok(None),
            Some(Some(outcome)) => Ok(Some(Bytes::from(outcome))),
            Some(None) => Err(malformed(key, "a completed key without an outcome")),
        }
    }

    async fn reset(&self, key: &str) -> Result<bool> {
        let table = self.shared.table("once");
        let live = format!("DELETE FROM {table} WHERE k = ? AND expires_at > NOW(6)");
        let n = self.shared.db.exec(&live, (self.shared.key(key),)).await?;
        let rest = format!("DELETE FROM {table} WHERE k = ?");
        self.shared.db.exec(&rest, (self.shared.key(key),)).await?;
        Ok(n > 0)
    }
}
