//! `DistributedLock` on etcd's mutex recipe: one key per waiter under the
//! lock's prefix, ordered by create revision, each waiter watching only its
//! predecessor. Compatible with `etcdctl lock` and Go's `concurrency.Mutex`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use im_infra::lease::{Lease, LeaseBackend, PendingLease, Tick};
use im_infra::lock::{
    DistributedLock, LeasedGuard, LockCapabilities, LockGuard, LockInfo, LockOptions,
};
use im_infra::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

use crate::connection::ConnectionManager;
use crate::lease::{lease_secs, EtcdLease, MIN_TTL};

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
    conn.settings()
        .key(&format!("{}{escaped}/", conn.settings().lock_prefix))
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
/// revision. From the grant on, the lease is a
/// [`Lease`](im_infra::lease::Lease): kept alive while waiting and while the
/// guard lives (with `auto_renew`), with a local deadline, so that a holder
/// cut off from etcd knows it lost the lock before etcd expires its lease.
/// Each renewal also checks that the waiter key is still there. After the
/// wait, the acquisition checks that its own key and lease survived it (as
/// Go's `concurrency.Mutex` does).
///
/// Raw operations: the backend hands it out layered
/// ([`ObservedLock`](im_infra::layer::ObservedLock): argument checks and
/// telemetry).
pub(crate) struct EtcdLock {
    conn: Arc<ConnectionManager>,
}

/// A waiter key on its lease, as the lease core sees it. `rev` is 0 until
/// the key's create revision is known.
struct WaiterKey {
    lease: EtcdLease,
    granted_secs: AtomicI64,
    name: String,
    my_key: String,
    rev: AtomicI64,
    token: String,
}

impl WaiterKey {
    fn rev(&self) -> i64 {
        self.rev.load(Ordering::Acquire)
    }

    fn conn(&self) -> &Arc<ConnectionManager> {
        self.lease.conn()
    }

    /// The lease our waiter key is on: `None` when the key is gone or is
    /// another waiter's (another create revision).
    async fn key_lease(&self) -> Result<Option<i64>> {
        let k = self.my_key.clone();
        let r = self
            .conn()
            .call(
                "lock.check_own",
                |mut c| async move { c.get(k, None).await },
            )
            .await?;
        let rev = self.rev();
        Ok(r.kvs()
            .first()
            .filter(|kv| kv.create_revision() == rev)
            .map(|kv| kv.lease()))
    }

    /// Whether the waiter key is still ours, on the lease this waiter
    /// renews. Our key on another lease (a move to a new lease that etcd
    /// applied but whose answer was lost, or that was cut off before it was
    /// recorded) has that lease adopted and renewed from now on: renewing
    /// the old one would leave the key to expire. Called only by `extend`,
    /// one at a time, as every change of the lease id.
    async fn key_is_ours(&self) -> Result<bool> {
        let renewed = self.lease.id();
        match self.key_lease().await? {
            Some(lease) if lease == renewed => Ok(true),
            Some(lease) if lease != 0 => {
                if self.lease.adopt(renewed, lease).await {
                    EtcdLease::revoke_later(self.conn(), renewed);
                }
                self.lease.keep_alive().await
            }
            _ => Ok(false),
        }
    }

    /// A lease's TTL is fixed: a new TTL moves the key to a new lease
    /// (keeping its create revision, so its place and fencing token).
    async fn move_to_new_lease(&self, ttl: Duration) -> Result<bool> {
        let (fresh, granted) = EtcdLease::grant(self.conn(), "lock.lease_grant", ttl).await?;
        let new_id = fresh.id();
        let value = holder_value(&self.name, &self.token)?;
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.my_key.clone(),
                CompareOp::Equal,
                self.rev(),
            )])
            .and_then([TxnOp::put(
                self.my_key.clone(),
                value,
                Some(PutOptions::new().with_lease(new_id)),
            )]);
        let moved = self
            .conn()
            .call("lock.refresh", |mut c| async move { c.txn(txn).await })
            .await;
        match moved {
            Ok(r) if r.succeeded() => {
                let old = self.lease.replace(new_id).await;
                self.granted_secs
                    .store(granted.as_secs() as i64, Ordering::Release);
                EtcdLease::revoke_later(self.conn(), old);
                Ok(true)
            }
            Ok(_) => {
                EtcdLease::revoke_later(self.conn(), new_id);
                Ok(false)
            }
            // etcd may have moved the key before the answer was lost:
            // revoking the new lease would then delete it. It is left to
            // expire; the next renewal moves the key again (the TTL still
            // differs), and until then the lease core bounds the deadline
            // by this request's TTL, which the new lease outlives.
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl LeaseBackend for WaiterKey {
    fn describe(&self) -> String {
        format!("lock {:?} (waiter key {})", self.name, self.my_key)
    }

    /// Keeps the lease alive and checks that the waiter key is still ours;
    /// a new TTL moves the key to a new lease.
    async fn extend(&self, ttl: Duration) -> Result<bool> {
        if lease_secs(ttl) != self.granted_secs.load(Ordering::Acquire) {
            return self.move_to_new_lease(ttl).await;
        }
        if !self.lease.keep_alive().await? {
            return Ok(false);
        }
        if self.rev() == 0 {
            return Ok(true);
        }
        self.key_is_ours().await
    }

    /// Deletes the waiter key if it is still ours (waking the next waiter),
    /// then revokes its lease in the background. Before the key's revision
    /// is known, revokes the lease (which deletes the key).
    async fn release(&self) -> Result<bool> {
        let rev = self.rev();
        if rev == 0 {
            return self.lease.revoke().await;
        }
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.my_key.clone(),
                CompareOp::Equal,
                rev,
            )])
            .and_then([TxnOp::delete(self.my_key.clone(), None)]);
        let resp = self
            .conn()
            .call("lock.release", |mut c| async move { c.txn(txn).await })
            .await;
        // The lease is this waiter's own: revoking it deletes only its key,
        // also when the delete failed (a dead waiter key would otherwise
        // hold its place in the queue until its TTL).
        EtcdLease::revoke_later(self.conn(), self.lease.id());
        Ok(resp?.succeeded())
    }

    fn announces_loss(&self) -> bool {
        true
    }

    /// Watches the waiter key and resolves when it is deleted (lease
    /// expired or revoked, key deleted by hand), following it across
    /// reconnections.
    async fn gone(&self) {
        // Locks released sooner never open a watch.
        tokio::time::sleep(WATCH_DELAY).await;
        let mut from = self.rev() + 1;
        loop {
            let k = self.my_key.clone();
            let watch = self
                .conn()
                .call("lock.watch_own", |mut c| async move {
                    c.watch(k, Some(WatchOptions::new().with_start_revision(from)))
                        .await
                })
                .await;
            if let Ok(mut stream) = watch {
                while let Ok(Some(r)) = stream.message().await {
                    if r.compact_revision() > 0 {
                        from = r.compact_revision();
                        break;
                    }
                    for e in r.events() {
                        if let Some(kv) = e.kv() {
                            from = from.max(kv.mod_revision() + 1);
                        }
                        if e.event_type() == etcd_client::EventType::Delete {
                            return;
                        }
                    }
                    if r.canceled() {
                        break;
                    }
                }
            }
            if self.conn().is_closed() {
                // Nothing to watch with: the keeper ends the lease at its
                // next renewal (`Closed`).
                return std::future::pending().await;
            }
            // The watch broke: look at the key, then watch again.
            if matches!(self.key_lease().await, Ok(None)) {
                return;
            }
            tokio::time::sleep(WATCH_DELAY).await;
        }
    }
}

/// How long after acquisition the waiter key is first watched, and the
/// pause before watching again after a broken watch.
const WATCH_DELAY: Duration = Duration::from_millis(200);

fn holder_value(name: &str, token: &str) -> Result<Vec<u8>> {
    serde_json::to_vec(&Holder {
        owner: token.to_owned(),
        acquired_at_ms: now_ms(),
    })
    .map_err(|e| Error::serialization(name, e))
}

impl EtcdLock {
    pub(crate) fn new(conn: Arc<ConnectionManager>) -> Self {
        EtcdLock { conn }
    }

    /// Grants the lease and puts the waiter key; returns the waiter key's
    /// lease (kept from now on, renewed even with `no_renewal` until the
    /// lock is acquired) and whether it owns the lock.
    async fn enqueue(&self, name: &str, opts: &LockOptions) -> Result<(Lease, i64, bool)> {
        let sent = Tick::now();
        let (lease, granted) = EtcdLease::grant(&self.conn, "lock.lease_grant", opts.ttl).await?;
        let lease_id = lease.id();
        let prefix = lock_prefix(&self.conn, name);
        let my_key = format!("{prefix}{lease_id:x}");
        let token = uuid::Uuid::new_v4().to_string();
        let value = holder_value(name, &token)?;
        let mut pending = PendingLease::new(WaiterKey {
            lease,
            granted_secs: AtomicI64::new(granted.as_secs() as i64),
            name: name.to_owned(),
            my_key: my_key.clone(),
            rev: AtomicI64::new(0),
            token,
        });
        pending.arm();
        let first = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        // Put only if absent; a retry of the same waiter finds its key.
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
                    Some(PutOptions::new().with_lease(lease_id)),
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
        pending.backend().rev.store(my_rev, Ordering::Release);
        let mut kept = opts.lease_options(crate::NAME, granted).auto_renew(true);
        kept.max_extensions = None;
        Ok((pending.start(kept, sent), my_rev, owner_rev == my_rev))
    }

    /// Waits until no key created before ours remains under the prefix.
    async fn wait_for_predecessors(
        &self,
        name: &str,
        lease: &Lease,
        my_rev: i64,
        deadline: Option<Instant>,
        wait: Duration,
    ) -> Result<()> {
        let lost = lease.lost();
        let prefix = lock_prefix(&self.conn, name);
        let past = |d: Option<Instant>| d.is_some_and(|d| Instant::now() >= d);
        loop {
            let prefix = prefix.clone();
            let max_rev = my_rev - 1;
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
            if past(deadline) {
                return Err(im_infra::lock::not_acquired(name, wait));
            }
            let until = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(until);
            let mut stream = tokio::select! {
                r = watch => r?,
                _ = &mut until => return Err(im_infra::lock::not_acquired(name, wait)),
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
                _ = &mut until => return Err(im_infra::lock::not_acquired(name, wait)),
                _ = lost.cancelled() => return Err(waiter_lost()),
                _ = self.conn.stop().cancelled() => return Err(im_infra::backend::closed(crate::NAME)),
            }
        }
    }

    /// The lease of an owned waiter key becomes the guard.
    async fn guard(
        &self,
        name: &str,
        lease: Lease,
        my_rev: i64,
        opts: LockOptions,
        waited: bool,
    ) -> Result<Box<dyn LockGuard>> {
        if waited {
            // The session may have expired while waiting (Go's mutex
            // returns ErrSessionExpired here): check key and lease.
            let prefix = lock_prefix(&self.conn, name);
            let r = self
                .conn
                .call("lock.verify", |mut c| async move {
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
            let first = r.kvs().first().map(|kv| kv.create_revision());
            if first != Some(my_rev) || !lease.is_held() {
                return Err(waiter_lost());
            }
        }
        if !opts.auto_renew {
            // Without renewal the TTL counts from the acquisition.
            if waited && !lease.refresh(lease.ttl()).await? {
                return Err(waiter_lost());
            }
            lease.set_auto_renew(false);
        } else if let Some(n) = opts.max_renewals {
            lease.limit_extensions(n);
        }
        Ok(Box::new(LeasedGuard::new(name, my_rev as u64, lease)))
    }
}

fn waiter_lost() -> Error {
    Error::new(
        ErrorKind::LeaseLost,
        "the waiter's lease or key was lost while waiting",
    )
}

#[async_trait]
impl DistributedLock for EtcdLock {
    fn capabilities(&self) -> LockCapabilities {
        LockCapabilities::default()
            .with_fair()
            .with_info()
            .with_fencing()
            .with_min_ttl(MIN_TTL)
    }

    async fn acquire(&self, name: &str, opts: LockOptions) -> Result<Box<dyn LockGuard>> {
        let began = Instant::now();
        let deadline = opts.wait_deadline(began);
        let (lease, my_rev, owned) = self.enqueue(name, &opts).await?;
        if !owned {
            // Dropping the lease (an error, a timeout, a dropped future)
            // removes the waiter key.
            self.wait_for_predecessors(name, &lease, my_rev, deadline, opts.wait_timeout)
                .await?;
        }
        self.guard(name, lease, my_rev, opts, !owned).await
    }

    async fn try_acquire(
        &self,
        key: &str,
        opts: LockOptions,
    ) -> Result<Option<Box<dyn LockGuard>>> {
        let (lease, my_rev, owned) = self.enqueue(key, &opts).await?;
        if !owned {
            // Releasing the lease removes the waiter key.
            let _ = lease.release().await;
            return Ok(None);
        }
        Ok(Some(self.guard(key, lease, my_rev, opts, false).await?))
    }

    async fn is_locked(&self, key: &str) -> Result<bool> {
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
    }

    async fn info(&self, key: &str) -> Result<Option<LockInfo>> {
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
        let ttl = crate::lease::info(&self.conn, kv.lease())
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
            acquired_at: holder.map(|h| UNIX_EPOCH + Duration::from_millis(h.acquired_at_ms)),
        }))
    }
}
