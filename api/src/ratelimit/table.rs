//! [`RuleTable`]: the one rule table of every limiter.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use foldhash::fast::RandomState;

use super::gcra::Params;
use super::{LimiterSettings, Rules};
use crate::error::Result;

/// A handful of resources (the usual case) are scanned linearly, which
/// beats hashing the name.
const FEW: usize = 8;

/// A resource's converted rule and what the limiter keeps beside it.
struct Entry<T> {
    params: Result<Params>,
    payload: T,
}

/// One version of the rules, converted.
pub(crate) struct Table<T> {
    version: u64,
    few: Vec<(Box<str>, Entry<T>)>,
    many: HashMap<Box<str>, Entry<T>, RandomState>,
    default: Option<Result<Params>>,
}

impl<T> Table<T> {
    fn build(
        config: &LimiterSettings,
        version: u64,
        tick_ns: u64,
        make: &dyn Fn(&str) -> T,
    ) -> Self {
        let all = config.rules.iter().map(|(name, rule)| {
            let entry = Entry {
                params: Params::new(rule, tick_ns),
                payload: make(name),
            };
            (Box::<str>::from(name.as_str()), entry)
        });
        let (few, many) = if config.rules.len() <= FEW {
            (all.collect(), HashMap::default())
        } else {
            (Vec::new(), all.collect())
        };
        Table {
            version,
            few,
            many,
            default: config.default_rule.map(|r| Params::new(&r, tick_ns)),
        }
    }

    /// The parameters and payload of `resource`'s rule (the payload is
    /// `None` when the default rule applies).
    #[inline(always)]
    fn lookup(&self, resource: &str) -> Result<(&Params, Option<&T>)> {
        let mut entry = None;
        if self.many.is_empty() {
            for (name, e) in &self.few {
                if crate::short_bytes::same(name.as_bytes(), resource.as_bytes()) {
                    entry = Some(e);
                    break;
                }
            }
        } else {
            entry = self.many.get(resource);
        }
        match (entry, &self.default) {
            (Some(e), _) => Ok((e.params.as_ref().map_err(Clone::clone)?, Some(&e.payload))),
            (None, Some(params)) => Ok((params.as_ref().map_err(Clone::clone)?, None)),
            (None, None) => Err(super::rule::no_rule(resource)),
        }
    }
}

/// One version of the rules, converted, as [`RuleTable::version`] hands
/// it out.
pub(crate) enum Version<'t, T> {
    Fixed(&'t Table<T>),
    Managed(arc_swap::Guard<Arc<Table<T>>>),
}

impl<T> Version<'_, T> {
    /// The parameters and payload of `resource`'s rule (the payload is
    /// `None` when the default rule applies).
    #[inline(always)]
    pub(crate) fn lookup(&self, resource: &str) -> Result<(&Params, Option<&T>)> {
        match self {
            Version::Fixed(table) => table.lookup(resource),
            Version::Managed(table) => table.lookup(resource),
        }
    }
}

enum Current<T> {
    Fixed(Table<T>),
    Managed(ArcSwap<Table<T>>),
}

/// The rules of one limiter, converted to GCRA parameters (in the
/// limiter's clock tick) once per configuration version, with a payload per
/// named resource (the in-process limiter keeps the resource's buckets
/// there; a server-side limiter keeps nothing). Hot-reloaded rules apply
/// from the next decision after the configuration changed.
///
/// ```
/// use im_infra::ratelimit::{Rule, Rules, RuleTable};
///
/// let rules = Rules::single("login", Rule::per_minute(5)).unwrap();
/// let table = RuleTable::new(rules, 1_000, |_resource| ());
/// let burst = table.with("login", |params, _| params.burst).unwrap();
/// assert_eq!(burst, 5);
/// assert!(table.with("upload", |_, _| ()).is_err(), "no rule, no default");
/// ```
pub struct RuleTable<T> {
    rules: Rules,
    tick_ns: u64,
    make: Box<dyn Fn(&str) -> T + Send + Sync>,
    current: Current<T>,
}

impl<T> std::fmt::Debug for RuleTable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleTable")
            .field("rules", &self.rules)
            .field("tick_ns", &self.tick_ns)
            .finish()
    }
}

impl<T: Send + Sync + 'static> RuleTable<T> {
    /// The table of `rules` in ticks of `tick_ns` nanoseconds; `make`
    /// builds the payload of each named resource (again at each reload).
    pub fn new(
        rules: Rules,
        tick_ns: u64,
        make: impl Fn(&str) -> T + Send + Sync + 'static,
    ) -> Self {
        let make: Box<dyn Fn(&str) -> T + Send + Sync> = Box::new(make);
        let current = match &rules {
            Rules::Fixed(c) => Current::Fixed(Table::build(c, 0, tick_ns, &*make)),
            Rules::Managed(m) => Current::Managed(ArcSwap::from_pointee(Table::build(
                &m.current(),
                m.version(),
                tick_ns,
                &*make,
            ))),
        };
        RuleTable {
            rules,
            tick_ns,
            make,
            current,
        }
    }

    /// The rules the table follows.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Calls `f` with the parameters of `resource`'s rule and its payload
    /// (`None` when the default rule applies). `NotFound` when there is no
    /// rule and no default; `InvalidConfig` when the rule cannot be
    /// converted.
    #[inline(always)]
    pub fn with<R>(&self, resource: &str, f: impl FnOnce(&Params, Option<&T>) -> R) -> Result<R> {
        let version = self.version();
        let (params, payload) = version.lookup(resource)?;
        Ok(f(params, payload))
    }

    /// The rules as they are now, converted: borrowed for fixed rules, held
    /// for hot-reloaded ones (rebuilt first if they changed).
    #[inline(always)]
    pub(crate) fn version(&self) -> Version<'_, T> {
        match &self.current {
            Current::Fixed(table) => Version::Fixed(table),
            Current::Managed(table) => Version::Managed(self.managed(table)),
        }
    }

    /// The current version of a managed table, rebuilt when the rules
    /// changed since it was built.
    #[inline]
    fn managed(&self, table: &ArcSwap<Table<T>>) -> arc_swap::Guard<Arc<Table<T>>> {
        let Rules::Managed(manager) = &self.rules else {
            unreachable!("a managed table follows managed rules")
        };
        let current = table.load();
        let version = manager.version();
        if current.version == version {
            return current;
        }
        let fresh = Arc::new(Table::build(
            &manager.current(),
            version,
            self.tick_ns,
            &*self.make,
        ));
        table.store(fresh.clone());
        arc_swap::Guard::from_inner(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::Rule;
    use crate::ErrorKind;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn named_rules_carry_their_payload_and_the_default_none() {
        let mut config = LimiterSettings::with_rule("a", Rule::per_second(10));
        config.default_rule = Some(Rule::per_second(3));
        let made = Arc::new(AtomicUsize::new(0));
        let m = made.clone();
        let table = RuleTable::new(Rules::fixed(config).unwrap(), 1, move |name| {
            m.fetch_add(1, Ordering::SeqCst);
            name.len()
        });
        assert_eq!(
            table.with("a", |p, t| (p.burst, t.copied())).unwrap(),
            (10, Some(1))
        );
        assert_eq!(
            table.with("zz", |p, t| (p.burst, t.copied())).unwrap(),
            (3, None)
        );
        assert_eq!(made.load(Ordering::SeqCst), 1, "payloads are built once");
    }

    #[test]
    fn many_rules_are_found_by_hash_and_a_missing_one_is_not_found() {
        let mut config = LimiterSettings::default();
        for i in 0..20 {
            config
                .rules
                .insert(format!("r{i}"), Rule::per_second(i + 1));
        }
        let table = RuleTable::new(Rules::fixed(config).unwrap(), 1, |_| ());
        assert_eq!(table.with("r19", |p, _| p.burst).unwrap(), 20);
        let err = table.with("nope", |_, _| ()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.message().contains("nope"));
    }
}
