//! Settings of the Redis backend.

use std::path::PathBuf;
use std::time::Duration;

use im_infra::secret::{redact_url, Secret};
use im_infra::settings::Checks;
use im_infra::{Error, Result, RetrySettings};
use serde::{Deserialize, Serialize};

/// Settings of a [`RedisBackend`](crate::RedisBackend); deserialises from
/// the config center (`/config/{env}/{service}/redis`).
///
/// ```
/// let cfg: im_infra_redis::RedisSettings = serde_json::from_str(r#"{
///     "urls": ["redis://10.0.0.5:6379/0"],
///     "username": "app",
///     "password": "s3cret",
///     "namespace": "im-logic",
///     "request_timeout": "500ms"
/// }"#).unwrap();
/// cfg.validate().unwrap();
/// assert!(!format!("{cfg:?}").contains("s3cret"));
/// ```
///
/// With Redis Sentinel, name the sentinels and the master name they
/// monitor; the backend asks them for the current primary, and again
/// whenever the primary stops answering or refuses writes (a failover), so
/// it follows a promoted replica without a restart. The first of `urls`
/// then gives only the database, the credentials and the scheme of the
/// connections to the primary (its host and port are not used):
///
/// ```
/// let cfg: im_infra_redis::RedisSettings = serde_json::from_str(r#"{
///     "sentinels": ["redis://10.0.0.7:26379", "redis://10.0.0.8:26379", "redis://10.0.0.9:26379"],
///     "master_name": "mymaster",
///     "urls": ["redis://primary/2"],
///     "password": "s3cret"
/// }"#).unwrap();
/// cfg.validate().unwrap();
/// assert!(cfg.is_sentinel());
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://host:port/db` or `rediss://` (TLS). Several URLs, or
    /// `cluster: true`, connect to a Redis Cluster. With `sentinels`, one
    /// URL whose database, credentials and scheme apply to the primary the
    /// sentinels name (its host and port are ignored).
    pub urls: Vec<String>,
    /// URLs of the Redis Sentinels to ask for the primary
    /// (`redis://host:26379`, or `rediss://`: the same scheme for all;
    /// a user and password in the URLs are the sentinels' own, the same for
    /// all). Set together with `master_name`; not with a cluster.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under
    /// (`sentinel monitor <name> ...`). Set together with `sentinels`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_name: Option<String>,
    /// Connect to a Redis Cluster even with one seed URL.
    pub cluster: bool,
    /// ACL user name (overrides the URL's).
    pub username: Option<String>,
    /// Password (overrides the URL's). Never printed.
    pub password: Option<Secret>,
    /// TLS files for `rediss://` URLs: a private CA, and a client
    /// certificate for mutual TLS. Without them `rediss://` trusts the
    /// system's roots.
    pub tls: Option<RedisTls>,
    /// Prefix of every key (letters, digits, `.`, `_`, `-`).
    pub namespace: String,
    /// Bound of establishing a connection (with Sentinel: of asking the
    /// sentinels for the primary, checking its role and connecting to it).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bound of every command (`response_timeout` in files is read as
    /// this).
    #[serde(with = "humantime_serde", alias = "response_timeout")]
    pub request_timeout: Duration,
    /// Backoff of reconnection attempts (with Sentinel, a failed lookup of
    /// the primary is not repeated within `initial_interval`).
    pub retry: RetrySettings,
    /// Largest cache or config value, in bytes.
    pub max_value_bytes: usize,
    /// Changes kept in the config change stream for resuming watches.
    pub config_history: usize,
    /// While Redis is unreachable, how long the limiter decides by its
    /// failure policy before asking Redis again.
    #[serde(with = "humantime_serde")]
    pub limiter_probe_interval: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            urls: vec!["redis://127.0.0.1:6379/0".into()],
            sentinels: Vec::new(),
            master_name: None,
            cluster: false,
            username: None,
            password: None,
            tls: None,
            namespace: "im-infra".into(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(2),
            retry: RetrySettings {
                max_retries: 6,
                initial_interval: Duration::from_millis(50),
                max_interval: Duration::from_secs(2),
                multiplier: 2.0,
                jitter: true,
            },
            max_value_bytes: 16 * 1024 * 1024,
            config_history: 10_000,
            limiter_probe_interval: Duration::from_secs(1),
        }
    }
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        let sentinels: Vec<String> = self.sentinels.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RedisSettings")
            .field("urls", &urls)
            .field("sentinels", &sentinels)
            .field("master_name", &self.master_name)
            .field("cluster", &self.cluster)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("tls", &self.tls)
            .field("namespace", &self.namespace)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("config_history", &self.config_history)
            .finish_non_exhaustive()
    }
}

/// TLS files (PEM) for `rediss://` connections.
///
/// ```
/// let cfg: im_infra_redis::RedisSettings = serde_json::from_str(r#"{
///     "urls": ["rediss://redis.internal:6380/0"],
///     "tls": { "ca_file": "/etc/ssl/internal-ca.pem" }
/// }"#).unwrap();
/// cfg.validate().unwrap();
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisTls {
    /// CA certificate(s) that signed the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// Client certificate, for mutual TLS (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// Client private key, for mutual TLS (with `cert_file`).
    pub key_file: Option<PathBuf>,
}

impl RedisTls {
    /// Reads the files; `InvalidConfig` names one that cannot be read.
    pub(crate) fn certificates(&self) -> Result<redis::TlsCertificates> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| invalid(format!("reading {}: {e}", p.display())))
        };
        let client_tls = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                client_cert: read(c)?,
                client_key: read(k)?,
            }),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "tls.cert_file and tls.key_file go together (mutual TLS)",
                ))
            }
        };
        Ok(redis::TlsCertificates {
            client_tls,
            root_cert: self.ca_file.as_ref().map(read).transpose()?,
        })
    }
}

const CHECK: Checks = Checks::new(crate::NAME);

fn invalid(msg: impl Into<String>) -> Error {
    CHECK.invalid(msg)
}

impl RedisSettings {
    /// A configuration for one server URL.
    pub fn new(url: impl Into<String>) -> Self {
        RedisSettings {
            urls: vec![url.into()],
            ..RedisSettings::default()
        }
    }

    /// Checks the values; `InvalidConfig` names the problem.
    pub fn validate(&self) -> Result<()> {
        if self.urls.is_empty() {
            return Err(im_infra::settings::missing_endpoints(crate::NAME, "urls"));
        }
        for url in &self.urls {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(invalid(format!(
                    "{} is not a redis:// or rediss:// URL",
                    redact_url(url)
                )));
            }
        }
        let ns = &self.namespace;
        if ns.is_empty()
            || ns.len() > 64
            || !ns
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(invalid(format!(
                "namespace {ns:?} must be 1-64 letters, digits, '.', '_' or '-'"
            )));
        }
        self.validate_sentinel()?;
        if let Some(tls) = &self.tls {
            if self.urls.iter().any(|u| !u.starts_with("rediss://")) {
                return Err(invalid("tls files are set but a URL is not rediss://"));
            }
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return Err(invalid(
                    "tls.cert_file and tls.key_file go together (mutual TLS)",
                ));
            }
        }
        CHECK.positive("connect_timeout", self.connect_timeout)?;
        CHECK.positive("request_timeout", self.request_timeout)?;
        CHECK.within("max_value_bytes", self.max_value_bytes as u64, 1..=u64::MAX)?;
        CHECK.within("config_history", self.config_history as u64, 1..=u64::MAX)?;
        CHECK.positive("limiter_probe_interval", self.limiter_probe_interval)?;
        self.retry.validate()
    }

    /// Whether to connect to a cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster || self.urls.len() > 1
    }

    /// Whether the primary is found through Redis Sentinel.
    pub fn is_sentinel(&self) -> bool {
        !self.sentinels.is_empty() || self.master_name.is_some()
    }

    /// The Sentinel settings: both or neither, no cluster, one scheme.
    fn validate_sentinel(&self) -> Result<()> {
        if !self.is_sentinel() {
            return Ok(());
        }
        let Some(name) = &self.master_name else {
            return Err(invalid("sentinels are set without master_name"));
        };
        if self.sentinels.is_empty() {
            return Err(invalid("master_name is set without sentinels"));
        }
        if name.is_empty()
            || name
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(invalid(format!(
                "master_name {name:?} must be non-empty, without spaces"
            )));
        }
        if self.is_cluster() {
            return Err(invalid(
                "sentinels cannot be combined with a cluster (cluster: true or several urls)",
            ));
        }
        for url in &self.sentinels {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(invalid(format!(
                    "sentinel {} is not a redis:// or rediss:// URL",
                    redact_url(url)
                )));
            }
        }
        let tls = |u: &String| u.starts_with("rediss://");
        if self.sentinels.iter().any(tls) && !self.sentinels.iter().all(tls) {
            return Err(invalid(
                "the sentinels' URLs must all be redis:// or all be rediss://",
            ));
        }
        Ok(())
    }
}

/// Read from the config center at `/config/{APP_ENV}/{service}/redis`
/// with [`im_infra::settings::from_center`]:
///
/// ```
/// # async fn demo() -> im_infra::Result<()> {
/// use im_infra::backend::Backend;
/// use im_infra::config::ConfigCenterExt;
///
/// let center = im_infra_memory::MemoryBackend::new().config().await?;
/// let path = im_infra::config::config_path("chat", "redis")?;
/// center.set_json(&path, &serde_json::json!({ "urls": ["redis://10.0.0.2:6379/0"], "namespace": "chat" })).await?;
/// let settings: im_infra_redis::RedisSettings = im_infra::settings::from_center(&*center, "chat").await?.unwrap();
/// assert_eq!(settings.namespace, "chat");
/// # Ok(()) }
/// # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
/// ```
impl im_infra::settings::Settings for RedisSettings {
    const COMPONENT: &'static str = "redis";
    const EARLIER_NAMES: &'static [(&'static str, &'static str)] =
        &[("response_timeout", "request_timeout")];

    fn validate(&self) -> im_infra::Result<()> {
        RedisSettings::validate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_infra::ErrorKind;

    #[test]
    fn the_earlier_name_of_the_request_timeout_is_read() {
        let s: RedisSettings = serde_json::from_str(r#"{"response_timeout": "750ms"}"#).unwrap();
        assert_eq!(s.request_timeout, Duration::from_millis(750));
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(RedisSettings::default().validate().is_ok());
        let mut c = RedisSettings::new("http://x");
        assert_eq!(c.validate().unwrap_err().kind(), ErrorKind::InvalidConfig);
        c = RedisSettings::default();
        c.namespace = "a:b".into();
        assert!(c.validate().is_err());
        c = RedisSettings::default();
        c.urls.clear();
        assert_eq!(
            c.validate().unwrap_err().kind(),
            ErrorKind::MissingEndpoints
        );
        c = RedisSettings::default();
        c.request_timeout = Duration::ZERO;
        let e = c.validate().unwrap_err();
        assert_eq!(
            (e.kind(), e.backend()),
            (ErrorKind::InvalidConfig, Some("redis"))
        );
        assert_eq!(e.message(), "request_timeout must be positive");
        let bad: std::result::Result<RedisSettings, _> = serde_json::from_str(r#"{"unknown": 1}"#);
        assert!(bad.is_err());
    }

    #[test]
    fn sentinel_settings_are_validated() {
        let sentinel = |sentinels: &[&str], name: Option<&str>| RedisSettings {
            sentinels: sentinels.iter().map(|s| s.to_string()).collect(),
            master_name: name.map(str::to_owned),
            ..RedisSettings::default()
        };
        let ok = sentinel(&["redis://s1:26379", "redis://s2:26379"], Some("mymaster"));
        ok.validate().unwrap();
        assert!(ok.is_sentinel() && !ok.is_cluster());
        assert!(!RedisSettings::default().is_sentinel());
        let fails = |c: RedisSettings, needle: &str| {
            let e = c.validate().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidConfig);
            assert!(e.to_string().contains(needle), "{e} (wanted {needle:?})");
        };
        fails(sentinel(&["redis://s1:26379"], None), "without master_name");
        fails(sentinel(&[], Some("mymaster")), "without sentinels");
        fails(sentinel(&["redis://s1:26379"], Some("")), "master_name");
        fails(
            sentinel(&["redis://s1:26379"], Some("my master")),
            "master_name",
        );
        fails(
            sentinel(&["http://s1:26379"], Some("m")),
            "is not a redis://",
        );
        fails(
            sentinel(&["redis://s1:26379", "rediss://s2:26379"], Some("m")),
            "all be",
        );
        let mut c = ok.clone();
        c.cluster = true;
        fails(c, "cluster");
        let mut c = ok.clone();
        c.urls.push("redis://other:6379".into());
        fails(c, "cluster");
        // Sentinel fields are not written when unused: settings without
        // them serialise as before.
        let json = serde_json::to_value(RedisSettings::default()).unwrap();
        assert!(json.get("sentinels").is_none() && json.get("master_name").is_none());
        let back: RedisSettings =
            serde_json::from_value(serde_json::to_value(&ok).unwrap()).unwrap();
        assert_eq!(back, ok);
        let d = format!(
            "{:?}",
            sentinel(&["redis://u:topsecret@s1:26379"], Some("m"))
        );
        assert!(!d.contains("topsecret"), "{d}");
    }

    #[test]
    fn debug_redacts_passwords() {
        let mut c = RedisSettings::new("redis://u:topsecret@h:1/0");
        c.password = Some(Secret::new("other-secret"));
        let d = format!("{c:?}");
        assert!(
            !d.contains("topsecret") && !d.contains("other-secret"),
            "{d}"
        );
    }
}
