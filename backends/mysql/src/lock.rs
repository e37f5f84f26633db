//! `DistributedLock` on a row lease: owner, expiry on the server's clock,
//! and a fencing counter that only grows.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use async_trait::async_trait;
use im_infra::lock::{DistributedLock, LockCapabilities, LockGuard, LockInfo, LockOptions};
use im_infra::telemetry::OpMetrics;
use im_infra::{validate, Error, ErrorKind, Result};
use mysql_async::prelude::Queryable;
use tokio_util::sync::CancellationToken;

use crate::db::first;
use crate::error::ForKey;
use crate::Shared;

/// The lock service of a [`MysqlBackend`](crate::MysqlBackend).
///
/// A lock is a row `(key, owner, fence, expires_at)`. Taking it is one
/// `UPDATE` that succeeds only when the row has no live owner and bumps
/// `fence` (returned through `LAST_INSERT_ID`), so the fencing token
/// strictly increases per key; the row stays after release, keeping the
/// counter. Release and renewal check the owner. Waiters poll with a
/// jittered backoff, never past the holder's expiry or their deadline.
pub struct MysqlLock {
    shared: Arc<Shared>,
    sql: Arc<LockSql>,
    guard_ops: Arc<GuardOps>,
    acquire: OpMetrics,
    try_acquire: OpMetrics,
    is_locked: OpMetrics,
    info: OpMetrics,
}

/// The statements of one table prefix, built once per lock service.
struct LockSql {
    take: String,
    seed: String,
    left: String,
    extend: String,
    holds: String,
    release: String,
    is_locked: String,
    info: String,
}

impl LockSql {
    fn new(shared: &Shared) -> Self {
        let t = shared.table("locks");
        LockSql {
            take: format!(
                "UPDATE {t} SET owner = ?, fence = LAST_INSERT_ID(fence + 1), \
                 expires_at = NOW(6) + INTERVAL ? MICROSECOND, acquired_at = NOW(6) \
                 WHERE k = ? AND (owner IS NULL OR expires_at <= NOW(6))"
            ),
            seed: format!(
                "INSERT IGNORE INTO {t} (k, owner, fence, expires_at) VALUES (?, NULL, 0, NOW(6))"
            ),
            left: format!(
                "SELECT TIMESTAMPDIFF(MICROSECOND, NOW(6), expires_at) FROM {t} WHERE k = ?"
            ),
            extend: format!(
                "UPDATE {t} SET expires_at = NOW(6) + INTERVAL ? MICROSECOND \
                 WHERE k = ? AND owner = ? AND expires_at > NOW(6)"
            ),
            holds: format!("SELECT 1 FROM {t} WHERE k = ? AND owner = ? AND expires_at > NOW(6)"),
            release: format!(
                "UPDATE {t} SET owner = NULL WHERE k = ? AND owner = ? AND expires_at > NOW(6)"
            ),
            is_locked: format!(
                "SELECT 1 FROM {t} WHERE k = ? AND owner IS NOT NULL AND expires_at > NOW(6)"
            ),
            info: format!(
                "SELECT owner, fence, TIMESTAMPDIFF(MICROSECOND, NOW(6), expires_at), \
                 CAST(UNIX_TIMESTAMP(acquired_at) * 1000000 AS SIGNED) \
                 FROM {t} WHERE k = ? AND owner IS NOT NULL AND expires_at > NOW(6)"
            ),
        }
    }
}

/// The metrics of guard operations, shared by every guard of a service.
struct GuardOps {
    refresh: OpMetrics,
    release: OpMetrics,
}

/// A fresh owner token: 128 random bits in hex. It identifies the holder
/// (release and renewal check it); it is not a secret.
fn new_token() -> String {
    format!("{:032x}", fastrand::u128(..))
}

impl std::fmt::Debug for MysqlLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlLock").finish_non_exhaustive()
    }
}

enum Attempt {
    Acquired(u64),
    /// Held; time left on the holder's lease.
    Held(Duration),
}

fn micros(d: Duration) -> u64 {
    validate::ttl_millis(d) * 1000
}

impl MysqlLock {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let m = |op| OpMetrics::new(crate::NAME, "lock", op);
        MysqlLock {
            sql: Arc::new(LockSql::new(&shared)),
            guard_ops: Arc::new(GuardOps {
                refresh: m("lock.refresh"),
                release: m("lock.release"),
            }),
            shared,
            acquire: m("lock.acquire"),
            try_acquire: m("lock.try_acquire"),
            is_locked: m("lock.is_locked"),
            info: m("lock.info"),
        }
    }

    async fn attempt(&self, key: &str, token: &str, ttl: Duration) -> Result<Attempt> {
        let k = self.shared.key(key);
        let sql = self.sql.clone();
        let token = token.to_owned();
        let ttl_us = micros(ttl);
        self.shared
            .db
            .with_conn(move |c| {
                Box::pin(async move {
                    for _ in 0..2 {
                        c.exec_drop(sql.take.as_str(), (token.as_str(), ttl_us, k.as_slice()))
                            .await?;
                        if c.affected_rows() == 1 {
                            return Ok(Attempt::Acquired(c.last_insert_id().unwrap_or(0)));
                        }
                        // No row yet (first use of the key), or held.
                        c.exec_drop(sql.seed.as_str(), (k.as_slice(),)).await?;
                        if c.affected_rows() == 0 {
                            let us: Option<Option<i64>> =
                                first(c, &sql.left, (k.as_slice(),)).await?;
                            let us = us.flatten().unwrap_or(0).max(1);
                            return Ok(Attempt::Held(Duration::from_micros(us as u64)));
                        }
                    }
                    Ok(Attempt::Held(Duration::from_millis(1)))
                })
            })
            .await
    }

    fn guard(&self, key: &str, token: String, fence: u64, opts: LockOptions) -> Box<dyn LockGuard> {
        Box::new(MysqlLockGuard::start(
            Held {
                shared: self.shared.clone(),
                sql: self.sql.clone(),
                key: key.to_owned(),
                token,
            },
            self.guard_ops.clone(),
            fence,
            opts,
        ))
    }

    async fn acquire_inner(&self, key: &str, opts: LockOptions) -> Result<Box<dyn LockGuard>> {
        validate::key(key)?;
        opts.validate()?;
        let token = new_token();
        let deadline = Instant::now() + opts.wait_timeout;
        let mut backoff = Duration::from_millis(10);
        loop {
            let left = match self.attempt(key, &token, opts.ttl).await {
                Ok(Attempt::Acquired(fence)) => return Ok(self.guard(key, token, fence, opts)),
                Ok(Attempt::Held(left)) => left,
                Err(e) if e.is_retryable() && Instant::now() < deadline => backoff,
                Err(e) => return Err(e),
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("lock {key:?} not acquired within {:?}", opts.wait_timeout),
                ));
            }
            let wait = backoff
                .mul_f64(0.5 + fastrand::f64() / 2.0)
                .min(left)
                .min(deadline - now);
            backoff = (backoff * 2).min(Duration::from_millis(250));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shared.shutdown.cancelled() => return Err(Error::new(ErrorKind::Closed, "the mysql backend was closed")),
            }
        }
    }
}

#[async_trait]
impl DistributedLock for MysqlLock {
    fn capabilities(&self) -> LockCapabilities {
        LockCapabilities::new(false, true, true)
    }

    async fn acquire(&self, key: &str, opts: LockOptions) -> Result<Box<dyn LockGuard>> {
        self.acquire.run(self.acquire_inner(key, opts)).await
    }

    async fn try_acquire(
        &self,
        key: &str,
        opts: LockOptions,
    ) -> Result<Option<Box<dyn LockGuard>>> {
        self.try_acquire
            .run(async {
                validate::key(key)?;
                opts.validate()?;
                let token = new_token();
                Ok(match self.attempt(key, &token, opts.ttl).await? {
                    Attempt::Acquired(fence) => Some(self.guard(key, token, fence, opts)),
                    Attempt::Held(_) => None,
                })
            })
            .await
    }

    async fn is_locked(&self, key: &str) -> Result<bool> {
        self.is_locked
            .run(async {
                validate::key(key)?;
                let v: Option<i64> = self
                    .shared
                    .db
                    .query_first(&self.sql.is_locked, (self.shared.key(key),))
                    .await?;
                Ok(v.is_some())
            })
            .await
    }

    async fn info(&self, key: &str) -> Result<Option<LockInfo>> {
        self.info
            .run(async {
                validate::key(key)?;
                let row: Option<(String, u64, i64, Option<i64>)> = self
                    .shared
                    .db
                    .query_first(&self.sql.info, (self.shared.key(key),))
                    .await
                    .for_key(key)?;
                Ok(row.map(|(owner, fence, left, at)| LockInfo {
                    key: key.to_owned(),
                    owner,
                    fencing_token: fence,
                    ttl: Some(Duration::from_micros(left.max(0) as u64)),
                    acquired_at: at.map(|us| UNIX_EPOCH + Duration::from_micros(us.max(0) as u64)),
                }))
            })
            .await
    }
}

/// What identifies one holding of a lock.
struct Held {
    shared: Arc<Shared>,
    sql: Arc<LockSql>,
    key: String,
    token: String,
}

impl Held {
    /// Extends the lock when this holder still has it.
    async fn extend(&self, ttl: Duration) -> Result<bool> {
        let params = (micros(ttl), self.shared.key(&self.key), self.token.as_str());
        Ok(self.shared.db.exec(&self.sql.extend, params).await? == 1)
    }

    /// Whether this holder still has the lock.
    async fn holds(&self) -> Result<bool> {
        let params = (self.shared.key(&self.key), self.token.as_str());
        let v: Option<i64> = self.shared.db.query_first(&self.sql.holds, params).await?;
        Ok(v.is_some())
    }

    /// Releases the lock when this holder still has it (the row stays: its
    /// fence counter must not go back).
    async fn release(&self) -> Result<bool> {
        let params = (self.shared.key(&self.key), self.token.as_str());
        Ok(self.shared.db.exec(&self.sql.release, params).await? == 1)
    }
}

/// A held MySQL lock.
///
/// With `auto_renew` a background task extends it every `ttl / 3`;
/// otherwise a task that cancels [`lost`](LockGuard::lost) at expiry starts
/// the first time that token is asked for.
pub struct MysqlLockGuard {
    held: Arc<Held>,
    fence: u64,
    auto_renew: bool,
    ttl_ms: Arc<AtomicU64>,
    expires: Arc<Mutex<Instant>>,
    lost: CancellationToken,
    keeper_started: AtomicBool,
    released: AtomicBool,
    ops: Arc<GuardOps>,
}

impl std::fmt::Debug for MysqlLockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlLockGuard")
            .field("key", &self.held.key)
            .field("fencing_token", &self.fence)
            .finish()
    }
}

fn locked(m: &Mutex<Instant>) -> std::sync::MutexGuard<'_, Instant> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MysqlLockGuard {
    fn start(held: Held, ops: Arc<GuardOps>, fence: u64, opts: LockOptions) -> Self {
        let guard = MysqlLockGuard {
            held: Arc::new(held),
            fence,
            auto_renew: opts.auto_renew,
            ttl_ms: Arc::new(AtomicU64::new(validate::ttl_millis(opts.ttl))),
            expires: Arc::new(Mutex::new(Instant::now() + opts.ttl)),
            lost: CancellationToken::new(),
            keeper_started: AtomicBool::new(false),
            released: AtomicBool::new(false),
            ops,
        };
        if opts.auto_renew {
            guard.start_keeper();
        }
        guard
    }

    fn start_keeper(&self) {
        if self.keeper_started.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(keeper(
                self.held.clone(),
                self.auto_renew,
                self.ttl_ms.clone(),
                self.expires.clone(),
                self.lost.clone(),
            ));
        }
    }

    fn not_held(&self) -> Error {
        Error::new(
            ErrorKind::LockNotHeld,
            format!(
                "lock {:?} is not held any more (expired, taken over or released)",
                self.held.key
            ),
        )
    }
}

/// Renews every ttl/3 (with `auto_renew`) or checks at expiry; cancels
/// `lost` when the lock is gone. An outage is ridden out until the local
/// lease deadline passes.
async fn keeper(
    held: Arc<Held>,
    auto_renew: bool,
    ttl_ms: Arc<AtomicU64>,
    expires: Arc<Mutex<Instant>>,
    lost: CancellationToken,
) {
    let key = held.key.as_str();
    loop {
        let ttl = Duration::from_millis(ttl_ms.load(Ordering::Relaxed));
        let wait = if auto_renew {
            (ttl / 3).max(Duration::from_millis(1))
        } else {
            locked(&expires).saturating_duration_since(Instant::now()) + Duration::from_millis(5)
        };
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = held.shared.shutdown.cancelled() => { lost.cancel(); return }
            _ = tokio::time::sleep(wait) => {}
        }
        if lost.is_cancelled() {
            return;
        }
        if !auto_renew && Instant::now() < *locked(&expires) {
            continue;
        }
        let started = Instant::now();
        let check = if auto_renew {
            held.extend(ttl).await
        } else {
            held.holds().await
        };
        match check {
            Ok(true) => {
                *locked(&expires) = if auto_renew {
                    started + ttl
                } else {
                    Instant::now() + Duration::from_millis(50)
                };
            }
            Ok(false) => {
                tracing::warn!(key, "lock lost");
                lost.cancel();
                return;
            }
            Err(e) => {
                if Instant::now() >= *locked(&expires) {
                    tracing::warn!(key, error = %e, "lock lease ran out while the database was unreachable");
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

#[async_trait]
impl LockGuard for MysqlLockGuard {
    fn key(&self) -> &str {
        &self.held.key
    }

    fn fencing_token(&self) -> u64 {
        self.fence
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
    }

    fn is_held(&self) -> bool {
        !self.lost.is_cancelled() && Instant::now() < *locked(&self.expires)
    }

    fn lost(&self) -> CancellationToken {
        if !self.released.load(Ordering::Acquire) {
            self.start_keeper();
        }
        self.lost.clone()
    }

    async fn refresh(&self, ttl: Duration) -> Result<()> {
        self.ops
            .refresh
            .run(async {
                validate::ttl(ttl)?;
                if self.released.load(Ordering::Acquire) || self.lost.is_cancelled() {
                    return Err(self.not_held());
                }
                let started = Instant::now();
                if !self.held.extend(ttl).await? {
                    self.lost.cancel();
                    return Err(self.not_held());
                }
                self.ttl_ms
                    .store(validate::ttl_millis(ttl), Ordering::Relaxed);
                *locked(&self.expires) = started + ttl;
                Ok(())
            })
            .await
    }

    async fn release(&self) -> Result<()> {
        self.ops
            .release
            .run(async {
                let was = self.released.swap(true, Ordering::AcqRel);
                self.lost.cancel();
                if was || !self.held.release().await? {
                    return Err(self.not_held());
                }
                Ok(())
            })
            .await
    }
}

impl Drop for MysqlLockGuard {
    fn drop(&mut self) {
        self.lost.cancel();
        if !self.released.swap(true, Ordering::AcqRel) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let held = self.held.clone();
                rt.spawn(async move {
                    let _ = held.release().await;
                });
            }
        }
    }
}
