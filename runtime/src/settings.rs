//! The runtime's own settings: the service, its environment, the
//! composition, and the start-up and shutdown policies.

use std::collections::BTreeMap;
use std::time::Duration;

use im_infra::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::composition::Composition;
use crate::sources::{COMPONENTS, RUNTIME_KEYS};

/// What start-up does when the coordinator cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CoordinatorPolicy {
    /// Start-up fails (the seed's behaviour).
    #[default]
    Fail,
    /// Start-up goes on: every role of the unreachable backend is played
    /// in process, and every setting comes from the local sources or the
    /// defaults. Locks are then local and registrations invisible to other
    /// processes: for development, or a service that can run degraded.
    Defaults,
}

/// The `startup` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StartupSettings {
    /// What to do when the coordinator is unreachable.
    pub coordinator_unreachable: CoordinatorPolicy,
    /// How long one read of settings from the config center may take
    /// before the local settings are used.
    #[serde(with = "humantime_serde")]
    pub settings_timeout: Duration,
}

impl Default for StartupSettings {
    fn default() -> Self {
        StartupSettings {
            coordinator_unreachable: CoordinatorPolicy::Fail,
            settings_timeout: Duration::from_secs(5),
        }
    }
}

/// The `shutdown` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    /// The deadline of the whole shutdown, from the signal.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings {
            timeout: Duration::from_secs(10),
        }
    }
}

/// The longest start-up or shutdown timeout accepted (one hour).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// Everything the runtime reads for itself, and the components' local
/// sections.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeSettings {
    pub(crate) service: String,
    pub(crate) env: String,
    pub(crate) composition: Composition,
    pub(crate) startup: StartupSettings,
    pub(crate) shutdown: ShutdownSettings,
    pub(crate) sections: Map<String, Value>,
}

fn section<T: for<'de> Deserialize<'de> + Default>(
    merged: &mut Map<String, Value>,
    key: &str,
) -> Result<T> {
    match merged.remove(key) {
        None => Ok(T::default()),
        Some(v) => serde_json::from_value(v)
            .map_err(|e| Error::new(ErrorKind::InvalidConfig, format!("{key}: {e}"))),
    }
}

impl RuntimeSettings {
    /// Reads the merged sources; `service` is the name the code gave, `own`
    /// the sections of the service's own components.
    pub(crate) fn read(
        service: &str,
        mut merged: Map<String, Value>,
        own: &[String],
    ) -> Result<RuntimeSettings> {
        let service: String = section::<Option<String>>(&mut merged, "service")?
            .unwrap_or_else(|| service.to_owned());
        let env: String = section::<Option<String>>(&mut merged, "env")?
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(im_infra::config::app_env);
        // The path convention checks both names.
        im_infra::config::config_path_in(&env, &service, "clog")?;
        let names: BTreeMap<String, String> = section(&mut merged, "backends")?;
        let composition = Composition::from_names(&names)?;
        let startup: StartupSettings = section(&mut merged, "startup")?;
        let shutdown: ShutdownSettings = section(&mut merged, "shutdown")?;
        for (what, d) in [
            ("startup.settings_timeout", startup.settings_timeout),
            ("shutdown.timeout", shutdown.timeout),
        ] {
            if d.is_zero() || d > MAX_TIMEOUT {
                return Err(Error::new(
                    ErrorKind::InvalidConfig,
                    format!("{what}: {d:?} is not between 1 ns and {MAX_TIMEOUT:?}"),
                ));
            }
        }
        let is_known = |k: &str| COMPONENTS.contains(&k) || own.iter().any(|o| o == k);
        if let Some(unknown) = merged.keys().find(|k| !is_known(k)) {
            let mut known: Vec<&str> = RUNTIME_KEYS.to_vec();
            known.extend(COMPONENTS);
            known.extend(own.iter().map(String::as_str));
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!("unknown section {unknown:?} (known: {})", known.join(", ")),
            ));
        }
        Ok(RuntimeSettings {
            service,
            env,
            composition,
            startup,
            shutdown,
            sections: merged,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::composition::{BackendKind, Role};

    fn read(v: Value) -> Result<RuntimeSettings> {
        RuntimeSettings::read("svc", v.as_object().cloned().unwrap(), &[])
    }

    #[test]
    fn nothing_configured_is_a_service_in_process_with_the_defaults() {
        let s = read(json!({})).unwrap();
        assert_eq!(s.service, "svc");
        assert_eq!(s.composition, Composition::default());
        assert_eq!(s.startup, StartupSettings::default());
        assert_eq!(s.shutdown.timeout, Duration::from_secs(10));
    }

    #[test]
    fn every_section_is_read_and_components_are_kept_for_later() {
        let s = read(json!({
            "service": "im-logic", "env": "prod",
            "backends": {"coord": "etcd", "cache": "redis"},
            "startup": {"coordinator_unreachable": "defaults", "settings_timeout": "2s"},
            "shutdown": {"timeout": "30s"},
            "redis": {"url": "redis://r"},
        }))
        .unwrap();
        assert_eq!((s.service.as_str(), s.env.as_str()), ("im-logic", "prod"));
        assert_eq!(s.composition.kind(Role::Cache), BackendKind::Redis);
        assert_eq!(
            s.startup.coordinator_unreachable,
            CoordinatorPolicy::Defaults
        );
        assert_eq!(s.startup.settings_timeout, Duration::from_secs(2));
        assert_eq!(s.shutdown.timeout, Duration::from_secs(30));
        assert_eq!(s.sections.get("redis"), Some(&json!({"url": "redis://r"})));
    }

    #[test]
    fn unknown_sections_fields_and_bad_names_are_errors_that_name_them() {
        let e = read(json!({"reddis": {}})).unwrap_err();
        assert!(e.to_string().contains("reddis"), "{e}");
        let e = read(json!({"startup": {"coordinator_unreachable": "maybe"}})).unwrap_err();
        assert!(e.to_string().contains("startup"), "{e}");
        let e = read(json!({"shutdown": {"timeout": "soon"}})).unwrap_err();
        assert!(e.to_string().contains("shutdown"), "{e}");
        let e = read(json!({"shutdown": {"timeout": "300000000000y"}})).unwrap_err();
        assert!(e.to_string().contains("shutdown.timeout"), "{e}");
        let e = read(json!({"service": "a/b"})).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
    }

    #[test]
    fn a_section_the_service_declares_is_kept_for_it() {
        let merged = json!({"chat": {"topic": "t"}});
        let own = ["chat".to_owned()];
        let s = RuntimeSettings::read("svc", merged.as_object().cloned().unwrap(), &own).unwrap();
        assert_eq!(s.sections.get("chat"), Some(&json!({"topic": "t"})));
        let e = read(merged).unwrap_err();
        assert!(e.to_string().contains("\"chat\""), "{e}");
    }
}
