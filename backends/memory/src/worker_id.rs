//! In-process worker-id leases.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use im_infra::telemetry::OpMetrics;
use im_infra::uid::{WorkerIdAllocator, WorkerLease};
use im_infra::{validate, Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use crate::Shared;

#[derive(Debug, Default)]
pub(crate) struct WorkerStore {
    /// Leased ids: id -> (token, expiry).
    leases: Mutex<BTreeMap<u64, (String, Instant)>>,
}

impl WorkerStore {
    fn leases(&self) -> MutexGuard<'_, BTreeMap<u64, (String, Instant)>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn renew(&self, id: u64, token: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        match self.leases().get_mut(&id) {
            Some((t, exp)) if t == token && *exp > now => {
                *exp = now + ttl;
                true
            }
            _ => false,
        }
    }

    fn release(&self, id: u64, token: &str) -> bool {
        let mut leases = self.leases();
        if leases.get(&id).is_some_and(|(t, _)| t == token) {
            leases.remove(&id);
            true
        } else {
            false
        }
    }

    /// Revokes a lease as if it expired (fault injection for tests).
    pub(crate) fn revoke(&self, id: u64) -> bool {
        self.leases().remove(&id).is_some()
    }
}

/// The worker-id allocator of a [`MemoryBackend`](crate::MemoryBackend).
pub struct MemoryWorkerIds {
    shared: Arc<Shared>,
    allocate: OpMetrics,
}

impl std::fmt::Debug for MemoryWorkerIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryWorkerIds").finish_non_exhaustive()
    }
}

impl MemoryWorkerIds {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MemoryWorkerIds {
            shared,
            allocate: OpMetrics::new(crate::NAME, "uid", "uid.allocate"),
        }
    }
}

#[async_trait]
impl WorkerIdAllocator for MemoryWorkerIds {
    async fn allocate(&self, max_worker_id: u64, ttl: Duration) -> Result<Box<dyn WorkerLease>> {
        self.allocate.run_sync(|| {
            self.shared.check_open()?;
            validate::ttl(ttl)?;
            let now = Instant::now();
            let token = uuid::Uuid::new_v4().to_string();
            let mut leases = self.shared.workers.leases();
            leases.retain(|_, (_, exp)| *exp > now);
            let id = (0..=max_worker_id)
                .find(|id| !leases.contains_key(id))
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::ResourceExhausted,
                        format!(
                            "all {} worker ids are leased",
                            max_worker_id.saturating_add(1)
                        ),
                    )
                })?;
            leases.insert(id, (token.clone(), now + ttl));
            drop(leases);
            let lost = CancellationToken::new();
            tokio::spawn(renew(
                self.shared.clone(),
                id,
                token.clone(),
                ttl,
                lost.clone(),
            ));
            Ok(Box::new(MemoryWorkerLease {
                shared: self.shared.clone(),
                id,
                token,
                lost,
                released: AtomicBool::new(false),
            }) as Box<dyn WorkerLease>)
        })
    }
}

async fn renew(
    shared: Arc<Shared>,
    id: u64,
    token: String,
    ttl: Duration,
    lost: CancellationToken,
) {
    let period = (ttl / 3).max(Duration::from_millis(1));
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        if !shared.workers.renew(id, &token, ttl) {
            tracing::warn!(worker_id = id, "worker id lease lost");
            lost.cancel();
            return;
        }
    }
}

/// A leased worker id.
pub struct MemoryWorkerLease {
    shared: Arc<Shared>,
    id: u64,
    token: String,
    lost: CancellationToken,
    released: AtomicBool,
}

impl std::fmt::Debug for MemoryWorkerLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryWorkerLease")
            .field("id", &self.id)
            .finish()
    }
}

#[async_trait]
impl WorkerLease for MemoryWorkerLease {
    fn worker_id(&self) -> u64 {
        self.id
    }

    fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    async fn release(&self) -> Result<()> {
        self.lost.cancel();
        if self.released.swap(true, Ordering::AcqRel)
            || !self.shared.workers.release(self.id, &self.token)
        {
            return Err(Error::new(
                ErrorKind::LeaseLost,
                format!("worker id {} was not leased any more", self.id),
            ));
        }
        Ok(())
    }
}

impl Drop for MemoryWorkerLease {
    fn drop(&mut self) {
        self.lost.cancel();
        if !self.released.swap(true, Ordering::AcqRel) {
            self.shared.workers.release(self.id, &self.token);
        }
    }
}
