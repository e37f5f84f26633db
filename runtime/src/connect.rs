//! Connecting one backend with its settings found by the one convention:
//! the config center's `/config/{env}/{service}/{component}`, else the local
//! section (file, environment, code), else the defaults — with a warning on
//! each fallback.

use std::sync::Arc;
use std::time::Duration;

use im_infra::backend::Backend;
use im_infra::config::ConfigCenter;
use im_infra::settings::{from_center_or, Settings};
use im_infra::{Error, ErrorKind, Result};
use serde_json::{Map, Value};

use crate::composition::BackendKind;

/// Where settings are looked up: the local sections, and the config center
/// once it is up.
pub(crate) struct Lookup<'a> {
    pub(crate) local: &'a Map<String, Value>,
    pub(crate) center: Option<&'a dyn ConfigCenter>,
    pub(crate) env: &'a str,
    pub(crate) service: &'a str,
    pub(crate) timeout: Duration,
}

impl Lookup<'_> {
    /// The local section of `T`, validated; the defaults with a warning when
    /// there is none. A section that does not parse or validate is an
    /// error naming it: a wrong file fails the start, it is never ignored.
    pub(crate) fn local<T: Settings + Default>(&self) -> Result<T> {
        let Some(section) = self.local.get(T::COMPONENT) else {
            tracing::warn!(
                component = T::COMPONENT,
                "no local settings; using the defaults"
            );
            return Ok(T::default());
        };
        let settings: T = serde_json::from_value(section.clone()).map_err(|e| {
            Error::new(
                ErrorKind::InvalidConfig,
                format!("local settings {:?}: {e}", T::COMPONENT),
            )
        })?;
        settings.validate().map_err(|e| {
            Error::new(
                ErrorKind::InvalidConfig,
                format!("local settings {:?}: {}", T::COMPONENT, e.message()),
            )
        })?;
        Ok(settings)
    }

    /// The config center's settings of `T`, else [`local`](Self::local).
    pub(crate) async fn resolve<T: Settings + Default>(&self) -> Result<T> {
        let local = self.local()?;
        Ok(self.center_or(local).await)
    }

    /// The config center's settings of `T`, else `local` (read already).
    pub(crate) async fn center_or<T: Settings>(&self, local: T) -> T {
        match self.center {
            Some(center) => {
                from_center_or(center, self.env, self.service, local, self.timeout).await
            }
            None => local,
        }
    }
}

fn not_compiled(kind: BackendKind) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!(
            "backend {kind} is not compiled in: enable the feature {:?} of im-infra-runtime",
            kind.feature().unwrap_or_default()
        ),
    )
}

/// Connects the backend `kind` with the settings `lookup` finds.
pub(crate) async fn connect(kind: BackendKind, lookup: &Lookup<'_>) -> Result<Arc<dyn Backend>> {
    let backend: Arc<dyn Backend> = match kind {
        BackendKind::Memory => {
            let settings = lookup.resolve::<im_infra_memory::MemorySettings>().await?;
            Arc::new(
                im_infra_memory::MemoryBackend::builder()
                    .settings(settings)
                    .build()?,
            )
        }
        BackendKind::Noop => Arc::new(im_infra_noop::NoopBackend::new()),
        #[cfg(feature = "etcd")]
        BackendKind::Etcd => {
            let settings = lookup.resolve::<im_infra_etcd::EtcdSettings>().await?;
            Arc::new(
                im_infra_etcd::EtcdBackend::builder()
                    .settings(settings)
                    .build()
                    .await?,
            )
        }
        #[cfg(feature = "redis")]
        BackendKind::Redis => {
            let settings = lookup.resolve::<im_infra_redis::RedisSettings>().await?;
            Arc::new(
                im_infra_redis::RedisBackend::builder()
                    .settings(settings)
                    .build()
                    .await?,
            )
        }
        #[cfg(feature = "mysql")]
        BackendKind::Mysql => {
            let settings = lookup.resolve::<im_infra_mysql::MysqlSettings>().await?;
            Arc::new(
                im_infra_mysql::MysqlBackend::builder()
                    .settings(settings)
                    .build()
                    .await?,
            )
        }
        #[cfg(feature = "kafka")]
        BackendKind::Kafka => {
            let settings = lookup.resolve::<im_infra_kafka::KafkaSettings>().await?;
            Arc::new(
                im_infra_kafka::KafkaBackend::builder()
                    .settings(settings)
                    .build()
                    .await?,
            )
        }
        #[allow(unreachable_patterns)]
        other => return Err(not_compiled(other)),
    };
    Ok(backend)
}

#[cfg(test)]
mod tests {
    use im_infra::backend::Capability;

    use super::*;

    #[test]
    fn each_kind_claims_what_its_backend_claims() {
        assert_eq!(
            BackendKind::Noop.capabilities(),
            im_infra_noop::NoopBackend::new().capabilities()
        );
        #[cfg(feature = "etcd")]
        assert_eq!(
            BackendKind::Etcd.capabilities(),
            im_infra_etcd::CAPABILITIES
        );
        #[cfg(feature = "redis")]
        assert_eq!(
            BackendKind::Redis.capabilities(),
            im_infra_redis::CAPABILITIES
        );
        #[cfg(feature = "mysql")]
        assert_eq!(
            BackendKind::Mysql.capabilities(),
            im_infra_mysql::CAPABILITIES
        );
        #[cfg(feature = "kafka")]
        assert_eq!(
            BackendKind::Kafka.capabilities(),
            im_infra_kafka::CAPABILITIES
        );
        assert!(BackendKind::Memory
            .capabilities()
            .contains(&Capability::Messaging));
    }

    #[test]
    fn a_local_section_that_does_not_parse_or_validate_names_itself() {
        let local = serde_json::json!({"memory": {"no_such_field": 1}});
        let lookup = Lookup {
            local: local.as_object().unwrap(),
            center: None,
            env: "dev",
            service: "svc",
            timeout: Duration::from_secs(1),
        };
        let e = lookup
            .local::<im_infra_memory::MemorySettings>()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(e.to_string().contains("\"memory\""), "{e}");

        let empty = Map::new();
        let lookup = Lookup {
            local: &empty,
            ..lookup
        };
        assert_eq!(
            lookup.local::<im_infra_memory::MemorySettings>().unwrap(),
            im_infra_memory::MemorySettings::default()
        );
    }
}
