//! Conveniences on top of [`Cache`]: typed JSON values and read-through loads.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{single_flight, Cache};
use crate::error::{Error, Result};

/// The bytes stored for a negatively cached key by
/// [`CacheExt::get_or_load`]; a plain [`Cache::get`] returns them as they are.
pub const ABSENT_MARKER: &[u8] = b"\0im-infra:absent\0";

/// Options of [`CacheExt::get_or_load`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// TTL of a loaded value (`None`: no expiry).
    pub ttl: Option<Duration>,
    /// When set, a load that finds nothing is remembered for this long, so
    /// that repeated lookups of a missing key do not reach the loader.
    pub negative_ttl: Option<Duration>,
}

impl LoadOptions {
    /// Loaded values expire after `ttl`.
    pub fn ttl(ttl: Duration) -> Self {
        LoadOptions {
            ttl: Some(ttl),
            negative_ttl: None,
        }
    }

    /// Also remember misses for `negative_ttl`.
    #[must_use]
    pub fn negative(mut self, negative_ttl: Duration) -> Self {
        self.negative_ttl = Some(negative_ttl);
        self
    }
}

/// Conveniences for every [`Cache`], including `dyn Cache`.
#[async_trait]
pub trait CacheExt: Cache {
    /// The JSON value of `key` decoded as `T`; a value that does not decode
    /// is a `Serialization` error naming the key.
    async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.get(key).await? {
            None => Ok(None),
            Some(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| Error::serialization(key, e)),
        }
    }

    /// Stores `value` as JSON.
    async fn set_json<T: Serialize + Sync>(
        &self,
        key: &str,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let raw = serde_json::to_vec(value).map_err(|e| Error::serialization(key, e))?;
        self.set(key, Bytes::from(raw), ttl).await
    }

    /// Read-through: the cached value of `key`, or else the value `load`
    /// returns, stored with `opts.ttl`.
    ///
    /// Within one process, concurrent callers for the same key on the same
    /// cache instance share one run of `load` (single flight). With
    /// `opts.negative_ttl`, a `None` from `load` is remembered (as
    /// [`ABSENT_MARKER`]) so later calls return `None` without loading.
    async fn get_or_load<F, Fut>(
        &self,
        key: &str,
        opts: LoadOptions,
        load: F,
    ) -> Result<Option<Bytes>>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<Option<Bytes>>> + Send,
    {
        crate::validate::key(key)?;
        crate::validate::opt_ttl(opts.ttl)?;
        crate::validate::opt_ttl(opts.negative_ttl)?;
        if let Some(hit) = self.get(key).await? {
            return Ok(decode_marker(hit));
        }
        let instance = self as *const Self as *const () as usize;
        let mut load = Some(load);
        single_flight::run(instance, key.to_owned(), || {
            let load = load.take();
            async move {
                // A previous leader may have stored the value meanwhile.
                if let Some(hit) = self.get(key).await? {
                    return Ok(decode_marker(hit));
                }
                let Some(load) = load else {
                    // This caller's loader was already consumed by an earlier
                    // round; nothing more to load.
                    return Ok(None);
                };
                match load().await? {
                    Some(value) => {
                        self.set(key, value.clone(), opts.ttl).await?;
                        Ok(Some(value))
                    }
                    None => {
                        if let Some(neg) = opts.negative_ttl {
                            self.set(key, Bytes::from_static(ABSENT_MARKER), Some(neg))
                                .await?;
                        }
                        Ok(None)
                    }
                }
            }
        })
        .await
    }
}

impl<C: Cache + ?Sized> CacheExt for C {}

fn decode_marker(value: Bytes) -> Option<Bytes> {
    if value.as_ref() == ABSENT_MARKER {
        None
    } else {
        Some(value)
    }
}
