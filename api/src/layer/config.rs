//! The layer of [`ConfigCenter`].

use async_trait::async_trait;
use bytes::Bytes;

use crate::config::{ConfigCapabilities, ConfigCenter, Versioned, WatchOptions, WatchStream};
use crate::error::Result;
use crate::validate;

ops!(ConfigOps, "config" {
    get => "config.get",
    set => "config.set",
    delete => "config.delete",
    list => "config.list",
    compare_and_set => "config.compare_and_set",
    watch => "config.watch",
    watch_prefix => "config.watch_prefix",
});

/// Argument checks (keys, prefixes, values against the inner center's
/// [`ConfigCapabilities::max_value_bytes`]) and telemetry (`config.*`)
/// around a config center.
///
/// ```
/// use std::sync::Arc;
/// use im_infra::config::ConfigCenter;
/// use im_infra::layer::ObservedConfigCenter;
///
/// fn hand_out<C: ConfigCenter>(raw: C) -> Arc<dyn ConfigCenter> {
///     Arc::new(ObservedConfigCenter::new("mysql", raw))
/// }
/// ```
pub struct ObservedConfigCenter<C> {
    inner: C,
    ops: ConfigOps,
    max_value_bytes: usize,
}

impl<C: ConfigCenter> ObservedConfigCenter<C> {
    /// `inner`, observed as the config center of `backend`.
    pub fn new(backend: &'static str, inner: C) -> Self {
        ObservedConfigCenter {
            max_value_bytes: inner.capabilities().max_value_bytes,
            ops: ConfigOps::new(backend),
            inner,
        }
    }

    /// The inner config center.
    pub fn inner(&self) -> &C {
        &self.inner
    }
}

impl<C> std::fmt::Debug for ObservedConfigCenter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedConfigCenter")
            .field("max_value_bytes", &self.max_value_bytes)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<C: ConfigCenter> ConfigCenter for ObservedConfigCenter<C> {
    fn capabilities(&self) -> ConfigCapabilities {
        self.inner.capabilities()
    }

    async fn get_with_version(&self, key: &str) -> Result<Option<Versioned>> {
        self.ops
            .get
            .run(async {
                validate::key(key)?;
                self.inner.get_with_version(key).await
            })
            .await
    }

    async fn set(&self, key: &str, value: Bytes) -> Result<u64> {
        self.ops
            .set
            .run(async {
                validate::key(key)?;
                validate::value(value.len(), self.max_value_bytes)?;
                self.inner.set(key, value).await
            })
            .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        self.ops
            .delete
            .run(async {
                validate::key(key)?;
                self.inner.delete(key).await
            })
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.ops
            .list
            .run(async {
                validate::prefix(prefix)?;
                self.inner.list(prefix).await
            })
            .await
    }

    async fn compare_and_set(&self, key: &str, value: Bytes, expected_version: u64) -> Result<u64> {
        self.ops
            .compare_and_set
            .run(async {
                validate::key(key)?;
                validate::value(value.len(), self.max_value_bytes)?;
                self.inner
                    .compare_and_set(key, value, expected_version)
                    .await
            })
            .await
    }

    async fn watch(&self, key: &str, opts: WatchOptions) -> Result<WatchStream> {
        self.ops
            .watch
            .run(async {
                validate::key(key)?;
                self.inner.watch(key, opts).await
            })
            .await
    }

    async fn watch_prefix(&self, prefix: &str, opts: WatchOptions) -> Result<WatchStream> {
        self.ops
            .watch_prefix
            .run(async {
                validate::prefix(prefix)?;
                self.inner.watch_prefix(prefix, opts).await
            })
            .await
    }
}
