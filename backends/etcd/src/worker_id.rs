//! Worker-id leases on etcd keys.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use im_infra::lease::{Lease, LeaseBackend, PendingLease, Tick};
use im_infra::uid::{last_timestamp_bound_after, WorkerIdAllocator, WorkerLease};
use im_infra::Result;

use crate::connection::ConnectionManager;
use crate::lease::EtcdLease;

fn dir(conn: &ConnectionManager) -> String {
    conn.settings().key("/workers/")
}

/// Where each id's last possible timestamp is kept (no lease: it must
/// outlive the holder).
fn last_dir(conn: &ConnectionManager) -> String {
    conn.settings().key("/workers-last/")
}

/// The worker-id allocator of an [`EtcdBackend`](crate::EtcdBackend): the id
/// `n` is the key `<namespace>/workers/<n>` on a lease kept by a
/// [`Lease`](im_infra::lease::Lease); an id is taken by a create-only
/// transaction. `<namespace>/workers-last/<n>` keeps the last timestamp the
/// id's latest holder may have used (written by every renewal, only while
/// the id is still that holder's), which the next holder starts after.
///
/// Raw operations: the backend hands it out layered
/// ([`ObservedWorkerIds`](im_infra::layer::ObservedWorkerIds)).
pub(crate) struct EtcdWorkerIds {
    conn: Arc<ConnectionManager>,
}

impl EtcdWorkerIds {
    pub(crate) fn new(conn: Arc<ConnectionManager>) -> Self {
        EtcdWorkerIds { conn }
    }
}

#[async_trait]
impl WorkerIdAllocator for EtcdWorkerIds {
    async fn allocate(&self, max_worker_id: u64, ttl: Duration) -> Result<WorkerLease> {
        let d = dir(&self.conn);
        let prefix = d.clone();
        let r = self
            .conn
            .call("uid.list", |mut c| async move {
                c.get(
                    prefix,
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                )
                .await
            })
            .await?;
        let taken: HashSet<u64> = r
            .kvs()
            .iter()
            .filter_map(|kv| {
                String::from_utf8_lossy(kv.key())
                    .strip_prefix(d.as_str())?
                    .parse()
                    .ok()
            })
            .collect();
        let sent = Tick::now();
        let (lease, granted) = EtcdLease::grant(&self.conn, "uid.lease", ttl).await?;
        let lease_id = lease.id();
        // Whatever happens from here, the lease goes (and the key it
        // may hold with it) unless the allocation completes.
        let mut pending = PendingLease::new(lease);
        pending.arm();
        let token = uuid::Uuid::new_v4().to_string();
        let last_dir = last_dir(&self.conn);
        for id in (0..=max_worker_id).filter(|id| !taken.contains(id)) {
            let key = format!("{d}{id}");
            let last_key = format!("{last_dir}{id}");
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::get(last_key.clone(), None),
                    TxnOp::put(
                        key.clone(),
                        token.clone(),
                        Some(PutOptions::new().with_lease(lease_id)),
                    ),
                ]);
            let r = self
                .conn
                .call("uid.claim", |mut c| async move { c.txn(txn).await })
                .await?;
            if r.succeeded() {
                let not_before = match r.op_responses().first() {
                    Some(TxnOpResponse::Get(g)) => g
                        .kvs()
                        .first()
                        .and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse().ok())
                        .unwrap_or(0),
                    _ => 0,
                };
                // The record is raised (never lowered) before any id is
                // issued; until then it holds the previous holder's bound.
                let last = last_timestamp_bound_after(not_before, granted);
                if !record_last(pending.backend(), &key, &last_key, last).await? {
                    return Err(im_infra::Error::new(
                        im_infra::ErrorKind::LeaseLost,
                        format!("worker id {id} was lost while being allocated"),
                    ));
                }
                let held = HeldWorkerId {
                    lease: pending.into_backend(),
                    key,
                    last_key,
                    ttl: granted,
                    not_before,
                };
                let opts = WorkerLease::lease_options(crate::NAME, granted);
                let lease = Lease::start(held, opts, sent);
                return Ok(WorkerLease::new(id, lease).with_not_before(not_before));
            }
        }
        Err(im_infra::uid::all_leased(max_worker_id))
    }
}

/// A worker id on its etcd lease, as the lease core sees it.
struct HeldWorkerId {
    lease: EtcdLease,
    key: String,
    last_key: String,
    ttl: Duration,
    /// The bound it inherited, which no record of its own may lower.
    not_before: u64,
}

/// Writes `last` as the id's last timestamp while its key (`key`) is still
/// on `lease`.
async fn record_last(lease: &EtcdLease, key: &str, last_key: &str, last: u64) -> Result<bool> {
    let txn = Txn::new()
        .when([Compare::lease(key.to_owned(), CompareOp::Equal, lease.id())])
        .and_then([TxnOp::put(last_key.to_owned(), last.to_string(), None)]);
    let r = lease
        .conn()
        .call("uid.last", |mut c| async move { c.txn(txn).await })
        .await?;
    Ok(r.succeeded())
}

impl HeldWorkerId {
    /// Records the last timestamp of a lease lasting `ahead` from now, never
    /// below the bound this holder inherited.
    async fn record_last(&self, ahead: Duration) -> Result<bool> {
        let last = last_timestamp_bound_after(self.not_before, ahead);
        record_last(&self.lease, &self.key, &self.last_key, last).await
    }
}

#[async_trait]
impl LeaseBackend for HeldWorkerId {
    fn describe(&self) -> String {
        format!("worker id key {}", self.key)
    }

    async fn extend(&self, _ttl: Duration) -> Result<bool> {
        Ok(self.lease.keep_alive().await? && self.record_last(self.ttl).await?)
    }

    /// Records the release time as the last timestamp, then revokes the
    /// lease (deleting the id's key).
    async fn release(&self) -> Result<bool> {
        // Without the record, the next holder waits for the last renewal's.
        if let Err(e) = self.record_last(Duration::ZERO).await {
            tracing::debug!(key = %self.key, error = %e, "could not record the release time");
        }
        self.lease.revoke().await
    }
}

/// Revokes the lease behind worker id `id` (fault injection).
pub(crate) async fn revoke(conn: &Arc<ConnectionManager>, id: u64) -> Result<bool> {
    let key = format!("{}{id}", dir(conn));
    let r = conn
        .call("uid.get", |mut c| async move { c.get(key, None).await })
        .await?;
    let Some(kv) = r.kvs().first() else {
        return Ok(false);
    };
    crate::lease::revoke(conn, kv.lease()).await?;
    Ok(true)
}
