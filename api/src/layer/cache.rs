//! The layer of [`Cache`].

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::cache::{Cache, CacheCapabilities, KeyTtl};
use crate::error::{Error, Result};
use crate::validate;

ops!(CacheOps, "cache" {
    get => "cache.get",
    set => "cache.set",
    set_nx => "cache.set_nx",
    delete => "cache.delete",
    exists => "cache.exists",
    expire => "cache.expire",
    ttl => "cache.ttl",
    get_with_ttl => "cache.get_with_ttl",
    get_many_with_ttl => "cache.get_many_with_ttl",
    incr_by => "cache.incr_by",
    get_many => "cache.get_many",
    set_many => "cache.set_many",
});

/// Argument checks and telemetry (`cache.*`) around a cache: keys with
/// [`validate::key`], TTLs with [`validate::ttl`], values against the
/// inner cache's [`CacheCapabilities::max_value_bytes`].
///
/// ```
/// use std::sync::Arc;
/// use im_infra::cache::Cache;
/// use im_infra::layer::ObservedCache;
///
/// /// What a backend's `cache()` accessor hands out: its raw cache, layered.
/// fn hand_out<C: Cache>(raw: C) -> Arc<dyn Cache> {
///     Arc::new(ObservedCache::new("redis", raw))
/// }
/// ```
pub struct ObservedCache<C> {
    inner: C,
    ops: CacheOps,
    max_value_bytes: usize,
}

impl<C: Cache> ObservedCache<C> {
    /// `inner`, observed as the cache of `backend`.
    pub fn new(backend: &'static str, inner: C) -> Self {
        ObservedCache {
            max_value_bytes: inner.capabilities().max_value_bytes,
            ops: CacheOps::new(backend),
            inner,
        }
    }

    /// The inner cache.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    fn value(&self, value: &Bytes) -> Result<()> {
        validate::value(value.len(), self.max_value_bytes)
    }
}

impl<C> std::fmt::Debug for ObservedCache<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedCache")
            .field("max_value_bytes", &self.max_value_bytes)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<C: Cache> Cache for ObservedCache<C> {
    fn capabilities(&self) -> CacheCapabilities {
        self.inner.capabilities()
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        self.ops
            .get
            .run(async {
                validate::key(key)?;
                self.inner.get(key).await
            })
            .await
    }

    async fn set(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<()> {
        self.ops
            .set
            .run(async {
                validate::key(key)?;
                validate::opt_ttl(ttl)?;
                self.value(&value)?;
                self.inner.set(key, value, ttl).await
            })
            .await
    }

    async fn set_nx(&self, key: &str, value: Bytes, ttl: Option<Duration>) -> Result<bool> {
        self.ops
            .set_nx
            .run(async {
                validate::key(key)?;
                validate::opt_ttl(ttl)?;
                self.value(&value)?;
                self.inner.set_nx(key, value, ttl).await
            })
            .await
    }

    async fn delete<'k>(&self, keys: &[&'k str]) -> Result<u64> {
        self.ops
            .delete
            .run(async {
                validate::keys(keys)?;
                self.inner.delete(keys).await
            })
            .await
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        self.ops
            .exists
            .run(async {
                validate::key(key)?;
                self.inner.exists(key).await
            })
            .await
    }

    async fn expire(&self, key: &str, ttl: Duration) -> Result<bool> {
        self.ops
            .expire
            .run(async {
                validate::key(key)?;
                validate::ttl(ttl)?;
                self.inner.expire(key, ttl).await
            })
            .await
    }

    async fn ttl(&self, key: &str) -> Result<KeyTtl> {
        self.ops
            .ttl
            .run(async {
                validate::key(key)?;
                self.inner.ttl(key).await
            })
            .await
    }

    async fn get_with_ttl(&self, key: &str) -> Result<(Option<Bytes>, KeyTtl)> {
        self.ops
            .get_with_ttl
            .run(async {
                validate::key(key)?;
                self.inner.get_with_ttl(key).await
            })
            .await
    }

    async fn get_many_with_ttl<'k>(
        &self,
        keys: &[&'k str],
    ) -> Result<Vec<(Option<Bytes>, KeyTtl)>> {
        self.ops
            .get_many_with_ttl
            .run(async {
                validate::keys(keys)?;
                self.inner.get_many_with_ttl(keys).await
            })
            .await
    }

    async fn incr_by(&self, key: &str, delta: i64) -> Result<i64> {
        self.ops
            .incr_by
            .run(async {
                validate::key(key)?;
                self.inner.incr_by(key, delta).await
            })
            .await
    }

    async fn get_many<'k>(&self, keys: &[&'k str]) -> Result<Vec<Option<Bytes>>> {
        self.ops
            .get_many
            .run(async {
                validate::keys(keys)?;
                self.inner.get_many(keys).await
            })
            .await
    }

    async fn set_many<'k>(
        &self,
        entries: &[(&'k str, Bytes)],
        ttl: Option<Duration>,
    ) -> Result<()> {
        self.ops
            .set_many
            .run(async {
                if entries.is_empty() {
                    return Err(Error::invalid_argument("at least one entry is required"));
                }
                validate::opt_ttl(ttl)?;
                for (key, value) in entries {
                    validate::key(key)?;
                    self.value(value)?;
                }
                self.inner.set_many(entries, ttl).await
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::ErrorKind;

    /// Counts the calls that reach it; stores nothing.
    #[derive(Default)]
    struct Counting(AtomicUsize);

    impl Counting {
        fn hit<T>(&self, v: T) -> Result<T> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(v)
        }
    }

    #[async_trait]
    impl Cache for Counting {
        fn capabilities(&self) -> CacheCapabilities {
            CacheCapabilities::storing(4)
        }
        async fn get(&self, _: &str) -> Result<Option<Bytes>> {
            self.hit(None)
        }
        async fn set(&self, _: &str, _: Bytes, _: Option<Duration>) -> Result<()> {
            self.hit(())
        }
        async fn set_nx(&self, _: &str, _: Bytes, _: Option<Duration>) -> Result<bool> {
            self.hit(true)
        }
        async fn delete<'k>(&self, keys: &[&'k str]) -> Result<u64> {
            self.hit(keys.len() as u64)
        }
        async fn exists(&self, _: &str) -> Result<bool> {
            self.hit(false)
        }
        async fn expire(&self, _: &str, _: Duration) -> Result<bool> {
            self.hit(false)
        }
        async fn ttl(&self, _: &str) -> Result<KeyTtl> {
            self.hit(KeyTtl::Missing)
        }
        async fn incr_by(&self, _: &str, d: i64) -> Result<i64> {
            self.hit(d)
        }
        async fn get_many<'k>(&self, keys: &[&'k str]) -> Result<Vec<Option<Bytes>>> {
            self.hit(vec![None; keys.len()])
        }
        async fn set_many<'k>(&self, _: &[(&'k str, Bytes)], _: Option<Duration>) -> Result<()> {
            self.hit(())
        }
    }

    #[tokio::test]
    async fn bad_input_never_reaches_the_backend_and_names_the_operation() {
        let c = ObservedCache::new("test", Counting::default());
        let v = Bytes::from_static(b"abc");
        let big = Bytes::from_static(b"abcde");
        let bad = [
            c.get("").await.err(),
            c.set("k", big.clone(), None).await.err(),
            c.set("k", v.clone(), Some(Duration::ZERO)).await.err(),
            c.set_nx("", v.clone(), None).await.err(),
            c.delete(&[]).await.err(),
            c.expire("k", Duration::ZERO).await.err(),
            c.get_many(&["a", ""]).await.err(),
            c.set_many(&[], None).await.err(),
            c.set_many(&[("a", big)], None).await.err(),
        ];
        for e in &bad {
            let e = e.as_ref().expect("refused");
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
            assert_eq!(e.backend(), Some("test"));
        }
        assert_eq!(bad[0].as_ref().unwrap().operation(), Some("cache.get"));
        assert_eq!(c.inner().0.load(Ordering::SeqCst), 0);
        c.set("k", v, None).await.unwrap();
        assert_eq!(c.incr_by("k", 3).await.unwrap(), 3);
        assert_eq!(c.inner().0.load(Ordering::SeqCst), 2);
    }
}
