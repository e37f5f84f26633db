//! The Generic Cell Rate Algorithm, as a pure function over a stored
//! "theoretical arrival time" (TAT).
//!
//! GCRA is equivalent to a token bucket of `burst` tokens refilled at
//! `rate / period`, but needs one number of state per key. Backends store the
//! TAT (in-process atomics, a Redis key, a table row) and call [`decide`]
//! with the current time of the clock they trust (the server's for
//! distributed backends). The Redis backend runs the same arithmetic in Lua.
//!
//! ```
//! use std::time::Duration;
//! use im_infra::ratelimit::{gcra, Rule};
//!
//! let rule = Rule::per_second(10).with_burst(2);
//! let g = gcra::Params::new(&rule, 1).unwrap(); // time in nanoseconds
//! let (d1, tat) = gcra::decide(&g, None, 0, 1);
//! let (d2, tat) = gcra::decide(&g, tat, 0, 1);
//! let (d3, _) = gcra::decide(&g, tat, 0, 1);
//! assert!(d1.allowed && d2.allowed && !d3.allowed);
//! assert_eq!(d3.retry_after, Duration::from_millis(100));
//! ```

use std::time::Duration;

use super::{Decision, DecisionSource, DenyReason, Rule};
use crate::error::{Error, Result};

/// A rule converted to integer ticks of a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Ticks between two requests at the steady rate.
    pub emission: u64,
    /// Ticks of burst tolerance (`emission * burst`).
    pub tolerance: u64,
    /// Bucket size.
    pub burst: u64,
    /// Length of one tick in nanoseconds.
    pub tick_ns: u64,
}

impl Params {
    /// Converts `rule` for a clock whose tick is `tick_ns` nanoseconds
    /// (1 for nanoseconds, 1000 for microseconds).
    pub fn new(rule: &Rule, tick_ns: u64) -> Result<Params> {
        rule.validate()?;
        if tick_ns == 0 {
            return Err(Error::invalid_argument("tick must be positive"));
        }
        let period_ticks = rule.period.as_nanos() / u128::from(tick_ns);
        let emission = period_ticks / u128::from(rule.rate);
        if emission == 0 {
            return Err(Error::new(
                crate::ErrorKind::InvalidConfig,
                format!(
                    "rate {} per {:?} is finer than the clock tick of {tick_ns} ns",
                    rule.rate, rule.period
                ),
            ));
        }
        let burst = rule.burst();
        let tolerance = emission * u128::from(burst);
        let (Ok(emission), Ok(tolerance)) = (u64::try_from(emission), u64::try_from(tolerance))
        else {
            return Err(Error::new(
                crate::ErrorKind::InvalidConfig,
                "rule period times burst is too long",
            ));
        };
        Ok(Params {
            emission,
            tolerance,
            burst,
            tick_ns,
        })
    }

    #[inline]
    fn duration(&self, ticks: u64) -> Duration {
        Duration::from_nanos(ticks.saturating_mul(self.tick_ns))
    }
}

/// Decides a request of `n` units at time `now`, given the stored TAT
/// (`None` for a key never seen). Returns the decision and the TAT to store
/// (`None` when nothing changed).
#[inline(always)]
pub fn decide(p: &Params, tat: Option<u64>, now: u64, n: u64) -> (Decision, Option<u64>) {
    let tat_now = tat.unwrap_or(now).max(now);
    if n > p.burst {
        let decision = Decision {
            allowed: false,
            limit: p.burst,
            remaining: remaining(p, tat_now, now),
            retry_after: Duration::MAX,
            reset_after: p.duration(tat_now - now),
            denied: Some(DenyReason::ExceedsBurst),
            source: DecisionSource::Backend,
        };
        return (decision, None);
    }
    let new_tat = tat_now.saturating_add(p.emission.saturating_mul(n));
    let allow_at = new_tat.saturating_sub(p.tolerance);
    if now < allow_at {
        let decision = Decision {
            allowed: false,
            limit: p.burst,
            remaining: remaining(p, tat_now, now),
            retry_after: p.duration(allow_at - now),
            reset_after: p.duration(tat_now - now),
            denied: Some(DenyReason::RateExceeded),
            source: DecisionSource::Backend,
        };
        (decision, None)
    } else {
        let decision = Decision {
            allowed: true,
            limit: p.burst,
            remaining: remaining(p, new_tat, now),
            retry_after: Duration::ZERO,
            reset_after: p.duration(new_tat - now),
            denied: None,
            source: DecisionSource::Backend,
        };
        (decision, Some(new_tat))
    }
}

/// Whole requests that would still be allowed at `now` with `tat` stored.
#[inline]
fn remaining(p: &Params, tat: u64, now: u64) -> u64 {
    let free = now.saturating_add(p.tolerance).saturating_sub(tat);
    // `tolerance` is `emission × burst`: a full bucket, or one short by at
    // most one request (the usual answers), need no division.
    if free >= p.tolerance {
        p.burst
    } else if free >= p.tolerance - p.emission {
        p.burst - 1
    } else {
        free / p.emission
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(rate: u64, period_ms: u64, burst: u64) -> Params {
        Params::new(
            &Rule::new(rate, Duration::from_millis(period_ms)).with_burst(burst),
            1_000_000,
        )
        .unwrap()
    }

    #[test]
    fn burst_then_steady_rate() {
        let p = p(10, 1000, 3); // one every 100 ms, 3 at once
        let mut tat = None;
        let mut allowed = 0;
        for _ in 0..10 {
            let (d, t) = decide(&p, tat, 0, 1);
            if d.allowed {
                allowed += 1;
                tat = t;
            }
        }
        assert_eq!(allowed, 3);
        let (d, _) = decide(&p, tat, 0, 1);
        assert_eq!(d.retry_after, Duration::from_millis(100));
        assert_eq!(d.remaining, 0);
        // 100 ms later exactly one more fits.
        let (d, t) = decide(&p, tat, 100, 1);
        assert!(d.allowed);
        let (d, _) = decide(&p, t, 100, 1);
        assert!(!d.allowed);
    }

    #[test]
    fn remaining_counts_down() {
        let p = p(5, 1000, 5);
        let (d, tat) = decide(&p, None, 0, 1);
        assert_eq!(d.remaining, 4);
        let (d, _) = decide(&p, tat, 0, 2);
        assert_eq!(d.remaining, 2);
        assert_eq!(d.reset_after, Duration::from_millis(600));
    }

    #[test]
    fn above_burst_is_always_denied() {
        let p = p(5, 1000, 5);
        let (d, tat) = decide(&p, None, 0, 6);
        assert!(!d.allowed);
        assert_eq!(d.denied, Some(DenyReason::ExceedsBurst));
        assert_eq!(tat, None);
        let (d, _) = decide(&p, None, 0, 5);
        assert!(d.allowed);
    }

    #[test]
    fn too_fine_rates_are_rejected() {
        let r = Rule::new(10_000, Duration::from_millis(1));
        assert!(Params::new(&r, 1_000_000).is_err());
        assert!(Params::new(&r, 1).is_ok());
    }

    #[test]
    fn huge_times_saturate_instead_of_panicking() {
        let p = p(1, 1000, 1);
        let (d, _) = decide(&p, Some(u64::MAX), 0, 1);
        assert!(!d.allowed);
        let (d, _) = decide(&p, None, u64::MAX, 1);
        assert!(d.allowed);
    }
}
