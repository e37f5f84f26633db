//! Leases: the lease manager of the original system, and the background
//! keep-alive every lease-backed capability uses.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{LeaseKeepAliveStream, LeaseKeeper, LeaseTimeToLiveOptions};
use im_infra::backend::{Closable, HandedOut};
use im_infra::lease::{Lease, LeaseBackend, LeaseOptions, Tick};
use im_infra::telemetry::OpMetrics;
use im_infra::{Error, ErrorKind, Result};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::connection::ConnectionManager;
use crate::error::from_etcd;

/// etcd grants whole seconds and enforces a minimum (1.5 s with default
/// settings, rounded up): shorter TTLs become this.
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// Whole seconds for a TTL, rounded up, at least [`MIN_TTL`].
pub(crate) fn lease_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    secs.max(MIN_TTL.as_secs()) as i64
}

/// What etcd knows of a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseInfo {
    /// The lease id.
    pub id: i64,
    /// Remaining TTL.
    pub ttl: Duration,
    /// TTL the lease was granted with.
    pub granted_ttl: Duration,
    /// Keys attached to the lease.
    pub keys: Vec<String>,
}

/// Creates, keeps alive, inspects and revokes leases. Each method is one
/// operation (`lease.create`, `lease.keep_alive`, ...: one span, counted in
/// `im_infra_ops_total{backend="etcd",capability="lease"}`).
///
/// ```no_run
/// # async fn demo(backend: im_infra_etcd::EtcdBackend) -> im_infra::Result<()> {
/// use std::time::Duration;
/// let leases = backend.leases();
/// let id = leases.create(Duration::from_secs(60)).await?;
/// let kept = leases.keep_alive(id).await?; // renewed until dropped
/// println!("{:?}", leases.info(id).await?);
/// drop(kept);
/// leases.revoke(id).await
/// # }
/// ```
#[derive(Clone)]
pub struct LeaseManager {
    conn: Arc<ConnectionManager>,
    /// Where keep-alives are tracked, to stop with the backend.
    handed_out: Arc<HandedOut>,
    ops: Arc<LeaseOps>,
}

struct LeaseOps {
    create: OpMetrics,
    keep_alive: OpMetrics,
    revoke: OpMetrics,
    info: OpMetrics,
    list: OpMetrics,
    refresh: OpMetrics,
}

pub(crate) fn lost(id: i64) -> Error {
    Error::new(
        ErrorKind::LeaseLost,
        format!("lease {id:x} expired or was revoked"),
    )
    .with_backend(crate::NAME)
}

/// What a public lease operation reports for a lease named by its id that
/// etcd does not know: `LeaseNotFound` (code 5002), whether it was never
/// granted, expired or was revoked. The backend's own leases, which it held,
/// report `LeaseLost` instead.
pub(crate) fn not_found(e: Error, id: i64) -> Error {
    if e.kind() == ErrorKind::LeaseLost {
        Error::new(
            ErrorKind::LeaseNotFound,
            format!("lease {id:x} not found: never granted, expired or revoked"),
        )
        .with_backend(crate::NAME)
    } else {
        e
    }
}

/// What `create` reports when the grant failed: a refusal by the server is
/// `LeaseNotCreated` (code 5001, with etcd's answer as the source); a grant
/// that could not be asked for (connection, timeout, closed), one refused
/// for overload ("too many requests": retryable) and bad input keep their
/// kinds.
fn not_created(e: Error) -> Error {
    match e.kind() {
        ErrorKind::Connection
        | ErrorKind::Unavailable
        | ErrorKind::Timeout
        | ErrorKind::Closed
        | ErrorKind::ResourceExhausted
        | ErrorKind::InvalidArgument => e,
        _ => Error::new(
            ErrorKind::LeaseNotCreated,
            "etcd refused to grant the lease",
        )
        .with_backend(crate::NAME)
        .with_source(e),
    }
}

/// Revokes the lease (its keys are deleted); `LeaseLost` when it is gone.
/// The backend's own revocations take this path, outside any `lease.*`
/// operation.
pub(crate) async fn revoke(conn: &ConnectionManager, id: i64) -> Result<()> {
    conn.call(
        "lease.revoke",
        |mut c| async move { c.lease_revoke(id).await },
    )
    .await
    .map(drop)
    .map_err(|e| {
        if e.kind() == ErrorKind::LeaseLost {
            lost(id)
        } else {
            e
        }
    })
}

/// What etcd knows of the lease; `LeaseLost` when it is gone.
pub(crate) async fn info(conn: &ConnectionManager, id: i64) -> Result<LeaseInfo> {
    let r = conn
        .call("lease.time_to_live", |mut c| async move {
            c.lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
                .await
        })
        .await?;
    if r.ttl() < 0 {
        return Err(lost(id));
    }
    Ok(LeaseInfo {
        id,
        ttl: Duration::from_secs(r.ttl() as u64),
        granted_ttl: Duration::from_secs(r.granted_ttl().max(0) as u64),
        keys: r
            .keys()
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect(),
    })
}

impl LeaseManager {
    pub(crate) fn new(conn: Arc<ConnectionManager>, handed_out: Arc<HandedOut>) -> Self {
        let m = |op| OpMetrics::new(crate::NAME, "lease", op);
        LeaseManager {
            conn,
            handed_out,
            ops: Arc::new(LeaseOps {
                create: m("lease.create"),
                keep_alive: m("lease.keep_alive"),
                revoke: m("lease.revoke"),
                info: m("lease.info"),
                list: m("lease.list"),
                refresh: m("lease.refresh"),
            }),
        }
    }

    /// Grants a lease of `ttl` (whole seconds, at least [`MIN_TTL`]).
    /// `LeaseNotCreated` (code 5001) when etcd refuses; connection failures
    /// and timeouts keep their (retryable) kinds.
    pub async fn create(&self, ttl: Duration) -> Result<i64> {
        self.ops
            .create
            .run(async {
                im_infra::validate::ttl(ttl)?;
                let secs = lease_secs(ttl);
                let r = self
                    .conn
                    .call("lease.grant", |mut c| async move {
                        c.lease_grant(secs, None).await
                    })
                    .await
                    .map_err(not_created)?;
                Ok(r.id())
            })
            .await
    }

    /// Renews the lease in the background until the returned handle is
    /// dropped or the backend closes; the handle's `lost` token fires if
    /// the lease is lost (or the renewals stop). `LeaseNotFound` (code 5002)
    /// for a lease etcd does not know.
    pub async fn keep_alive(&self, id: i64) -> Result<KeepAlive> {
        self.ops
            .keep_alive
            .run(async {
                let sent = Tick::now();
                let info = info(&self.conn, id).await.map_err(|e| not_found(e, id))?;
                // Until the first renewal, the deadline counts from what etcd
                // reported as left (whole seconds, rounded down).
                // The caller's lease: a failure or a dropped call stops
                // keeping it (`Kept` detaches on drop), never revokes it.
                let kept = Arc::new(Kept(Mutex::new(Some(Lease::start(
                    EtcdLease::new(self.conn.clone(), id),
                    LeaseOptions::new(info.ttl.max(Duration::from_millis(1)))
                        .labels(crate::NAME, "lease"),
                    sent,
                )))));
                let lost = kept.lost();
                // Renew at once: from then on a full TTL, renewed every third of it.
                if let Err(e) = kept
                    .refresh(info.granted_ttl.max(Duration::from_secs(1)))
                    .await
                {
                    tracing::debug!(lease = format!("{id:x}"), error = %e, "first keep-alive failed; the keeper retries");
                }
                self.handed_out.track(&kept).map_err(|e| e.with_backend(crate::NAME))?;
                Ok(KeepAlive { id, lost, kept })
            })
            .await
    }

    /// Revokes the lease (its keys are deleted). `LeaseNotFound`
    /// (code 5002) for a lease etcd does not know.
    pub async fn revoke(&self, id: i64) -> Result<()> {
        self.ops
            .revoke
            .run(async { revoke(&self.conn, id).await.map_err(|e| not_found(e, id)) })
            .await
    }

    /// What etcd knows of the lease. `LeaseNotFound` (code 5002) for a lease
    /// etcd does not know.
    pub async fn info(&self, id: i64) -> Result<LeaseInfo> {
        self.ops
            .info
            .run(async { info(&self.conn, id).await.map_err(|e| not_found(e, id)) })
            .await
    }

    /// Ids of every lease of the cluster.
    pub async fn list(&self) -> Result<Vec<i64>> {
        self.ops
            .list
            .run(async {
                let r = self
                    .conn
                    .call("lease.leases", |mut c| async move { c.leases().await })
                    .await?;
                Ok(r.leases().iter().map(|l| l.id()).collect())
            })
            .await
    }

    /// Renews the lease once; returns its TTL afterwards. `LeaseNotFound`
    /// (code 5002) for a lease etcd does not know.
    pub async fn refresh(&self, id: i64) -> Result<Duration> {
        self.ops
            .refresh
            .run(async {
                let ttl = self
                    .conn
                    .call("lease.keep_alive", |mut c| async move {
                        let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
                        keeper.keep_alive().await?;
                        Ok(stream.message().await?.map_or(0, |r| r.ttl()))
                    })
                    .await
                    .map_err(|e| not_found(e, id))?;
                if ttl <= 0 {
                    return Err(not_found(lost(id), id));
                }
                Ok(Duration::from_secs(ttl as u64))
            })
            .await
    }
}

/// The renewals behind a [`KeepAlive`], stopped by the handle or by the
/// backend's close (the lease then expires on etcd after its TTL).
/// The lease core keeping a caller's lease; stopping or dropping it stops
/// the renewals and never revokes the lease.
struct Kept(Mutex<Option<Lease>>);

impl Drop for Kept {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Kept {
    fn stop(&self) {
        let lease = self.0.lock().take();
        if let Some(lease) = lease {
            lease.detach();
        }
    }

    fn lost(&self) -> CancellationToken {
        self.0
            .lock()
            .as_ref()
            .map_or_else(CancellationToken::new, Lease::lost)
    }

    /// The first renewal (the lease is taken out of the mutex for it and put
    /// back; dropped mid-call it is detached, as on any drop of `Kept`).
    async fn refresh(&self, ttl: Duration) -> Result<bool> {
        struct Back<'a>(&'a Kept, Option<Lease>);
        impl Drop for Back<'_> {
            fn drop(&mut self) {
                if let Some(lease) = self.1.take() {
                    *self.0 .0.lock() = Some(lease);
                }
            }
        }
        let Some(lease) = self.0.lock().take() else {
            return Ok(false);
        };
        let back = Back(self, Some(lease));
        match &back.1 {
            Some(lease) => lease.refresh(ttl).await,
            None => Ok(false),
        }
    }

    fn is_held(&self) -> bool {
        self.0.lock().as_ref().is_some_and(Lease::is_held)
    }
}

#[async_trait]
impl Closable for Kept {
    async fn close(&self) -> Result<()> {
        self.stop();
        Ok(())
    }
}

/// A lease renewed in the background by the lease core
/// ([`im_infra::lease::Lease`]): every third of its TTL, with a local
/// deadline, and [`lost`](KeepAlive::lost) fired when etcd reports the lease
/// gone or the deadline passes without a successful renewal. Dropping it,
/// or closing the backend, stops the renewals (the lease then expires after
/// its TTL unless revoked).
pub struct KeepAlive {
    id: i64,
    lost: CancellationToken,
    kept: Arc<Kept>,
}

impl std::fmt::Debug for KeepAlive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeepAlive")
            .field("id", &format_args!("{:x}", self.id))
            .field("held", &self.is_held())
            .finish()
    }
}

impl KeepAlive {
    /// The lease id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Cancelled when the lease is found expired or revoked, cannot be
    /// renewed before its local deadline, or the renewals stop (the handle
    /// stopped, the backend closed).
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Whether the lease is held (before its local deadline, not lost).
    pub fn is_held(&self) -> bool {
        self.kept.is_held()
    }

    /// Stops renewing (the lease expires on etcd after its TTL).
    pub fn stop(&mut self) {
        self.kept.stop();
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One etcd lease as the lease core sees it: extended by keep-alive
/// requests on a stream opened once (and again after a failure), released
/// by revoking it.
pub(crate) struct EtcdLease {
    conn: Arc<ConnectionManager>,
    id: AtomicI64,
    stream: tokio::sync::Mutex<Option<(LeaseKeeper, LeaseKeepAliveStream)>>,
}

impl EtcdLease {
    pub(crate) fn new(conn: Arc<ConnectionManager>, id: i64) -> Self {
        EtcdLease {
            conn,
            id: AtomicI64::new(id),
            stream: tokio::sync::Mutex::new(None),
        }
    }

    /// Grants a lease of `ttl` (whole seconds, at least [`MIN_TTL`]);
    /// returns it and the TTL etcd granted.
    pub(crate) async fn grant(
        conn: &Arc<ConnectionManager>,
        what: &'static str,
        ttl: Duration,
    ) -> Result<(EtcdLease, Duration)> {
        let secs = lease_secs(ttl);
        let grant = conn
            .call(what, |mut c| async move { c.lease_grant(secs, None).await })
            .await?;
        let granted = Duration::from_secs(grant.ttl().max(1) as u64);
        Ok((EtcdLease::new(conn.clone(), grant.id()), granted))
    }

    pub(crate) fn id(&self) -> i64 {
        self.id.load(Ordering::Acquire)
    }

    pub(crate) fn conn(&self) -> &Arc<ConnectionManager> {
        &self.conn
    }

    /// Moves to another lease id (the stream is reopened for it); returns
    /// the old id.
    pub(crate) async fn replace(&self, id: i64) -> i64 {
        let mut stream = self.stream.lock().await;
        *stream = None;
        self.id.swap(id, Ordering::AcqRel)
    }

    /// Moves from lease `from` to `to`, only if it is still on `from`;
    /// whether it moved.
    pub(crate) async fn adopt(&self, from: i64, to: i64) -> bool {
        let mut stream = self.stream.lock().await;
        let moved = self
            .id
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if moved {
            *stream = None;
        }
        moved
    }

    /// One keep-alive round trip, bounded by the request timeout. `Ok(true)`
    /// while the lease lives, `Ok(false)` once etcd reports it gone.
    pub(crate) async fn keep_alive(&self) -> Result<bool> {
        let mut slot = self.stream.lock().await;
        let id = self.id();
        // Out of the slot for the exchange, and back only once its answer
        // was read: a call dropped or failed mid-exchange leaves no answer
        // queued, which the next call would take for its own.
        let mut stream = match slot.take() {
            Some(stream) => stream,
            None => {
                self.conn
                    .call("lease.keep_alive", |mut c| async move {
                        c.lease_keep_alive(id).await
                    })
                    .await?
            }
        };
        let timeout = self.conn.settings().request_timeout;
        let answer = {
            let (keeper, responses) = &mut stream;
            let once = async {
                keeper.keep_alive().await?;
                responses.message().await
            };
            tokio::time::timeout(timeout, once).await
        };
        match answer {
            Ok(Ok(Some(r))) => {
                *slot = Some(stream);
                Ok(r.ttl() > 0)
            }
            Ok(Ok(None)) => Err(
                Error::new(ErrorKind::Unavailable, "the keep-alive stream ended")
                    .with_backend(crate::NAME),
            ),
            Ok(Err(e)) => Err(from_etcd(e)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("no keep-alive answer within {timeout:?}"),
            )
            .with_backend(crate::NAME)),
        }
    }

    /// Revokes the lease (its keys are deleted). `Ok(false)` when it was
    /// already gone.
    pub(crate) async fn revoke(&self) -> Result<bool> {
        match revoke(&self.conn, self.id()).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::LeaseLost => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Revokes in the background (best effort).
    pub(crate) fn revoke_later(conn: &Arc<ConnectionManager>, id: i64) {
        let conn = conn.clone();
        tokio::spawn(async move {
            let _ = revoke(&conn, id).await;
        });
    }
}

#[async_trait]
impl LeaseBackend for EtcdLease {
    fn describe(&self) -> String {
        format!("etcd lease {:x}", self.id())
    }

    async fn extend(&self, _ttl: Duration) -> Result<bool> {
        self.keep_alive().await
    }

    async fn release(&self) -> Result<bool> {
        self.revoke().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_grant_is_lease_not_created_and_a_lost_request_keeps_its_kind() {
        for kind in [
            ErrorKind::InvalidState,
            ErrorKind::InvalidConfig,
            ErrorKind::Internal,
        ] {
            let e = not_created(Error::new(kind, "refused"));
            assert_eq!((e.kind(), e.code()), (ErrorKind::LeaseNotCreated, 5001));
            assert!(
                std::error::Error::source(&e).is_some(),
                "etcd's answer is kept"
            );
        }
        for kind in [
            ErrorKind::Connection,
            ErrorKind::Unavailable,
            ErrorKind::Timeout,
            ErrorKind::Closed,
            ErrorKind::ResourceExhausted,
            ErrorKind::InvalidArgument,
        ] {
            assert_eq!(not_created(Error::new(kind, "x")).kind(), kind);
        }
    }

    #[test]
    fn an_unknown_lease_named_by_id_is_lease_not_found() {
        let e = not_found(lost(0x2a), 0x2a);
        assert_eq!((e.kind(), e.code()), (ErrorKind::LeaseNotFound, 5002));
        assert!(e.message().contains("2a"), "{e}");
        let other = not_found(Error::new(ErrorKind::Timeout, "slow"), 1);
        assert_eq!(other.kind(), ErrorKind::Timeout);
    }
}
