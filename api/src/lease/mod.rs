//! Leases that know when they end: the one keeper behind every lock guard,
//! worker id, registration and once-claim.
//!
//! A backend grants something for a TTL (a lock key with an expiry, an etcd
//! lease, a row with an expiry time) and implements [`LeaseBackend`]: how to
//! extend it and how to give it up on its server. [`Lease`] does the rest,
//! the same way for every backend:
//!
//! - it renews the lease every third of its TTL (unless renewal is off,
//!   or the optional bound on extensions is reached);
//! - after each successful renewal its **local deadline** becomes the
//!   instant the renewal request was *sent*, plus the TTL, minus a safety
//!   margin for clock-rate drift, on a monotonic clock. The server starts
//!   its TTL when it applies the request, never before it was sent, so the
//!   local deadline always comes before the server's expiry;
//! - [`Lease::lost`] fires at that deadline whether or not a renewal is
//!   still outstanding: a holder cut off from its server (a partition, a
//!   frozen connection) learns it lost the lease *before* any other process
//!   can be granted it. [`Lease::is_held`] is "before the deadline and not
//!   lost";
//! - a renewal the server answers with "gone" ends the lease at once; a
//!   renewal that fails is retried with backoff until the deadline;
//! - [`Lease::refresh`] extends now with a new TTL, which the keeper then
//!   renews with;
//! - [`Lease::release`] gives it up; dropping the lease releases it in the
//!   background.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use std::time::Duration;
//! use async_trait::async_trait;
//! use im_infra::lease::{Lease, LeaseBackend, LeaseOptions, Tick};
//!
//! /// A lease on a server, here a flag.
//! struct Flag(Arc<AtomicBool>);
//!
//! #[async_trait]
//! impl LeaseBackend for Flag {
//!     fn describe(&self) -> String {
//!         "flag".into()
//!     }
//!     async fn extend(&self, _ttl: Duration) -> im_infra::Result<bool> {
//!         Ok(self.0.load(Ordering::SeqCst))
//!     }
//!     async fn release(&self) -> im_infra::Result<bool> {
//!         Ok(self.0.swap(false, Ordering::SeqCst))
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> im_infra::Result<()> {
//! let flag = Arc::new(AtomicBool::new(true));
//! let sent = Tick::now(); // just before the request that took it
//! let lease = Lease::start(Flag(flag.clone()), LeaseOptions::new(Duration::from_secs(10)), sent);
//! assert!(lease.is_held());
//! assert!(lease.refresh(Duration::from_secs(20)).await?);
//! assert_eq!(lease.ttl(), Duration::from_secs(20));
//! assert!(lease.release().await?);
//! assert!(!lease.is_held() && lease.lost().is_cancelled());
//! # Ok(()) }
//! ```

mod clock;
mod keeper;
mod pending;

use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;

pub use clock::Tick;
pub use keeper::Lease;
pub use pending::PendingLease;

/// What a backend does for one lease on its server. The backend supplies
/// only these two operations; [`Lease`] keeps the deadline, renews,
/// retries and reports the loss.
///
/// Both are called by one task at a time (never concurrently for one
/// lease), are bounded by the backend's own request timeout, and may be
/// dropped mid-call when the local deadline passes.
#[async_trait]
pub trait LeaseBackend: Send + Sync + 'static {
    /// What the lease protects, for logs (`lock "orders:7"`, `worker id 3`).
    fn describe(&self) -> String;

    /// Extends the lease to `ttl` from the moment the server applies the
    /// request. `Ok(true)`: still held and extended; `Ok(false)`: gone on
    /// the server (expired, revoked, taken over) — the lease ends at once;
    /// `Err`: the outcome is unknown (the keeper retries until the local
    /// deadline). A `Closed` error ends the lease too.
    async fn extend(&self, ttl: Duration) -> Result<bool>;

    /// Gives the lease up on the server. `Ok(true)`: released; `Ok(false)`:
    /// it was not held any more.
    async fn release(&self) -> Result<bool>;

    /// Whether the server can announce the loss itself
    /// ([`gone`](LeaseBackend::gone)). Default: no.
    fn announces_loss(&self) -> bool {
        false
    }

    /// Resolves when the server announces that the lease is gone (a
    /// deletion seen on a watch, say); the lease then ends at once instead
    /// of at the next renewal. Runs for the life of the lease when
    /// [`announces_loss`](LeaseBackend::announces_loss); must retry its own
    /// connection failures and resolve only on a real loss.
    async fn gone(&self) {
        std::future::pending::<()>().await
    }
}

/// A shared lease backend is one: the lease core keeps it while its owner
/// holds it too (a registration it updates, a claim it completes).
#[async_trait]
impl<T: LeaseBackend + ?Sized> LeaseBackend for std::sync::Arc<T> {
    fn describe(&self) -> String {
        (**self).describe()
    }
    async fn extend(&self, ttl: Duration) -> Result<bool> {
        (**self).extend(ttl).await
    }
    async fn release(&self) -> Result<bool> {
        (**self).release().await
    }
    fn announces_loss(&self) -> bool {
        (**self).announces_loss()
    }
    async fn gone(&self) {
        (**self).gone().await
    }
}

/// How a [`Lease`] is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseOptions {
    /// The TTL the server applies on every extension.
    pub ttl: Duration,
    /// Renew in the background every `ttl / 3`. Without it the lease ends
    /// at its deadline unless [refreshed](Lease::refresh).
    pub auto_renew: bool,
    /// Subtracted from every deadline to absorb clock-rate drift between
    /// this host and the server. `None`: 1 % of the TTL, at least 5 ms, never
    /// more than half the TTL.
    pub safety_margin: Option<Duration>,
    /// Stop renewing after this many background renewals (the lease then
    /// ends at its deadline). `None`: renew for as long as the lease lives.
    pub max_extensions: Option<u64>,
    /// The backend's name, for the `lease.*` metrics and spans.
    pub backend: &'static str,
    /// The capability the lease serves (`lock`, `uid`, `registry`, `once`),
    /// for the metrics and spans.
    pub capability: &'static str,
}

impl LeaseOptions {
    /// A lease of `ttl`, renewed in the background, with the default margin.
    pub fn new(ttl: Duration) -> Self {
        LeaseOptions {
            ttl,
            auto_renew: true,
            safety_margin: None,
            max_extensions: None,
            backend: "custom",
            capability: "lease",
        }
    }

    /// Sets whether the keeper renews in the background.
    #[must_use]
    pub fn auto_renew(mut self, on: bool) -> Self {
        self.auto_renew = on;
        self
    }

    /// Sets the safety margin subtracted from every deadline.
    #[must_use]
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.safety_margin = Some(margin);
        self
    }

    /// Bounds the number of background renewals.
    #[must_use]
    pub fn max_extensions(mut self, n: u64) -> Self {
        self.max_extensions = Some(n);
        self
    }

    /// Names the backend and capability in metrics and spans.
    #[must_use]
    pub fn labels(mut self, backend: &'static str, capability: &'static str) -> Self {
        self.backend = backend;
        self.capability = capability;
        self
    }

    /// The margin applied to a lease of `ttl`.
    pub fn margin_for(&self, ttl: Duration) -> Duration {
        self.safety_margin
            .unwrap_or_else(|| (ttl / 100).max(Duration::from_millis(5)))
            .min(ttl / 2)
    }
}
