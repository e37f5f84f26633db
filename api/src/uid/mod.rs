//! Unique, time-ordered 64-bit ids (Snowflake) and leased worker ids.
//!
//! ```
//! use im_infra::uid::{IdGenerator, Layout, Snowflake};
//!
//! let ids = Snowflake::new(Layout::default(), 7).unwrap();
//! let a = ids.next_id().unwrap();
//! let b = ids.next_id().unwrap();
//! assert!(b > a);
//! assert_eq!(ids.decompose(a).worker_id, 7);
//! ```
//!
//! In a cluster, each process leases its worker id from a coordination
//! backend ([`WorkerIdAllocator`]) and builds its generator on the lease;
//! if the lease is lost the generator stops issuing ids rather than risk a
//! duplicate:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use im_infra::uid::{IdGenerator, Layout, Snowflake, WorkerIdAllocator};
//!
//! async fn ids(alloc: Arc<dyn WorkerIdAllocator>) -> im_infra::Result<Snowflake> {
//!     let layout = Layout::default();
//!     let lease = alloc.allocate(layout.max_worker_id(), Duration::from_secs(30)).await?;
//!     Snowflake::with_lease(layout, lease)
//! }
//! ```

mod snowflake;
mod worker;

use std::time::SystemTime;

pub use snowflake::{Clock, Layout, Snowflake, SystemClock};
#[cfg(feature = "mock")]
pub use worker::MockWorkerIdAllocator;
pub use worker::{
    all_leased, check_max_worker_id, last_timestamp_bound, last_timestamp_bound_after,
    WorkerIdAllocator, WorkerLease, CLOCK_TOLERANCE,
};

use crate::error::Result;

/// The parts of an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdParts {
    /// Milliseconds since the layout's epoch.
    pub millis_since_epoch: u64,
    /// The wall-clock time the id was issued at.
    pub time: SystemTime,
    /// The worker that issued it.
    pub worker_id: u64,
    /// The sequence number within that millisecond.
    pub sequence: u64,
}

/// A generator of unique, increasing ids.
#[cfg_attr(feature = "mock", mockall::automock)]
pub trait IdGenerator: Send + Sync + 'static {
    /// A new id, larger than every id this generator issued before.
    /// Fails (rather than risk a duplicate) when the clock moved back further
    /// than the layout tolerates or the worker lease was lost.
    fn next_id(&self) -> Result<i64>;

    /// [`next_id`](Self::next_id) in decimal.
    fn next_string(&self) -> Result<String> {
        self.next_id().map(|id| id.to_string())
    }

    /// Splits an id into time, worker and sequence.
    fn decompose(&self, id: i64) -> IdParts;
}
