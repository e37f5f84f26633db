//! `DistributedLock`: owner token + Lua, a fencing counter that never goes
//! back, leases kept by the lease core, and waiting on release
//! notifications (pub/sub) with a jittered fallback.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use dashmap::DashMap;
use futures::StreamExt;
use im_infra::lease::LeaseBackend;
use im_infra::lock::attempts::{self, Attempt, ReleaseWatch, TokenLock};
use im_infra::lock::{DistributedLock, LockCapabilities, LockGuard, LockInfo, LockOptions};
use im_infra::{validate, Result};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::client;
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
        let stop = s.client.stop().clone();
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

impl RedisLock {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RedisLock { shared }
    }
}

#[async_trait]
impl TokenLock for RedisLock {
    type Held = HeldLock;

    fn backend(&self) -> &'static str {
        crate::NAME
    }

    fn holder(&self, key: &str) -> HeldLock {
        HeldLock {
            shared: self.shared.clone(),
            key: key.to_owned(),
            token: uuid::Uuid::new_v4().to_string(),
        }
    }

    async fn attempt(&self, held: &HeldLock, ttl: Duration) -> Result<Attempt> {
        let keys = &self.shared.keys;
        let lock = [keys.lock(&held.key), keys.lock_fence(&held.key)];
        let mut cmd = client::evalsha(&ACQUIRE, lock);
        cmd.arg(&held.token).arg(validate::ttl_millis(ttl));
        let (ok, n): (i64, i64) = self.shared.client.script(&ACQUIRE, &cmd).await?;
        Ok(if ok == 1 {
            Attempt::Acquired(n as u64)
        } else {
            Attempt::Held(Duration::from_millis(n.max(1) as u64))
        })
    }

    fn closed(&self) -> &CancellationToken {
        self.shared.client.stop()
    }

    fn releases(&self, key: &str) -> Option<ReleaseWatch> {
        self.shared.notifier.ensure_started(&self.shared);
        let notify = self.shared.notifier.register(key);
        struct Unregister(Arc<Shared>, String);
        impl Drop for Unregister {
            fn drop(&mut self) {
                self.0.notifier.unregister(&self.1);
            }
        }
        Some(ReleaseWatch::new(
            notify,
            Unregister(self.shared.clone(), key.to_owned()),
        ))
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
        attempts::acquire(self, key, opts).await
    }

    async fn try_acquire(
        &self,
        key: &str,
        opts: LockOptions,
    ) -> Result<Option<Box<dyn LockGuard>>> {
        attempts::try_acquire(self, key, opts).await
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
pub(crate) struct HeldLock {
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
        let mut cmd = client::evalsha(&EXTEND, [self.shared.keys.lock(&self.key)]);
        cmd.arg(&self.token).arg(validate::ttl_millis(ttl));
        let ok: i64 = self.shared.client.script(&EXTEND, &cmd).await?;
        Ok(ok == 1)
    }

    async fn release(&self) -> Result<bool> {
        let mut cmd = client::evalsha(&RELEASE, [self.shared.keys.lock(&self.key)]);
        cmd.arg(&self.token)
            .arg(self.shared.keys.lock_channel())
            .arg(&self.key);
        let ok: i64 = self.shared.client.script(&RELEASE, &cmd).await?;
        Ok(ok == 1)
    }
}
