//! `Limiter`: GCRA in one Lua script on the server's clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use im_infra::config::ConfigManager;
use im_infra::ratelimit::{
    gcra, validate_check, Decision, DecisionSource, DenyReason, Limiter, LimiterConfig, Rules,
};
use im_infra::telemetry::OpMetrics;
use im_infra::{Error, ErrorKind, Result};

use crate::Shared;

/// Microseconds: the resolution of Redis `TIME` that the script uses.
const TICK_NS: u64 = 1_000;

static GCRA: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("scripts/gcra.lua")));

/// The GCRA script (for benchmarks that run it raw).
pub fn gcra_script() -> &'static redis::Script {
    &GCRA
}

/// Rule parameters by resource, converted once per configuration version.
struct Table {
    version: u64,
    rules: HashMap<String, Result<gcra::Params>, foldhash::fast::RandomState>,
    default: Option<Result<gcra::Params>>,
}

impl Table {
    fn build(config: &LimiterConfig, version: u64) -> Table {
        Table {
            version,
            rules: config
                .rules
                .iter()
                .map(|(name, rule)| (name.clone(), gcra::Params::new(rule, TICK_NS)))
                .collect(),
            default: config.default_rule.map(|r| gcra::Params::new(&r, TICK_NS)),
        }
    }

    fn lookup(&self, resource: &str) -> Result<gcra::Params> {
        match self.rules.get(resource).or(self.default.as_ref()) {
            Some(p) => p.clone(),
            None => Err(Error::new(
                ErrorKind::NotFound,
                format!("no rate-limit rule for resource {resource:?} and no default rule"),
            )),
        }
    }
}

enum Params {
    Fixed(Table),
    Managed {
        manager: ConfigManager<LimiterConfig>,
        table: ArcSwap<Table>,
    },
}

/// The distributed limiter of a [`RedisBackend`](crate::RedisBackend). Every
/// decision is one `EVALSHA` of a GCRA script reading the server's `TIME`,
/// so all processes share one budget and one clock. Wrapped by the backend
/// in a [`FallbackLimiter`](im_infra::ratelimit::FallbackLimiter) that
/// applies the failure policy while Redis is unreachable.
pub struct RedisLimiter {
    shared: Arc<Shared>,
    params: Params,
    op: OpMetrics,
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
        let params = match rules {
            Rules::Fixed(c) => Params::Fixed(Table::build(c, 0)),
            Rules::Managed(m) => Params::Managed {
                table: ArcSwap::from_pointee(Table::build(&m.current(), m.version())),
                manager: m.clone(),
            },
        };
        RedisLimiter {
            shared,
            params,
            op: OpMetrics::new(crate::NAME, "ratelimit", "ratelimit.check"),
        }
    }

    fn params_of(&self, resource: &str) -> Result<gcra::Params> {
        match &self.params {
            Params::Fixed(t) => t.lookup(resource),
            Params::Managed { manager, table } => {
                let current = table.load();
                let version = manager.version();
                if current.version == version {
                    return current.lookup(resource);
                }
                let fresh = Arc::new(Table::build(&manager.current(), version));
                table.store(fresh.clone());
                fresh.lookup(resource)
            }
        }
    }

    async fn decide(&self, resource: &str, key: &str, n: u64) -> Result<Decision> {
        validate_check(resource, key, n)?;
        let p = self.params_of(resource)?;
        let mut inv = GCRA.prepare_invoke();
        inv.key(self.shared.keys.limiter_arg(resource, key))
            .arg(p.emission)
            .arg(p.tolerance)
            .arg(n)
            .arg(p.burst);
        let (allowed, remaining, retry_us, reset_us, reason): (i64, i64, i64, i64, i64) =
            self.shared.client.script(inv).await?;
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

#[async_trait]
impl Limiter for RedisLimiter {
    async fn check(&self, resource: &str, key: &str, n: u64) -> Result<Decision> {
        self.op.run(self.decide(resource, key, n)).await
    }
}
