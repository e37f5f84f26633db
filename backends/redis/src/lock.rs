//! `DistributedLock`: owner token + Lua, a fencing counter that never goes
//! back, leases kept by the lease core, and waiting on release
//! notifications (pub/sub) with a jittered fallback.

use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use async_trait::async_trait;
use dashmap::DashMap;
use futures::StreamExt;
use im_infra::lease::{LeaseBackend, PendingLease, Tick};
use im_infra::lock::{
    DistributedLock, LeasedGuard, LockCapabilities, LockGuard, LockInfo, LockOptions,
};
use im_infra::{validate, Error, ErrorKind, Result};
use tokio::sync::Notify;

use crate::Shared;

static ACQUIRE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("scripts/lock_acquire.lua")));
static RELEASE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("scripts/lock_release.lua")));
static EXTEND: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("scripts/lock_extend.lua")));

/// Wakes waiters of a lock when its release is announced.
#[derive(Default)]
pub(crate) struct ReleaseNotifier {
    waiters: DashMap<String, (Arc<Notify>, usize)>,
    started: std::sync::OnceLock<()>,
}

impl ReleaseNotifier {
    fn register(&self, key: &str) -> Arc<Notify> {
        let mut e = self
            .waiters
            .entry(key.to_owned())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        e.1 += 1;
        e.0.clone()
    }

    fn unregister(&self, key: &str) {
        self.waiters.remove_if_mut(key, |_, (_, n)| {
            *n -= 1;
            *n == 0
        });
    }

    fn wake(&self, key: &str) {
        if let Some(w) = self.waiters.get(key) {
            w.0.notify_waiters();
        }
    }

    fn wake_all(&self) {
        for w in self.waiters.iter() {
            w.0.notify_waiters();
        }
    }

    /// Starts the subscriber once (single node only; a cluster relies on
    /// the jittered retry).
    fn ensure_started(&self, shared: &Arc<Shared>) {
        if shared.client.settings().is_cluster() {
            return;
        }
        self.started.get_or_init(|| {
            tokio::spawn(subscriber(Arc::downgrade(shared)));
        });
    }
}

/// Listens to release announcements, reconnecting forever with backoff; on
/// every (re)connection wakes all waiters, since releases may have been missed.
async fn subscriber(shared: std::sync::Weak<Shared>) {
    let mut delays = None;
    loop {
        let Some(s) = shared.upgrade() else { return };
        let stop = s.client.shutdown.clone();
        let channel = s.keys.lock_channel();
        let pubsub = s.client.pubsub().await;
        let delays_iter = delays.get_or_insert_with(|| s.client.settings().retry.delays_forever());
        let mut pubsub = match pubsub {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "lock release subscriber cannot connect; retrying");
                let d = delays_iter.next().unwrap_or(Duration::from_secs(1));
                drop(s);
                tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(d) => continue }
            }
        };
        if pubsub.subscribe(&channel).await.is_err() {
            let d = delays_iter.next().unwrap_or(Duration::from_secs(1));
            drop(s);
            tokio::select! { _ = stop.cancelled() => return, _ = tokio::time::sleep(d) => continue }
        }
        delays = None;
        s.notifier.wake_all();
        let notifier = Arc::downgrade(&s);
        drop(s);
        let mut messages = pubsub.on_message();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                msg = messages.next() => match msg {
                    Some(m) => {
                        let Some(s) = notifier.upgrade() else { return };
                        if let Ok(key) = m.get_payload::<String>() {
                            s.notifier.wake(&key);
                        }
                    }
                    None => break,
                }
            }
        }
    }
}

/// The lock service of a [`RedisBackend`](crate::RedisBackend).
///
/// A lock is a hash `{owner, fence, at}` with a `PX` expiry, set only when
/// absent (or already the caller's: an attempt whose answer was lost is
/// recognised by its owner token). The fencing token comes from a per-key
/// counter in the same script: the larger of the last token + 1 and the
/// server's clock in microseconds, so it strictly increases, also after
/// Redis comes back with older data (see the crate docs). Release and
/// extension compare the owner token in Lua; the guard is a
/// [`LeasedGuard`] whose lease ends at a local deadline before Redis can
/// expire the key. An attempt that fails or is dropped releases what it may
/// have taken. Waiters sleep until a release is announced on a pub/sub
/// channel, or a jittered fallback delay bounded by the holder's remaining
/// TTL. Handed out inside [`ObservedLock`](im_infra::layer::ObservedLock),
/// which checks keys and [`LockOptions`].
pub(crate) struct RedisLock {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLock").finish_non_exhaustive()
    }
}

enum Attempt {
    Acquired(u64),
    Held(Duration),
}

impl RedisLock {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RedisLock { shared }
    }

    async fn attempt(&self, key: &str, token: &str, ttl: Duration) -> Result<Attempt> {
        let keys = &self.shared.keys;
        let mut inv = ACQUIRE.prepare_invoke();
        inv.key(keys.lock(key))
            .key(keys.lock_fence(key))
            .arg(token)
            .arg(validate::ttl_millis(ttl));
        let (ok, n): (i64, i64) = self.shared.client.script(inv).await?;
        Ok(if ok == 1 {
            Attempt::Acquired(n as u64)
        } else {
            Attempt::Held(Duration::from_millis(n.max(1) as u64))
        })
    }

    fn pending(&self, key: &str, token: &str) -> PendingLease<HeldLock> {
        PendingLease::new(HeldLock {
            shared: self.shared.clone(),
            key: key.to_owned(),
            token: token.to_owned(),
        })
    }

    /// One acquisition attempt with `pending`'s token. An attempt whose
    /// answer is lost (an error, a dropped future) leaves `pending` armed,
    /// so what it may have taken is released unless a retry with the same
    /// token finds the lock its own.
    async fn attempt_with(
        &self,
        pending: &mut PendingLease<HeldLock>,
        ttl: Duration,
    ) -> Result<(Attempt, Tick)> {
        let sent = Tick::now();
        pending.arm();
        let held = pending.backend();
        let attempt = self.attempt(&held.key, &held.token, ttl).await?;
        if let Attempt::Held(_) = attempt {
            pending.disarm();
        }
        Ok((attempt, sent))
    }

    fn guard(
        key: &str,
        pending: PendingLease<HeldLock>,
        fence: u64,
        opts: LockOptions,
        sent: Tick,
    ) -> Box<dyn LockGuard> {
        let lease = pending.start(opts.lease_options(crate::NAME, opts.ttl), sent);
        Box::new(LeasedGuard::new(key, fence, lease))
    }
}

#[async_trait]
impl DistributedLock for RedisLock {
    fn capabilities(&self) -> LockCapabilities {
        LockCapabilities::default().with_info().with_fencing()
    }

    async fn acquire(&self, key: &str, opts: LockOptions) -> Result<Box<dyn LockGuard>> {
        // Before the release subscriber may be started.
        self.shared.client.check_open()?;
        let token = uuid::Uuid::new_v4().to_string();
        let deadline = opts.wait_deadline(Instant::now());
        let past_deadline = || deadline.is_some_and(|d| Instant::now() >= d);
        self.shared.notifier.ensure_started(&self.shared);
        let notify = self.shared.notifier.register(key);
        struct Unregister<'a>(&'a Shared, &'a str);
        impl Drop for Unregister<'_> {
            fn drop(&mut self) {
                self.0.notifier.unregister(self.1);
            }
        }
        let _unregister = Unregister(&self.shared, key);
        let mut pending = self.pending(key, &token);
        let mut backoff = Duration::from_millis(20);
        loop {
            let released = notify.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let remaining = match self.attempt_with(&mut pending, opts.ttl).await {
                Ok((Attempt::Acquired(fence), sent)) => {
                    return Ok(Self::guard(key, pending, fence, opts, sent))
                }
                Ok((Attempt::Held(ttl), _)) => ttl,
                // A transient failure: keep trying (with the same token, so
                // an attempt the server applied is found ours) until the
                // deadline.
                Err(e) if e.is_retryable() => {
                    if past_deadline() {
                        return Err(e);
                    }
                    backoff
                }
                Err(e) => return Err(e),
            };
            if past_deadline() {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("lock {key:?} not acquired within {:?}", opts.wait_timeout),
                ));
            }
            // Fallback when no release is announced: jittered, never past
            // the holder's expiry or the deadline.
            let jittered = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
            let mut wait = jittered.min(remaining);
            if let Some(d) = deadline {
                wait = wait.min(d.saturating_duration_since(Instant::now()));
            }
            backoff = (backoff * 2).min(Duration::from_millis(500));
            tokio::select! {
                _ = &mut released => {}
                _ = tokio::time::sleep(wait) => {}
                _ = self.shared.client.shutdown.cancelled() => return Err(Error::new(ErrorKind::Closed, "the redis backend was closed")),
            }
        }
    }

    async fn try_acquire(
        &self,
        key: &str,
        opts: LockOptions,
    ) -> Result<Option<Box<dyn LockGuard>>> {
        let token = uuid::Uuid::new_v4().to_string();
        let mut pending = self.pending(key, &token);
        Ok(match self.attempt_with(&mut pending, opts.ttl).await? {
            (Attempt::Acquired(fence), sent) => Some(Self::guard(key, pending, fence, opts, sent)),
            (Attempt::Held(_), _) => None,
        })
    }

    async fn is_locked(&self, key: &str) -> Result<bool> {
        let n: u64 = self
            .shared
            .client
            .query(redis::cmd("EXISTS").arg(self.shared.keys.lock(key)))
            .await?;
        Ok(n == 1)
    }

    async fn info(&self, key: &str) -> Result<Option<LockInfo>> {
        let k = self.shared.keys.lock(key);
        let mut p = redis::pipe();
        p.atomic()
            .cmd("HMGET")
            .arg(&k)
            .arg("owner")
            .arg("fence")
            .arg("at")
            .cmd("PTTL")
            .arg(&k);
        let ((owner, fence, at), pttl): ((Option<String>, Option<u64>, Option<u64>), i64) =
            self.shared.client.pipe(&p).await?;
        let (Some(owner), Some(fence)) = (owner, fence) else {
            return Ok(None);
        };
        Ok(Some(LockInfo {
            key: key.to_owned(),
            owner,
            fencing_token: fence,
            ttl: (pttl >= 0).then(|| Duration::from_millis(pttl as u64)),
            acquired_at: at.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
        }))
    }
}

/// A lock held on Redis, as the lease core sees it: extended and released
/// by owner-checking scripts.
struct HeldLock {
    shared: Arc<Shared>,
    key: String,
    token: String,
}

#[async_trait]
impl LeaseBackend for HeldLock {
    fn describe(&self) -> String {
        format!("lock {:?}", self.key)
    }

    async fn extend(&self, ttl: Duration) -> Result<bool> {
        let mut inv = EXTEND.prepare_invoke();
        inv.key(self.shared.keys.lock(&self.key))
            .arg(&self.token)
            .arg(validate::ttl_millis(ttl));
        let ok: i64 = self.shared.client.script(inv).await?;
        Ok(ok == 1)
    }

    async fn release(&self) -> Result<bool> {
        let mut inv = RELEASE.prepare_invoke();
        inv.key(self.shared.keys.lock(&self.key))
            .arg(&self.token)
            .arg(self.shared.keys.lock_channel())
            .arg(&self.key);
        let ok: i64 = self.shared.client.script(inv).await?;
        Ok(ok == 1)
    }
}
