//! `Once` on a table: claim, complete and abandon as single statements.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use im_infra::once::{Claim, Once};
use im_infra::telemetry::OpMetrics;
use im_infra::{validate, Error, ErrorKind, Result};
use mysql_async::prelude::Queryable;

use crate::db::first;
use crate::error::{malformed, ForKey};
use crate::Shared;

/// Idempotency on a [`MysqlBackend`](crate::MysqlBackend): a row
/// `(key, state, token, outcome, expires_at)` per key, expiring by the
/// server's clock. A claim is an upsert that only takes an expired row.
pub struct MysqlOnce {
    shared: Arc<Shared>,
    claim: OpMetrics,
    complete: OpMetrics,
    abandon: OpMetrics,
    outcome: OpMetrics,
    reset: OpMetrics,
}

impl std::fmt::Debug for MysqlOnce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlOnce").finish_non_exhaustive()
    }
}

fn micros(d: Duration) -> u64 {
    validate::ttl_millis(d) * 1000
}

impl MysqlOnce {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let m = |op| OpMetrics::new(crate::NAME, "once", op);
        MysqlOnce {
            shared,
            claim: m("once.claim"),
            complete: m("once.complete"),
            abandon: m("once.abandon"),
            outcome: m("once.outcome"),
            reset: m("once.reset"),
        }
    }

    fn not_held(key: &str) -> Error {
        Error::new(
            ErrorKind::LockNotHeld,
            format!("the claim on {key:?} expired or belongs to another caller"),
        )
    }
}

#[async_trait]
impl Once for MysqlOnce {
    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim> {
        self.claim
            .run(async {
                validate::key(key)?;
                validate::ttl(ttl)?;
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
                            c.exec_drop(upsert, (k.as_slice(), mine.as_str(), micros(ttl)))
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
            })
            .await
    }

    async fn complete(&self, key: &str, token: &str, outcome: Bytes, ttl: Duration) -> Result<()> {
        self.complete
            .run(async {
                validate::key(key)?;
                validate::ttl(ttl)?;
                validate::value(outcome.len(), self.shared.cfg().max_value_bytes)?;
                let sql = format!(
                    "UPDATE {} SET state = 'd', outcome = ?, token = NULL, expires_at = NOW(6) + INTERVAL ? MICROSECOND \
                     WHERE k = ? AND state = 'c' AND token = ? AND expires_at > NOW(6)",
                    self.shared.table("once")
                );
                let n = self
                    .shared
                    .db
                    .exec(&sql, (outcome.to_vec(), micros(ttl), self.shared.key(key), token))
                    .await?;
                if n == 1 {
                    Ok(())
                } else {
                    Err(Self::not_held(key))
                }
            })
            .await
    }

    async fn abandon(&self, key: &str, token: &str) -> Result<()> {
        self.abandon
            .run(async {
                validate::key(key)?;
                let sql = format!(
                    "DELETE FROM {} WHERE k = ? AND state = 'c' AND token = ? AND expires_at > NOW(6)",
                    self.shared.table("once")
                );
                if self.shared.db.exec(&sql, (self.shared.key(key), token)).await? == 1 {
                    Ok(())
                } else {
                    Err(Self::not_held(key))
                }
            })
            .await
    }

    async fn outcome(&self, key: &str) -> Result<Option<Bytes>> {
        self.outcome
            .run(async {
                validate::key(key)?;
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
            })
            .await
    }

    async fn reset(&self, key: &str) -> Result<bool> {
        self.reset
            .run(async {
                validate::key(key)?;
                let table = self.shared.table("once");
                let live = format!("DELETE FROM {table} WHERE k = ? AND expires_at > NOW(6)");
                let n = self.shared.db.exec(&live, (self.shared.key(key),)).await?;
                let rest = format!("DELETE FROM {table} WHERE k = ?");
                self.shared.db.exec(&rest, (self.shared.key(key),)).await?;
                Ok(n > 0)
            })
            .await
    }
}
