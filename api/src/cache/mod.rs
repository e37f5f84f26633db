//! Key-value caching with TTLs.
//!
//! [`Cache`] is the small trait backends implement; [`CacheExt`] adds typed
//! JSON access and a read-through [`get_or_load`](CacheExt::get_or_load) with
//! single-flight loading, for every `Cache` (including `dyn Cache`).
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use bytes::Bytes;
//! use im_infra::cache::{Cache, CacheExt, KeyTtl};
//!
//! async fn greet(cache: Arc<dyn Cache>) -> im_infra::Result<()> {
//!     cache.set("greeting", Bytes::from_static(b"hello"), Some(Duration::from_secs(60))).await?;
//!     assert_eq!(cache.get("greeting").await?.as_deref(), Some(&b"hello"[..]));
//!     assert!(matches!(cache.ttl("greeting").await?, KeyTtl::Expires(_)));
//!     cache.set_json("user:1", &vec!["alice"], None).await?;
//!     let names: Option<Vec<String>> = cache.get_json("user:1").await?;
//!     assert_eq!(names, Some(vec!["alice".to_string()]));
//!     Ok(())
//! }
//! ```

mod ext;
#[cfg(feature = "near-cache")]
pub mod near;
mod single_flight;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;

pub use ext::{CacheExt, LoadOptions, ABSENT_MARKER};

/// Remaining lifetime of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyTtl {
    /// The key does not exist (or has expired).
    Missing,
    /// The key exists and never expires.
    Persistent,
    /// The key expires after this much time (millisecond precision).
    Expires(Duration),
}

/// What a cache backend offers beyond the required operations.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheCapabilities {
    /// Largest value accepted, in bytes; larger values are rejected with
    /// `InvalidArgument`.
    pub max_value_bytes: usize,
    /// Whether values are kept at all (`false` for the noop cache).
    pub stores_values: bool,
}

impl CacheCapabilities {
    /// Capabilities of a cache that stores values up to `max_value_bytes`.
    pub fn storing(max_value_bytes: usize) -> Self {
        CacheCapabilities {
            max_value_bytes,
            stores_values: true,
        }
    }
}

/// A key-value cache with per-key TTLs.
///
/// Keys are checked with [`crate::validate::key`]; TTLs must be positive
/// (`None` means "never expires") and have millisecond precision. A miss is
/// `Ok(None)`, never an error.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Cache: Send + Sync + 'static {
    /// What this backend offers.
    fn capabilities(&self) -> CacheCapabilities;

    /// The value of `key`, or `None` when absent or expired.
    async fn get(&self, key: &str) -> Result<Option<Bytes>>;

    /// Stores `value` under `key`, replacing any value and TTL.
    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()>;

    /// Stores `value` only if `key` is absent; returns whether it was stored.
    async fn set_nx(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<bool>;

    /// Deletes the keys; returns how many existed.
    async fn delete<'k>(&self, keys: &[&'k str]) -> Result<u64>;

    /// Whether `key` exists.
    async fn exists(&self, key: &str) -> Result<bool>;

    /// Sets a new TTL on an existing key; returns `false` when it is absent.
    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool>;

    /// The remaining lifetime of `key`.
    async fn ttl(&self, key: &str) -> Result<KeyTtl>;

    /// The value of `key` and its remaining lifetime, read together: in one
    /// round trip where the backend can (Redis runs `GET` and `PTTL` in one
    /// script call, MySQL reads both in one statement); by default [`get`](Self::get)
    /// and [`ttl`](Self::ttl) at once. Absent: `(None, KeyTtl::Missing)`.
    /// Unless the backend reads both in one statement, another client may
    /// write between the two reads: a value with `Missing` means the key
    /// went away in between.
    ///
    /// ```
    /// # async fn demo(cache: std::sync::Arc<dyn im_infra::cache::Cache>) -> im_infra::Result<()> {
    /// use im_infra::cache::KeyTtl;
    /// match cache.get_with_ttl("session:ana").await? {
    ///     (Some(value), KeyTtl::Expires(left)) => println!("{} bytes for {left:?}", value.len()),
    ///     (Some(_), _) => println!("kept until deleted"),
    ///     (None, _) => println!("absent"),
    /// }
    /// # Ok(()) }
    /// ```
    async fn get_with_ttl(&self, key: &str) -> Result<(Option<Bytes>, KeyTtl)> {
        let (value, ttl) = tokio::join!(self.get(key), self.ttl(key));
        Ok((value?, ttl?))
    }

    /// Atomically adds `delta` to the integer stored at `key` (absent = 0)
    /// and returns the new value. The key's TTL is kept. A value that is not
    /// a decimal `i64`, or an overflow, fails with `InvalidState`.
    async fn incr_by(&self, key: &str, delta: i64) -> Result<i64>;

    /// [`get_with_ttl`](Self::get_with_ttl) of every key, in order, in one
    /// round trip where the backend can (one script call on a single Redis
    /// node, one statement on MySQL); by default each key's
    /// `get_with_ttl` at once. A near cache fills several callers' misses
    /// with one call.
    ///
    /// ```
    /// # async fn demo(cache: std::sync::Arc<dyn im_infra::cache::Cache>) -> im_infra::Result<()> {
    /// use im_infra::cache::KeyTtl;
    /// for (value, ttl) in cache.get_many_with_ttl(&["a", "b"]).await? {
    ///     if let (Some(v), KeyTtl::Expires(left)) = (value, ttl) {
    ///         println!("{} bytes for {left:?}", v.len());
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    async fn get_many_with_ttl<'k>(
        &self,
        keys: &[&'k str],
    ) -> Result<Vec<(Option<Bytes>, KeyTtl)>> {
        futures::future::try_join_all(keys.iter().map(|k| self.get_with_ttl(k))).await
    }

    /// The values of `keys`, in order, in one round trip where possible.
    async fn get_many<'k>(&self, keys: &[&'k str]) -> Result<Vec<Option<Bytes>>>;

    /// Stores every entry with the same TTL, in one round trip where possible.
    async fn set_many<'k>(&self, entries: &[(&'k str, Bytes)], ttl: Option<Duration>)
        -> Result<()>;
}
