//! Worker ids leased from a coordination backend.

use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// A worker id held by this process. The backend renews it in the
/// background; if renewal fails the [`lost`](Self::lost) token is cancelled
/// and a [`Snowflake`](super::Snowflake) built on it stops issuing ids.
/// Dropping it releases the id in the background (best effort).
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait WorkerLease: Send + Sync {
    /// The leased id.
    fn worker_id(&self) -> u64;
    /// Cancelled when the lease is lost or released.
    fn lost(&self) -> CancellationToken;
    /// Gives the id back.
    async fn release(&self) -> Result<()>;
}

/// Hands out worker ids that are unique among live processes.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait WorkerIdAllocator: Send + Sync + 'static {
    /// Leases the lowest free id in `0..=max_worker_id` for `ttl` (renewed
    /// while the lease lives). `ResourceExhausted` when every id is taken.
    async fn allocate(&self, max_worker_id: u64, ttl: Duration) -> Result<Box<dyn WorkerLease>>;
}
