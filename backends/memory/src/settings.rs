//! Settings of the in-process backend.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Settings of a [`MemoryBackend`](crate::MemoryBackend).
///
/// ```
/// let cfg: im_infra_memory::MemorySettings =
///     serde_json::from_str(r#"{"max_value_bytes": 1048576, "config_history": 100}"#).unwrap();
/// assert_eq!(cfg.default_partitions, 4);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemorySettings {
    /// Largest cache or config value, in bytes.
    pub max_value_bytes: usize,
    /// Largest message (payload + key + headers), in bytes.
    pub max_message_bytes: usize,
    /// How many config changes are kept for watches that resume from an
    /// older version; older watchers are resynchronised from the current
    /// state.
    pub config_history: usize,
    /// Partitions of a topic created on first use.
    pub default_partitions: u32,
    /// How often expired cache entries and idle limiter keys are purged.
    #[serde(with = "humantime_serde")]
    pub purge_interval: Duration,
}

impl Default for MemorySettings {
    fn default() -> Self {
        MemorySettings {
            max_value_bytes: 8 * 1024 * 1024,
            max_message_bytes: 1024 * 1024,
            config_history: 10_000,
            default_partitions: 4,
            purge_interval: Duration::from_secs(10),
        }
    }
}

impl MemorySettings {
    /// Checks the values.
    pub fn validate(&self) -> im_infra::Result<()> {
        use im_infra::{Error, ErrorKind};
        if self.max_value_bytes == 0 || self.max_message_bytes == 0 {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "size limits must be positive",
            ));
        }
        if self.config_history == 0 {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "config_history must be at least 1",
            ));
        }
        if self.default_partitions == 0 || self.default_partitions > 10_000 {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "default_partitions must be 1..=10000",
            ));
        }
        if self.purge_interval.is_zero() {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "purge_interval must be positive",
            ));
        }
        Ok(())
    }
}

/// Read from the config center at `/config/{APP_ENV}/{service}/memory`
/// with [`im_infra::settings::from_center`]:
///
/// ```
/// # async fn demo() -> im_infra::Result<()> {
/// use im_infra::backend::Backend;
/// use im_infra::config::ConfigCenterExt;
///
/// let center = im_infra_memory::MemoryBackend::new().config().await?;
/// let path = im_infra::config::config_path("chat", "memory")?;
/// center.set_json(&path, &serde_json::json!({ "max_value_bytes": 4096 })).await?;
/// let settings: im_infra_memory::MemorySettings = im_infra::settings::from_center(&*center, "chat").await?.unwrap();
/// assert_eq!(settings.max_value_bytes, 4096);
/// # Ok(()) }
/// # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
/// ```
impl im_infra::settings::Settings for MemorySettings {
    const COMPONENT: &'static str = "memory";

    fn validate(&self) -> im_infra::Result<()> {
        MemorySettings::validate(self)
    }
}
