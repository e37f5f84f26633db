//! `Once` on etcd: one key per work item on a lease, claimed and completed
//! by transactions on its value.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use im_infra::once::{Claim, Once, OnceCapabilities};
use im_infra::telemetry::OpMetrics;
use im_infra::{validate, Error, ErrorKind, Result};

use crate::connection::ConnectionManager;
use crate::lease::{lease_secs, LeaseManager, MIN_TTL};

const CLAIMED: &[u8] = b"c:";
const DONE: &[u8] = b"d:";

/// Idempotency on an [`EtcdBackend`](crate::EtcdBackend): the key
/// `<namespace>/once/<key>` holds `c:<token>` while claimed and
/// `d:<outcome>` when done, on a lease of the TTL (whole seconds, at least
/// 2 s). Claim, complete and abandon are transactions comparing the value.
pub struct EtcdOnce {
    conn: Arc<ConnectionManager>,
    claim: OpMetrics,
    complete: OpMetrics,
    abandon: OpMetrics,
    outcome: OpMetrics,
    reset: OpMetrics,
}

impl std::fmt::Debug for EtcdOnce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOnce").finish_non_exhaustive()
    }
}

fn claimed(token: &str) -> Vec<u8> {
    [CLAIMED, token.as_bytes()].concat()
}

/// The lease id carried in a claim token (`<uuid>.<lease hex>`).
fn lease_of(token: &str) -> Option<i64> {
    i64::from_str_radix(token.rsplit_once('.')?.1, 16).ok()
}

impl EtcdOnce {
    pub(crate) fn new(conn: Arc<ConnectionManager>) -> Self {
        let m = |op| OpMetrics::new(crate::NAME, "once", op);
        EtcdOnce {
            conn,
            claim: m("once.claim"),
            complete: m("once.complete"),
            abandon: m("once.abandon"),
            outcome: m("once.outcome"),
            reset: m("once.reset"),
        }
    }

    fn key(&self, key: &str) -> String {
        self.conn.cfg().key(&format!("/once/{key}"))
    }

    fn leases(&self) -> LeaseManager {
        LeaseManager::new(self.conn.clone())
    }

    fn not_held(key: &str) -> Error {
        Error::new(
            ErrorKind::LockNotHeld,
            format!("the claim on {key:?} expired or belongs to another caller"),
        )
    }
}

#[async_trait]
impl Once for EtcdOnce {
    fn capabilities(&self) -> OnceCapabilities {
        OnceCapabilities::with_min_ttl(MIN_TTL)
    }

    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim> {
        self.claim
            .run(async {
                validate::key(key)?;
                validate::ttl(ttl)?;
                let k = self.key(key);
                let secs = lease_secs(ttl);
                let lease = self
                    .conn
                    .call("once.lease", |mut c| async move {
                        c.lease_grant(secs, None).await
                    })
                    .await?
                    .id();
                let token = format!("{}.{lease:x}", uuid::Uuid::new_v4().simple());
                let txn = Txn::new()
                    .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        k.clone(),
                        claimed(&token),
                        Some(PutOptions::new().with_lease(lease)),
                    )])
                    .or_else([TxnOp::get(k, None)]);
                let r = self
                    .conn
                    .call("once.claim", |mut c| async move { c.txn(txn).await })
                    .await?;
                if r.succeeded() {
                    return Ok(Claim::Acquired { token });
                }
                let _ = self.leases().revoke(lease).await;
                let value = match r.op_responses().first() {
                    Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.value().to_vec()),
                    _ => None,
                };
                Ok(match value {
                    Some(v) if v.starts_with(DONE) => {
                        Claim::Done(Bytes::copy_from_slice(&v[DONE.len()..]))
                    }
                    // Claimed, or gone between the two steps: report in progress.
                    _ => Claim::InProgress,
                })
            })
            .await
    }

    async fn complete(&self, key: &str, token: &str, outcome: Bytes, ttl: Duration) -> Result<()> {
        self.complete
            .run(async {
                validate::key(key)?;
                validate::ttl(ttl)?;
                validate::value(outcome.len() + DONE.len(), self.conn.cfg().max_value_bytes)?;
                let old = lease_of(token).ok_or_else(|| Self::not_held(key))?;
                let k = self.key(key);
                let secs = lease_secs(ttl);
                let lease = self
                    .conn
                    .call("once.lease", |mut c| async move {
                        c.lease_grant(secs, None).await
                    })
                    .await?
                    .id();
                let txn = Txn::new()
                    .when([Compare::value(k.clone(), CompareOp::Equal, claimed(token))])
                    .and_then([TxnOp::put(
                        k,
                        [DONE, &outcome].concat(),
                        Some(PutOptions::new().with_lease(lease)),
                    )]);
                let r = self
                    .conn
                    .call("once.complete", |mut c| async move { c.txn(txn).await })
                    .await?;
                if !r.succeeded() {
                    let _ = self.leases().revoke(lease).await;
                    return Err(Self::not_held(key));
                }
                let _ = self.leases().revoke(old).await;
                Ok(())
            })
            .await
    }

    async fn abandon(&self, key: &str, token: &str) -> Result<()> {
        self.abandon
            .run(async {
                validate::key(key)?;
                let k = self.key(key);
                let txn = Txn::new()
                    .when([Compare::value(k.clone(), CompareOp::Equal, claimed(token))])
                    .and_then([TxnOp::delete(k, None)]);
                let r = self
                    .conn
                    .call("once.abandon", |mut c| async move { c.txn(txn).await })
                    .await?;
                if let Some(old) = lease_of(token) {
                    let _ = self.leases().revoke(old).await;
                }
                if r.succeeded() {
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
                let k = self.key(key);
                let r = self
                    .conn
                    .call("once.get", |mut c| async move { c.get(k, None).await })
                    .await?;
                Ok(r.kvs()
                    .first()
                    .map(|kv| kv.value())
                    .filter(|v| v.starts_with(DONE))
                    .map(|v| Bytes::copy_from_slice(&v[DONE.len()..])))
            })
            .await
    }

    async fn reset(&self, key: &str) -> Result<bool> {
        self.reset
            .run(async {
                validate::key(key)?;
                let k = self.key(key);
                let r = self
                    .conn
                    .call("once.reset", |mut c| async move { c.delete(k, None).await })
                    .await?;
                Ok(r.deleted() > 0)
            })
            .await
    }
}
