//! The in-process cache: a sharded map with per-entry expiry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use im_infra::cache::{Cache, CacheCapabilities, KeyTtl};
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
    /// Near caches told of every write, before the write returns.
    #[cfg(feature = "near-cache")]
    pub(crate) listeners: crate::near::Listeners,
}

impl CacheStore {
    /// Tells the near caches that `keys` changed.
    #[inline]
    fn changed<S: AsRef<str>>(&self, keys: &[S]) {
        #[cfg(feature = "near-cache")]
        self.listeners.changed(keys);
        #[cfg(not(feature = "near-cache"))]
        let _ = keys;
    }

    /// Removes expired entries.
    pub(crate) fn purge(&self) {
        let now = Instant::now();
        self.items.retain(|_, item| item.live(now));
    }
}

/// A handle on the backend's cache. Every handle of one
/// [`MemoryBackend`](crate::MemoryBackend) sees the same entries. The
/// backend hands it out inside an
/// [`ObservedCache`](im_infra::layer::ObservedCache), which checks the
/// arguments and does the telemetry.
pub(crate) struct MemoryCache {
    shared: Arc<Shared>,
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
        MemoryCache { shared }
    }

    fn store(&self) -> &CacheStore {
        &self.shared.cache
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
        CacheCapabilities::storing(self.shared.settings.max_value_bytes)
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.shared.check_open()?;
        Ok(self.read(key))
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.shared.check_open()?;
        self.store().items.insert(
            key.to_owned(),
            Item {
                value,
                expires_at: expiry(ttl),
            },
        );
        self.store().changed(&[key]);
        Ok(())
    }

    async fn set_nx(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<bool> {
        self.shared.check_open()?;
        let now = Instant::now();
        let item = Item {
            value,
            expires_at: expiry(ttl),
        };
        let stored = match self.store().items.entry(key.to_owned()) {
            Entry::Occupied(mut e) => {
                if e.get().live(now) {
                    false
                } else {
                    e.insert(item);
                    true
                }
            }
            Entry::Vacant(e) => {
                e.insert(item);
                true
            }
        };
        if stored {
            self.store().changed(&[key]);
        }
        Ok(stored)
    }

    async fn delete<'k>(&self, keys: &[&'k str]) -> Result<u64> {
        self.shared.check_open()?;
        let now = Instant::now();
        let mut n = 0;
        for key in keys {
            if let Some((_, item)) = self.store().items.remove(*key) {
                if item.live(now) {
                    n += 1;
                }
            }
        }
        self.store().changed(keys);
        Ok(n)
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        self.shared.check_open()?;
        Ok(self.read(key).is_some())
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.shared.check_open()?;
        let now = Instant::now();
        let found = match self.store().items.get_mut(key) {
            Some(mut item) if item.live(now) => {
                item.expires_at = expiry(Some(ttl));
                true
            }
            _ => false,
        };
        if found {
            self.store().changed(&[key]);
        }
        Ok(found)
    }

    async fn ttl(&self, key: &str) -> Result<KeyTtl> {
        self.shared.check_open()?;
        let now = Instant::now();
        Ok(match self.store().items.get(key) {
            Some(item) if item.live(now) => match item.expires_at {
                None => KeyTtl::Persistent,
                Some(t) => KeyTtl::Expires(t - now),
            },
            _ => KeyTtl::Missing,
        })
    }

    /// One look-up: the value and its lifetime at the same instant (an
    /// expired entry found is removed, as `get` does).
    async fn get_with_ttl(&self, key: &str) -> Result<(Option<Bytes>, KeyTtl)> {
        self.shared.check_open()?;
        let now = Instant::now();
        match self.store().items.get(key) {
            Some(item) if item.live(now) => {
                let ttl = match item.expires_at {
                    None => KeyTtl::Persistent,
                    Some(t) => KeyTtl::Expires(t - now),
                };
                return Ok((Some(item.value.clone()), ttl));
            }
            Some(_) => {}
            None => return Ok((None, KeyTtl::Missing)),
        }
        self.store().items.remove_if(key, |_, item| !item.live(now));
        Ok((None, KeyTtl::Missing))
    }

    async fn incr_by(&self, key: &str, delta: i64) -> Result<i64> {
        self.shared.check_open()?;
        let now = Instant::now();
        let next = self.add(key, delta, now)?;
        self.store().changed(&[key]);
        Ok(next)
    }

    async fn get_many<'k>(&self, keys: &[&'k str]) -> Result<Vec<Option<Bytes>>> {
        self.shared.check_open()?;
        Ok(keys.iter().map(|k| self.read(k)).collect())
    }

    async fn set_many<'k>(
        &self,
        entries: &[(&'k str, Bytes)],
        ttl: Option<Duration>,
    ) -> Result<()> {
        self.shared.check_open()?;
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
        let keys: Vec<&str> = entries.iter().map(|(k, _)| *k).collect();
        self.store().changed(&keys);
        Ok(())
    }
}

impl MemoryCache {
    /// `incr_by`'s step under the entry's lock.
    fn add(&self, key: &str, delta: i64, now: Instant) -> Result<i64> {
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
    }
}
