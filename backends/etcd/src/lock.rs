//! `DistributedLock` on etcd's mutex recipe: one key per waiter under the
//! lock's prefix, ordered by create revision, each waiter watching only its
//! predecessor. Compatible with `etcdctl lock` and Go's `concurrency.Mutex`.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use im_infra::lock::{DistributedLock, LockCapabilities, LockGuard, LockInfo, LockOptions};
use im_infra::telemetry::OpMetrics;
use im_infra::{validate, Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::connection::ConnectionManager;
use crate::lease::{lease_secs, KeepAlive, LeaseManager, MIN_TTL};

/// The value of a waiter key: who and since when.
#[derive(Debug, Serialize, Deserialize)]
struct Holder {
    owner: String,
    acquired_at_ms: u64,
}

/// The lock's prefix: `/` and `%` in the name are percent-encoded, so that
/// lock `a` never sees the waiters of lock `a/b`.
pub(crate) fn lock_prefix(conn: &ConnectionManager, name: &str) -> String {
    let escaped = name.replace('%', "%25").replace('/', "%2F");
    conn.cfg()
        .key(&format!("{}{escaped}/", conn.cfg().lock_prefix))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The lock service of an [`EtcdBackend`](crate::EtcdBackend).
///
/// An acquisition grants a lease of the lock's TTL (whole seconds, at least
/// 2 s), creates `<prefix><name>/<lease id in hex>` on it, and owns the lock
/// when its key has the smallest create revision under the prefix; until
/// then it watches only the key created just before its own. Waiters are
/// served in arrival order. The fencing token is the key's create
/// revision. While waiting, and while the guard lives with `auto_renew`,
/// the lease is kept alive; the guard watches its key and reports loss when
/// the key disappears (lease expired or revoked).
pub struct EtcdLock {
    conn: Arc<ConnectionManager>,
    acquire: OpMetrics,
    try_acquire: OpMetrics,
    is_locked: OpMetrics,
    info: OpMetrics,
}

impl std::fmt::Debug for EtcdLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLock").finish_non_exhaustive()
    }
}

/// A waiter key in place, removed (with its lease) if the attempt fails or
/// is cancelled.
struct Attempt {
    conn: Arc<ConnectionManager>,
    name: String,
    prefix: String,
    my_key: String,
    my_rev: i64,
    lease: i64,
    lease_ttl: Duration,
    keep: Option<KeepAlive>,
    token: String,
    done: bool,
}

impl Attempt {
    /// Keeps the lease alive (while waiting, or for a renewed lock).
    fn keep_alive(&mut self) {
        if self.keep.is_none() {
            self.keep = Some(KeepAlive::spawn(
                self.conn.clone(),
                self.lease,
                self.lease_ttl,
            ));
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let conn = self.conn.clone();
            let lease = self.lease;
            rt.spawn(async move {
                let _ = LeaseManager::new(conn).revoke(lease).await;
            });
        }
    }
}

fn deadline_error(name: &str, wait: Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("lock {name:?} not acquired within {wait:?}"),
    )
}

impl EtcdLock {
    pub(crate) fn new(conn: Arc<ConnectionManager>) -> Self {
        let m = |op| OpMetrics::new(crate::NAME, "lock", op);
        EtcdLock {
            conn,
            acquire: m("lock.acquire"),
            try_acquire: m("lock.try_acquire"),
            is_locked: m("lock.is_locked"),
            info: m("lock.info"),
        }
    }

    /// Grants the lease and puts the waiter key; returns whether it owns the lock.
    async fn enqueue(&self, name: &str, opts: &LockOptions) -> Result<(Attempt, bool)> {
        let secs = lease_secs(opts.ttl);
        let grant = self
            .conn
            .call("lock.lease_grant", |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?;
        let lease = grant.id();
        let prefix = lock_prefix(&self.conn, name);
        let my_key = format!("{prefix}{lease:x}");
        let token = uuid::Uuid::new_v4().to_string();
        let mut attempt = Attempt {
            conn: self.conn.clone(),
            name: name.to_owned(),
            prefix: prefix.clone(),
            my_key: my_key.clone(),
            my_rev: 0,
            lease,
            lease_ttl: Duration::from_secs(grant.ttl().max(1) as u64),
            keep: None,
            token: token.clone(),
            done: false,
        };
        let value = serde_json::to_vec(&Holder {
            owner: token,
            acquired_at_ms: now_ms(),
        })
        .map_err(|e| Error::serialization(name, e))?;
        let first = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let txn = Txn::new()
            .when([Compare::create_revision(
                my_key.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::put(
                    my_key.clone(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::get(prefix.clone(), Some(first.clone())),
            ])
            .or_else([
                TxnOp::get(my_key.clone(), None),
                TxnOp::get(prefix.clone(), Some(first)),
            ]);
        let resp = self
            .conn
            .call("lock.enqueue", |mut c| async move { c.txn(txn).await })
            .await?;
        let header_rev = resp.header().map_or(0, |h| h.revision());
        let ops = resp.op_responses();
        let my_rev = if resp.succeeded() {
            header_rev
        } else {
            match ops.first() {
                Some(TxnOpResponse::Get(g)) => g.kvs().first().map_or(0, |kv| kv.create_revision()),
                _ => 0,
            }
        };
        let owner_rev = match ops.get(1) {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().map_or(0, |kv| kv.create_revision()),
            _ => 0,
        };
        if my_rev == 0 {
            return Err(Error::new(
                ErrorKind::Internal,
                "etcd did not report the waiter's revision",
            ));
        }
        attempt.my_rev = my_rev;
        Ok((attempt, owner_rev == my_rev))
    }

    /// Waits until no key created before ours remains under the prefix.
    async fn wait_for_predecessors(
        &self,
        attempt: &Attempt,
        deadline: Instant,
        wait: Duration,
    ) -> Result<()> {
        let lost = attempt
            .keep
            .as_ref()
            .map(KeepAlive::lost)
            .unwrap_or_default();
        loop {
            let prefix = attempt.prefix.clone();
            let max_rev = attempt.my_rev - 1;
            let resp = self
                .conn
                .call("lock.predecessor", |mut c| async move {
                    c.get(
                        prefix,
                        Some(
                            GetOptions::new()
                                .with_prefix()
                                .with_sort(SortTarget::Create, SortOrder::Descend)
                                .with_max_create_revision(max_rev)
                                .with_limit(1),
                        ),
                    )
                    .await
                })
                .await?;
            let Some(pred) = resp.kvs().first() else {
                return Ok(());
            };
            let pred_key = pred.key().to_vec();
            let from = resp.header().map_or(0, |h| h.revision()) + 1;
            let watch = self.conn.call("lock.watch", |mut c| async move {
                c.watch(
                    pred_key,
                    Some(WatchOptions::new().with_start_revision(from)),
                )
                .await
            });
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(deadline_error(&attempt.name, wait));
            }
            let mut stream = match tokio::time::timeout(remaining, watch).await {
                Ok(r) => r?,
                Err(_) => return Err(deadline_error(&attempt.name, wait)),
            };
            // Wait for the predecessor's deletion (or a broken stream: look again).
            let deleted = async {
                loop {
                    match stream.message().await {
                        Ok(Some(r)) => {
                            if r.events()
                                .iter()
                                .any(|e| e.event_type() == etcd_client::EventType::Delete)
                            {
                                return;
                            }
                            if r.canceled() {
                                return;
                            }
                        }
                        _ => return,
                    }
                }
            };
            tokio::select! {
                _ = deleted => {}
                _ = tokio::time::sleep_until(deadline.into()) => return Err(deadline_error(&attempt.name, wait)),
                _ = lost.cancelled() => return Err(Error::new(ErrorKind::LeaseLost, "the waiter's lease was lost while waiting")),
                _ = self.conn.shutdown.cancelled() => return Err(Error::new(ErrorKind::Closed, "the etcd backend was closed")),
            }
        }
    }

    async fn acquire_inner(&self, name: &str, opts: LockOptions) -> Result<Box<dyn LockGuard>> {
        validate::key(name)?;
        opts.validate()?;
        let began = Instant::now();
        let deadline = began + opts.wait_timeout;
        let (mut attempt, owned) = self.enqueue(name, &opts).await?;
        if !owned {
            // The wait may outlast the lease: keep it alive meanwhile.
            attempt.keep_alive();
            self.wait_for_predecessors(&attempt, deadline, opts.wait_timeout)
                .await?;
        }
        EtcdLockGuard::start(attempt, opts, began.elapsed())
            .await
            .map(|g| Box::new(g) as Box<dyn LockGuard>)
    }
}

#[async_trait]
impl DistributedLock for EtcdLock {
    fn capabilities(&self) -> LockCapabilities {
        LockCapabilities::new(true, true, true).with_min_ttl(MIN_TTL)
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
                let (attempt, owned) = self.enqueue(key, &opts).await?;
                if !owned {
                    // Dropping the attempt removes the waiter key and its lease.
                    return Ok(None);
                }
                Ok(Some(
                    Box::new(EtcdLockGuard::start(attempt, opts, Duration::ZERO).await?)
                        as Box<dyn LockGuard>,
                ))
            })
            .await
    }

    async fn is_locked(&self, key: &str) -> Result<bool> {
        self.is_locked
            .run(async {
                validate::key(key)?;
                let prefix = lock_prefix(&self.conn, key);
                let r = self
                    .conn
                    .call("lock.is_locked", |mut c| async move {
                        c.get(
                            prefix,
                            Some(GetOptions::new().with_prefix().with_count_only()),
                        )
                        .await
                    })
                    .await?;
                Ok(r.count() > 0)
            })
            .await
    }

    async fn info(&self, key: &str) -> Result<Option<LockInfo>> {
        self.info
            .run(async {
                validate::key(key)?;
                let prefix = lock_prefix(&self.conn, key);
                let r = self
                    .conn
                    .call("lock.info", |mut c| async move {
                        c.get(
                            prefix,
                            Some(
                                GetOptions::new()
                                    .with_prefix()
                                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                                    .with_limit(1),
                            ),
                        )
                        .await
                    })
                    .await?;
                let Some(kv) = r.kvs().first() else {
                    return Ok(None);
                };
                let holder: Option<Holder> = serde_json::from_slice(kv.value()).ok();
                let ttl = LeaseManager::new(self.conn.clone())
                    .info(kv.lease())
                    .await
                    .ok()
                    .map(|i| i.ttl);
                Ok(Some(LockInfo {
                    key: key.to_owned(),
                    // A holder written by another client (etcdctl, Go) has
                    // no JSON value: its waiter key names it.
                    owner: holder
                        .as_ref()
                        .map(|h| h.owner.clone())
                        .unwrap_or_else(|| String::from_utf8_lossy(kv.key()).into_owned()),
                    fencing_token: kv.create_revision() as u64,
                    ttl,
                    acquired_at: holder
                        .map(|h| UNIX_EPOCH + Duration::from_millis(h.acquired_at_ms)),
                }))
            })
            .await
    }
}

/// A held etcd lock.
pub struct EtcdLockGuard {
    conn: Arc<ConnectionManager>,
    name: String,
    my_key: String,
    my_rev: i64,
    lease: AtomicI64,
    keep: Mutex<Option<KeepAlive>>,
    auto_renew: bool,
    ttl_ms: AtomicU64,
    lost: CancellationToken,
    released: AtomicBool,
    token: String,
    refresh_op: OpMetrics,
    release_op: OpMetrics,
}

impl std::fmt::Debug for EtcdLockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLockGuard")
            .field("key", &self.name)
            .field("waiter_key", &self.my_key)
            .field("fencing_token", &self.my_rev)
            .finish()
    }
}

impl EtcdLockGuard {
    async fn start(mut attempt: Attempt, opts: LockOptions, waited: Duration) -> Result<Self> {
        let keep = if opts.auto_renew {
            attempt.keep_alive();
            attempt.keep.take()
        } else {
            // The TTL should count from now: after a noticeable wait, one
            // last renewal (the lease was granted when the wait began).
            drop(attempt.keep.take());
            if waited > opts.ttl / 10 {
                let _ = LeaseManager::new(attempt.conn.clone())
                    .refresh(attempt.lease)
                    .await;
            }
            None
        };
        attempt.done = true;
        let lost = CancellationToken::new();
        if let Some(k) = &keep {
            let (l, kl) = (lost.clone(), k.lost());
            tokio::spawn(async move {
                tokio::select! { _ = kl.cancelled() => l.cancel(), _ = l.cancelled() => {} }
            });
        }
        tokio::spawn(watch_own_key(
            attempt.conn.clone(),
            attempt.my_key.clone(),
            attempt.my_rev,
            lost.clone(),
        ));
        let m = |op| OpMetrics::new(crate::NAME, "lock", op);
        Ok(EtcdLockGuard {
            conn: attempt.conn.clone(),
            name: attempt.name.clone(),
            my_key: attempt.my_key.clone(),
            my_rev: attempt.my_rev,
            lease: AtomicI64::new(attempt.lease),
            keep: Mutex::new(keep),
            auto_renew: opts.auto_renew,
            ttl_ms: AtomicU64::new(validate::ttl_millis(opts.ttl)),
            lost,
            released: AtomicBool::new(false),
            token: attempt.token.clone(),
            refresh_op: m("lock.refresh"),
            release_op: m("lock.release"),
        })
    }

    fn keep(&self) -> MutexGuard<'_, Option<KeepAlive>> {
        self.keep.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn not_held(&self) -> Error {
        Error::new(
            ErrorKind::LockNotHeld,
            format!(
                "lock {:?} is not held any more (lease expired or revoked, or released)",
                self.name
            ),
        )
    }

    /// The waiter key in etcd (`<prefix><name>/<lease hex>`).
    pub fn waiter_key(&self) -> &str {
        &self.my_key
    }

    /// The lease the lock lives on.
    pub fn lease_id(&self) -> i64 {
        self.lease.load(Ordering::Acquire)
    }

    /// The owner token written in the waiter key.
    pub fn owner(&self) -> &str {
        &self.token
    }
}

/// How long after acquisition the guard starts watching its key. The watch
/// starts at the revision after acquisition, so nothing is missed; locks
/// released sooner never open a watch.
const WATCH_DELAY: Duration = Duration::from_millis(200);

/// Cancels `lost` when the waiter key is deleted (expiry, revocation,
/// release), following the key across reconnections.
async fn watch_own_key(
    conn: Arc<ConnectionManager>,
    key: String,
    rev: i64,
    lost: CancellationToken,
) {
    tokio::select! {
        _ = lost.cancelled() => return,
        _ = tokio::time::sleep(WATCH_DELAY) => {}
    }
    let mut from = rev + 1;
    loop {
        if lost.is_cancelled() {
            return;
        }
        let k = key.clone();
        let watch = conn
            .call("lock.watch_own", |mut c| async move {
                c.watch(k, Some(WatchOptions::new().with_start_revision(from)))
                    .await
            })
            .await;
        if let Ok(mut stream) = watch {
            loop {
                let msg = tokio::select! {
                    _ = lost.cancelled() => return,
                    _ = conn.shutdown.cancelled() => return,
                    m = stream.message() => m,
                };
                match msg {
                    Ok(Some(r)) => {
                        if r.compact_revision() > 0 {
                            from = r.compact_revision();
                            break;
                        }
                        for e in r.events() {
                            if let Some(kv) = e.kv() {
                                from = from.max(kv.mod_revision() + 1);
                            }
                            if e.event_type() == etcd_client::EventType::Delete {
                                tracing::warn!(key, "lock lost: its key was deleted");
                                lost.cancel();
                                return;
                            }
                        }
                        if r.canceled() {
                            break;
                        }
                    }
                    _ => break,
                }
            }
        }
        // Reconnect; meanwhile check the key is still ours.
        let k = key.clone();
        if let Ok(r) = conn
            .call(
                "lock.check_own",
                |mut c| async move { c.get(k, None).await },
            )
            .await
        {
            if r.kvs().first().is_none_or(|kv| kv.create_revision() != rev) {
                lost.cancel();
                return;
            }
        }
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = conn.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Deletes the waiter key if it is still ours (waking the next waiter),
/// then revokes its lease.
async fn release(conn: &Arc<ConnectionManager>, key: &str, rev: i64, lease: i64) -> Result<bool> {
    let txn = Txn::new()
        .when([Compare::create_revision(
            key.to_owned(),
            CompareOp::Equal,
            rev,
        )])
        .and_then([TxnOp::delete(key.to_owned(), None)]);
    let resp = conn
        .call("lock.release", |mut c| async move { c.txn(txn).await })
        .await?;
    // The next waiter is already awake; the lease goes in the background.
    let leases = LeaseManager::new(conn.clone());
    tokio::spawn(async move {
        let _ = leases.revoke(lease).await;
    });
    Ok(resp.succeeded())
}

#[async_trait]
impl LockGuard for EtcdLockGuard {
    fn key(&self) -> &str {
        &self.name
    }

    fn fencing_token(&self) -> u64 {
        self.my_rev as u64
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
    }

    fn is_held(&self) -> bool {
        !self.lost.is_cancelled() && !self.released.load(Ordering::Acquire)
    }

    fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    async fn refresh(&self, ttl: Duration) -> Result<()> {
        self.refresh_op
            .run(async {
                validate::ttl(ttl)?;
                if !self.is_held() {
                    return Err(self.not_held());
                }
                // A lease's TTL is fixed: move the key to a new lease.
                let secs = lease_secs(ttl);
                let grant = self
                    .conn
                    .call("lock.lease_grant", |mut c| async move {
                        c.lease_grant(secs, None).await
                    })
                    .await?;
                let new_lease = grant.id();
                let value = serde_json::to_vec(&Holder {
                    owner: self.token.clone(),
                    acquired_at_ms: now_ms(),
                })
                .map_err(|e| Error::serialization(&self.name, e))?;
                let txn = Txn::new()
                    .when([Compare::create_revision(
                        self.my_key.clone(),
                        CompareOp::Equal,
                        self.my_rev,
                    )])
                    .and_then([TxnOp::put(
                        self.my_key.clone(),
                        value,
                        Some(PutOptions::new().with_lease(new_lease)),
                    )]);
                let resp = self
                    .conn
                    .call("lock.refresh", |mut c| async move { c.txn(txn).await })
                    .await?;
                let leases = LeaseManager::new(self.conn.clone());
                if !resp.succeeded() {
                    let _ = leases.revoke(new_lease).await;
                    self.lost.cancel();
                    return Err(self.not_held());
                }
                let old = self.lease.swap(new_lease, Ordering::AcqRel);
                let _ = leases.revoke(old).await;
                if self.auto_renew {
                    let keep = KeepAlive::spawn(
                        self.conn.clone(),
                        new_lease,
                        Duration::from_secs(grant.ttl().max(1) as u64),
                    );
                    let (l, kl) = (self.lost.clone(), keep.lost());
                    tokio::spawn(async move {
                        tokio::select! { _ = kl.cancelled() => l.cancel(), _ = l.cancelled() => {} }
                    });
                    *self.keep() = Some(keep);
                }
                self.ttl_ms
                    .store(validate::ttl_millis(ttl), Ordering::Relaxed);
                Ok(())
            })
            .await
    }

    async fn release(&self) -> Result<()> {
        self.release_op
            .run(async {
                let was = self.released.swap(true, Ordering::AcqRel);
                self.lost.cancel();
                self.keep().take();
                if was {
                    return Err(self.not_held());
                }
                if release(
                    &self.conn,
                    &self.my_key,
                    self.my_rev,
                    self.lease.load(Ordering::Acquire),
                )
                .await?
                {
                    Ok(())
                } else {
                    Err(self.not_held())
                }
            })
            .await
    }
}

impl Drop for EtcdLockGuard {
    fn drop(&mut self) {
        self.lost.cancel();
        self.keep().take();
        if !self.released.swap(true, Ordering::AcqRel) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let conn = self.conn.clone();
                let (key, rev, lease) = (
                    self.my_key.clone(),
                    self.my_rev,
                    self.lease.load(Ordering::Acquire),
                );
                rt.spawn(async move {
                    if let Err(e) = release(&conn, &key, rev, lease).await {
                        tracing::debug!(key, error = %e, "background release of a dropped lock guard failed");
                    }
                });
            }
        }
    }
}
