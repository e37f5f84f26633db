//! A near cache: a bounded in-process copy of hot keys in front of any
//! [`Cache`], kept no older than the server by the server's own
//! invalidations.
//!
//! Reads of a key held near are answered from memory; a miss reads the
//! server once per key at a time (single flight) and keeps the value for at
//! most the server's remaining TTL and the near cache's own `ttl`. Misses
//! of several callers at once are read together
//! ([`Cache::get_many_with_ttl`]: one script call on Redis): at most four
//! reads of the server run at once, and the misses that come meanwhile
//! wait for the next one. Writes through the near cache drop the key near
//! before and after they reach the server.
//!
//! Each thread also keeps a copy of the keys it reads most (64 slots, values
//! up to 1 KiB), so that threads reading one hot key write no cache line in
//! common; a copy answers only until the next invalidation, loss of the
//! channel or its deadline, whichever comes first. These copies are outside
//! `max_entries` and `max_bytes`: at most 64 × (key + 1 KiB) per thread.
//!
//! The store is `quick_cache` (CLOCK-PRO, bounded by weight): in the
//! near-cache benchmark a hot key is read a third faster than through
//! moka (3.2 against 2.4 million reads a second).
//!
//! Freshness rests on an [`InvalidationSource`]: Redis's client-side
//! caching, the in-process backend's own writes. While the source's
//! channel is down, the near cache is empty and every read goes to the
//! server, so no read returns a value older than a write acknowledged
//! before the channel came back. "Down" starts when the source notices
//! it: at once for a closed connection, within the source's heartbeats
//! for a frozen one (the Redis source's documentation says which losses it
//! notices and how fast). A fill that an invalidation overtook does not
//! store what it read. An entry expires a little before the key would on
//! the server (1 ‰ of its remaining time and 1 ms earlier), so the two
//! clocks drifting apart cannot make it outlive the key. [`NearCache::sync`] waits until every write
//! acknowledged before the call has been reported. A backend without such
//! a channel can only be used with an explicit bound on staleness
//! ([`NearCacheBuilder::max_staleness`]); the builder refuses otherwise.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use im_infra::cache::near::NearCache;
//! use im_infra::cache::Cache;
//!
//! # async fn demo(cache: Arc<dyn Cache>) -> im_infra::Result<()> {
//! // A backend without an invalidation channel: values at most 500 ms old.
//! let near = NearCache::builder(cache)
//!     .max_entries(10_000)
//!     .max_bytes(64 << 20)
//!     .max_staleness(Duration::from_millis(500))
//!     .build()
//!     .await?;
//! let _profile = near.get("profile:42").await?;
//! # Ok(()) }
//! ```
//!
//! Metrics: `im_infra_near_cache_hits_total`, `…_misses_total`,
//! `…_bypassed_total` (reads while the channel is down),
//! `…_invalidations_total` and `…_evictions_total`.

mod batch;
mod front;
mod source;
mod state;

use std::sync::Arc;
use std::time::Duration;

// The time-stamp counter: a read of the clock on every hit costs a few
// nanoseconds instead of a `clock_gettime`.
use quanta::Instant;

use async_trait::async_trait;
use bytes::Bytes;

pub use source::{InvalidationSink, InvalidationSource, Subscription};
use state::{Entry, NearState};

use super::{Cache, CacheCapabilities, KeyTtl};
use crate::error::{Error, ErrorKind, Result};

/// Builds a [`NearCache`]; see the [module](self).
pub struct NearCacheBuilder {
    inner: Arc<dyn Cache>,
    max_entries: u64,
    max_bytes: u64,
    ttl: Duration,
    negative: bool,
    source: Option<Arc<dyn InvalidationSource>>,
    max_staleness: Option<Duration>,
}

impl std::fmt::Debug for NearCacheBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearCacheBuilder")
            .field("max_entries", &self.max_entries)
            .field("max_bytes", &self.max_bytes)
            .field("ttl", &self.ttl)
            .field("negative", &self.negative)
            .field("source", &self.source.is_some())
            .field("max_staleness", &self.max_staleness)
            .finish()
    }
}

impl NearCacheBuilder {
    /// At most `n` entries (default 10 000).
    #[must_use]
    pub fn max_entries(mut self, n: u64) -> Self {
        self.max_entries = n;
        self
    }

    /// At most `n` bytes of keys and values (default 64 MiB) in the shared
    /// store; each thread's copies of its hottest keys come on top (see the
    /// [module](self)).
    #[must_use]
    pub fn max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = n;
        self
    }

    /// The longest an entry is kept near (default 5 min), shortened to the
    /// server's remaining TTL of the key.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Remember misses too (default: no).
    #[must_use]
    pub fn negative(mut self, yes: bool) -> Self {
        self.negative = yes;
        self
    }

    /// Keeps entries fresh with `source`'s invalidations.
    #[must_use]
    pub fn invalidation(mut self, source: Arc<dyn InvalidationSource>) -> Self {
        self.source = Some(source);
        self
    }

    /// Without an invalidation source: entries are kept at most `d`, so a
    /// read may return a value up to `d` older than the server's.
    #[must_use]
    pub fn max_staleness(mut self, d: Duration) -> Self {
        self.max_staleness = Some(d);
        self
    }

    /// The near cache; subscribes to the source. `InvalidConfig` without
    /// a source or a staleness bound, or with a zero bound.
    pub async fn build(self) -> Result<NearCache> {
        let invalid = |m: &str| Error::new(ErrorKind::InvalidConfig, format!("near cache: {m}"));
        if self.max_entries == 0 || self.max_bytes == 0 {
            return Err(invalid("max_entries and max_bytes must be positive"));
        }
        crate::validate::ttl(self.ttl).map_err(|e| invalid(e.message()))?;
        if self.source.is_none() && self.max_staleness.is_none() {
            return Err(invalid(
                "this backend has no invalidation channel: set max_staleness to accept values that old",
            ));
        }
        if let Some(d) = self.max_staleness {
            crate::validate::ttl(d).map_err(|e| invalid(e.message()))?;
        }
        // Every entry weighs at least its share of the byte budget, so the
        // byte bound also bounds the number of entries.
        let floor = self.max_bytes.div_ceil(self.max_entries).max(1);
        let entries = state::Entries::with(
            usize::try_from(self.max_entries).unwrap_or(usize::MAX),
            self.max_bytes,
            state::Weight { floor },
            foldhash::fast::RandomState::default(),
            state::CountEvictions,
        );
        let state = Arc::new(NearState::new(entries, self.source.is_none()));
        let subscription = match &self.source {
            Some(source) => Some(
                source
                    .subscribe(InvalidationSink {
                        state: state.clone(),
                    })
                    .await?,
            ),
            None => None,
        };
        let ttl = self.max_staleness.map_or(self.ttl, |d| d.min(self.ttl));
        Ok(NearCache {
            inner: self.inner,
            batch: batch::Batcher::default(),
            state,
            ttl,
            negative: self.negative,
            source: self.source,
            _subscription: subscription,
        })
    }
}

/// A [`Cache`] with a near copy of hot keys; see the [module](self).
pub struct NearCache {
    inner: Arc<dyn Cache>,
    batch: batch::Batcher,
    state: Arc<NearState>,
    ttl: Duration,
    negative: bool,
    source: Option<Arc<dyn InvalidationSource>>,
    _subscription: Option<Subscription>,
}

impl std::fmt::Debug for NearCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearCache")
            .field("entries", &self.state.entries.len())
            .field("live", &self.state.is_live())
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl NearCache {
    /// A builder over `inner`.
    pub fn builder(inner: Arc<dyn Cache>) -> NearCacheBuilder {
        NearCacheBuilder {
            inner,
            max_entries: 10_000,
            max_bytes: 64 << 20,
            ttl: Duration::from_secs(300),
            negative: false,
            source: None,
            max_staleness: None,
        }
    }

    /// Whether entries are kept now (the invalidation channel is up).
    pub fn is_live(&self) -> bool {
        self.state.is_live()
    }

    /// How many entries are held, and their weight (bytes, each entry
    /// counted as at least `max_bytes / max_entries`).
    pub fn size(&self) -> (u64, u64) {
        (self.state.entries.len() as u64, self.state.entries.weight())
    }

    /// Returns once no read can return a value older than a write
    /// acknowledged (to any client) before the call: the source reported
    /// every such change, or, when it cannot tell, the near cache was
    /// emptied and reads go to the server until the channel is back.
    /// Without a source it waits for nothing: values may be up to the
    /// staleness bound old.
    pub async fn sync(&self) {
        if let Some(source) = &self.source {
            let readies = self.state.readies();
            if let Err(e) = source.sync().await {
                tracing::warn!(error = %e, "near cache: the invalidation channel cannot confirm; bypassing it until it is back");
                self.state.lost_unless_ready_since(readies);
            }
        }
    }

    /// A read that missed: joins the key's read in flight, or reads it and
    /// hands the answer to whoever joined meanwhile. A caller whose read was
    /// abandoned (its reader cancelled) or overtaken by an invalidation
    /// joins again.
    async fn miss(&self, key: &str) -> Result<Option<Bytes>> {
        loop {
            match self.state.join(key) {
                state::Joined::Lead(fill) => return self.fill(key, fill).await,
                state::Joined::Wait(rx) => {
                    if let Ok(outcome) = rx.await {
                        return outcome;
                    }
                }
            }
        }
    }

    async fn fill(&self, key: &str, fill: state::Fill) -> Result<Option<Bytes>> {
        // A fill dropped before it finishes forgets its flight.
        struct Abandon<'a>(&'a NearState, &'a str, Option<state::Fill>);
        impl Drop for Abandon<'_> {
            fn drop(&mut self) {
                if let Some(fill) = self.2 {
                    self.0.abandon(self.1, fill);
                }
            }
        }
        let mut guard = Abandon(&self.state, key, Some(fill));
        // The entry's deadline counts from before the server was asked, so
        // it never outlives the key.
        let asked = Instant::now();
        let read = match self.batch.read(self.inner.as_ref(), key).await {
            // A cache that cannot tell a key's TTL: the value, not kept.
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                self.inner.get(key).await.map(|v| (v, KeyTtl::Missing))
            }
            read => read,
        };
        guard.2 = None;
        let (outcome, entry) = match read {
            Ok((value, ttl)) => {
                let entry = self.entry(value.as_ref(), ttl, asked);
                (Ok(value), entry)
            }
            Err(e) => (Err(e), None),
        };
        for waiter in self.state.finish(key, fill, entry) {
            let _ = waiter.send(outcome.clone());
        }
        outcome
    }

    /// What a fill keeps of a read asked at `asked`, if anything.
    fn entry(&self, value: Option<&Bytes>, ttl: KeyTtl, asked: Instant) -> Option<Entry> {
        let keep = match ttl {
            // Less a margin for the two clocks' rates: the server (or the
            // in-process store) counts the key's time on its own clock, the
            // entry on this one, and they may drift apart by up to 500 ppm
            // (the kernel's most NTP slew) while the entry lives.
            KeyTtl::Expires(left) => Some(
                left.saturating_sub(left / 1000 + Duration::from_millis(1))
                    .min(self.ttl),
            ),
            KeyTtl::Persistent => Some(self.ttl),
            // Gone between the two reads: not kept.
            KeyTtl::Missing => None,
        };
        match (value, keep) {
            (Some(v), Some(keep)) => Some(Entry {
                value: Some(v.clone()),
                expires: asked + keep,
            }),
            (None, _) if self.negative => Some(Entry {
                value: None,
                expires: asked + self.ttl,
            }),
            _ => None,
        }
    }

    /// Runs a write, dropping `keys` near before and after it.
    async fn write<T>(
        &self,
        keys: &[&str],
        op: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        for k in keys {
            self.state.invalidate(k);
        }
        let out = op.await;
        for k in keys {
            self.state.invalidate(k);
        }
        out
    }
}

#[async_trait]
impl Cache for NearCache {
    fn capabilities(&self) -> CacheCapabilities {
        self.inner.capabilities()
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        crate::validate::key(key)?;
        if !self.state.is_live() {
            metrics::counter!("im_infra_near_cache_bypassed_total").increment(1);
            return self.inner.get(key).await;
        }
        // Read before the shared store: see `front`.
        let epoch = self.state.epoch();
        let now = Instant::now();
        let hash = front::hash(key);
        if let Some(value) = front::get(self.state.id, epoch, hash, key, now) {
            metrics::counter!("im_infra_near_cache_hits_total").increment(1);
            return Ok(value);
        }
        if let Some(entry) = self.state.entries.get(key) {
            if entry.expires > now {
                metrics::counter!("im_infra_near_cache_hits_total").increment(1);
                front::offer(self.state.id, epoch, hash, key, &entry);
                return Ok(entry.value);
            }
        }
        metrics::counter!("im_infra_near_cache_misses_total").increment(1);
        // Boxed apart: the future of every read, a hit's too, is then only
        // as large as the hit path needs.
        Box::pin(self.miss(key)).await
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.write(&[key], self.inner.set(key, value, ttl)).await
    }

    async fn set_nx(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<bool> {
        self.write(&[key], self.inner.set_nx(key, value, ttl)).await
    }

    async fn delete<'k>(&self, keys: &[&'k str]) -> Result<u64> {
        self.write(keys, self.inner.delete(keys)).await
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        self.inner.exists(key).await
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.write(&[key], self.inner.expire(key, ttl)).await
    }

    async fn ttl(&self, key: &str) -> Result<KeyTtl> {
        self.inner.ttl(key).await
    }

    /// From the server (what is held near has a deadline of its own, not
    /// the key's TTL).
    async fn get_with_ttl(&self, key: &str) -> Result<(Option<Bytes>, KeyTtl)> {
        crate::validate::key(key)?;
        self.inner.get_with_ttl(key).await
    }

    /// From the server, like [`get_with_ttl`](Cache::get_with_ttl).
    async fn get_many_with_ttl<'k>(
        &self,
        keys: &[&'k str],
    ) -> Result<Vec<(Option<Bytes>, KeyTtl)>> {
        crate::validate::keys(keys)?;
        self.inner.get_many_with_ttl(keys).await
    }

    async fn incr_by(&self, key: &str, delta: i64) -> Result<i64> {
        self.write(&[key], self.inner.incr_by(key, delta)).await
    }

    /// Keys held near are answered from memory; the others in one round
    /// trip to the server (not kept near: their TTLs are not read).
    async fn get_many<'k>(&self, keys: &[&'k str]) -> Result<Vec<Option<Bytes>>> {
        crate::validate::keys(keys)?;
        if !self.state.is_live() {
            return self.inner.get_many(keys).await;
        }
        let now = Instant::now();
        let mut out: Vec<Option<Option<Bytes>>> = keys
            .iter()
            .map(|k| {
                self.state
                    .entries
                    .get(*k)
                    .filter(|e| e.expires > now)
                    .map(|e| e.value)
            })
            .collect();
        let missing: Vec<&str> = keys
            .iter()
            .zip(&out)
            .filter(|(_, hit)| hit.is_none())
            .map(|(k, _)| *k)
            .collect();
        if !missing.is_empty() {
            let mut fetched = self.inner.get_many(&missing).await?.into_iter();
            for slot in out.iter_mut().filter(|s| s.is_none()) {
                *slot = Some(fetched.next().flatten());
            }
        }
        Ok(out.into_iter().map(Option::flatten).collect())
    }

    async fn set_many<'k>(
        &self,
        entries: &[(&'k str, Bytes)],
        ttl: Option<Duration>,
    ) -> Result<()> {
        let keys: Vec<&str> = entries.iter().map(|(k, _)| *k).collect();
        self.write(&keys, self.inner.set_many(entries, ttl)).await
    }
}

#[cfg(test)]
mod tests;
