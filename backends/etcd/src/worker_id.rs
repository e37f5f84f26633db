//! Worker-id leases on etcd keys.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use im_infra::telemetry::OpMetrics;
use im_infra::uid::{WorkerIdAllocator, WorkerLease};
use im_infra::{validate, Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use crate::connection::ConnectionManager;
use crate::lease::{lease_secs, KeepAlive, LeaseManager};

fn dir(conn: &ConnectionManager) -> String {
    conn.cfg().key("/workers/")
}

/// The worker-id allocator of an [`EtcdBackend`](crate::EtcdBackend): the id
/// `n` is the key `<namespace>/workers/<n>` on a lease kept alive while the
/// lease object lives; an id is taken by a create-only transaction.
pub struct EtcdWorkerIds {
    conn: Arc<ConnectionManager>,
    allocate: OpMetrics,
}

impl std::fmt::Debug for EtcdWorkerIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdWorkerIds").finish_non_exhaustive()
    }
}

impl EtcdWorkerIds {
    pub(crate) fn new(conn: Arc<ConnectionManager>) -> Self {
        EtcdWorkerIds {
            conn,
            allocate: OpMetrics::new(crate::NAME, "uid", "uid.allocate"),
        }
    }
}

#[async_trait]
impl WorkerIdAllocator for EtcdWorkerIds {
    async fn allocate(&self, max_worker_id: u64, ttl: Duration) -> Result<Box<dyn WorkerLease>> {
        self.allocate
            .run(async {
                validate::ttl(ttl)?;
                let d = dir(&self.conn);
                let prefix = d.clone();
                let r = self
                    .conn
                    .call("uid.list", |mut c| async move {
                        c.get(
                            prefix,
                            Some(GetOptions::new().with_prefix().with_keys_only()),
                        )
                        .await
                    })
                    .await?;
                let taken: HashSet<u64> = r
                    .kvs()
                    .iter()
                    .filter_map(|kv| {
                        String::from_utf8_lossy(kv.key())
                            .strip_prefix(d.as_str())?
                            .parse()
                            .ok()
                    })
                    .collect();
                let secs = lease_secs(ttl);
                let grant = self
                    .conn
                    .call("uid.lease", |mut c| async move {
                        c.lease_grant(secs, None).await
                    })
                    .await?;
                let lease = grant.id();
                let token = uuid::Uuid::new_v4().to_string();
                for id in (0..=max_worker_id).filter(|id| !taken.contains(id)) {
                    let key = format!("{d}{id}");
                    let txn = Txn::new()
                        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(
                            key.clone(),
                            token.clone(),
                            Some(PutOptions::new().with_lease(lease)),
                        )]);
                    let r = self
                        .conn
                        .call("uid.claim", |mut c| async move { c.txn(txn).await })
                        .await?;
                    if r.succeeded() {
                        let keep = KeepAlive::spawn(
                            self.conn.clone(),
                            lease,
                            Duration::from_secs(grant.ttl().max(1) as u64),
                        );
                        return Ok(Box::new(EtcdWorkerLease {
                            conn: self.conn.clone(),
                            id,
                            key,
                            lease,
                            lost: keep.lost(),
                            _keep: keep,
                            released: AtomicBool::new(false),
                        }) as Box<dyn WorkerLease>);
                    }
                }
                let _ = LeaseManager::new(self.conn.clone()).revoke(lease).await;
                Err(Error::new(
                    ErrorKind::ResourceExhausted,
                    format!(
                        "all {} worker ids are leased",
                        max_worker_id.saturating_add(1)
                    ),
                ))
            })
            .await
    }
}

/// A worker id leased from etcd.
pub struct EtcdWorkerLease {
    conn: Arc<ConnectionManager>,
    id: u64,
    key: String,
    lease: i64,
    lost: CancellationToken,
    _keep: KeepAlive,
    released: AtomicBool,
}

impl std::fmt::Debug for EtcdWorkerLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdWorkerLease")
            .field("id", &self.id)
            .field("key", &self.key)
            .finish()
    }
}

#[async_trait]
impl WorkerLease for EtcdWorkerLease {
    fn worker_id(&self) -> u64 {
        self.id
    }

    fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    async fn release(&self) -> Result<()> {
        self.lost.cancel();
        self._keep.stop();
        if self.released.swap(true, Ordering::AcqRel) {
            return Err(Error::new(
                ErrorKind::LeaseLost,
                "the worker id was already released",
            ));
        }
        LeaseManager::new(self.conn.clone())
            .revoke(self.lease)
            .await
    }
}

impl Drop for EtcdWorkerLease {
    fn drop(&mut self) {
        self.lost.cancel();
        if !self.released.swap(true, Ordering::AcqRel) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (conn, lease) = (self.conn.clone(), self.lease);
                rt.spawn(async move {
                    let _ = LeaseManager::new(conn).revoke(lease).await;
                });
            }
        }
    }
}

/// Revokes the lease behind worker id `id` (fault injection).
pub(crate) async fn revoke(conn: &Arc<ConnectionManager>, id: u64) -> Result<bool> {
    let key = format!("{}{id}", dir(conn));
    let r = conn
        .call("uid.get", |mut c| async move { c.get(key, None).await })
        .await?;
    let Some(kv) = r.kvs().first() else {
        return Ok(false);
    };
    LeaseManager::new(conn.clone()).revoke(kv.lease()).await?;
    Ok(true)
}
