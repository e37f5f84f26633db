//! Dynamic configuration: a versioned key-value center with watches, and a
//! typed, hot-reloading [`ConfigManager`] on top of it.
//!
//! Values are bytes (JSON by convention); versions strictly increase with
//! every change of a key and are ordered across keys of one backend (etcd's
//! revision model), so a watch can resume "after version v".
//!
//! ```
//! use std::sync::Arc;
//! use futures::StreamExt;
//! use im_infra::config::{ConfigCenter, ConfigCenterExt, WatchOptions};
//!
//! #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
//! struct Flags { dark_mode: bool }
//!
//! async fn demo(center: Arc<dyn ConfigCenter>) -> im_infra::Result<()> {
//!     let v1 = center.set_json("/config/dev/web/flags", &Flags { dark_mode: false }).await?;
//!     // Compare-and-set: only if nobody changed it since v1.
//!     let v2 = center.compare_and_set_json("/config/dev/web/flags", &Flags { dark_mode: true }, v1).await?;
//!     assert!(v2 > v1);
//!     let mut events = center.watch("/config/dev/web/flags", WatchOptions::after(v1)).await?;
//!     let first = events.next().await.unwrap()?;
//!     assert_eq!(first.version, v2);
//!     Ok(())
//! }
//! ```

mod ext;
mod manager;
mod path;
pub mod watch;
pub mod watch_driver;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::error::{Error, ErrorKind, Result};

pub use ext::ConfigCenterExt;
#[cfg(feature = "mock")]
pub use manager::MockHotReloadable;
pub use manager::{ConfigManager, ConfigManagerBuilder, HotReloadable};
pub use path::{app_env, config_path, config_path_in, APP_ENV_VAR, DEFAULT_ENV};

/// A value with its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The stored bytes.
    pub value: Bytes,
    /// The version of this value (> 0).
    pub version: u64,
}

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConfigEventKind {
    /// The key was created or updated.
    Put,
    /// The key was deleted.
    Delete,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigEvent {
    /// Put or delete.
    pub kind: ConfigEventKind,
    /// The full key.
    pub key: String,
    /// The new value (`None` for a delete).
    pub value: Option<Bytes>,
    /// The version of the change.
    pub version: u64,
}

impl ConfigEvent {
    /// `key` was set to `value` at `version`.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use im_infra::config::{ConfigEvent, ConfigEventKind};
    ///
    /// let e = ConfigEvent::put("/config/a", Bytes::from_static(b"1"), 7);
    /// assert_eq!((e.kind, e.version), (ConfigEventKind::Put, 7));
    /// ```
    pub fn put(key: impl Into<String>, value: Bytes, version: u64) -> Self {
        ConfigEvent {
            kind: ConfigEventKind::Put,
            key: key.into(),
            value: Some(value),
            version,
        }
    }

    /// `key` was deleted at `version`.
    ///
    /// ```
    /// use im_infra::config::{ConfigEvent, ConfigEventKind};
    ///
    /// let e = ConfigEvent::delete("/config/a", 8);
    /// assert_eq!((e.kind, e.value), (ConfigEventKind::Delete, None));
    /// ```
    pub fn delete(key: impl Into<String>, version: u64) -> Self {
        ConfigEvent {
            kind: ConfigEventKind::Delete,
            key: key.into(),
            value: None,
            version,
        }
    }
}

/// `Conflict`: a compare-and-set found `key` at another version than
/// `expected` (`current`, when the backend can tell).
///
/// ```
/// use im_infra::ErrorKind;
///
/// let e = im_infra::config::conflict("/config/a", Some(4), 3);
/// assert_eq!(e.kind(), ErrorKind::Conflict);
/// assert!(e.message().contains("at version 4, not 3"));
/// ```
pub fn conflict(key: &str, current: Option<u64>, expected: u64) -> Error {
    let message = match current {
        Some(current) => format!("{key:?} is at version {current}, not {expected}"),
        None => format!("{key:?} is not at version {expected} any more"),
    };
    Error::new(ErrorKind::Conflict, message)
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchOptions {
    /// `None`: changes from now on (what exists now counts as known: if the
    /// history is lost while the watch is disconnected, a key deleted
    /// meanwhile is still reported deleted). `Some(v)`: every change with a version
    /// above `v`; if the backend's history no longer reaches back to `v`,
    /// the watch delivers the current state instead (a put for every key
    /// changed since, a delete for a watched key that is gone) and continues.
    pub after_version: Option<u64>,
}

impl WatchOptions {
    /// Changes with a version above `version`.
    pub fn after(version: u64) -> Self {
        WatchOptions {
            after_version: Some(version),
        }
    }
}

/// A stream of changes, in version order. Connection losses are handled
/// inside (the stream resumes after the last delivered version); an `Err`
/// item means the watch cannot continue (closed backend, bad input).
///
/// One exception to the order: when the server comes back with older data
/// than the watch delivered (a restore from an old snapshot, a failover to
/// a lagging replica), the watch reports the server's current state for
/// every key that may differ, with versions below those delivered before,
/// and goes on from there. Such an event supersedes what was delivered
/// (as [`ConfigManager`] does).
pub type WatchStream = BoxStream<'static, Result<ConfigEvent>>;

/// What a config center offers beyond the required operations.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigCapabilities {
    /// `watch` and `watch_prefix` deliver changes.
    pub watch: bool,
    /// `compare_and_set` is supported.
    pub compare_and_set: bool,
    /// Largest value accepted, in bytes.
    pub max_value_bytes: usize,
}

impl ConfigCapabilities {
    /// Everything supported, values up to `max_value_bytes`.
    pub fn full(max_value_bytes: usize) -> Self {
        ConfigCapabilities {
            watch: true,
            compare_and_set: true,
            max_value_bytes,
        }
    }
}

/// A versioned configuration store with watches.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait ConfigCenter: Send + Sync + 'static {
    /// What this backend offers.
    fn capabilities(&self) -> ConfigCapabilities;

    /// The value of `key` with its version, or `None`.
    async fn get_with_version(&self, key: &str) -> Result<Option<Versioned>>;

    /// Stores `value`; returns the new version.
    async fn set(&self, key: &str, value: Bytes) -> Result<u64>;

    /// Deletes `key`; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Keys that start with `prefix`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>>;

    /// Stores `value` only if the current version of `key` is
    /// `expected_version` (0: only if `key` does not exist). Returns the new
    /// version, or `Conflict` when the version differs.
    ///
    /// A `Timeout`, or a retryable error from a connection lost mid-call
    /// (`Unavailable`, `Connection`), does not say the write was not
    /// applied: the server may have stored it before the answer was lost.
    /// Retried unchanged, such a write then answers `Conflict` although
    /// the first attempt landed; re-read the key (its value and version)
    /// to tell the two apart.
    async fn compare_and_set(&self, key: &str, value: Bytes, expected_version: u64) -> Result<u64>;

    /// Changes of `key`.
    async fn watch(&self, key: &str, opts: WatchOptions) -> Result<WatchStream>;

    /// Changes of every key starting with `prefix`.
    async fn watch_prefix(&self, prefix: &str, opts: WatchOptions) -> Result<WatchStream>;
}
