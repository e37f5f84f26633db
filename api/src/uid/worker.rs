//! Worker ids leased from a coordination backend.

use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorKind, Result};
use crate::lease::{Lease, LeaseOptions, Tick};

/// A worker id held by this process, kept by a [`Lease`]: renewed in the
/// background, with a local deadline after which a
/// [`Snowflake`](super::Snowflake) built on it stops issuing ids — before
/// the server can hand the id to another process. Dropping it releases the
/// id in the background (best effort).
///
/// It also carries the previous holder's last possible timestamp
/// ([`not_before_millis`](Self::not_before_millis)): a generator on a
/// reused id issues no id at or before it, so a host whose clock is behind
/// the previous holder's cannot repeat its ids.
///
/// ```
/// use im_infra::uid::WorkerLease;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> im_infra::Result<()> {
/// let lease = WorkerLease::fixed(7);
/// assert_eq!(lease.worker_id(), 7);
/// assert!(lease.is_held());
/// lease.release().await?;
/// assert!(!lease.is_held());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct WorkerLease {
    worker_id: u64,
    not_before_millis: u64,
    lease: Lease,
}

impl WorkerLease {
    /// Worker id `worker_id`, kept by `lease`.
    pub fn new(worker_id: u64, lease: Lease) -> Self {
        WorkerLease {
            worker_id,
            not_before_millis: 0,
            lease,
        }
    }

    /// A worker id that is simply fixed (never expires, nothing on a server).
    pub fn fixed(worker_id: u64) -> Self {
        WorkerLease::new(
            worker_id,
            Lease::unbounded(format!("worker id {worker_id}")),
        )
    }

    /// Records the previous holder's last possible timestamp (Unix ms).
    #[must_use]
    pub fn with_not_before(mut self, unix_millis: u64) -> Self {
        self.not_before_millis = unix_millis;
        self
    }

    /// The leased id.
    pub fn worker_id(&self) -> u64 {
        self.worker_id
    }

    /// No id may carry this timestamp (Unix ms) or an earlier one: the
    /// previous holder may have used it. 0 when the id was never held.
    pub fn not_before_millis(&self) -> u64 {
        self.not_before_millis
    }

    /// Whether the id is still held (before the local deadline, not lost).
    #[inline]
    pub fn is_held(&self) -> bool {
        self.lease.is_held()
    }

    /// [`is_held`](Self::is_held) at a clock reading the caller took.
    #[inline]
    pub fn is_held_at(&self, now: Tick) -> bool {
        self.lease.is_held_at(now)
    }

    /// Cancelled when the lease is lost or released.
    pub fn lost(&self) -> CancellationToken {
        self.lease.lost()
    }

    /// The lease that keeps the id.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Gives the id back. `LeaseLost` if it had been lost or released.
    pub async fn release(&self) -> Result<()> {
        if self.lease.release().await? {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::LeaseLost,
                format!(
                    "worker id {} was not leased any more (lost or released)",
                    self.worker_id
                ),
            ))
        }
    }

    /// The lease options of a worker id of `ttl` on `backend`.
    pub fn lease_options(backend: &'static str, ttl: Duration) -> LeaseOptions {
        LeaseOptions::new(ttl).labels(backend, "uid")
    }
}

/// How far a generator's clock ([`SystemClock`](super::SystemClock), the
/// wall clock read through the lease clock and re-synchronised every
/// second) may run ahead of [`SystemTime::now`](std::time::SystemTime::now).
pub const CLOCK_TOLERANCE: Duration = Duration::from_millis(20);

/// The last timestamp (Unix ms) a generator on this host may put in an id
/// while its worker lease lasts `ahead` from now: what a backend records
/// with the lease on every renewal (`ahead` = the TTL) and at release
/// (`ahead` = 0), for the id's next holder to start after.
///
/// ```
/// use std::time::{Duration, SystemTime, UNIX_EPOCH};
/// use im_infra::uid::last_timestamp_bound;
///
/// let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
/// assert!(last_timestamp_bound(Duration::from_secs(10)) >= now + 10_000);
/// ```
pub fn last_timestamp_bound(ahead: Duration) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    now.saturating_add(crate::validate::ttl_millis(
        ahead.saturating_add(CLOCK_TOLERANCE),
    ))
}

/// What a holder records for its id's next holder: [`last_timestamp_bound`]
/// of `ahead`, but never less than `not_before`, the bound it inherited
/// ([`WorkerLease::not_before_millis`]). Its own bound can be lower (it
/// released the id at once, or its clock is behind its predecessor's);
/// recording that would let the next holder start before ids the
/// predecessor may have issued.
///
/// ```
/// use std::time::Duration;
/// use im_infra::uid::{last_timestamp_bound, last_timestamp_bound_after};
///
/// let far = last_timestamp_bound(Duration::from_secs(3600));
/// assert_eq!(last_timestamp_bound_after(far, Duration::ZERO), far);
/// assert!(last_timestamp_bound_after(0, Duration::ZERO) > 0);
/// ```
pub fn last_timestamp_bound_after(not_before: u64, ahead: Duration) -> u64 {
    last_timestamp_bound(ahead).max(not_before)
}

/// `ResourceExhausted`: every id in `0..=max_worker_id` is leased — what
/// [`WorkerIdAllocator::allocate`] answers on every backend then.
///
/// ```
/// use im_infra::ErrorKind;
///
/// let e = im_infra::uid::all_leased(1023);
/// assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
/// assert!(e.message().contains("all 1024 worker ids"));
/// ```
pub fn all_leased(max_worker_id: u64) -> Error {
    Error::new(
        ErrorKind::ResourceExhausted,
        format!(
            "all {} worker ids are leased",
            max_worker_id.saturating_add(1)
        ),
    )
}

/// `InvalidArgument` when `max_worker_id` is above `limit`, the most ids a
/// backend's allocator handles.
///
/// ```
/// assert!(im_infra::uid::check_max_worker_id(1023, 65_535).is_ok());
/// assert!(im_infra::uid::check_max_worker_id(70_000, 65_535).is_err());
/// ```
pub fn check_max_worker_id(max_worker_id: u64, limit: u64) -> Result<()> {
    if max_worker_id > limit {
        return Err(Error::invalid_argument(format!(
            "max_worker_id above {limit} is not supported"
        )));
    }
    Ok(())
}

/// Hands out worker ids that are unique among live processes.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait WorkerIdAllocator: Send + Sync + 'static {
    /// Leases the lowest free id in `0..=max_worker_id` for `ttl` (renewed
    /// while the lease lives). `ResourceExhausted` when every id is taken.
    async fn allocate(&self, max_worker_id: u64, ttl: Duration) -> Result<WorkerLease>;
}
