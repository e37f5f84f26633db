//! Settings of the MySQL backend and its `db` pool.

use std::path::PathBuf;
use std::time::Duration;

use im_infra::secret::{redact_url, Secret};
use im_infra::settings::Checks;
use im_infra::{Error, Result, RetrySettings};
use serde::{Deserialize, Serialize};

/// TLS to the server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MysqlTls {
    /// CA certificate (PEM) of the server; the system roots otherwise.
    pub ca_file: Option<PathBuf>,
    /// Accept a certificate for another host name (test setups only).
    pub skip_domain_validation: bool,
    /// Accept any certificate (test setups only).
    pub accept_invalid_certs: bool,
}

/// Settings of the pooled connection ([`Db`](crate::Db)) and of the
/// [`MysqlBackend`](crate::MysqlBackend); deserialises from the config
/// center (`/config/{env}/{service}/db`).
///
/// Either `url` (`mysql://user:password@host:3306/database`) or the fields
/// name the server; the fields override the URL's parts.
///
/// ```
/// let cfg: im_infra_mysql::MysqlSettings = serde_json::from_str(r#"{
///     "url": "mysql://app:s3cret@10.0.0.7:3306/im",
///     "pool_max": 32,
///     "request_timeout": "2s",
///     "table_prefix": "im_"
/// }"#).unwrap();
/// cfg.validate().unwrap();
/// assert!(!format!("{cfg:?}").contains("s3cret"));
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MysqlSettings {
    /// `mysql://user:password@host:port/database`.
    pub url: Option<String>,
    /// Server host (overrides the URL's).
    pub host: Option<String>,
    /// Server port (overrides the URL's).
    pub port: Option<u16>,
    /// User (overrides the URL's).
    pub user: Option<String>,
    /// Password (overrides the URL's). Never printed.
    pub password: Option<Secret>,
    /// Database (overrides the URL's).
    pub database: Option<String>,
    /// Connections kept open.
    pub pool_min: usize,
    /// Most connections open at once.
    pub pool_max: usize,
    /// Bound of establishing a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bound of every query (and of taking a connection from the pool);
    /// `query_timeout` in files is read as this.
    #[serde(with = "humantime_serde", alias = "query_timeout")]
    pub request_timeout: Duration,
    /// The server closes a connection silent this long (the session's
    /// `wait_timeout`, whole seconds, at least 2 s), rolling back what it
    /// left open: a client that froze inside a config write holds the
    /// writers' row lock this long at most, not for the server's default
    /// of hours. The pool closes connections idle half as long, so that it
    /// never hands out one the server closed.
    #[serde(with = "humantime_serde")]
    pub idle_session_timeout: Duration,
    /// TLS, when set.
    pub tls: Option<MysqlTls>,
    /// Prefix of the backend's tables (letters, digits, `_`).
    pub table_prefix: String,
    /// Prefix of every key the backend stores (a namespace inside the tables).
    pub namespace: String,
    /// How often config watches look for changes.
    #[serde(with = "humantime_serde")]
    pub config_poll_interval: Duration,
    /// Backoff of config watches after a failed poll.
    pub retry: RetrySettings,
    /// Config changes kept for watches that resume from an older version.
    pub config_history: u64,
    /// How often expired rows are deleted.
    #[serde(with = "humantime_serde")]
    pub purge_interval: Duration,
    /// Largest cache or config value, in bytes.
    pub max_value_bytes: usize,
    /// While the database is unreachable, how long the limiter decides by
    /// its failure policy before asking again.
    #[serde(with = "humantime_serde")]
    pub limiter_probe_interval: Duration,
}

impl Default for MysqlSettings {
    fn default() -> Self {
        MysqlSettings {
            url: None,
            host: None,
            port: None,
            user: None,
            password: None,
            database: None,
            pool_min: 1,
            pool_max: 16,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(3),
            idle_session_timeout: Duration::from_secs(120),
            tls: None,
            table_prefix: "iminfra_".into(),
            namespace: String::new(),
            config_poll_interval: Duration::from_millis(200),
            retry: RetrySettings::default(),
            config_history: 10_000,
            purge_interval: Duration::from_secs(10),
            max_value_bytes: 4 * 1024 * 1024,
            limiter_probe_interval: Duration::from_secs(1),
        }
    }
}

impl std::fmt::Debug for MysqlSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlSettings")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("database", &self.database)
            .field("pool_min", &self.pool_min)
            .field("pool_max", &self.pool_max)
            .field("request_timeout", &self.request_timeout)
            .field("tls", &self.tls)
            .field("table_prefix", &self.table_prefix)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

const CHECK: Checks = Checks::new(crate::NAME);

fn invalid(msg: impl Into<String>) -> Error {
    CHECK.invalid(msg)
}

impl MysqlSettings {
    /// A configuration for a server URL.
    pub fn new(url: impl Into<String>) -> Self {
        MysqlSettings {
            url: Some(url.into()),
            ..MysqlSettings::default()
        }
    }

    /// Checks the values; `InvalidConfig` names the problem.
    pub fn validate(&self) -> Result<()> {
        if self.url.is_none() && self.host.is_none() {
            return Err(im_infra::settings::missing_endpoints(
                crate::NAME,
                "url and host",
            ));
        }
        if let Some(u) = &self.url {
            mysql_async::Opts::from_url(u)
                .map_err(|e| invalid(format!("{}: {e}", redact_url(u))))?;
        }
        if self.pool_max == 0 || self.pool_min > self.pool_max {
            return Err(invalid("pool_max must be positive and at least pool_min"));
        }
        CHECK.positive("connect_timeout", self.connect_timeout)?;
        CHECK.positive("request_timeout", self.request_timeout)?;
        CHECK.within(
            "idle_session_timeout (seconds)",
            self.idle_session_timeout.as_secs(),
            2..=31_536_000,
        )?;
        let ok_name = |s: &str, max: usize| {
            s.len() <= max && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        if !ok_name(&self.table_prefix, 32) {
            return Err(invalid(
                "table_prefix may only hold up to 32 letters, digits and '_'",
            ));
        }
        if self.namespace.len() > 64 {
            return Err(invalid("namespace is longer than 64 bytes"));
        }
        CHECK.positive("config_poll_interval", self.config_poll_interval)?;
        CHECK.positive("purge_interval", self.purge_interval)?;
        CHECK.positive("limiter_probe_interval", self.limiter_probe_interval)?;
        CHECK.within("config_history", self.config_history, 1..=u64::MAX)?;
        CHECK.within("max_value_bytes", self.max_value_bytes as u64, 1..=u64::MAX)?;
        self.retry.validate()
    }

    /// The `mysql_async` options these settings stand for (what the
    /// backend's pool is built with), for a pool of your own.
    ///
    /// ```
    /// let cfg = im_infra_mysql::MysqlSettings::new("mysql://app:pw@10.0.0.7:3306/im");
    /// let opts = cfg.opts().unwrap();
    /// assert_eq!(opts.db_name(), Some("im"));
    /// assert!(!opts.pool_opts().reset_connection());
    /// ```
    pub fn opts(&self) -> Result<mysql_async::Opts> {
        let mut b = match &self.url {
            Some(u) => mysql_async::OptsBuilder::from_opts(
                mysql_async::Opts::from_url(u)
                    .map_err(|e| invalid(format!("{}: {e}", redact_url(u))))?,
            ),
            None => mysql_async::OptsBuilder::default(),
        };
        if let Some(h) = &self.host {
            b = b.ip_or_hostname(h.clone());
        }
        if let Some(p) = self.port {
            b = b.tcp_port(p);
        }
        if let Some(u) = &self.user {
            b = b.user(Some(u.clone()));
        }
        if let Some(p) = &self.password {
            b = b.pass(Some(p.expose().to_owned()));
        }
        if let Some(d) = &self.database {
            b = b.db_name(Some(d.clone()));
        }
        let constraints = mysql_async::PoolConstraints::new(self.pool_min, self.pool_max)
            .ok_or_else(|| invalid("pool_min must not exceed pool_max"))?;
        // No COM_RESET_CONNECTION when a connection goes back to the pool:
        // the backend leaves no session state behind, and a reset costs a
        // round trip and empties the prepared-statement cache.
        let pool = mysql_async::PoolOpts::default()
            .with_constraints(constraints)
            .with_inactive_connection_ttl(Duration::from_secs(60))
            .with_reset_connection(false);
        b = b
            .pool_opts(pool)
            .prefer_socket(false)
            // Affected rows must count changed rows: the backend's
            // conditional upserts report success through them.
            .client_found_rows(false)
            // Expiry arithmetic on DATETIME columns must not see DST jumps;
            // a silent client's session (and its locks) ends on the server.
            .setup(vec![
                "SET time_zone = '+00:00'".to_owned(),
                format!(
                    "SET SESSION wait_timeout = {}",
                    self.idle_session_timeout.as_secs()
                ),
            ])
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .conn_ttl(Some(self.idle_session_timeout / 2));
        if let Some(tls) = &self.tls {
            let mut ssl = mysql_async::SslOpts::default()
                .with_danger_skip_domain_validation(tls.skip_domain_validation)
                .with_danger_accept_invalid_certs(tls.accept_invalid_certs);
            if let Some(ca) = &tls.ca_file {
                ssl = ssl.with_root_certs(vec![ca.clone().into()]);
            }
            b = b.ssl_opts(Some(ssl));
        }
        Ok(b.into())
    }
}

/// Read from the config center at `/config/{APP_ENV}/{service}/db`
/// with [`im_infra::settings::from_center`]:
///
/// ```
/// # async fn demo() -> im_infra::Result<()> {
/// use im_infra::backend::Backend;
/// use im_infra::config::ConfigCenterExt;
///
/// let center = im_infra_memory::MemoryBackend::new().config().await?;
/// let path = im_infra::config::config_path("im-logic", "db")?;
/// center.set_json(&path, &serde_json::json!({ "url": "mysql://app:pw@db:3306/im", "pool_max": 8 })).await?;
/// let settings: im_infra_mysql::MysqlSettings = im_infra::settings::from_center(&*center, "im-logic").await?.unwrap();
/// assert_eq!(settings.pool_max, 8);
/// # Ok(()) }
/// # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
/// ```
impl im_infra::settings::Settings for MysqlSettings {
    const COMPONENT: &'static str = "db";
    const EARLIER_NAMES: &'static [(&'static str, &'static str)] =
        &[("query_timeout", "request_timeout")];

    fn validate(&self) -> Result<()> {
        MysqlSettings::validate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_infra::ErrorKind;

    #[test]
    fn the_earlier_name_of_the_request_timeout_is_read() {
        let s: MysqlSettings = serde_json::from_str(r#"{"query_timeout": "750ms"}"#).unwrap();
        assert_eq!(s.request_timeout, Duration::from_millis(750));
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(MysqlSettings::new("mysql://u:p@h:3306/db")
            .validate()
            .is_ok());
        assert_eq!(
            MysqlSettings::default().validate().unwrap_err().kind(),
            ErrorKind::MissingEndpoints
        );
        assert!(MysqlSettings::new("not a url").validate().is_err());
        let c = MysqlSettings {
            table_prefix: "bad-prefix;".into(),
            ..MysqlSettings::new("mysql://h/db")
        };
        assert!(c.validate().is_err());
        let c = MysqlSettings {
            pool_min: 5,
            pool_max: 2,
            ..MysqlSettings::new("mysql://h/db")
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn fields_override_the_url() {
        let c = MysqlSettings {
            port: Some(3307),
            password: Some(Secret::new("other")),
            ..MysqlSettings::new("mysql://u:p@h:3306/db")
        };
        let o = c.opts().unwrap();
        assert_eq!(o.tcp_port(), 3307);
        assert_eq!(o.pass(), Some("other"));
        assert_eq!(o.db_name(), Some("db"));
    }
}
