//! Worker-id leases: one row per `(namespace, id)` with an owner token and
//! an expiry on the server's clock.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use im_infra::lease::{LeaseBackend, PendingLease, Tick};
use im_infra::uid::{last_timestamp_bound, WorkerIdAllocator, WorkerLease};
use im_infra::{validate, Result};

use crate::Shared;

/// Most ids one allocator hands out (the snowflake layouts use 10 bits; 16
/// leave room).
const MAX_WORKER_ID: u64 = 65_535;

/// The worker-id allocator of a [`MysqlBackend`](crate::MysqlBackend).
///
/// Allocation reads the live ids, then takes the lowest free one with an
/// upsert that only replaces an expired row; a lost race moves on to the
/// next candidate. The lease is kept by a [`Lease`](im_infra::lease::Lease).
/// Released ids keep their row (expired), with the last timestamp their
/// holder may have used, which the next holder starts after.
///
/// Raw operations: the backend hands it out layered
/// ([`ObservedWorkerIds`](im_infra::layer::ObservedWorkerIds)); the bound
/// on `max_worker_id` is this backend's own.
pub(crate) struct MysqlWorkerIds {
    shared: Arc<Shared>,
}

impl MysqlWorkerIds {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MysqlWorkerIds { shared }
    }

    /// Takes `id` for `token` unless a live lease holds it; on success
    /// returns the previous holder's last possible timestamp.
    async fn take(&self, id: u64, token: &str, ttl: Duration) -> Result<Option<u64>> {
        // Every condition reads the old expiry: `expires_at` is assigned
        // last. `prev_ms` keeps the old `last_ms` for the taker to read.
        let t = self.shared.table("workers");
        let sql = format!(
            "INSERT INTO {t} (ns, id, token, expires_at, last_ms, prev_ms) \
             VALUES (?, ?, ?, NOW(6) + INTERVAL ? MICROSECOND, ?, 0) \
             ON DUPLICATE KEY UPDATE \
               token = IF(expires_at <= NOW(6), VALUES(token), token), \
               prev_ms = IF(expires_at <= NOW(6), last_ms, prev_ms), \
               last_ms = IF(expires_at <= NOW(6), GREATEST(last_ms, VALUES(last_ms)), last_ms), \
               expires_at = IF(expires_at <= NOW(6), VALUES(expires_at), expires_at)"
        );
        let last = last_timestamp_bound(ttl);
        let n = self
            .shared
            .db
            .exec(
                &sql,
                (self.shared.ns(), id, token, validate::ttl_micros(ttl), last),
            )
            .await?;
        if n == 0 {
            return Ok(None);
        }
        let read = format!("SELECT prev_ms FROM {t} WHERE ns = ? AND id = ? AND token = ?");
        let prev: Option<u64> = self
            .shared
            .db
            .query_first(&read, (self.shared.ns(), id, token))
            .await?;
        Ok(Some(prev.unwrap_or(0)))
    }

    async fn live_ids(&self, max_worker_id: u64) -> Result<Vec<u64>> {
        let sql = format!(
            "SELECT id FROM {} WHERE ns = ? AND id <= ? AND expires_at > NOW(6) ORDER BY id",
            self.shared.table("workers")
        );
        self.shared
            .db
            .query(&sql, (self.shared.ns(), max_worker_id))
            .await
    }
}

/// The lowest ids in `0..=max` that are not in the sorted `taken`.
fn free_ids(taken: &[u64], max: u64) -> impl Iterator<Item = u64> + '_ {
    (0..=max).filter(move |id| taken.binary_search(id).is_err())
}

#[async_trait]
impl WorkerIdAllocator for MysqlWorkerIds {
    async fn allocate(&self, max_worker_id: u64, ttl: Duration) -> Result<WorkerLease> {
        im_infra::uid::check_max_worker_id(max_worker_id, MAX_WORKER_ID)?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        // Until an id is known, releasing looks for the token.
        let mut pending = PendingLease::new(HeldWorkerId {
            shared: self.shared.clone(),
            id: OnceLock::new(),
            token: token.clone(),
        });
        // A few rounds: another allocator may take our candidates.
        for _ in 0..8 {
            let taken = self.live_ids(max_worker_id).await?;
            let mut tried = false;
            for id in free_ids(&taken, max_worker_id).take(4) {
                tried = true;
                let sent = Tick::now();
                pending.arm();
                if let Some(not_before) = self.take(id, &token, ttl).await? {
                    let _ = pending.backend().id.set(id);
                    let lease = pending.start(WorkerLease::lease_options(crate::NAME, ttl), sent);
                    return Ok(WorkerLease::new(id, lease).with_not_before(not_before));
                }
                pending.disarm();
            }
            if !tried {
                break;
            }
        }
        Err(im_infra::uid::all_leased(max_worker_id))
    }
}

/// A leased worker id, as the lease core sees it.
struct HeldWorkerId {
    shared: Arc<Shared>,
    id: OnceLock<u64>,
    token: String,
}

#[async_trait]
impl LeaseBackend for HeldWorkerId {
    fn describe(&self) -> String {
        match self.id.get() {
            Some(id) => format!("worker id {id}"),
            None => "a worker id being allocated".into(),
        }
    }

    async fn extend(&self, ttl: Duration) -> Result<bool> {
        let Some(&id) = self.id.get() else {
            return Ok(false);
        };
        let shared = &self.shared;
        let sql = format!(
            "UPDATE {} SET last_ms = GREATEST(last_ms, ?), expires_at = NOW(6) + INTERVAL ? MICROSECOND \
             WHERE ns = ? AND id = ? AND token = ? AND expires_at > NOW(6)",
            shared.table("workers")
        );
        let last = last_timestamp_bound(ttl);
        let params = (
            last,
            validate::ttl_micros(ttl),
            shared.ns(),
            id,
            self.token.as_str(),
        );
        Ok(shared.db.exec(&sql, params).await? == 1)
    }

    /// Expires the row (it stays, with the release time as the last
    /// timestamp its holder used, but never less than the bound it
    /// inherited, `prev_ms`).
    async fn release(&self) -> Result<bool> {
        let shared = &self.shared;
        let sql = format!(
            "UPDATE {} SET last_ms = GREATEST(prev_ms, ?), expires_at = NOW(6) \
             WHERE ns = ? AND token = ? AND expires_at > NOW(6)",
            shared.table("workers")
        );
        let params = (
            last_timestamp_bound(Duration::ZERO),
            shared.ns(),
            self.token.as_str(),
        );
        Ok(shared.db.exec(&sql, params).await? >= 1)
    }
}

/// Expires a worker-id lease whoever holds it (fault injection).
pub(crate) async fn revoke(shared: &Shared, id: u64) -> Result<bool> {
    let sql = format!(
        "UPDATE {} SET expires_at = NOW(6) WHERE ns = ? AND id = ? AND expires_at > NOW(6)",
        shared.table("workers")
    );
    Ok(shared.db.exec(&sql, (shared.ns(), id)).await? == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ids_skip_the_taken_ones() {
        let got: Vec<u64> = free_ids(&[0, 1, 3], 5).collect();
        assert_eq!(got, [2, 4, 5]);
        assert_eq!(free_ids(&[0, 1], 1).count(), 0);
    }
}
