//! Leases: the lease manager of the original system, and the background
//! keep-alive every lease-backed capability uses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::LeaseTimeToLiveOptions;
use im_infra::{Error, ErrorKind, Result};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::connection::ConnectionManager;

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

/// Creates, keeps alive, inspects and revokes leases.
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
}

impl std::fmt::Debug for LeaseManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseManager").finish_non_exhaustive()
    }
}

fn lost(id: i64) -> Error {
    Error::new(
        ErrorKind::LeaseLost,
        format!("lease {id:x} expired or was revoked"),
    )
    .with_backend(crate::NAME)
}

impl LeaseManager {
    pub(crate) fn new(conn: Arc<ConnectionManager>) -> Self {
        LeaseManager { conn }
    }

    /// Grants a lease of `ttl` (whole seconds, at least [`MIN_TTL`]).
    pub async fn create(&self, ttl: Duration) -> Result<i64> {
        im_infra::validate::ttl(ttl)?;
        let secs = lease_secs(ttl);
        let r = self
            .conn
            .call("lease.grant", |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?;
        Ok(r.id())
    }

    /// Renews the lease in the background until the returned handle is
    /// dropped; the handle's `lost` token fires if the lease is lost.
    pub async fn keep_alive(&self, id: i64) -> Result<KeepAlive> {
        let info = self.info(id).await?;
        Ok(KeepAlive::spawn(self.conn.clone(), id, info.granted_ttl))
    }

    /// Revokes the lease (its keys are deleted).
    pub async fn revoke(&self, id: i64) -> Result<()> {
        self.conn
            .call(
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
    pub async fn info(&self, id: i64) -> Result<LeaseInfo> {
        let r = self
            .conn
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

    /// Ids of every lease of the cluster.
    pub async fn list(&self) -> Result<Vec<i64>> {
        let r = self
            .conn
            .call("lease.leases", |mut c| async move { c.leases().await })
            .await?;
        Ok(r.leases().iter().map(|l| l.id()).collect())
    }

    /// Renews the lease once; returns its TTL afterwards.
    pub async fn refresh(&self, id: i64) -> Result<Duration> {
        let ttl = self
            .conn
            .call("lease.keep_alive", |mut c| async move {
                let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
                keeper.keep_alive().await?;
                Ok(stream.message().await?.map_or(0, |r| r.ttl()))
            })
            .await?;
        if ttl <= 0 {
            return Err(lost(id));
        }
        Ok(Duration::from_secs(ttl as u64))
    }
}

/// A lease renewed in the background. Dropping it stops the renewals (the
/// lease then expires after its TTL unless revoked).
#[derive(Debug)]
pub struct KeepAlive {
    id: i64,
    stop: CancellationToken,
    lost: CancellationToken,
}

impl KeepAlive {
    /// Starts renewing lease `id` of `ttl` every `ttl / 3`.
    pub(crate) fn spawn(conn: Arc<ConnectionManager>, id: i64, ttl: Duration) -> KeepAlive {
        let stop = CancellationToken::new();
        let lost = CancellationToken::new();
        tokio::spawn(keep_alive_loop(conn, id, ttl, stop.clone(), lost.clone()));
        KeepAlive { id, stop, lost }
    }

    /// The lease id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// Cancelled when the lease is found expired or revoked, or cannot be
    /// renewed within its TTL.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Stops renewing.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn keep_alive_loop(
    conn: Arc<ConnectionManager>,
    id: i64,
    ttl: Duration,
    stop: CancellationToken,
    lost: CancellationToken,
) {
    let period = (ttl / 3).max(Duration::from_millis(300));
    let mut last_ok = Instant::now();
    let mut stream = None;
    loop {
        if stream.is_none() {
            stream = conn
                .call("lease.keep_alive", |mut c| async move {
                    c.lease_keep_alive(id).await
                })
                .await
                .ok();
        }
        let renewed = match stream.as_mut() {
            Some((keeper, responses)) => {
                let once = async {
                    keeper.keep_alive().await?;
                    responses.message().await
                };
                match tokio::time::timeout(conn.cfg().request_timeout, once).await {
                    Ok(Ok(Some(r))) => Some(r.ttl()),
                    _ => None,
                }
            }
            None => None,
        };
        match renewed {
            Some(t) if t > 0 => last_ok = Instant::now(),
            Some(_) => {
                tracing::warn!(lease = format!("{id:x}"), "lease expired or was revoked");
                lost.cancel();
                return;
            }
            None => {
                stream = None;
                if last_ok.elapsed() >= ttl {
                    tracing::warn!(
                        lease = format!("{id:x}"),
                        "lease could not be renewed within its TTL"
                    );
                    lost.cancel();
                    return;
                }
            }
        }
        let wait = if stream.is_some() {
            period
        } else {
            period.min(Duration::from_millis(500))
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = conn.shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
