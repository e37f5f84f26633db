//! In-process worker-id leases.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use im_infra::lease::{Lease, LeaseBackend, Tick};
use im_infra::uid::{
    last_timestamp_bound, last_timestamp_bound_after, WorkerIdAllocator, WorkerLease,
};
use im_infra::Result;

use crate::Shared;

#[derive(Debug, Default)]
struct Leases {
    /// Leased ids: id -> (token, expiry).
    held: BTreeMap<u64, (String, Instant)>,
    /// Per id, the last timestamp (Unix ms) its latest holder may have
    /// used: renewal time + TTL, or the release time.
    last_millis: BTreeMap<u64, u64>,
}

#[derive(Debug, Default)]
pub(crate) struct WorkerStore {
    leases: Mutex<Leases>,
}

impl WorkerStore {
    fn leases(&self) -> MutexGuard<'_, Leases> {
        self.leases.lock()
    }

    fn renew(&self, id: u64, token: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut leases = self.leases();
        match leases.held.get_mut(&id) {
            Some((t, exp)) if t == token && *exp > now => {
                *exp = now + ttl;
                let last = last_timestamp_bound(ttl);
                let e = leases.last_millis.entry(id).or_default();
                *e = (*e).max(last);
                true
            }
            _ => false,
        }
    }

    /// Releases `id` if `token` holds it, recording `last` as the last
    /// timestamp its holder used.
    fn release(&self, id: u64, token: &str, last: u64) -> bool {
        let mut leases = self.leases();
        if leases.held.get(&id).is_some_and(|(t, _)| t == token) {
            leases.held.remove(&id);
            leases.last_millis.insert(id, last);
            true
        } else {
            false
        }
    }

    /// Revokes a lease as if it expired (fault injection for tests).
    pub(crate) fn revoke(&self, id: u64) -> bool {
        self.leases().held.remove(&id).is_some()
    }
}

/// The worker-id allocator of a [`MemoryBackend`](crate::MemoryBackend).
/// The backend hands it out inside an
/// [`ObservedWorkerIds`](im_infra::layer::ObservedWorkerIds), which checks
/// the TTL and does the telemetry.
pub(crate) struct MemoryWorkerIds {
    shared: Arc<Shared>,
}

impl MemoryWorkerIds {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MemoryWorkerIds { shared }
    }
}

#[async_trait]
impl WorkerIdAllocator for MemoryWorkerIds {
    async fn allocate(&self, max_worker_id: u64, ttl: Duration) -> Result<WorkerLease> {
        self.shared.check_open()?;
        let sent = Tick::now();
        let now = Instant::now();
        let token = uuid::Uuid::new_v4().to_string();
        let mut leases = self.shared.workers.leases();
        leases.held.retain(|_, (_, exp)| *exp > now);
        let id = (0..=max_worker_id)
            .find(|id| !leases.held.contains_key(id))
            .ok_or_else(|| im_infra::uid::all_leased(max_worker_id))?;
        leases.held.insert(id, (token.clone(), now + ttl));
        let not_before = leases.last_millis.get(&id).copied().unwrap_or(0);
        let last = last_timestamp_bound(ttl);
        leases.last_millis.insert(id, not_before.max(last));
        drop(leases);
        let lease = Lease::start(
            HeldWorkerId {
                shared: self.shared.clone(),
                id,
                token,
                not_before,
            },
            WorkerLease::lease_options(crate::NAME, ttl),
            sent,
        );
        Ok(WorkerLease::new(id, lease).with_not_before(not_before))
    }
}

/// A leased worker id, as the lease core sees it.
struct HeldWorkerId {
    shared: Arc<Shared>,
    id: u64,
    token: String,
    /// The bound it inherited, which its release must not lower.
    not_before: u64,
}

#[async_trait]
impl LeaseBackend for HeldWorkerId {
    fn describe(&self) -> String {
        format!("worker id {}", self.id)
    }

    async fn extend(&self, ttl: Duration) -> Result<bool> {
        self.shared.check_open()?;
        Ok(self.shared.workers.renew(self.id, &self.token, ttl))
    }

    /// Its holder stops issuing ids now (or at the inherited bound).
    async fn release(&self) -> Result<bool> {
        let last = last_timestamp_bound_after(self.not_before, Duration::ZERO);
        Ok(self.shared.workers.release(self.id, &self.token, last))
    }
}
