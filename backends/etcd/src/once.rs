//! `Once` on etcd: one key per work item on a lease, claimed and completed
//! by transactions on its value.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use im_infra::lease::LeaseBackend;
use im_infra::once::{Claim, ClaimLease, Once, OnceCapabilities};
use im_infra::{validate, Result};

use crate::connection::ConnectionManager;
use crate::lease::{lease_secs, EtcdLease, MIN_TTL};

const CLAIMED: &[u8] = b"c:";
/// `d:<outcome>`: done (written by earlier versions, without the token).
const DONE: &[u8] = b"d:";
/// `D:<token>\n<outcome>`: done by the claim `token`.
const DONE_BY: &[u8] = b"D:";

/// The outcome of a done value, and the token that completed it if known.
fn done(value: &[u8]) -> Option<(Option<&[u8]>, &[u8])> {
    if let Some(rest) = value.strip_prefix(DONE_BY) {
        let split = rest.iter().position(|b| *b == b'\n')?;
        return Some((Some(&rest[..split]), &rest[split + 1..]));
    }
    value.strip_prefix(DONE).map(|outcome| (None, outcome))
}

/// Idempotency on an [`EtcdBackend`](crate::EtcdBackend): the key
/// `<namespace>/once/<key>` holds `c:<token>` while claimed (on a lease of
/// the claim's TTL, kept alive while the work runs) and
/// `D:<token>\n<outcome>` when done (on a lease of the outcome's TTL);
/// TTLs are whole seconds, at least 2 s. Claim, complete and abandon are
/// transactions comparing the value.
///
/// Raw operations: the backend hands it out layered
/// ([`ObservedOnce`](im_infra::layer::ObservedOnce): argument checks,
/// outcome sizes, telemetry).
pub(crate) struct EtcdOnce {
    conn: Arc<ConnectionManager>,
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
        EtcdOnce { conn }
    }

    fn key(&self, key: &str) -> String {
        self.conn.settings().key(&format!("/once/{key}"))
    }
}

/// Whether `value` is a done record completed by `token`.
fn done_by(value: Option<&[u8]>, token: &str) -> bool {
    matches!(value.and_then(done), Some((Some(t), _)) if t == token.as_bytes())
}

/// Deletes the claim if it is `token`'s, and revokes its lease.
async fn abandon(conn: &Arc<ConnectionManager>, k: &str, token: &str) -> Result<bool> {
    let txn = Txn::new()
        .when([Compare::value(
            k.to_owned(),
            CompareOp::Equal,
            claimed(token),
        )])
        .and_then([TxnOp::delete(k.to_owned(), None)]);
    let r = conn
        .call("once.abandon", |mut c| async move { c.txn(txn).await })
        .await?;
    if let Some(old) = lease_of(token) {
        let _ = crate::lease::revoke(conn, old).await;
    }
    Ok(r.succeeded())
}

/// Stores `token`'s claim on `k` (the stored key of `key`) as done with
/// `outcome`, on a new lease of `ttl`, then revokes the claim's lease.
async fn complete(
    conn: &Arc<ConnectionManager>,
    k: &str,
    key: &str,
    token: &str,
    outcome: &[u8],
    ttl: Duration,
) -> Result<()> {
    let value = [DONE_BY, token.as_bytes(), b"\n", outcome].concat();
    // The layer checked the outcome against `max_outcome`, which leaves
    // room for a well-formed token: this bounds the record.
    validate::value(value.len(), conn.settings().max_value_bytes)?;
    let old = lease_of(token).ok_or_else(|| im_infra::once::not_held(key))?;
    let secs = lease_secs(ttl);
    let lease = conn
        .call("once.lease", |mut c| async move {
            c.lease_grant(secs, None).await
        })
        .await?
        .id();
    let txn = Txn::new()
        .when([Compare::value(
            k.to_owned(),
            CompareOp::Equal,
            claimed(token),
        )])
        .and_then([TxnOp::put(
            k.to_owned(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(k.to_owned(), None)]);
    // A failed call may have been applied with its answer lost: the done
    // record is then on the new lease, which is therefore not revoked
    // (unused, it expires with the outcome's TTL).
    let r = conn
        .call("once.complete", |mut c| async move { c.txn(txn).await })
        .await?;
    if !r.succeeded() {
        let _ = crate::lease::revoke(conn, lease).await;
        // Completed by this token already (a retry after a lost answer)?
        let current = match r.op_responses().first() {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        };
        if !done_by(current.as_deref(), token) {
            return Err(im_infra::once::not_held(key));
        }
    }
    // The claim's lease holds nothing any more (also after a retry that
    // found the record done by this token).
    let _ = crate::lease::revoke(conn, old).await;
    Ok(())
}

/// A claim on its lease, as the lease core sees it.
struct HeldClaim {
    lease: EtcdLease,
    /// The stored key.
    key: String,
    /// The caller's key, for errors.
    name: String,
    token: String,
}

#[async_trait]
impl LeaseBackend for HeldClaim {
    fn describe(&self) -> String {
        format!("once claim {}", self.key)
    }

    /// Keeps the claim's lease alive; once it is gone, the claim still
    /// counts as held if this token completed the work.
    async fn extend(&self, _ttl: Duration) -> Result<bool> {
        if self.lease.keep_alive().await? {
            return Ok(true);
        }
        let k = self.key.clone();
        let r = self
            .lease
            .conn()
            .call("once.get", |mut c| async move { c.get(k, None).await })
            .await?;
        Ok(done_by(r.kvs().first().map(|kv| kv.value()), &self.token))
    }

    async fn release(&self) -> Result<bool> {
        abandon(self.lease.conn(), &self.key, &self.token).await
    }
}

#[async_trait]
impl ClaimLease for HeldClaim {
    async fn complete(&self, outcome: Bytes, ttl: Duration) -> Result<()> {
        let conn = self.lease.conn();
        complete(conn, &self.key, &self.name, &self.token, &outcome, ttl).await
    }
}

#[async_trait]
impl Once for EtcdOnce {
    fn capabilities(&self) -> OnceCapabilities {
        // The done record carries the token and a separator beside the outcome.
        let overhead = DONE_BY.len() + 2 + 64;
        OnceCapabilities::default()
            .with_min_ttl(MIN_TTL)
            .with_max_outcome(
                self.conn
                    .settings()
                    .max_value_bytes
                    .saturating_sub(overhead),
            )
    }

    fn claim_lease(&self, key: &str, token: &str) -> Arc<dyn ClaimLease> {
        Arc::new(HeldClaim {
            lease: EtcdLease::new(self.conn.clone(), lease_of(token).unwrap_or(0)),
            key: self.key(key),
            name: key.to_owned(),
            token: token.to_owned(),
        })
    }

    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim> {
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
        let _ = crate::lease::revoke(&self.conn, lease).await;
        let value = match r.op_responses().first() {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        };
        Ok(match value.as_deref().and_then(done) {
            Some((_, outcome)) => Claim::Done(Bytes::copy_from_slice(outcome)),
            // Claimed, or gone between the two steps: report in progress.
            _ => Claim::InProgress,
        })
    }

    async fn complete(&self, key: &str, token: &str, outcome: Bytes, ttl: Duration) -> Result<()> {
        complete(&self.conn, &self.key(key), key, token, &outcome, ttl).await
    }

    async fn abandon(&self, key: &str, token: &str) -> Result<()> {
        if abandon(&self.conn, &self.key(key), token).await? {
            Ok(())
        } else {
            Err(im_infra::once::not_held(key))
        }
    }

    async fn outcome(&self, key: &str) -> Result<Option<Bytes>> {
        let k = self.key(key);
        let r = self
            .conn
            .call("once.get", |mut c| async move { c.get(k, None).await })
            .await?;
        Ok(r.kvs()
            .first()
            .and_then(|kv| done(kv.value()))
            .map(|(_, outcome)| Bytes::copy_from_slice(outcome)))
    }

    async fn reset(&self, key: &str) -> Result<bool> {
        let k = self.key(key);
        let r = self
            .conn
            .call("once.reset", |mut c| async move { c.delete(k, None).await })
            .await?;
        Ok(r.deleted() > 0)
    }
}
