//! Worker-id leases on Redis keys with expiries.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use im_infra::lease::{LeaseBackend, PendingLease, Tick};
use im_infra::uid::{
    last_timestamp_bound, last_timestamp_bound_after, WorkerIdAllocator, WorkerLease,
};
use im_infra::{validate, Result};

use crate::client;
use crate::Shared;

static SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("scripts/worker_id.lua")));

async fn run<T: redis::FromRedisValue>(shared: &Shared, args: &[String]) -> Result<T> {
    let prefix = shared.keys.worker_prefix();
    let mut cmd = client::evalsha(&SCRIPT, [format!("{prefix}route")]);
    cmd.arg(&args[0]).arg(&prefix);
    for a in &args[1..] {
        cmd.arg(a);
    }
    shared.client.script(&SCRIPT, &cmd).await
}

/// The worker-id allocator of a [`RedisBackend`](crate::RedisBackend): one
/// key per id holding the owner's token with a `PX` expiry; the lowest free
/// id is taken in one script and kept by a [`Lease`]; a hash keeps each
/// id's last possible timestamp for its next holder. Handed out inside
/// [`ObservedWorkerIds`](im_infra::layer::ObservedWorkerIds), which checks
/// the TTL.
pub(crate) struct RedisWorkerIds {
    shared: Arc<Shared>,
}

impl RedisWorkerIds {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RedisWorkerIds { shared }
    }
}

#[async_trait]
impl WorkerIdAllocator for RedisWorkerIds {
    async fn allocate(&self, max_worker_id: u64, ttl: Duration) -> Result<WorkerLease> {
        // The script scans every id in one slot.
        im_infra::uid::check_max_worker_id(max_worker_id, 65_535)?;
        let token = uuid::Uuid::new_v4().to_string();
        let ttl_ms = validate::ttl_millis(ttl);
        let mut pending = PendingLease::new(HeldWorkerId {
            shared: self.shared.clone(),
            id: OnceLock::new(),
            not_before: OnceLock::new(),
            token: token.clone(),
            max_worker_id,
        });
        let sent = Tick::now();
        pending.arm();
        let (id, not_before): (i64, u64) = run(
            &self.shared,
            &[
                "allocate".into(),
                max_worker_id.to_string(),
                token,
                ttl_ms.to_string(),
                last_timestamp_bound(Duration::ZERO).to_string(),
            ],
        )
        .await?;
        if id < 0 {
            pending.disarm();
            return Err(im_infra::uid::all_leased(max_worker_id));
        }
        let id = id as u64;
        let _ = pending.backend().id.set(id);
        let _ = pending.backend().not_before.set(not_before);
        let lease = pending.start(WorkerLease::lease_options(crate::NAME, ttl), sent);
        Ok(WorkerLease::new(id, lease).with_not_before(not_before))
    }
}

/// A leased worker id, as the lease core sees it. Before the id is known
/// (an allocation whose answer was lost), releasing looks for the token in
/// every id.
struct HeldWorkerId {
    shared: Arc<Shared>,
    id: OnceLock<u64>,
    /// The bound it inherited, which its release must not lower.
    not_before: OnceLock<u64>,
    token: String,
    max_worker_id: u64,
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
        let Some(id) = self.id.get() else {
            return Ok(false);
        };
        let args = [
            "renew".to_string(),
            id.to_string(),
            self.token.clone(),
            validate::ttl_millis(ttl).to_string(),
            last_timestamp_bound(Duration::ZERO).to_string(),
        ];
        Ok(run::<i64>(&self.shared, &args).await? == 1)
    }

    async fn release(&self) -> Result<bool> {
        let args = match self.id.get() {
            Some(id) => ["release".to_string(), id.to_string()],
            None => ["forget".to_string(), self.max_worker_id.to_string()],
        };
        let [op, which] = args;
        let not_before = self.not_before.get().copied().unwrap_or(0);
        let args = [
            op,
            which,
            self.token.clone(),
            last_timestamp_bound_after(not_before, Duration::ZERO).to_string(),
        ];
        Ok(run::<i64>(&self.shared, &args).await? == 1)
    }
}

/// Deletes a worker-id lease whoever holds it (fault injection).
pub(crate) async fn revoke(shared: &Shared, id: u64) -> Result<bool> {
    let n: u64 = shared
        .client
        .query(redis::cmd("DEL").arg(format!("{}{id}", shared.keys.worker_prefix())))
        .await?;
    Ok(n == 1)
}
