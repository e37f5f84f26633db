//! Settings of the etcd backend, and where they come from.
//!
//! Priority, highest first: builder arguments > a config file
//! (`etcd-config.json|yaml|yml`, then `config/etcd.json|yaml|yml`) >
//! environment (`ETCD_ENDPOINTS`, `ETCD_CONNECT_TIMEOUT`, ...) > defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use im_infra::secret::{redact_url, Secret};
use im_infra::settings::Checks;
use im_infra::{Error, Result, RetrySettings};
use serde::{Deserialize, Serialize};

/// TLS files for connecting to etcd over `https://`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsFiles {
    /// CA certificate (PEM) that signed the servers' certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM), for mutual TLS.
    pub key_file: Option<PathBuf>,
    /// Name to verify the servers' certificates against.
    pub server_name: Option<String>,
}

/// Settings of an [`EtcdBackend`](crate::EtcdBackend).
///
/// ```
/// let cfg: im_infra_etcd::EtcdSettings = serde_json::from_str(r#"{
///     "endpoints": ["http://10.0.0.1:2379", "http://10.0.0.2:2379"],
///     "connect_timeout": "5s",
///     "username": "app", "password": "s3cret",
///     "service_prefix": "/prod/services",
///     "lock_prefix": "/prod/locks/"
/// }"#).unwrap();
/// cfg.validate().unwrap();
/// assert!(!format!("{cfg:?}").contains("s3cret"));
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdSettings {
    /// Client URLs of the members (`http://host:2379` or `https://`).
    pub endpoints: Vec<String>,
    /// Bound of connecting (and of the first health check).
    /// `dial_timeout`, the original system's name, is read as this.
    #[serde(with = "humantime_serde", alias = "dial_timeout")]
    pub connect_timeout: Duration,
    /// Bound of every request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// User name (etcd authentication).
    pub username: Option<String>,
    /// Password. Never printed.
    pub password: Option<Secret>,
    /// TLS files (for `https://` endpoints).
    pub tls: Option<TlsFiles>,
    /// Prefix of every key this backend writes (empty by default, so
    /// configuration is plain JSON at `/config/...`, as `etcdctl` sees it).
    pub namespace: String,
    /// TTL of a service registration when none is given.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Prefix of registered services: `<prefix>/<service>/<id>`.
    pub service_prefix: String,
    /// Prefix of locks: waiters are `<prefix><name>/<lease id in hex>`, the
    /// layout of etcd's own mutex (`etcdctl lock <prefix><name>`).
    pub lock_prefix: String,
    /// Metadata added to every registered instance (its own labels win).
    pub default_metadata: BTreeMap<String, String>,
    /// How often the connection is checked in the background.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    /// Bound of one health check.
    #[serde(with = "humantime_serde")]
    pub health_check_timeout: Duration,
    /// Backoff of reconnecting watches and re-registrations.
    pub retry: RetrySettings,
    /// Largest value written, in bytes (etcd refuses requests above 1.5 MiB).
    pub max_value_bytes: usize,
    /// The seed's `log_level` (`trace`, `debug`, `info`, `warn` or
    /// `error`): checked here and left to the service's logger to apply
    /// (the backend installs no logger of its own).
    pub log_level: Option<String>,
}

/// The levels `log_level` accepts.
const LOG_LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

impl Default for EtcdSettings {
    fn default() -> Self {
        EtcdSettings {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            username: None,
            password: None,
            tls: None,
            namespace: String::new(),
            default_ttl: Duration::from_secs(30),
            service_prefix: "/services".into(),
            lock_prefix: "/locks/".into(),
            default_metadata: BTreeMap::new(),
            health_check_interval: Duration::from_secs(30),
            health_check_timeout: Duration::from_secs(5),
            retry: RetrySettings {
                max_retries: 5,
                initial_interval: Duration::from_millis(100),
                max_interval: Duration::from_secs(5),
                multiplier: 2.0,
                jitter: true,
            },
            max_value_bytes: 1024 * 1024,
            log_level: None,
        }
    }
}

impl std::fmt::Debug for EtcdSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let eps: Vec<String> = self.endpoints.iter().map(|e| redact_url(e)).collect();
        f.debug_struct("EtcdSettings")
            .field("endpoints", &eps)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("tls", &self.tls)
            .field("namespace", &self.namespace)
            .field("default_ttl", &self.default_ttl)
            .field("service_prefix", &self.service_prefix)
            .field("lock_prefix", &self.lock_prefix)
            .field("log_level", &self.log_level)
            .finish_non_exhaustive()
    }
}

const CHECK: Checks = Checks::new(crate::NAME);

fn invalid(msg: impl Into<String>) -> Error {
    CHECK.invalid(msg)
}

/// The file names looked for, in order, when no file is named.
pub const SETTINGS_FILES: [&str; 6] = [
    "etcd-config.json",
    "etcd-config.yaml",
    "etcd-config.yml",
    "config/etcd.json",
    "config/etcd.yaml",
    "config/etcd.yml",
];

impl EtcdSettings {
    /// Defaults for one endpoint.
    pub fn with_endpoints<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        EtcdSettings {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..EtcdSettings::default()
        }
    }

    /// A local development setup: `localhost:2379`, short timeouts.
    pub fn development() -> Self {
        EtcdSettings {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(3),
            default_ttl: Duration::from_secs(10),
            ..EtcdSettings::default()
        }
    }

    /// A production setup: several members, longer timeouts, more retries.
    pub fn production<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        EtcdSettings {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            default_ttl: Duration::from_secs(60),
            health_check_interval: Duration::from_secs(15),
            retry: RetrySettings {
                max_retries: 10,
                initial_interval: Duration::from_millis(200),
                max_interval: Duration::from_secs(10),
                multiplier: 2.0,
                jitter: true,
            },
            ..EtcdSettings::default()
        }
    }

    /// A test setup: short TTLs and timeouts, frequent health checks.
    pub fn testing() -> Self {
        EtcdSettings {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            default_ttl: Duration::from_secs(5),
            health_check_interval: Duration::from_secs(2),
            health_check_timeout: Duration::from_secs(1),
            ..EtcdSettings::default()
        }
    }

    /// Checks the values; `MissingEndpoints` (code 6002) without an
    /// endpoint, otherwise `InvalidConfig` naming the problem.
    pub fn validate(&self) -> Result<()> {
        if self.endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err(im_infra::settings::missing_endpoints(
                crate::NAME,
                "endpoints",
            ));
        }
        if self.endpoints.iter().any(|e| e.trim().is_empty()) {
            return Err(invalid("an etcd endpoint is empty"));
        }
        for e in &self.endpoints {
            let hostport = e.split_once("://").map_or(e.as_str(), |(_, r)| r);
            if !hostport.contains(':') {
                return Err(invalid(format!("endpoint {} has no port", redact_url(e))));
            }
        }
        CHECK.positive("connect_timeout", self.connect_timeout)?;
        CHECK.positive("request_timeout", self.request_timeout)?;
        CHECK.positive("health_check_timeout", self.health_check_timeout)?;
        CHECK.positive("health_check_interval", self.health_check_interval)?;
        if self.default_ttl < Duration::from_secs(1) {
            return Err(invalid(
                "default_ttl must be at least 1 s (etcd leases are whole seconds)",
            ));
        }
        if !self.service_prefix.starts_with('/') || !self.lock_prefix.starts_with('/') {
            return Err(invalid(
                "service_prefix and lock_prefix must start with '/'",
            ));
        }
        CHECK.within("max_value_bytes", self.max_value_bytes as u64, 1..=u64::MAX)?;
        if let Some(level) = &self.log_level {
            if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
                return Err(invalid(format!(
                    "log_level {level:?} is not one of {}",
                    LOG_LEVELS.join(", ")
                )));
            }
        }
        self.retry.validate()
    }

    /// Applies the `ETCD_*` environment variables that are set
    /// (`ETCD_ENDPOINTS` comma-separated, `ETCD_CONNECT_TIMEOUT` like `5s`
    /// — `ETCD_DIAL_TIMEOUT` is read too, the new name winning —,
    /// `ETCD_REQUEST_TIMEOUT`, `ETCD_USERNAME`, `ETCD_PASSWORD`,
    /// `ETCD_NAMESPACE`, `ETCD_SERVICE_PREFIX`, `ETCD_LOCK_PREFIX`,
    /// `ETCD_DEFAULT_TTL`).
    pub fn apply_env(&mut self) -> Result<()> {
        self.apply_vars(|name| std::env::var(name).ok())
    }

    fn apply_vars(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<()> {
        let dur = |name: &str, v: String| {
            humantime::parse_duration(v.trim()).map_err(|e| invalid(format!("{name}={v:?}: {e}")))
        };
        if let Some(v) = var("ETCD_ENDPOINTS") {
            self.endpoints = v
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
        }
        // `ETCD_DIAL_TIMEOUT` is the original system's name.
        for name in ["ETCD_DIAL_TIMEOUT", "ETCD_CONNECT_TIMEOUT"] {
            if let Some(v) = var(name) {
                self.connect_timeout = dur(name, v)?;
            }
        }
        if let Some(v) = var("ETCD_REQUEST_TIMEOUT") {
            self.request_timeout = dur("ETCD_REQUEST_TIMEOUT", v)?;
        }
        if let Some(v) = var("ETCD_DEFAULT_TTL") {
            self.default_ttl = dur("ETCD_DEFAULT_TTL", v)?;
        }
        if let Some(v) = var("ETCD_USERNAME") {
            self.username = Some(v);
        }
        if let Some(v) = var("ETCD_PASSWORD") {
            self.password = Some(Secret::new(v));
        }
        if let Some(v) = var("ETCD_NAMESPACE") {
            self.namespace = v;
        }
        if let Some(v) = var("ETCD_SERVICE_PREFIX") {
            self.service_prefix = v;
        }
        if let Some(v) = var("ETCD_LOCK_PREFIX") {
            self.lock_prefix = v;
        }
        Ok(())
    }

    /// Applies the fields set in a JSON or YAML file (by its extension) over
    /// this configuration.
    pub fn apply_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
        let patch: serde_json::Value = match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => serde_yaml_ng::from_str(&text)
                .map_err(|e| invalid(format!("{} is not valid YAML: {e}", path.display())))?,
            _ => serde_json::from_str(&text)
                .map_err(|e| invalid(format!("{} is not valid JSON: {e}", path.display())))?,
        };
        let serde_json::Value::Object(mut patch) = patch else {
            return Err(invalid(format!("{} must hold an object", path.display())));
        };
        im_infra::settings::use_current_names::<Self>(&mut patch)
            .map_err(|e| invalid(format!("{}: {}", path.display(), e.message())))?;
        let mut merged = serde_json::to_value(&*self).map_err(|e| invalid(e.to_string()))?;
        if let serde_json::Value::Object(base) = &mut merged {
            for (k, v) in patch {
                base.insert(k, v);
            }
        }
        *self = serde_json::from_value(merged)
            .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        Ok(())
    }

    /// The first of [`SETTINGS_FILES`] that exists under `dir`.
    pub fn find_file(dir: &Path) -> Option<PathBuf> {
        SETTINGS_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
    }

    /// Defaults, then the environment, then the first config file found in
    /// the working directory (or `file`, when given). Builder arguments are
    /// applied on top by the caller.
    pub fn load(file: Option<&Path>) -> Result<EtcdSettings> {
        let mut cfg = EtcdSettings::default();
        cfg.apply_env()?;
        let found = match file {
            Some(f) => Some(f.to_path_buf()),
            None => std::env::current_dir()
                .ok()
                .and_then(|d| Self::find_file(&d)),
        };
        if let Some(f) = found {
            tracing::info!(file = %f.display(), "loading etcd configuration file");
            cfg.apply_file(&f)?;
        }
        Ok(cfg)
    }

    /// The full key for `key` under the namespace.
    pub(crate) fn key(&self, key: &str) -> String {
        format!("{}{key}", self.namespace)
    }
}

/// Read from the config center at `/config/{APP_ENV}/{service}/etcd`
/// with [`im_infra::settings::from_center`]:
///
/// ```
/// # async fn demo() -> im_infra::Result<()> {
/// use im_infra::backend::Backend;
/// use im_infra::config::ConfigCenterExt;
///
/// let center = im_infra_memory::MemoryBackend::new().config().await?;
/// let path = im_infra::config::config_path("chat", "etcd")?;
/// center.set_json(&path, &serde_json::json!({ "endpoints": ["http://10.0.0.3:2379"], "namespace": "/chat" })).await?;
/// let settings: im_infra_etcd::EtcdSettings = im_infra::settings::from_center(&*center, "chat").await?.unwrap();
/// assert_eq!(settings.namespace, "/chat");
/// # Ok(()) }
/// # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
/// ```
impl im_infra::settings::Settings for EtcdSettings {
    const COMPONENT: &'static str = "etcd";
    const EARLIER_NAMES: &'static [(&'static str, &'static str)] =
        &[("dial_timeout", "connect_timeout")];

    fn validate(&self) -> im_infra::Result<()> {
        EtcdSettings::validate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_infra::ErrorKind;

    /// The sample files of the seed's etcd library (JSON and YAML) load, with
    /// its `log_level`; a field it does not define is still refused, by name.
    #[test]
    fn the_seed_sample_files_load() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("etcd-config.json");
        std::fs::write(
            &json,
            r#"{
  "endpoints": ["localhost:23791", "localhost:23792", "localhost:23793"],
  "dial_timeout": "5s",
  "log_level": "info"
}"#,
        )
        .unwrap();
        let yaml = dir.path().join("etcd-config.yaml");
        std::fs::write(
            &yaml,
            "endpoints:\n  - localhost:23791\n  - localhost:23792\n  - localhost:23793\ndial_timeout: 5s\nlog_level: info\n",
        )
        .unwrap();
        for file in [&json, &yaml] {
            let s = EtcdSettings::load(Some(file)).unwrap();
            s.validate().unwrap();
            assert_eq!(s.endpoints.len(), 3, "{file:?}");
            assert_eq!(s.connect_timeout, Duration::from_secs(5));
            assert_eq!(s.log_level.as_deref(), Some("info"));
        }
        std::fs::write(&json, r#"{"endpoints": ["h:1"], "log_levl": "info"}"#).unwrap();
        let err = EtcdSettings::load(Some(&json)).unwrap_err();
        assert!(err.to_string().contains("log_levl"), "{err}");
        std::fs::write(&json, r#"{"endpoints": ["h:1"], "log_level": "loud"}"#).unwrap();
        let err = EtcdSettings::load(Some(&json))
            .and_then(|s| s.validate())
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.to_string().contains("loud"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(EtcdSettings::default().validate().is_ok());
        let mut c = EtcdSettings::default();
        c.endpoints.clear();
        let e = c.validate().unwrap_err();
        assert_eq!((e.kind(), e.code()), (ErrorKind::MissingEndpoints, 6002));
        assert!(e.to_string().contains("endpoints is empty"), "{e}");
        c.endpoints = vec!["127.0.0.1:2379".into(), " ".into()];
        assert_eq!(c.validate().unwrap_err().kind(), ErrorKind::InvalidConfig);
        let c = EtcdSettings {
            default_ttl: Duration::from_millis(10),
            ..EtcdSettings::default()
        };
        assert!(c.validate().is_err());
        let c = EtcdSettings {
            endpoints: vec!["http://nohost".into()],
            ..EtcdSettings::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn environment_overrides_defaults() {
        let mut c = EtcdSettings::default();
        c.apply_vars(|k| match k {
            "ETCD_ENDPOINTS" => Some("http://a:1, http://b:2".into()),
            "ETCD_DIAL_TIMEOUT" => Some("750ms".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.endpoints, vec!["http://a:1", "http://b:2"]);
        assert_eq!(c.connect_timeout, Duration::from_millis(750));
        c.apply_vars(|k| match k {
            "ETCD_DIAL_TIMEOUT" => Some("1s".into()),
            "ETCD_CONNECT_TIMEOUT" => Some("2s".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(
            c.connect_timeout,
            Duration::from_secs(2),
            "the new name wins"
        );
        let bad = EtcdSettings::default()
            .apply_vars(|k| (k == "ETCD_DIAL_TIMEOUT").then(|| "soon".into()));
        assert_eq!(bad.unwrap_err().kind(), ErrorKind::InvalidConfig);
    }

    #[test]
    fn a_file_may_give_the_earlier_name_but_not_both() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("etcd-config.json");
        let mut c = EtcdSettings {
            connect_timeout: Duration::from_secs(9),
            ..EtcdSettings::default()
        };
        std::fs::write(&file, r#"{"dial_timeout": "4s"}"#).unwrap();
        c.apply_file(&file).unwrap();
        assert_eq!(c.connect_timeout, Duration::from_secs(4));
        std::fs::write(&file, r#"{"dial_timeout": "4s", "connect_timeout": "5s"}"#).unwrap();
        let e = c.apply_file(&file).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidConfig);
        assert!(
            e.message()
                .contains("dial_timeout is the earlier name of connect_timeout"),
            "{e}"
        );
    }

    #[test]
    fn files_are_found_in_order_and_override_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("config")).unwrap();
        std::fs::write(
            dir.path().join("config/etcd.json"),
            r#"{"connect_timeout": "9s"}"#,
        )
        .unwrap();
        assert_eq!(
            EtcdSettings::find_file(dir.path()).unwrap(),
            dir.path().join("config/etcd.json")
        );
        std::fs::write(
            dir.path().join("etcd-config.yaml"),
            "endpoints:\n  - http://y:2379\nconnect_timeout: 4s\n",
        )
        .unwrap();
        let found = EtcdSettings::find_file(dir.path()).unwrap();
        assert_eq!(found, dir.path().join("etcd-config.yaml"));
        let mut c = EtcdSettings::default();
        c.apply_vars(|k| (k == "ETCD_ENDPOINTS").then(|| "http://env:2379".into()))
            .unwrap();
        c.apply_file(&found).unwrap();
        assert_eq!(
            c.endpoints,
            vec!["http://y:2379"],
            "the file wins over the environment"
        );
        assert_eq!(c.connect_timeout, Duration::from_secs(4));
        std::fs::write(dir.path().join("bad.json"), "{not json").unwrap();
        assert_eq!(
            c.apply_file(&dir.path().join("bad.json"))
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidConfig
        );
    }
}
