//! Settings: a backend's own configuration, and the one convention by which
//! every backend reads it from the config center.
//!
//! A settings type names its component (`"redis"`, `"db"`, ...) and checks
//! itself; [`from_center`] reads it from
//! `/config/{APP_ENV}/{service}/{component}` and [`from_center_or`] falls
//! back, with a warning naming the path and the reason, to the settings the
//! caller already has (from a file, the environment, or the defaults).
//!
//! ```
//! use im_infra::settings::Settings;
//!
//! #[derive(Debug, Default, serde::Deserialize)]
//! struct Mine { url: String }
//!
//! impl Settings for Mine {
//!     const COMPONENT: &'static str = "mine";
//!     fn validate(&self) -> im_infra::Result<()> {
//!         if self.url.is_empty() {
//!             let e = im_infra::Error::new(im_infra::ErrorKind::InvalidConfig, "mine: url is empty");
//!             return Err(e);
//!         }
//!         Ok(())
//!     }
//! }
//! # let _ = Mine::default();
//! ```

use serde::de::DeserializeOwned;

use std::time::Duration;

use crate::config::{app_env, config_path_in, ConfigCenter, ConfigCenterExt};
use crate::error::{Error, ErrorKind, Result};

/// The error of settings that name no server to connect to:
/// `MissingEndpoints` (code 6002), naming the backend and the field.
///
/// ```
/// use im_infra::{settings::missing_endpoints, ErrorKind};
/// let e = missing_endpoints("etcd", "endpoints");
/// assert_eq!(e.kind(), ErrorKind::MissingEndpoints);
/// assert_eq!(e.code(), 6002);
/// assert_eq!(e.backend(), Some("etcd"));
/// ```
pub fn missing_endpoints(backend: &'static str, field: &str) -> Error {
    Error::new(
        ErrorKind::MissingEndpoints,
        format!("{backend}: no server to connect to ({field} is empty)"),
    )
    .with_backend(backend)
}

/// The checks of one backend's settings. Each fails with `InvalidConfig`
/// (code 6001) carrying the backend's name and naming the field at fault.
///
/// ```
/// use std::time::Duration;
/// use im_infra::{settings::Checks, ErrorKind};
///
/// const CHECK: Checks = Checks::new("redis");
/// CHECK.positive("connect_timeout", Duration::from_secs(5))?;
/// CHECK.within("config_history", 1_000, 1..=u64::MAX)?;
/// let e = CHECK.positive("connect_timeout", Duration::ZERO).unwrap_err();
/// assert_eq!(e.kind(), ErrorKind::InvalidConfig);
/// assert_eq!(e.backend(), Some("redis"));
/// assert_eq!(e.message(), "connect_timeout must be positive");
/// let e = CHECK.within("pool_max", 0, 1..=100).unwrap_err();
/// assert_eq!(e.message(), "pool_max must be 1 to 100");
/// # Ok::<(), im_infra::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Checks {
    backend: &'static str,
}

impl Checks {
    /// The checks of `backend`'s settings.
    pub const fn new(backend: &'static str) -> Self {
        Checks { backend }
    }

    /// `InvalidConfig` with `message`, which names the field at fault.
    pub fn invalid(&self, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidConfig, message.into()).with_backend(self.backend)
    }

    /// The duration `field` is longer than zero.
    pub fn positive(&self, field: &str, value: Duration) -> Result<()> {
        if value.is_zero() {
            return Err(self.invalid(format!("{field} must be positive")));
        }
        Ok(())
    }

    /// The number `field` lies in `range` ("must be at least N" when the
    /// range has no upper end).
    pub fn within(
        &self,
        field: &str,
        value: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<()> {
        if range.contains(&value) {
            return Ok(());
        }
        let (low, high) = range.into_inner();
        Err(self.invalid(if high == u64::MAX {
            format!("{field} must be at least {low}")
        } else {
            format!("{field} must be {low} to {high}")
        }))
    }
}

/// A backend's settings type.
pub trait Settings: DeserializeOwned + Send + Sync + Sized {
    /// The component segment of its config-center path
    /// (`/config/{env}/{service}/{COMPONENT}`).
    const COMPONENT: &'static str;

    /// Fields renamed since an earlier release, as `(earlier, current)`:
    /// a source may still give the earlier name ([`use_current_names`]).
    const EARLIER_NAMES: &'static [(&'static str, &'static str)] = &[];

    /// Checks the values; `InvalidConfig` names the field at fault.
    fn validate(&self) -> Result<()>;
}

/// Renames, in the fields of one settings section as one source (a file,
/// the environment, code) gives them, every earlier name of `T`'s fields
/// to the current one, so that sections from several sources merge field
/// by field whichever name each used. `InvalidConfig` when the one source
/// gives a field under both names.
///
/// ```
/// use im_infra::settings::{use_current_names, Settings};
///
/// #[derive(serde::Deserialize)]
/// struct Mine { connect_timeout: u64 }
///
/// impl Settings for Mine {
///     const COMPONENT: &'static str = "mine";
///     const EARLIER_NAMES: &'static [(&'static str, &'static str)] =
///         &[("dial_timeout", "connect_timeout")];
///     fn validate(&self) -> im_infra::Result<()> { Ok(()) }
/// }
///
/// let serde_json::Value::Object(mut fields) = serde_json::json!({"dial_timeout": 5}) else {
///     unreachable!()
/// };
/// use_current_names::<Mine>(&mut fields).unwrap();
/// assert_eq!(fields["connect_timeout"], 5);
/// assert!(!fields.contains_key("dial_timeout"));
///
/// let serde_json::Value::Object(mut both) =
///     serde_json::json!({"dial_timeout": 5, "connect_timeout": 6}) else { unreachable!() };
/// assert!(use_current_names::<Mine>(&mut both).is_err());
/// ```
pub fn use_current_names<T: Settings>(
    fields: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    for (earlier, current) in T::EARLIER_NAMES {
        let Some(value) = fields.remove(*earlier) else {
            continue;
        };
        if fields.contains_key(*current) {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "{}: {earlier} is the earlier name of {current}; give one of them",
                    T::COMPONENT
                ),
            ));
        }
        fields.insert((*current).to_owned(), value);
    }
    Ok(())
}

/// The settings stored at `/config/{APP_ENV}/{service}/{T::COMPONENT}`
/// (JSON), validated; `None` when the key does not exist, `Serialization`
/// naming the key when it does not parse.
///
/// ```
/// # async fn demo(center: &dyn im_infra::config::ConfigCenter) -> im_infra::Result<()> {
/// # #[derive(Debug, serde::Deserialize)] struct Mine { url: String }
/// # impl im_infra::settings::Settings for Mine {
/// #     const COMPONENT: &'static str = "mine";
/// #     fn validate(&self) -> im_infra::Result<()> { Ok(()) }
/// # }
/// let mine: Option<Mine> = im_infra::settings::from_center(center, "im-logic").await?;
/// # Ok(()) }
/// ```
pub async fn from_center<T: Settings>(
    center: &dyn ConfigCenter,
    service: &str,
) -> Result<Option<T>> {
    from_center_in(center, &app_env(), service).await
}

/// [`from_center`] in the environment `env` rather than `APP_ENV`'s:
/// the settings at `/config/{env}/{service}/{T::COMPONENT}`.
///
/// ```
/// # async fn demo(center: &dyn im_infra::config::ConfigCenter) -> im_infra::Result<()> {
/// # #[derive(Debug, serde::Deserialize)] struct Mine { url: String }
/// # impl im_infra::settings::Settings for Mine {
/// #     const COMPONENT: &'static str = "mine";
/// #     fn validate(&self) -> im_infra::Result<()> { Ok(()) }
/// # }
/// let mine: Option<Mine> = im_infra::settings::from_center_in(center, "prod", "im-logic").await?;
/// # Ok(()) }
/// ```
pub async fn from_center_in<T: Settings>(
    center: &dyn ConfigCenter,
    env: &str,
    service: &str,
) -> Result<Option<T>> {
    let path = config_path_in(env, service, T::COMPONENT)?;
    let settings: Option<T> = center.get_json(&path).await?;
    if let Some(s) = &settings {
        s.validate()?;
    }
    Ok(settings)
}

/// [`from_center_in`] within `timeout`, or `fallback` with a warning naming
/// the path and why: nothing stored there, the center unreachable or too
/// slow, or stored settings that do not parse or validate. Never fails.
///
/// ```
/// # use std::time::Duration;
/// # #[derive(Debug, Default, serde::Deserialize)] struct Mine { url: String }
/// # impl im_infra::settings::Settings for Mine {
/// #     const COMPONENT: &'static str = "mine";
/// #     fn validate(&self) -> im_infra::Result<()> { Ok(()) }
/// # }
/// # async fn demo(center: &dyn im_infra::config::ConfigCenter) {
/// let local = Mine { url: "redis://127.0.0.1:6379".into() };
/// let mine = im_infra::settings::from_center_or(center, "prod", "im-logic", local, Duration::from_secs(5)).await;
/// # let _ = mine; }
/// ```
pub async fn from_center_or<T: Settings>(
    center: &dyn ConfigCenter,
    env: &str,
    service: &str,
    fallback: T,
    timeout: Duration,
) -> T {
    let path = config_path_in(env, service, T::COMPONENT).unwrap_or_else(|e| e.to_string());
    match tokio::time::timeout(timeout, from_center_in(center, env, service)).await {
        Ok(Ok(Some(settings))) => settings,
        Ok(Ok(None)) => {
            tracing::warn!(
                path,
                "no settings in the config center; using the local ones"
            );
            fallback
        }
        Ok(Err(error)) => {
            tracing::warn!(path, %error, "settings from the config center unusable; using the local ones");
            fallback
        }
        Err(_) => {
            tracing::warn!(
                path,
                ?timeout,
                "the config center did not answer in time; using the local settings"
            );
            fallback
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use async_trait::async_trait;
    use bytes::Bytes;

    use super::*;
    use crate::config::{ConfigCapabilities, Versioned, WatchOptions, WatchStream};
    use crate::{Error, ErrorKind};

    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Mine {
        url: String,
    }

    impl Settings for Mine {
        const COMPONENT: &'static str = "mine";
        fn validate(&self) -> Result<()> {
            if self.url.is_empty() {
                return Err(Error::new(ErrorKind::InvalidConfig, "mine: url is empty"));
            }
            Ok(())
        }
    }

    /// A center of fixed values; `None` answers `Unavailable`; `hang`
    /// makes every read wait forever.
    #[derive(Default)]
    struct Center(
        parking_lot::Mutex<Option<HashMap<String, Bytes>>>,
        std::sync::atomic::AtomicBool,
    );

    #[async_trait]
    impl ConfigCenter for Center {
        fn capabilities(&self) -> ConfigCapabilities {
            ConfigCapabilities::full(1024)
        }
        async fn get_with_version(&self, key: &str) -> Result<Option<Versioned>> {
            if self.1.load(std::sync::atomic::Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            let values = self.0.lock();
            let values = values
                .as_ref()
                .ok_or_else(|| Error::new(ErrorKind::Unavailable, "down"))?;
            Ok(values.get(key).map(|v| Versioned {
                value: v.clone(),
                version: 1,
            }))
        }
        async fn set(&self, _: &str, _: Bytes) -> Result<u64> {
            Err(Error::unsupported("set"))
        }
        async fn delete(&self, _: &str) -> Result<bool> {
            Err(Error::unsupported("delete"))
        }
        async fn list(&self, _: &str) -> Result<Vec<String>> {
            Err(Error::unsupported("list"))
        }
        async fn compare_and_set(&self, _: &str, _: Bytes, _: u64) -> Result<u64> {
            Err(Error::unsupported("cas"))
        }
        async fn watch(&self, _: &str, _: WatchOptions) -> Result<WatchStream> {
            Err(Error::unsupported("watch"))
        }
        async fn watch_prefix(&self, _: &str, _: WatchOptions) -> Result<WatchStream> {
            Err(Error::unsupported("watch_prefix"))
        }
    }

    impl Center {
        fn put(&self, value: &'static str) {
            let path = config_path_in("dev", "svc", "mine").unwrap();
            let mut values = self.0.lock();
            values
                .get_or_insert_with(HashMap::new)
                .insert(path, Bytes::from_static(value.as_bytes()));
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    fn local() -> Mine {
        Mine {
            url: "local".into(),
        }
    }

    #[tokio::test]
    async fn stored_settings_are_read_validated_or_fall_back() {
        let center = Center::default();
        assert_eq!(
            from_center_or(&center, "dev", "svc", local(), SECOND).await,
            local(),
            "unreachable"
        );
        center.put(r#"{"url": "from-center"}"#);
        let read = from_center_in::<Mine>(&center, "dev", "svc").await.unwrap();
        assert_eq!(read.map(|m| m.url).as_deref(), Some("from-center"));
        assert_eq!(
            from_center_or(&center, "dev", "svc", local(), SECOND)
                .await
                .url,
            "from-center"
        );

        center.put(r#"{"url": ""}"#);
        let bad = from_center_in::<Mine>(&center, "dev", "svc")
            .await
            .unwrap_err();
        assert_eq!(bad.kind(), ErrorKind::InvalidConfig);
        assert_eq!(
            from_center_or(&center, "dev", "svc", local(), SECOND).await,
            local(),
            "invalid"
        );

        center.put(r#"{"url": "x", "nope": 1}"#);
        let unknown = from_center_in::<Mine>(&center, "dev", "svc")
            .await
            .unwrap_err();
        assert_eq!(unknown.kind(), ErrorKind::Serialization);
        assert!(from_center_in::<Mine>(&center, "dev", "other")
            .await
            .unwrap()
            .is_none());
        assert_eq!(
            from_center_or(&center, "dev", "other", local(), SECOND).await,
            local(),
            "absent"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_center_that_does_not_answer_falls_back_at_the_timeout() {
        let center = Center::default();
        center.put(r#"{"url": "from-center"}"#);
        center.1.store(true, std::sync::atomic::Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        assert_eq!(
            from_center_or(&center, "dev", "svc", local(), SECOND).await,
            local()
        );
        assert_eq!(started.elapsed(), SECOND);
    }
}
