//! `DistributedLock`: owner token + Lua, fencing by `INCR`, renewal, and
//! waiting on release notifications (pub/sub) with a jittered fallback.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use async_trait::async_trait;
use dashmap::DashMap;
use futures::StreamExt;
use im_infra::lock::{DistributedLock, LockCapabilities, LockGuard, LockInfo, LockOptions};
use im_infra::telemetry::OpMetrics;
use im_infra::{validate, Error, ErrorKind, Result};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

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
        if shared.client.cfg().is_cluster() {
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
        let delays_iter = delays.get_or_insert_with(|| s.client.cfg().retry.delays_forever());
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
/// absent; the fencing token comes from `INCR` of a per-key counter in the
/// same script (strictly increasing, never reset). Release and extension
/// compare the owner token in Lua. Waiters sleep until a release is
/// announced on a pub/sub channel, or a jittered fallback delay bounded by
/// the holder's remaining TTL.
pub struct RedisLock {
    shared: Arc<Shared>,
    acquire: OpMetrics,
    try_acquire: OpMetrics,
    is_locked: OpMetrics,
    info: OpMetrics,
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
        let m = |op| OpMetrics::new(crate::NAME, "lock", op);
        RedisLock {
            shared,
            acquire: m("lock.acquire"),
            try_acquire: m("lock.try_acquire"),
            is_locked: m("lock.is_locked"),
            info: m("lock.info"),
        }
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

    fn guard(&self, key: &str, token: String, fence: u64, opts: LockOptions) -> Box<dyn LockGuard> {
        Box::new(RedisLockGuard::start(
            self.shared.clone(),
            key,
            token,
            fence,
            opts,
        ))
    }

    async fn acquire_inner(&self, key: &str, opts: LockOptions) -> Result<Box<dyn LockGuard>> {
        self.shared.client.check_open()?;
        validate::key(key)?;
        opts.validate()?;
        let token = uuid::Uuid::new_v4().to_string();
        let deadline = Instant::now() + opts.wait_timeout;
        self.shared.notifier.ensure_started(&self.shared);
        let notify = self.shared.notifier.register(key);
        struct Unregister<'a>(&'a Shared, &'a str);
        impl Drop for Unregister<'_> {
            fn drop(&mut self) {
                self.0.notifier.unregister(self.1);
            }
        }
        let _unregister = Unregister(&self.shared, key);
        let mut backoff = Duration::from_millis(20);
        loop {
            let released = notify.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let remaining = match self.attempt(key, &token, opts.ttl).await {
                Ok(Attempt::Acquired(fence)) => return Ok(self.guard(key, token, fence, opts)),
                Ok(Attempt::Held(ttl)) => ttl,
                // A transient failure: keep trying until the deadline.
                Err(e) if e.is_retryable() => {
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    backoff
                }
                Err(e) => return Err(e),
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("lock {key:?} not acquired within {:?}", opts.wait_timeout),
                ));
            }
            // Fallback when no release is announced: jittered, never past
            // the holder's expiry or the deadline.
            let jittered = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
            let wait = jittered.min(remaining).min(deadline - now);
            backoff = (backoff * 2).min(Duration::from_millis(500));
            tokio::select! {
                _ = &mut released => {}
                _ = tokio::time::sleep(wait) => {}
                _ = self.shared.client.shutdown.cancelled() => return Err(Error::new(ErrorKind::Closed, "the redis backend was closed")),
            }
        }
    }
}

#[async_trait]
impl DistributedLock for RedisLock {
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
                let token = uuid::Uuid::new_v4().to_string();
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
                let n: u64 = self
                    .shared
                    .client
                    .query(redis::cmd("EXISTS").arg(self.shared.keys.lock(key)))
                    .await?;
                Ok(n == 1)
            })
            .await
    }

    async fn info(&self, key: &str) -> Result<Option<LockInfo>> {
        self.info
            .run(async {
                validate::key(key)?;
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
            })
            .await
    }
}

/// A held Redis lock.
pub struct RedisLockGuard {
    shared: Arc<Shared>,
    key: String,
    token: String,
    fence: u64,
    ttl_ms: Arc<AtomicU64>,
    /// Local deadline of the lease (renewals push it).
    expires: Arc<Mutex<Instant>>,
    lost: CancellationToken,
    released: AtomicBool,
    refresh: OpMetrics,
    release: OpMetrics,
}

impl std::fmt::Debug for RedisLockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLockGuard")
            .field("key", &self.key)
            .field("fencing_token", &self.fence)
            .finish()
    }
}

async fn extend(shared: &Shared, key: &str, token: &str, ttl_ms: u64) -> Result<bool> {
    let mut inv = EXTEND.prepare_invoke();
    inv.key(shared.keys.lock(key)).arg(token).arg(ttl_ms);
    let ok: i64 = shared.client.script(inv).await?;
    Ok(ok == 1)
}

async fn owner_is(shared: &Shared, key: &str, token: &str) -> Result<bool> {
    let owner: Option<String> = shared
        .client
        .query(redis::cmd("HGET").arg(shared.keys.lock(key)).arg("owner"))
        .await?;
    Ok(owner.as_deref() == Some(token))
}

fn lock_of(m: &Mutex<Instant>) -> std::sync::MutexGuard<'_, Instant> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RedisLockGuard {
    fn start(shared: Arc<Shared>, key: &str, token: String, fence: u64, opts: LockOptions) -> Self {
        let ttl_ms = Arc::new(AtomicU64::new(validate::ttl_millis(opts.ttl)));
        let expires = Arc::new(Mutex::new(Instant::now() + opts.ttl));
        let lost = CancellationToken::new();
        tokio::spawn(keeper(
            shared.clone(),
            key.to_owned(),
            token.clone(),
            opts.auto_renew,
            ttl_ms.clone(),
            expires.clone(),
            lost.clone(),
        ));
        let m = |op| OpMetrics::new(crate::NAME, "lock", op);
        RedisLockGuard {
            shared,
            key: key.to_owned(),
            token,
            fence,
            ttl_ms,
            expires,
            lost,
            released: AtomicBool::new(false),
            refresh: m("lock.refresh"),
            release: m("lock.release"),
        }
    }

    fn not_held(&self) -> Error {
        Error::new(
            ErrorKind::LockNotHeld,
            format!(
                "lock {:?} is not held any more (expired, taken over or released)",
                self.key
            ),
        )
    }
}

/// Renews the lock every ttl/3 (with `auto_renew`) or checks it at its
/// expiry, and cancels `lost` when it is gone. A Redis outage is ridden out
/// until the local lease deadline passes.
async fn keeper(
    shared: Arc<Shared>,
    key: String,
    token: String,
    auto_renew: bool,
    ttl_ms: Arc<AtomicU64>,
    expires: Arc<Mutex<Instant>>,
    lost: CancellationToken,
) {
    loop {
        let ttl = Duration::from_millis(ttl_ms.load(Ordering::Relaxed));
        let deadline = *lock_of(&expires);
        let wait = if auto_renew {
            (ttl / 3).max(Duration::from_millis(1))
        } else {
            deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(5)
        };
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = shared.client.shutdown.cancelled() => { lost.cancel(); return }
            _ = tokio::time::sleep(wait) => {}
        }
        if lost.is_cancelled() {
            return;
        }
        let started = Instant::now();
        let check = if auto_renew {
            extend(&shared, &key, &token, ttl.as_millis() as u64).await
        } else if Instant::now() < *lock_of(&expires) {
            // Refreshed meanwhile: sleep again until the new deadline.
            continue;
        } else {
            owner_is(&shared, &key, &token).await
        };
        match check {
            Ok(true) => {
                if auto_renew {
                    *lock_of(&expires) = started + ttl;
                } else {
                    // Still there at its local deadline (clock skew): look again shortly.
                    *lock_of(&expires) = Instant::now() + Duration::from_millis(50);
                }
            }
            Ok(false) => {
                tracing::warn!(key, "lock lost");
                lost.cancel();
                return;
            }
            Err(e) => {
                if Instant::now() >= *lock_of(&expires) {
                    tracing::warn!(key, error = %e, "lock lease ran out while redis was unreachable");
                    lost.cancel();
                    return;
                }
            }
        }
    }
}

#[async_trait]
impl LockGuard for RedisLockGuard {
    fn key(&self) -> &str {
        &self.key
    }

    fn fencing_token(&self) -> u64 {
        self.fence
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
    }

    fn is_held(&self) -> bool {
        !self.lost.is_cancelled() && Instant::now() < *lock_of(&self.expires)
    }

    fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    async fn refresh(&self, ttl: Duration) -> Result<()> {
        self.refresh
            .run(async {
                validate::ttl(ttl)?;
                if self.released.load(Ordering::Acquire) || self.lost.is_cancelled() {
                    return Err(self.not_held());
                }
                let started = Instant::now();
                let ms = validate::ttl_millis(ttl);
                if !extend(&self.shared, &self.key, &self.token, ms).await? {
                    self.lost.cancel();
                    return Err(self.not_held());
                }
                self.ttl_ms.store(ms, Ordering::Relaxed);
                *lock_of(&self.expires) = started + Duration::from_millis(ms);
                Ok(())
            })
            .await
    }

    async fn release(&self) -> Result<()> {
        self.release
            .run(async {
                let was = self.released.swap(true, Ordering::AcqRel);
                self.lost.cancel();
                if was {
                    return Err(self.not_held());
                }
                if release(&self.shared, &self.key, &self.token).await? {
                    Ok(())
                } else {
                    Err(self.not_held())
                }
            })
            .await
    }
}

async fn release(shared: &Shared, key: &str, token: &str) -> Result<bool> {
    let mut inv = RELEASE.prepare_invoke();
    inv.key(shared.keys.lock(key))
        .arg(token)
        .arg(shared.keys.lock_channel())
        .arg(key);
    let ok: i64 = shared.client.script(inv).await?;
    Ok(ok == 1)
}

impl Drop for RedisLockGuard {
    fn drop(&mut self) {
        self.lost.cancel();
        if !self.released.swap(true, Ordering::AcqRel) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let shared = self.shared.clone();
                let (key, token) = (self.key.clone(), self.token.clone());
                rt.spawn(async move {
                    if let Err(e) = release(&shared, &key, &token).await {
                        tracing::debug!(key, error = %e, "background release of a dropped lock guard failed");
                    }
                });
            }
        }
    }
}
