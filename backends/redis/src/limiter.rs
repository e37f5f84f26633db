//! `Limiter`: GCRA in one Lua script on the server's clock.

use std::sync::Arc;
use std::time::Duration;

use im_infra::ratelimit::{
    gcra, Check, Decision, DecisionSource, DenyReason, Limiter, RuleTable, Rules,
};
use im_infra::Result;

use crate::client;
use crate::Shared;

/// Microseconds: the resolution of Redis `TIME` that the script uses.
const TICK_NS: u64 = 1_000;

static GCRA: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("scripts/gcra.lua")));

/// The GCRA script (for benchmarks that run it raw).
pub fn gcra_script() -> &'static redis::Script {
    &GCRA
}

/// The distributed limiter of a [`RedisBackend`](crate::RedisBackend). Every
/// decision is one `EVALSHA` of a GCRA script reading the server's `TIME`,
/// so all processes share one budget and one clock. Wrapped by the backend
/// in a [`FallbackLimiter`] that applies the failure policy while Redis is
/// unreachable, and in the limiter layer
/// ([`ObservedLimiter`](im_infra::layer::ObservedLimiter)) that checks the
/// arguments and counts the calls: on its own it does neither.
pub struct RedisLimiter {
    shared: Arc<Shared>,
    table: RuleTable<()>,
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter").finish_non_exhaustive()
    }
}

fn us(v: i64) -> Duration {
    Duration::from_micros(v.max(0) as u64)
}

impl RedisLimiter {
    pub(crate) fn new(shared: Arc<Shared>, rules: &Rules) -> Self {
        RedisLimiter {
            shared,
            table: RuleTable::new(rules.clone(), TICK_NS, |_| ()),
        }
    }

    fn params_of(&self, resource: &str) -> Result<gcra::Params> {
        self.table.with(resource, |p, _| *p)
    }

    async fn decide(&self, resource: &str, key: &str, n: u64) -> Result<Decision> {
        let p = self.params_of(resource)?;
        let mut cmd = client::evalsha(&GCRA, [self.shared.keys.limiter_arg(resource, key)]);
        cmd.arg(p.emission).arg(p.tolerance).arg(n).arg(p.burst);
        let (allowed, remaining, retry_us, reset_us, reason): (i64, i64, i64, i64, i64) =
            self.shared.client.script(&GCRA, &cmd).await?;
        let denied = match reason {
            0 => None,
            2 => Some(DenyReason::ExceedsBurst),
            _ => Some(DenyReason::RateExceeded),
        };
        Ok(Decision {
            allowed: allowed == 1,
            limit: p.burst,
            remaining: remaining.max(0) as u64,
            retry_after: if retry_us < 0 {
                Duration::MAX
            } else {
                us(retry_us)
            },
            reset_after: us(reset_us),
            denied,
            source: DecisionSource::Backend,
        })
    }
}

impl Limiter for RedisLimiter {
    fn check<'a>(&'a self, resource: &'a str, key: &'a str, n: u64) -> Check<'a> {
        Check::boxed(self.decide(resource, key, n))
    }
}
