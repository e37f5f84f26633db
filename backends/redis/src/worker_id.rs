//! Worker-id leases on Redis keys with expiries.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use im_infra::telemetry::OpMetrics;
use im_infra::uid::{WorkerIdAllocator, WorkerLease};
use im_infra::{validate, Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use crate::Shared;

static SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("scripts/worker_id.lua")));

async fn run(shared: &Shared, args: &[String]) -> Result<i64> {
    let prefix = shared.keys.worker_prefix();
    let mut inv = SCRIPT.prepare_invoke();
    inv.key(format!("{prefix}route"));
    inv.arg(&args[0]).arg(&prefix);
    for a in &args[1..] {
        inv.arg(a);
    }
    shared.client.script(inv).await
}

/// The worker-id allocator of a [`RedisBackend`](crate::RedisBackend): one
/// key per id holding the owner's token with a `PX` expiry; the lowest free
/// id is taken in one script; the lease is renewed every `ttl / 3`.
pub struct RedisWorkerIds {
    shared: Arc<Shared>,
    allocate: OpMetrics,
}

impl std::fmt::Debug for RedisWorkerIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisWorkerIds").finish_non_exhaustive()
    }
}

impl RedisWorkerIds {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RedisWorkerIds {
            shared,
            allocate: OpMetrics::new(crate::NAME, "uid", "uid.allocate"),
        }
    }
}

#[async_trait]
impl WorkerIdAllocator for RedisWorkerIds {
    async fn allocate(&self, max_worker_id: u64, ttl: Duration) -> Result<Box<dyn WorkerLease>> {
        self.allocate
            .run(async {
                validate::ttl(ttl)?;
                if max_worker_id > 65_535 {
                    return Err(Error::invalid_argument(
                        "max_worker_id above 65535 is not supported",
                    ));
                }
                let token = uuid::Uuid::new_v4().to_string();
                let ttl_ms = validate::ttl_millis(ttl);
                let id = run(
                    &self.shared,
                    &[
                        "allocate".into(),
                        max_worker_id.to_string(),
                        token.clone(),
                        ttl_ms.to_string(),
                    ],
                )
                .await?;
                if id < 0 {
                    return Err(Error::new(
                        ErrorKind::ResourceExhausted,
                        format!("all {} worker ids are leased", max_worker_id + 1),
                    ));
                }
                let lost = CancellationToken::new();
                tokio::spawn(renew(
                    self.shared.clone(),
                    id as u64,
                    token.clone(),
                    ttl,
                    lost.clone(),
                ));
                Ok(Box::new(RedisWorkerLease {
                    shared: self.shared.clone(),
                    id: id as u64,
                    token,
                    lost,
                    released: AtomicBool::new(false),
                }) as Box<dyn WorkerLease>)
            })
            .await
    }
}

async fn renew(
    shared: Arc<Shared>,
    id: u64,
    token: String,
    ttl: Duration,
    lost: CancellationToken,
) {
    let period = (ttl / 3).max(Duration::from_millis(1));
    let args = [
        "renew".to_string(),
        id.to_string(),
        token,
        validate::ttl_millis(ttl).to_string(),
    ];
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = shared.client.shutdown.cancelled() => { lost.cancel(); return }
            _ = tokio::time::sleep(period) => {}
        }
        match run(&shared, &args).await {
            Ok(1) => last_ok = Instant::now(),
            Ok(_) => {
                tracing::warn!(worker_id = id, "worker id lease lost");
                lost.cancel();
                return;
            }
            Err(e) if last_ok.elapsed() >= ttl => {
                tracing::warn!(worker_id = id, error = %e, "worker id lease ran out while redis was unreachable");
                lost.cancel();
                return;
            }
            Err(_) => {}
        }
    }
}

/// A worker id leased from Redis.
pub struct RedisWorkerLease {
    shared: Arc<Shared>,
    id: u64,
    token: String,
    lost: CancellationToken,
    released: AtomicBool,
}

impl std::fmt::Debug for RedisWorkerLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisWorkerLease")
            .field("id", &self.id)
            .finish()
    }
}

#[async_trait]
impl WorkerLease for RedisWorkerLease {
    fn worker_id(&self) -> u64 {
        self.id
    }

    fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    async fn release(&self) -> Result<()> {
        self.lost.cancel();
        if self.released.swap(true, Ordering::AcqRel) {
            return Err(Error::new(
                ErrorKind::LeaseLost,
                "the worker id was already released",
            ));
        }
        let n = run(
            &self.shared,
            &["release".into(), self.id.to_string(), self.token.clone()],
        )
        .await?;
        if n == 1 {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::LeaseLost,
                format!("worker id {} was not leased any more", self.id),
            ))
        }
    }
}

impl Drop for RedisWorkerLease {
    fn drop(&mut self) {
        self.lost.cancel();
        if !self.released.swap(true, Ordering::AcqRel) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let shared = self.shared.clone();
                let args = [
                    "release".to_string(),
                    self.id.to_string(),
                    self.token.clone(),
                ];
                rt.spawn(async move {
                    let _ = run(&shared, &args).await;
                });
            }
        }
    }
}

/// Deletes a worker-id lease whoever holds it (fault injection).
pub(crate) async fn revoke(shared: &Shared, id: u64) -> Result<bool> {
    let n: u64 = shared
        .client
        .query(redis::cmd("DEL").arg(format!("{}{id}", shared.keys.worker_prefix())))
        .await?;
    Ok(n == 1)
}
