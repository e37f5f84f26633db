//! Worker-id leases: one row per `(namespace, id)` with an owner token and
//! an expiry on the server's clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use im_infra::telemetry::OpMetrics;
use im_infra::uid::{WorkerIdAllocator, WorkerLease};
use im_infra::{validate, Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// Most ids one allocator hands out (the snowflake layouts use 10 bits; 16
/// leave room).
const MAX_WORKER_ID: u64 = 65_535;

/// The worker-id allocator of a [`MysqlBackend`](crate::MysqlBackend).
///
/// Allocation reads the live ids, then takes the lowest free one with an
/// upsert that only replaces an expired row; a lost race moves on to the
/// next candidate. The lease is renewed every `ttl / 3`.
pub struct MysqlWorkerIds {
    shared: Arc<Shared>,
    allocate: OpMetrics,
}

impl std::fmt::Debug for MysqlWorkerIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlWorkerIds").finish_non_exhaustive()
    }
}

fn micros(d: Duration) -> u64 {
    validate::ttl_millis(d) * 1000
}

impl MysqlWorkerIds {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MysqlWorkerIds {
            shared,
            allocate: OpMetrics::new(crate::NAME, "uid", "uid.allocate"),
        }
    }

    /// Takes `id` for `token` unless a live lease holds it.
    async fn take(&self, id: u64, token: &str, ttl: Duration) -> Result<bool> {
        // `token` is assigned before `expires_at`, so both conditions read
        // the old expiry.
        let sql = format!(
            "INSERT INTO {} (ns, id, token, expires_at) VALUES (?, ?, ?, NOW(6) + INTERVAL ? MICROSECOND) \
             ON DUPLICATE KEY UPDATE \
               token = IF(expires_at <= NOW(6), VALUES(token), token), \
               expires_at = IF(expires_at <= NOW(6), VALUES(expires_at), expires_at)",
            self.shared.table("workers")
        );
        let n = self
            .shared
            .db
            .exec(&sql, (self.shared.ns(), id, token, micros(ttl)))
            .await?;
        Ok(n > 0)
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
    async fn allocate(&self, max_worker_id: u64, ttl: Duration) -> Result<Box<dyn WorkerLease>> {
        self.allocate
            .run(async {
                validate::ttl(ttl)?;
                if max_worker_id > MAX_WORKER_ID {
                    return Err(Error::invalid_argument(format!(
                        "max_worker_id above {MAX_WORKER_ID} is not supported"
                    )));
                }
                let token = uuid::Uuid::new_v4().simple().to_string();
                // A few rounds: another allocator may take our candidates.
                for _ in 0..8 {
                    let taken = self.live_ids(max_worker_id).await?;
                    let mut tried = false;
                    for id in free_ids(&taken, max_worker_id).take(4) {
                        tried = true;
                        if self.take(id, &token, ttl).await? {
                            return Ok(self.lease(id, token, ttl));
                        }
                    }
                    if !tried {
                        break;
                    }
                }
                Err(Error::new(
                    ErrorKind::ResourceExhausted,
                    format!("all {} worker ids are leased", max_worker_id + 1),
                ))
            })
            .await
    }
}

impl MysqlWorkerIds {
    fn lease(&self, id: u64, token: String, ttl: Duration) -> Box<dyn WorkerLease> {
        let lost = CancellationToken::new();
        tokio::spawn(renew(
            self.shared.clone(),
            id,
            token.clone(),
            ttl,
            lost.clone(),
        ));
        Box::new(MysqlWorkerLease {
            shared: self.shared.clone(),
            id,
            token,
            lost,
            released: AtomicBool::new(false),
        })
    }
}

async fn extend(shared: &Shared, id: u64, token: &str, ttl: Duration) -> Result<bool> {
    let sql = format!(
        "UPDATE {} SET expires_at = NOW(6) + INTERVAL ? MICROSECOND \
         WHERE ns = ? AND id = ? AND token = ? AND expires_at > NOW(6)",
        shared.table("workers")
    );
    Ok(shared
        .db
        .exec(&sql, (micros(ttl), shared.ns(), id, token))
        .await?
        == 1)
}

async fn give_back(shared: &Shared, id: u64, token: &str) -> Result<bool> {
    let sql = format!(
        "DELETE FROM {} WHERE ns = ? AND id = ? AND token = ? AND expires_at > NOW(6)",
        shared.table("workers")
    );
    Ok(shared.db.exec(&sql, (shared.ns(), id, token)).await? == 1)
}

/// Renews every `ttl / 3`; an outage is ridden out until the lease would
/// have run out.
async fn renew(
    shared: Arc<Shared>,
    id: u64,
    token: String,
    ttl: Duration,
    lost: CancellationToken,
) {
    let period = (ttl / 3).max(Duration::from_millis(1));
    let mut valid_until = Instant::now() + ttl;
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = shared.shutdown.cancelled() => { lost.cancel(); return }
            _ = tokio::time::sleep(period) => {}
        }
        let started = Instant::now();
        match extend(&shared, id, &token, ttl).await {
            Ok(true) => valid_until = started + ttl,
            Ok(false) => {
                tracing::warn!(worker_id = id, "worker id lease lost");
                lost.cancel();
                return;
            }
            Err(e) if Instant::now() >= valid_until => {
                tracing::warn!(worker_id = id, error = %e, "worker id lease ran out while the database was unreachable");
                lost.cancel();
                return;
            }
            Err(_) => {}
        }
    }
}

/// A worker id leased from MySQL.
pub struct MysqlWorkerLease {
    shared: Arc<Shared>,
    id: u64,
    token: String,
    lost: CancellationToken,
    released: AtomicBool,
}

impl std::fmt::Debug for MysqlWorkerLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlWorkerLease")
            .field("id", &self.id)
            .finish()
    }
}

#[async_trait]
impl WorkerLease for MysqlWorkerLease {
    fn worker_id(&self) -> u64 {
        self.id
    }

    fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    async fn release(&self) -> Result<()> {
        self.lost.cancel();
        if self.released.swap(true, Ordering::AcqRel) {
            return Err(Error::new(
                ErrorKind::LeaseLost,
                "the worker id was already released",
            ));
        }
        if give_back(&self.shared, self.id, &self.token).await? {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::LeaseLost,
                format!("worker id {} was not leased any more", self.id),
            ))
        }
    }
}

impl Drop for MysqlWorkerLease {
    fn drop(&mut self) {
        self.lost.cancel();
        if !self.released.swap(true, Ordering::AcqRel) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let shared = self.shared.clone();
                let (id, token) = (self.id, self.token.clone());
                rt.spawn(async move {
                    let _ = give_back(&shared, id, &token).await;
                });
            }
        }
    }
}

/// Deletes a worker-id lease whoever holds it (fault injection).
pub(crate) async fn revoke(shared: &Shared, id: u64) -> Result<bool> {
    let sql = format!(
        "DELETE FROM {} WHERE ns = ? AND id = ? AND expires_at > NOW(6)",
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
