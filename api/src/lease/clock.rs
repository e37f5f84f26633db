//! The monotonic clock lease deadlines are measured on.
//!
//! A reading is nanoseconds since a process-wide base, taken from a
//! time-stamp-counter clock (`quanta`, a few nanoseconds per read) so that
//! checking a deadline on a hot path (every Snowflake id) costs almost
//! nothing. Every instant a lease compares comes from this one clock; a
//! reading is never 0, which marks a lease that is not held.

use std::sync::LazyLock;
use std::time::Duration;

static BASE: LazyLock<quanta::Instant> = LazyLock::new(quanta::Instant::now);

/// Nanoseconds since the process-wide base, at least 1.
#[inline]
pub(crate) fn now() -> u64 {
    nanos(quanta::Instant::now().duration_since(*BASE)).saturating_add(1)
}

/// A duration in nanoseconds, saturating.
#[inline]
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A reading of the monotonic clock leases are measured on.
///
/// Take one just before sending the request that grants or extends a
/// lease (and pass it to [`Lease::start`](super::Lease::start)): the server
/// starts the lease's TTL when it applies the request, which is never
/// before this instant, so `sent + ttl` never comes after the server's
/// expiry.
///
/// ```
/// use im_infra::lease::Tick;
///
/// let sent = Tick::now();
/// // ... send the request that takes the lease ...
/// assert!(sent.elapsed() < std::time::Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tick(pub(crate) u64);

impl Tick {
    /// Now.
    #[inline]
    pub fn now() -> Self {
        Tick(now())
    }

    /// Time since this instant.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(now().saturating_sub(self.0))
    }

    /// Nanoseconds since the process-wide base of the lease clock.
    pub fn as_nanos(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_positive_and_increase_with_time() {
        let a = now();
        std::thread::sleep(Duration::from_millis(20));
        let b = now();
        assert!(a >= 1 && b > a);
        let elapsed = b - a;
        assert!(
            (19_000_000..500_000_000).contains(&elapsed),
            "20 ms read as {elapsed} ns"
        );
        assert_eq!(nanos(Duration::MAX), u64::MAX);
    }
}
