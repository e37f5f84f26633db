//! The in-process GCRA limiter: one atomic per (resource, key) in a
//! lock-free map; no lock on the decision path.
//!
//! A decision is: a look-up of the resource in a small per-handle table
//! (rebuilt only when a hot-reloaded configuration changes), one hash of the
//! key, a lock-free map read, one read of the time-stamp-counter clock and
//! one compare-and-swap.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use foldhash::fast::RandomState;
use im_infra::config::ConfigManager;
use im_infra::ratelimit::{gcra, validate_check, Decision, Limiter, LimiterConfig, Rules};
use im_infra::telemetry::OpMetrics;
use im_infra::{Error, ErrorKind, Result};

use crate::Shared;

/// TAT value meaning "never seen" (a fresh bucket).
const EMPTY: u64 = 0;

/// TAT value of a bucket the purge took out of the map: a decision that
/// finds it starts over on the key's current bucket. A real TAT is capped
/// below it.
const REMOVED: u64 = u64::MAX;

/// The buckets of one resource: a TAT per key.
type Buckets = papaya::HashMap<Box<str>, AtomicU64, RandomState>;

/// The shared buckets of every limiter handle of one backend.
pub(crate) struct LimiterStore {
    /// The time-stamp-counter clock and its reading at creation.
    clock: quanta::Clock,
    origin: u64,
    resources: papaya::HashMap<Box<str>, Arc<Buckets>, RandomState>,
}

impl std::fmt::Debug for LimiterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimiterStore")
            .field("resources", &self.resources.len())
            .finish()
    }
}

impl Default for LimiterStore {
    fn default() -> Self {
        let clock = quanta::Clock::new();
        LimiterStore {
            origin: clock.raw(),
            clock,
            resources: papaya::HashMap::with_hasher(RandomState::default()),
        }
    }
}

impl LimiterStore {
    /// Nanoseconds since the store was created, plus one (never `EMPTY`).
    #[inline]
    fn now(&self) -> u64 {
        self.clock
            .delta_as_nanos(self.origin, self.clock.raw())
            .saturating_add(1)
    }

    /// The buckets of `resource` (created on first use).
    fn buckets_of(&self, resource: &str) -> Arc<Buckets> {
        let resources = self.resources.pin();
        if let Some(b) = resources.get(resource) {
            return b.clone();
        }
        resources
            .get_or_insert_with(resource.into(), || {
                Arc::new(Buckets::with_hasher(RandomState::default()))
            })
            .clone()
    }

    /// Drops buckets that are full again (their TAT is in the past): they
    /// behave exactly like a key never seen.
    ///
    /// A decision may hold a bucket while it is dropped. So that its update
    /// is not lost with the bucket, the purge first swaps the old TAT for
    /// `REMOVED`; the swap fails if a decision got there first, and the
    /// bucket stays. A decision that finds `REMOVED` starts over.
    pub(crate) fn purge(&self) {
        let now = self.now();
        for (_, buckets) in self.resources.pin().iter() {
            buckets.pin().retain(|_, tat| {
                let t = tat.load(Ordering::Acquire);
                if t == REMOVED {
                    return false;
                }
                t > now
                    || tat
                        .compare_exchange(t, REMOVED, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
            });
        }
    }

    #[inline]
    fn decide(&self, buckets: &Buckets, params: &gcra::Params, key: &str, n: u64) -> Decision {
        let buckets = buckets.pin();
        let now = self.now();
        'bucket: loop {
            let bucket = match buckets.get(key) {
                Some(b) => b,
                None => buckets.get_or_insert(key.into(), AtomicU64::new(EMPTY)),
            };
            let mut cur = bucket.load(Ordering::Acquire);
            loop {
                if cur == REMOVED {
                    // Purged under us: take the dead bucket out (if the
                    // purge has not yet) and decide on the key's new one.
                    let _ = buckets.remove_if(key, |_, b| std::ptr::eq(b, bucket));
                    continue 'bucket;
                }
                let stored = (cur != EMPTY).then_some(cur);
                let (decision, next) = gcra::decide(params, stored, now, n);
                let Some(next) = next else { return decision };
                let next = next.min(REMOVED - 1);
                match bucket.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return decision,
                    Err(actual) => cur = actual,
                }
            }
        }
    }
}

/// A resource's converted rule and its buckets.
struct Entry {
    params: Result<gcra::Params>,
    buckets: Arc<Buckets>,
}

/// Rule parameters by resource, converted once. A handful of resources
/// (the usual case) are scanned linearly, which beats hashing the name.
struct ParamTable {
    /// Version of the configuration the table was built from.
    version: u64,
    few: Vec<(Box<str>, Entry)>,
    many: HashMap<Box<str>, Entry, RandomState>,
    default: Option<Result<gcra::Params>>,
}

const FEW: usize = 8;

impl ParamTable {
    fn build(store: &LimiterStore, config: &LimiterConfig, version: u64) -> ParamTable {
        let all = config.rules.iter().map(|(name, rule)| {
            let entry = Entry {
                params: gcra::Params::new(rule, 1),
                buckets: store.buckets_of(name),
            };
            (Box::<str>::from(name.as_str()), entry)
        });
        let (few, many) = if config.rules.len() <= FEW {
            (all.collect(), HashMap::default())
        } else {
            (Vec::new(), all.collect())
        };
        ParamTable {
            version,
            few,
            many,
            default: config.default_rule.map(|r| gcra::Params::new(&r, 1)),
        }
    }

    #[inline]
    fn entry(&self, resource: &str) -> Option<&Entry> {
        if self.many.is_empty() {
            self.few
                .iter()
                .find(|(name, _)| **name == *resource)
                .map(|(_, e)| e)
        } else {
            self.many.get(resource)
        }
    }

    #[inline]
    fn decide(&self, store: &LimiterStore, resource: &str, key: &str, n: u64) -> Result<Decision> {
        if let Some(e) = self.entry(resource) {
            let params = e.params.as_ref().map_err(Clone::clone)?;
            return Ok(store.decide(&e.buckets, params, key, n));
        }
        match &self.default {
            Some(params) => {
                let params = params.as_ref().map_err(Clone::clone)?;
                Ok(store.decide(&store.buckets_of(resource), params, key, n))
            }
            None => Err(Error::new(
                ErrorKind::NotFound,
                format!("no rate-limit rule for resource {resource:?} and no default rule"),
            )),
        }
    }
}

enum Params {
    Fixed(ParamTable),
    Managed {
        manager: ConfigManager<LimiterConfig>,
        table: ArcSwap<ParamTable>,
    },
}

/// A limiter handle. Handles of one [`MemoryBackend`](crate::MemoryBackend)
/// share their budgets; a hot-reloaded rule applies from the next decision.
pub struct MemoryLimiter {
    shared: Arc<Shared>,
    rules: Rules,
    params: Params,
    op: OpMetrics,
}

impl std::fmt::Debug for MemoryLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLimiter")
            .field("rules", &self.rules)
            .finish()
    }
}

impl MemoryLimiter {
    pub(crate) fn new(shared: Arc<Shared>, rules: Rules) -> Self {
        let store = &shared.limiter;
        let params = match &rules {
            Rules::Fixed(config) => Params::Fixed(ParamTable::build(store, config, 0)),
            Rules::Managed(manager) => Params::Managed {
                table: ArcSwap::from_pointee(ParamTable::build(
                    store,
                    &manager.current(),
                    manager.version(),
                )),
                manager: manager.clone(),
            },
        };
        MemoryLimiter {
            shared,
            rules,
            params,
            op: OpMetrics::new(crate::NAME, "ratelimit", "ratelimit.check"),
        }
    }

    /// Decides without span or metrics: the body of [`Limiter::check`], for
    /// callers on a hot path that do their own accounting.
    #[inline]
    pub fn check_now(&self, resource: &str, key: &str, n: u64) -> Result<Decision> {
        self.shared.check_open()?;
        validate_check(resource, key, n)?;
        let store = &self.shared.limiter;
        match &self.params {
            Params::Fixed(table) => table.decide(store, resource, key, n),
            Params::Managed { manager, table } => {
                let current = table.load();
                let version = manager.version();
                if current.version == version {
                    return current.decide(store, resource, key, n);
                }
                let fresh = Arc::new(ParamTable::build(store, &manager.current(), version));
                table.store(fresh.clone());
                fresh.decide(store, resource, key, n)
            }
        }
    }
}

#[async_trait]
impl Limiter for MemoryLimiter {
    async fn check(&self, resource: &str, key: &str, n: u64) -> Result<Decision> {
        self.op.run_sync(|| self.check_now(resource, key, n))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use im_infra::ratelimit::Rule;

    use super::*;

    /// The purge runs flat out while four threads take a budget of 50 on
    /// fresh keys (no refill: one token per hour): exactly 50 are granted
    /// every time, none lost with a purged bucket.
    #[test]
    fn purging_while_deciding_loses_no_decision() {
        let store = Arc::new(LimiterStore::default());
        let rule = Rule::new(1, Duration::from_secs(3600)).with_burst(50);
        let params = gcra::Params::new(&rule, 1).expect("params");
        let buckets = store.buckets_of("api");
        let stop = Arc::new(AtomicBool::new(false));
        let purger = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    store.purge();
                }
            })
        };
        for round in 0..300 {
            let key = format!("k{round}");
            let allowed: u64 = std::thread::scope(|s| {
                let workers: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            (0..25)
                                .filter(|_| store.decide(&buckets, &params, &key, 1).allowed)
                                .count() as u64
                        })
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().expect("worker")).sum()
            });
            assert_eq!(
                allowed, 50,
                "round {round}: {allowed} granted of a budget of 50"
            );
        }
        stop.store(true, Ordering::Relaxed);
        purger.join().expect("purger");
    }
}
