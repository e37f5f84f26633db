//! The connection to the primary that Redis Sentinel names, followed
//! across failovers.
//!
//! The sentinels are asked for the primary of `master_name` (the `redis`
//! crate's [`SentinelClient`]: `SENTINEL MASTERS` on each sentinel, a
//! primary flagged down is skipped, and `ROLE` on the named node must say
//! it is a primary), and one multiplexed connection to it is opened. A
//! command that finds the primary gone (connection refused or dropped, an
//! I/O error, no answer within the request timeout) or demoted (`READONLY`,
//! `MASTERDOWN`, `NOREPLICAS`) drops that connection and fails with that
//! error; the next command asks the sentinels again. During a failover the
//! sentinels name no usable primary for a while: commands fail retryably
//! (`Unavailable`, `Connection`, `Timeout`) until they do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Cmd, ConnectionAddr, ErrorKind as RK, IntoConnectionInfo, Pipeline, RedisError, RedisResult,
    ServerErrorKind as SK, TlsCertificates, TlsMode, Value,
};

use crate::settings::RedisSettings;

/// The primary in use: its client (for dedicated and pub/sub connections)
/// and the shared multiplexed connection.
pub(crate) struct Primary {
    pub(crate) client: redis::Client,
    conn: MultiplexedConnection,
    addr: String,
}

/// The sentinels, and the primary they named last.
pub(crate) struct SentinelConn {
    master_name: String,
    sentinel: tokio::sync::Mutex<SentinelClient>,
    current: ArcSwapOption<Primary>,
    /// When the last lookup failed, and why: for `pause` after it, callers
    /// get its error instead of asking the sentinels again (also those
    /// that waited for it).
    last_failure: ArcSwapOption<(Instant, RedisError)>,
    pause: Duration,
    connection: redis::AsyncConnectionConfig,
    /// Bound of one lookup (asking the sentinels, checking the role of the
    /// node they name, connecting to it): a node that vanished does not
    /// answer a connection attempt at all.
    bound: Duration,
    db: i64,
}

fn invalid(msg: &'static str) -> RedisError {
    RedisError::from((RK::InvalidClientConfig, msg))
}

/// Whether `e` means the connection's node is gone or no longer the
/// primary, so that the sentinels must be asked again.
fn primary_lost(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || matches!(e.kind(), RK::Server(SK::ReadOnly | SK::MasterDown))
        || e.code() == Some("NOREPLICAS")
}

impl SentinelConn {
    /// Builds the sentinel client from `cfg` (which `validate` accepted)
    /// and connects to the primary the sentinels name.
    pub(crate) async fn connect(
        cfg: &RedisSettings,
        certs: Option<TlsCertificates>,
    ) -> RedisResult<SentinelConn> {
        let master_name = cfg
            .master_name
            .clone()
            .ok_or_else(|| invalid("master_name is not set"))?;
        let mut sentinels = Vec::with_capacity(cfg.sentinels.len());
        let mut credentials = None;
        for url in &cfg.sentinels {
            let info = url.as_str().into_connection_info()?;
            let settings = info.redis_settings();
            if credentials.is_none()
                && (settings.username().is_some() || settings.password().is_some())
            {
                credentials = Some((
                    settings.username().map(str::to_owned),
                    settings.password().map(str::to_owned),
                ));
            }
            sentinels.push(info.addr().clone());
        }
        let sentinels_tls = sentinels
            .iter()
            .any(|a| matches!(a, ConnectionAddr::TcpTls { .. }));
        // The primary: database, credentials and scheme of the first URL.
        let primary = cfg
            .urls
            .first()
            .ok_or_else(|| invalid("no URL for the primary's database and credentials"))?
            .as_str()
            .into_connection_info()?;
        let primary_settings = primary.redis_settings();
        let db = primary_settings.db();
        let mut b =
            SentinelClientBuilder::new(sentinels, master_name.clone(), SentinelServerType::Master)?
                .set_client_to_redis_db(db);
        if let ConnectionAddr::TcpTls { insecure, .. } = primary.addr() {
            b = b.set_client_to_redis_tls_mode(if *insecure {
                TlsMode::Insecure
            } else {
                TlsMode::Secure
            });
            if let Some(certs) = &certs {
                b = b.set_client_to_redis_certificates(certs.clone());
            }
        }
        let username = cfg
            .username
            .clone()
            .or_else(|| primary_settings.username().map(str::to_owned));
        let password = cfg
            .password
            .as_ref()
            .map(|p| p.expose().to_owned())
            .or_else(|| primary_settings.password().map(str::to_owned));
        if let Some(u) = username {
            b = b.set_client_to_redis_username(u);
        }
        if let Some(p) = password {
            b = b.set_client_to_redis_password(p);
        }
        if let Some((u, p)) = credentials {
            if let Some(u) = u {
                b = b.set_client_to_sentinel_username(u);
            }
            if let Some(p) = p {
                b = b.set_client_to_sentinel_password(p);
            }
        }
        if sentinels_tls {
            if let Some(certs) = certs {
                b = b.set_client_to_sentinel_certificates(certs);
            }
        }
        let this = SentinelConn {
            master_name,
            sentinel: tokio::sync::Mutex::new(b.build()?),
            current: ArcSwapOption::empty(),
            last_failure: ArcSwapOption::empty(),
            pause: cfg.retry.initial_interval,
            connection: redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(cfg.connect_timeout))
                .set_response_timeout(Some(cfg.request_timeout)),
            bound: cfg.connect_timeout,
            db,
        };
        this.primary().await?;
        Ok(this)
    }

    pub(crate) fn db(&self) -> i64 {
        self.db
    }

    /// The primary in use, asking the sentinels for it if there is none
    /// (one lookup at a time, within the connect timeout; not again within
    /// `retry.initial_interval` of a failed one).
    pub(crate) async fn primary(&self) -> RedisResult<Arc<Primary>> {
        if let Some(p) = self.current.load_full() {
            return Ok(p);
        }
        self.recent_failure()?;
        let mut sentinel = self.sentinel.lock().await;
        if let Some(p) = self.current.load_full() {
            return Ok(p);
        }
        self.recent_failure()?;
        let found = tokio::time::timeout(self.bound, self.resolve(&mut sentinel)).await;
        let found = found.unwrap_or_else(|_| {
            Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the sentinels named no reachable primary of {:?} within {:?}",
                    self.master_name, self.bound
                ),
            )))
        });
        match found {
            Ok(p) => {
                let primary = Arc::new(p);
                self.current.store(Some(primary.clone()));
                self.last_failure.store(None);
                Ok(primary)
            }
            Err(e) => {
                self.last_failure
                    .store(Some(Arc::new((Instant::now(), e.clone()))));
                Err(e)
            }
        }
    }

    /// The error of a lookup that failed less than `pause` ago.
    fn recent_failure(&self) -> RedisResult<()> {
        match self.last_failure.load().as_deref() {
            Some((at, e)) if at.elapsed() < self.pause => Err(e.clone()),
            _ => Ok(()),
        }
    }

    async fn resolve(&self, sentinel: &mut SentinelClient) -> RedisResult<Primary> {
        let client = sentinel.async_get_client().await?;
        let addr = client.get_connection_info().addr().to_string();
        let conn = client
            .get_multiplexed_async_connection_with_config(&self.connection)
            .await?;
        tracing::info!(master = %self.master_name, primary = %addr, "redis sentinel: connected to the primary");
        Ok(Primary { client, conn, addr })
    }

    /// Forgets the primary in use (its node said it is one no longer): the
    /// next command asks the sentinels again.
    #[cfg(feature = "near-cache")]
    pub(crate) fn forget_primary(&self) {
        if let Some(p) = self.current.swap(None) {
            tracing::warn!(master = %self.master_name, primary = %p.addr, "redis sentinel: the primary in use says it is a replica; asking the sentinels again");
        }
    }

    /// Forgets `used` (if it is still the primary in use) after `e`, when
    /// `e` shows it is gone or demoted.
    fn after_error(&self, used: &Arc<Primary>, e: &RedisError) {
        if !primary_lost(e) {
            return;
        }
        let mut forgot = false;
        self.current.rcu(|cur| {
            forgot = cur.as_ref().is_some_and(|p| Arc::ptr_eq(p, used));
            if forgot {
                None
            } else {
                cur.clone()
            }
        });
        if forgot {
            tracing::warn!(master = %self.master_name, primary = %used.addr, error = %e, "redis sentinel: the primary failed; asking the sentinels again");
        }
    }

    /// Forgets `used` after an error reply in `value` that shows it gone or
    /// demoted. The connection hands server errors (`READONLY`,
    /// `MASTERDOWN`, ...) back as values; they become errors only later,
    /// where the reply is read.
    fn after_reply(&self, used: &Arc<Primary>, value: &Value) {
        if let Value::ServerError(se) = value {
            self.after_error(used, &RedisError::from(se.clone()));
        }
    }

    pub(crate) async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let primary = self.primary().await?;
        let mut conn = primary.conn.clone();
        let r = conn.req_packed_command(cmd).await;
        match &r {
            Ok(value) => self.after_reply(&primary, value),
            Err(e) => self.after_error(&primary, e),
        }
        r
    }

    pub(crate) async fn commands(
        &self,
        cmd: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let primary = self.primary().await?;
        let mut conn = primary.conn.clone();
        let r = conn.req_packed_commands(cmd, offset, count).await;
        match &r {
            Ok(values) => {
                for value in values {
                    self.after_reply(&primary, value);
                }
            }
            Err(e) => self.after_error(&primary, e),
        }
        r
    }
}
