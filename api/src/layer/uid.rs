//! The layer of [`WorkerIdAllocator`].

use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::uid::{WorkerIdAllocator, WorkerLease};
use crate::validate;

ops!(UidOps, "uid" {
    allocate => "uid.allocate",
});

/// Argument checks (TTL) and telemetry (`uid.allocate`) around a worker-id
/// allocator. The lease's renewals are the lease core's `lease.*`
/// operations.
///
/// ```
/// use std::sync::Arc;
/// use im_infra::layer::ObservedWorkerIds;
/// use im_infra::uid::WorkerIdAllocator;
///
/// fn hand_out<A: WorkerIdAllocator>(raw: A) -> Arc<dyn WorkerIdAllocator> {
///     Arc::new(ObservedWorkerIds::new("mysql", raw))
/// }
/// ```
pub struct ObservedWorkerIds<A> {
    inner: A,
    ops: UidOps,
}

impl<A: WorkerIdAllocator> ObservedWorkerIds<A> {
    /// `inner`, observed as the worker-id allocator of `backend`.
    pub fn new(backend: &'static str, inner: A) -> Self {
        ObservedWorkerIds {
            inner,
            ops: UidOps::new(backend),
        }
    }

    /// The inner allocator.
    pub fn inner(&self) -> &A {
        &self.inner
    }
}

impl<A> std::fmt::Debug for ObservedWorkerIds<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedWorkerIds").finish_non_exhaustive()
    }
}

#[async_trait]
impl<A: WorkerIdAllocator> WorkerIdAllocator for ObservedWorkerIds<A> {
    async fn allocate(&self, max_worker_id: u64, ttl: Duration) -> Result<WorkerLease> {
        self.ops
            .allocate
            .run(async {
                validate::ttl(ttl)?;
                self.inner.allocate(max_worker_id, ttl).await
            })
            .await
    }
}
