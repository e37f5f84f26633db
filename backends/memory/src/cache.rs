//! The in-process cache: a sharded map with per-entry expiry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use im_infra::cache::{Cache, CacheCapabilities, KeyTtl};
use im_infra::telemetry::OpMetrics;
use im_infra::{validate, Error, ErrorKind, Result};

use crate::Shared;

#[derive(Debug, Clone)]
struct Item {
    value: Bytes,
    expires_at: Option<Instant>,
}

impl Item {
    fn live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|t| t > now)
    }
}

/// The shared entries of every cache handle of one backend.
#[derive(Debug, Default)]
pub(crate) struct CacheStore {
    items: DashMap<String, Item>,
}

impl CacheStore {
    /// Removes expired entries.
    pub(crate) fn purge(&self) {
        let now = Instant::now();
        self.items.retain(|_, item| item.live(now));
    }
}

struct Ops {
    get: OpMetrics,
    set: OpMetrics,
    set_nx: OpMetrics,
    delete: OpMetrics,
    exists: OpMetrics,
    expire: OpMetrics,
    ttl: OpMetrics,
    incr_by: OpMetrics,
    get_many: OpMetrics,
    set_many: OpMetrics,
}

impl Ops {
    fn new() -> Self {
        let m = |op| OpMetrics::new(crate::NAME, "cache", op);
        Ops {
            get: m("cache.get"),
            set: m("cache.set"),
            set_nx: m("cache.set_nx"),
            delete: m("cache.delete"),
            exists: m("cache.exists"),
            expire: m("cache.expire"),
            ttl: m("cache.ttl"),
            incr_by: m("cache.incr_by"),
            get_many: m("cache.get_many"),
            set_many: m("cache.set_many"),
        }
    }
}

/// A handle on the backend's cache. Every handle of one
/// [`MemoryBackend`](crate::MemoryBackend) sees the same entries.
pub struct MemoryCache {
    shared: Arc<Shared>,
    ops: Ops,
}

impl std::fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCache")
            .field("entries", &self.store().items.len())
            .finish()
    }
}

fn expiry(ttl: Option<Duration>) -> Option<Instant> {
    ttl.map(|t| Instant::now() + Duration::from_millis(validate::ttl_millis(t)))
}

impl MemoryCache {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MemoryCache {
            shared,
            ops: Ops::new(),
        }
    }

    fn store(&self) -> &CacheStore {
        &self.shared.cache
    }

    fn check_value(&self, value: &Bytes) -> Result<()> {
        validate::value(value.len(), self.shared.config.max_value_bytes)
    }

    fn read(&self, key: &str) -> Option<Bytes> {
        let now = Instant::now();
        match self.store().items.get(key) {
            Some(item) if item.live(now) => return Some(item.value.clone()),
            Some(_) => {}
            None => return None,
        }
        self.store().items.remove_if(key, |_, item| !item.live(now));
        None
    }
}

#[async_trait]
impl Cache for MemoryCache {
    fn capabilities(&self) -> CacheCapabilities {
        CacheCapabilities::storing(self.shared.config.max_value_bytes)
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.ops.get.run_sync(|| {
            self.shared.check_open()?;
            validate::key(key)?;
            Ok(self.read(key))
        })
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.ops.set.run_sync(|| {
            self.shared.check_open()?;
            validate::key(key)?;
            validate::opt_ttl(ttl)?;
            self.check_value(&value)?;
            self.store().items.insert(
                key.to_owned(),
                Item {
                    value,
                    expires_at: expiry(ttl),
                },
            );
            Ok(())
        })
    }

    async fn set_nx(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<bool> {
        self.ops.set_nx.run_sync(|| {
            self.shared.check_open()?;
            validate::key(key)?;
            validate::opt_ttl(ttl)?;
            self.check_value(&value)?;
            let now = Instant::now();
            let item = Item {
                value,
                expires_at: expiry(ttl),
            };
            match self.store().items.entry(key.to_owned()) {
                Entry::Occupied(mut e) => {
                    if e.get().live(now) {
                        Ok(false)
                    } else {
                        e.insert(item);
                        Ok(true)
                    }
                }
                Entry::Vacant(e) => {
                    e.insert(item);
                    Ok(true)
                }
            }
        })
    }

    async fn delete<'k>(&self, keys: &[&'k str]) -> Result<u64> {
        self.ops.delete.run_sync(|| {
            self.shared.check_open()?;
            validate::keys(keys)?;
            let now = Instant::now();
            let mut n = 0;
            for key in keys {
                if let Some((_, item)) = self.store().items.remove(*key) {
                    if item.live(now) {
                        n += 1;
                    }
                }
            }
            Ok(n)
        })
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        self.ops.exists.run_sync(|| {
            self.shared.check_open()?;
            validate::key(key)?;
            Ok(self.read(key).is_some())
        })
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.ops.expire.run_sync(|| {
            self.shared.check_open()?;
            validate::key(key)?;
            validate::ttl(ttl)?;
            let now = Instant::now();
            match self.store().items.get_mut(key) {
                Some(mut item) if item.live(now) => {
                    item.expires_at = expiry(Some(ttl));
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
    }

    async fn ttl(&self, key: &str) -> Result<KeyTtl> {
        self.ops.ttl.run_sync(|| {
            self.shared.check_open()?;
            validate::key(key)?;
            let now = Instant::now();
            Ok(match self.store().items.get(key) {
                Some(item) if item.live(now) => match item.expires_at {
                    None => KeyTtl::Persistent,
                    Some(t) => KeyTtl::Expires(t - now),
                },
                _ => KeyTtl::Missing,
            })
        })
    }

    async fn incr_by(&self, key: &str, delta: i64) -> Result<i64> {
        self.ops.incr_by.run_sync(|| {
            self.shared.check_open()?;
            validate::key(key)?;
            let now = Instant::now();
            let mut entry = self.store().items.entry(key.to_owned()).or_insert(Item {
                value: Bytes::from_static(b"0"),
                expires_at: None,
            });
            if !entry.live(now) {
                *entry = Item {
                    value: Bytes::from_static(b"0"),
                    expires_at: None,
                };
            }
            let current: i64 = std::str::from_utf8(&entry.value)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidState,
                        format!("value of {key:?} is not a decimal integer"),
                    )
                })?;
            let next = current.checked_add(delta).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidState,
                    format!("incrementing {key:?} overflows i64"),
                )
            })?;
            entry.value = Bytes::from(next.to_string());
            Ok(next)
        })
    }

    async fn get_many<'k>(&self, keys: &[&'k str]) -> Result<Vec<Option<Bytes>>> {
        self.ops.get_many.run_sync(|| {
            self.shared.check_open()?;
            validate::keys(keys)?;
            Ok(keys.iter().map(|k| self.read(k)).collect())
        })
    }

    async fn set_many<'k>(
        &self,
        entries: &[(&'k str, Bytes)],
        ttl: Option<Duration>,
    ) -> Result<()> {
        self.ops.set_many.run_sync(|| {
            self.shared.check_open()?;
            if entries.is_empty() {
                return Err(Error::invalid_argument("at least one entry is required"));
            }
            validate::opt_ttl(ttl)?;
            for (k, v) in entries {
                validate::key(k)?;
                self.check_value(v)?;
            }
            let expires_at = expiry(ttl);
            for (k, v) in entries {
                self.store().items.insert(
                    (*k).to_owned(),
                    Item {
                        value: v.clone(),
                        expires_at,
                    },
                );
            }
            Ok(())
        })
    }
}
