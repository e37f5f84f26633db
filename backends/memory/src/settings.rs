//! Settings of the in-process backend.

use std::time::Duration;

use im_infra::settings::Checks;
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
        const CHECK: Checks = Checks::new(crate::NAME);
        CHECK.within("max_value_bytes", self.max_value_bytes as u64, 1..=u64::MAX)?;
        CHECK.within(
            "max_message_bytes",
            self.max_message_bytes as u64,
            1..=u64::MAX,
        )?;
        CHECK.within("config_history", self.config_history as u64, 1..=u64::MAX)?;
        CHECK.within(
            "default_partitions",
            u64::from(self.default_partitions),
            1..=10_000,
        )?;
        CHECK.positive("purge_interval", self.purge_interval)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_value_is_named_with_the_backend() {
        assert!(MemorySettings::default().validate().is_ok());
        type Edit = fn(&mut MemorySettings);
        let cases: [(Edit, &str); 5] = [
            (
                |s| s.max_value_bytes = 0,
                "max_value_bytes must be at least 1",
            ),
            (
                |s| s.max_message_bytes = 0,
                "max_message_bytes must be at least 1",
            ),
            (
                |s| s.config_history = 0,
                "config_history must be at least 1",
            ),
            (
                |s| s.default_partitions = 10_001,
                "default_partitions must be 1 to 10000",
            ),
            (
                |s| s.purge_interval = Duration::ZERO,
                "purge_interval must be positive",
            ),
        ];
        for (edit, message) in cases {
            let mut settings = MemorySettings::default();
            edit(&mut settings);
            let e = settings.validate().unwrap_err();
            assert_eq!(e.kind(), im_infra::ErrorKind::InvalidConfig, "{message}");
            assert_eq!(e.backend(), Some(crate::NAME), "{message}");
            assert_eq!(e.message(), message);
        }
    }
}
