//! [`LocalLimiter`]: GCRA in this process, one atomic per (resource, key) in
//! a lock-free map — the in-process backend's limiter and the local
//! fallback of the distributed ones.
//!
//! A decision is: a look-up of the resource in the [`RuleTable`] (rebuilt
//! only when hot-reloaded rules change), one hash of the key, a lock-free
//! map read, one read of the time-stamp-counter clock and one
//! compare-and-swap.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use foldhash::fast::RandomState;

use super::{gcra, validate_check, Check, Decision, Limiter, RuleTable, Rules};
use crate::error::Result;

/// TAT value meaning "never seen" (a fresh bucket).
const EMPTY: u64 = 0;

/// TAT value of a bucket the purge took out of the map: a decision that
/// finds it starts over on the key's current bucket. A real TAT is capped
/// below it.
const REMOVED: u64 = u64::MAX;

/// The buckets of one resource: a TAT per key.
type Buckets = papaya::HashMap<Box<str>, AtomicU64, RandomState>;

/// A key as a decision looks it up: hashed as the stored `Box<str>` is,
/// compared in place (keys are short; a call to `memcmp` costs more than
/// the comparison).
struct KeyRef<'k>(&'k str);

impl std::hash::Hash for KeyRef<'_> {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl papaya::Equivalent<Box<str>> for KeyRef<'_> {
    #[inline]
    fn equivalent(&self, stored: &Box<str>) -> bool {
        crate::short_bytes::same(self.0.as_bytes(), stored.as_bytes())
    }
}

/// The buckets of every limiter that shares them (all handles of one
/// in-process backend; one fallback limiter).
pub struct BucketStore {
    /// The time-stamp-counter clock and its reading at creation.
    clock: quanta::Clock,
    origin: u64,
    resources: papaya::HashMap<Box<str>, Arc<Buckets>, RandomState>,
}

impl std::fmt::Debug for BucketStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketStore")
            .field("resources", &self.resources.len())
            .finish()
    }
}

impl Default for BucketStore {
    fn default() -> Self {
        let clock = quanta::Clock::new();
        BucketStore {
            origin: clock.raw(),
            clock,
            resources: papaya::HashMap::with_hasher(RandomState::default()),
        }
    }
}

impl BucketStore {
    /// An empty store.
    pub fn new() -> Self {
        BucketStore::default()
    }

    /// Nanoseconds since the store was created, plus one (never `EMPTY`).
    #[inline(always)]
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
    /// behave exactly like a key never seen. Run it now and then (the
    /// in-process backend does every few seconds; see
    /// [`purge_every`](Self::purge_every)).
    ///
    /// A decision may hold a bucket while it is dropped. So that its update
    /// is not lost with the bucket, the purge first swaps the old TAT for
    /// `REMOVED`; the swap fails if a decision got there first, and the
    /// bucket stays. A decision that finds `REMOVED` starts over.
    pub fn purge(&self) {
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

    /// Purges every `period` on the current tokio runtime until the store
    /// is dropped (nothing happens outside a runtime).
    pub fn purge_every(self: &Arc<Self>, period: Duration) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store: Weak<BucketStore> = Arc::downgrade(self);
        rt.spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                match store.upgrade() {
                    Some(s) => s.purge(),
                    None => return,
                }
            }
        });
    }

    #[inline(always)]
    fn decide(&self, buckets: &Buckets, params: &gcra::Params, key: &str, n: u64) -> Decision {
        // The clock first: its read is slow, and the look-up overlaps it.
        let now = self.now();
        let buckets = buckets.pin();
        'bucket: loop {
            let bucket = match buckets.get(&KeyRef(key)) {
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

/// An in-process GCRA limiter: every decision is taken here, on this
/// process's clock, without an await point. Limiters on one
/// [`BucketStore`] share their budgets.
///
/// ```
/// use im_infra::ratelimit::{Limiter, LocalLimiter, Rule, Rules};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> im_infra::Result<()> {
/// let limiter = LocalLimiter::new(Rules::single("login", Rule::per_minute(2))?);
/// assert!(limiter.check("login", "ana", 1).await?.allowed);
/// assert!(limiter.check("login", "ana", 1).await?.allowed);
/// assert!(!limiter.check("login", "ana", 1).await?.allowed, "burst of 2 used up");
/// assert!(limiter.check("login", "bob", 1).await?.allowed, "another key");
/// # Ok(()) }
/// ```
pub struct LocalLimiter {
    store: Arc<BucketStore>,
    table: RuleTable<Arc<Buckets>>,
}

impl std::fmt::Debug for LocalLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLimiter")
            .field("rules", self.table.rules())
            .finish()
    }
}

impl LocalLimiter {
    /// A limiter on a store of its own (purged every 10 s on the current
    /// runtime).
    pub fn new(rules: Rules) -> Self {
        let store = Arc::new(BucketStore::new());
        store.purge_every(Duration::from_secs(10));
        LocalLimiter::on(store, rules)
    }

    /// A limiter on `store`, sharing its budgets with the other limiters on
    /// it. The store's owner purges it.
    pub fn on(store: Arc<BucketStore>, rules: Rules) -> Self {
        let s = store.clone();
        let table = RuleTable::new(rules, 1, move |resource| s.buckets_of(resource));
        LocalLimiter { store, table }
    }

    /// The rules it follows.
    pub fn rules(&self) -> &Rules {
        self.table.rules()
    }

    /// Decides without checking the arguments (the caller did: a layer, or
    /// [`Limiter::check`]).
    #[inline(always)]
    pub fn decide_unchecked(&self, resource: &str, key: &str, n: u64) -> Result<Decision> {
        // Straight-line code, no closure: the whole decision is inlined
        // into the caller and the `Decision` built once, in place.
        let version = self.table.version();
        let (params, named) = version.lookup(resource)?;
        let unnamed;
        let buckets = match named {
            Some(b) => b,
            None => {
                unnamed = self.store.buckets_of(resource);
                &unnamed
            }
        };
        Ok(self.store.decide(buckets, params, key, n))
    }
}

impl Limiter for LocalLimiter {
    #[inline]
    fn check<'a>(&'a self, resource: &'a str, key: &'a str, n: u64) -> Check<'a> {
        Check::ready(
            validate_check(resource, key, n).and_then(|()| self.decide_unchecked(resource, key, n)),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::ratelimit::Rule;

    /// The purge runs flat out while four threads take a budget of 50 on
    /// fresh keys (no refill: one token per hour): exactly 50 are granted
    /// every time, none lost with a purged bucket.
    #[test]
    fn purging_while_deciding_loses_no_decision() {
        let store = Arc::new(BucketStore::default());
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

    #[test]
    fn limiters_on_one_store_share_a_budget_and_bad_input_is_refused() {
        let store = Arc::new(BucketStore::new());
        let rules = Rules::single("api", Rule::per_minute(3)).unwrap();
        let (a, b) = (
            LocalLimiter::on(store.clone(), rules.clone()),
            LocalLimiter::on(store, rules),
        );
        let allowed = (0..3)
            .map(|i| if i % 2 == 0 { &a } else { &b })
            .filter(|l| l.decide_unchecked("api", "k", 1).unwrap().allowed)
            .count();
        assert_eq!(allowed, 3);
        assert!(!b.decide_unchecked("api", "k", 1).unwrap().allowed);
        let bad = a.check("api", "", 1).into_ready().unwrap();
        assert_eq!(bad.unwrap_err().kind(), crate::ErrorKind::InvalidArgument);
    }
}
