//! The connection to etcd: connect, check, reconnect, status — and a
//! deadline and error mapping around every request.

use std::future::Future;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use etcd_client::{Client, ConnectOptions, GetOptions};
use im_infra::backend::Shutdown;
use im_infra::telemetry::OpMetrics;
use im_infra::{Error, ErrorKind, Result};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::error::from_etcd;
use crate::settings::EtcdSettings;

/// The state of the connection, as last observed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConnectionStatus {
    /// Whether the last check (or request) reached etcd.
    pub connected: bool,
    /// The endpoint of the member that answered the last check (one of the
    /// configured endpoints when it advertises it, else the first client
    /// URL it advertises); before any answer, the configured endpoints
    /// joined by commas.
    pub endpoint: String,
    /// When etcd last answered a health check.
    pub last_ping: Option<SystemTime>,
    /// The last connection error, if the last check failed.
    pub error: Option<String>,
}

/// Owns the etcd client of a backend: connecting, checking, reconnecting.
///
/// The underlying gRPC channel reconnects by itself when a member comes
/// back; [`reconnect`](Self::reconnect) builds a new client explicitly (for
/// changed credentials, or a stuck channel).
///
/// [`connect`](Self::connect), [`disconnect`](Self::disconnect),
/// [`reconnect`](Self::reconnect) and [`health_check`](Self::health_check)
/// are operations (`connection.connect`, ...: one span, counted in
/// `im_infra_ops_total{backend="etcd",capability="connection"}`); the
/// background health checker's own checks are not counted.
pub struct ConnectionManager {
    settings: EtcdSettings,
    client: ArcSwapOption<Client>,
    status: Mutex<ConnectionStatus>,
    /// Member id → the endpoint to report for it (see [`ConnectionStatus::endpoint`]).
    members: Mutex<std::collections::HashMap<u64, String>>,
    /// Closed on close: stops keep-alives, watches and the health checker.
    shutdown: Shutdown,
    ops: ConnectionOps,
    /// Calls whose next answer is lost after etcd applied them (fault
    /// injection for tests).
    #[cfg(feature = "testing")]
    lose_answers: Mutex<Vec<&'static str>>,
}

struct ConnectionOps {
    connect: OpMetrics,
    disconnect: OpMetrics,
    reconnect: OpMetrics,
    health_check: OpMetrics,
}

impl std::fmt::Debug for ConnectionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionManager")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl ConnectionManager {
    pub(crate) fn new(settings: EtcdSettings) -> Self {
        let endpoint = settings.endpoints.join(",");
        let m = |op| OpMetrics::new(crate::NAME, "connection", op);
        ConnectionManager {
            settings,
            client: ArcSwapOption::empty(),
            status: Mutex::new(ConnectionStatus {
                endpoint,
                ..ConnectionStatus::default()
            }),
            members: Mutex::new(std::collections::HashMap::new()),
            shutdown: Shutdown::new(crate::NAME),
            ops: ConnectionOps {
                connect: m("connection.connect"),
                disconnect: m("connection.disconnect"),
                reconnect: m("connection.reconnect"),
                health_check: m("connection.health_check"),
            },
            #[cfg(feature = "testing")]
            lose_answers: Mutex::new(Vec::new()),
        }
    }

    /// The next call named `what` (its metric name, such as
    /// `"lock.refresh"`) is applied by etcd and then fails with `Timeout`,
    /// as when its answer is lost (feature `testing`).
    #[cfg(feature = "testing")]
    pub fn lose_next_answer(&self, what: &'static str) {
        self.lose_answers.lock().push(what);
    }

    fn status_mut(&self) -> MutexGuard<'_, ConnectionStatus> {
        self.status.lock()
    }

    pub(crate) fn settings(&self) -> &EtcdSettings {
        &self.settings
    }

    fn options(&self) -> Result<ConnectOptions> {
        let mut o = ConnectOptions::new()
            .with_connect_timeout(self.settings.connect_timeout)
            .with_timeout(self.settings.request_timeout)
            .with_keep_alive(Duration::from_secs(10), self.settings.health_check_timeout)
            .with_keep_alive_while_idle(true);
        if let (Some(u), Some(p)) = (&self.settings.username, &self.settings.password) {
            o = o.with_user(u.clone(), p.expose().to_owned());
        }
        if let Some(tls) = &self.settings.tls {
            let mut t = etcd_client::TlsOptions::new();
            if let Some(ca) = &tls.ca_file {
                let pem = std::fs::read(ca).map_err(|e| {
                    Error::new(
                        ErrorKind::InvalidConfig,
                        format!("cannot read {}: {e}", ca.display()),
                    )
                })?;
                t = t.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                let read = |p: &std::path::Path| {
                    std::fs::read(p).map_err(|e| {
                        Error::new(
                            ErrorKind::InvalidConfig,
                            format!("cannot read {}: {e}", p.display()),
                        )
                    })
                };
                t = t.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            if let Some(name) = &tls.server_name {
                t = t.domain_name(name.clone());
            }
            o = o.with_tls(t);
        }
        Ok(o)
    }

    /// Connects (replacing any previous client) and checks that etcd
    /// answers. Building the client is bounded by the connect timeout; the
    /// first check (each bounded by the health-check timeout) is tried
    /// again on a retryable failure, such as a configured member that is
    /// down, until the connect timeout has passed once more, so a connect
    /// takes at most twice the connect timeout plus one health-check timeout.
    pub async fn connect(&self) -> Result<()> {
        self.ops.connect.run(self.connect_raw()).await
    }

    async fn connect_raw(&self) -> Result<()> {
        self.shutdown.check_open()?;
        let options = self.options()?;
        let connect = Client::connect(self.settings.endpoints.clone(), Some(options));
        let client = match tokio::time::timeout(self.settings.connect_timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(self.failed(from_etcd(e))),
            Err(_) => {
                return Err(self.failed(self.timeout("connect", self.settings.connect_timeout)))
            }
        };
        self.client.store(Some(Arc::new(client)));
        // The first requests may go to a configured member that is down
        // before the channel has learnt it is: a retryable failure is tried
        // again (on the next member) until the connect timeout.
        let deadline = tokio::time::Instant::now() + self.settings.connect_timeout;
        loop {
            match self.check().await {
                Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                res => return res,
            }
        }
    }

    /// Drops the client; requests fail with `Closed` until `connect`.
    pub fn disconnect(&self) {
        let _ = self.ops.disconnect.run_sync(|| {
            self.drop_client();
            Ok(())
        });
    }

    fn drop_client(&self) {
        self.client.store(None);
        let mut s = self.status_mut();
        s.connected = false;
    }

    /// Whether the last check or request reached etcd.
    pub fn is_connected(&self) -> bool {
        self.status_mut().connected && self.client.load().is_some()
    }

    /// A linearizable read (needs a leader), bounded by the health-check
    /// timeout; updates the status.
    pub async fn health_check(&self) -> Result<()> {
        self.ops.health_check.run(self.check()).await
    }

    /// [`health_check`](Self::health_check) outside any operation: for the
    /// background checker, connecting, and the backend's own health check.
    pub(crate) async fn check(&self) -> Result<()> {
        let key = format!("{}/im-infra/health", self.settings.namespace);
        let timeout = self.settings.health_check_timeout;
        let res = self
            .call_with(timeout, "health_check", |mut c| async move {
                c.get(key, Some(GetOptions::new().with_count_only())).await
            })
            .await;
        let member = match &res {
            Ok(r) => match r.header().map(|h| h.member_id()) {
                Some(id) => self.endpoint_of(id).await,
                None => None,
            },
            Err(_) => None,
        };
        match &res {
            Ok(_) => {
                let mut s = self.status_mut();
                if let Some(endpoint) = member {
                    s.endpoint = endpoint;
                }
                s.connected = true;
                s.last_ping = Some(SystemTime::now());
                s.error = None;
            }
            Err(e) => {
                let mut s = self.status_mut();
                s.connected = false;
                s.error = Some(e.to_string());
            }
        }
        res.map(drop)
    }

    /// The endpoint to report for member `id`: looked up in the member list
    /// (read again when `id` is new to it).
    async fn endpoint_of(&self, id: u64) -> Option<String> {
        if let Some(e) = self.members.lock().get(&id) {
            return Some(e.clone());
        }
        let timeout = self.settings.health_check_timeout;
        let list = self
            .call_with(timeout, "member_list", |mut c| async move {
                c.member_list().await
            })
            .await
            .ok()?;
        let mut members = self.members.lock();
        members.clear();
        for m in list.members() {
            let urls = m.client_urls();
            let configured = urls.iter().find(|u| self.settings.endpoints.contains(u));
            if let Some(url) = configured.or_else(|| urls.first()) {
                members.insert(m.id(), url.clone());
            }
        }
        members.get(&id).cloned()
    }

    /// Builds a new client and checks it.
    pub async fn reconnect(&self) -> Result<()> {
        self.ops
            .reconnect
            .run(async {
                self.drop_client();
                self.connect_raw().await
            })
            .await
    }

    /// The connection status.
    pub fn status(&self) -> ConnectionStatus {
        self.status_mut().clone()
    }

    /// The raw `etcd-client` client (for operations this crate does not wrap).
    pub fn client(&self) -> Result<Client> {
        self.shutdown.check_open()?;
        self.client.load().as_deref().cloned().ok_or_else(|| {
            Error::new(ErrorKind::Closed, "not connected to etcd").with_backend(crate::NAME)
        })
    }

    /// Closes the connection for good: watches, keep-alives and the
    /// health checker stop, and every request fails with `Closed` from now
    /// on (`connect` too). [`Backend::close`](im_infra::backend::Backend::close)
    /// of the backend does this after closing what it handed out
    /// (deregistering instances); closing only the connection leaves
    /// registrations to expire on etcd. Idempotent.
    pub fn close(&self) {
        self.shutdown.close();
        self.drop_client();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.shutdown.is_closed()
    }

    /// Cancelled on close: keep-alives, watches and the health checker
    /// stop on it.
    pub(crate) fn stop(&self) -> &CancellationToken {
        self.shutdown.token()
    }

    fn timeout(&self, what: &str, d: Duration) -> Error {
        Error::new(
            ErrorKind::Timeout,
            format!("etcd {what} did not finish within {d:?}"),
        )
        .with_backend(crate::NAME)
    }

    fn failed(&self, e: Error) -> Error {
        if e.is_connection() || e.is_timeout() {
            let mut s = self.status_mut();
            s.connected = false;
            s.error = Some(e.to_string());
        }
        e
    }

    /// Runs one request. The client bounds every request by the request
    /// timeout (set on its channel, so no second timer runs here); failures
    /// come back as they are, retryable ones marked so: the caller decides
    /// whether to retry, e.g. with [`RetrySettings::retry`](im_infra::RetrySettings::retry).
    pub(crate) async fn call<T, F, Fut>(&self, what: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let client = self.client()?;
        let answer = f(client).await.map_err(|e| self.failed(from_etcd(e)));
        #[cfg(feature = "testing")]
        if answer.is_ok() {
            let mut lose = self.lose_answers.lock();
            if let Some(at) = lose.iter().position(|w| *w == what) {
                lose.remove(at);
                return Err(self.timeout(what, self.settings.request_timeout));
            }
        }
        #[cfg(not(feature = "testing"))]
        let _ = what;
        answer
    }

    async fn call_with<T, F, Fut>(&self, timeout: Duration, what: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let client = self.client()?;
        match tokio::time::timeout(timeout, f(client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.failed(from_etcd(e))),
            Err(_) => Err(self.failed(self.timeout(what, timeout))),
        }
    }

    /// Checks the connection every `health_check_interval` until close.
    pub(crate) async fn health_loop(this: std::sync::Weak<ConnectionManager>) {
        loop {
            let Some(me) = this.upgrade() else { return };
            let (interval, stop) = (me.settings.health_check_interval, me.stop().clone());
            if let Err(e) = me.check().await {
                tracing::warn!(error = %e, "etcd health check failed");
            }
            drop(me);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
