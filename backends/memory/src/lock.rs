//! In-process locks with TTLs, fair waiting, fencing and expiry.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use im_infra::lease::{Lease, LeaseBackend, Tick};
use im_infra::lock::{
    DistributedLock, LeasedGuard, LockCapabilities, LockGuard, LockInfo, LockOptions,
};
use im_infra::Result;
use tokio::sync::Notify;

use crate::Shared;

#[derive(Debug, Clone)]
struct Holder {
    token: String,
    fencing: u64,
    expires_at: Instant,
    acquired_at: SystemTime,
}

#[derive(Debug, Default)]
struct KeyState {
    holder: Option<Holder>,
    /// Waiting acquirers, first come first served.
    queue: VecDeque<u64>,
    notify: Arc<Notify>,
}

impl KeyState {
    fn live_holder(&mut self, now: Instant) -> Option<&Holder> {
        if self.holder.as_ref().is_some_and(|h| h.expires_at <= now) {
            self.holder = None;
            self.notify.notify_waiters();
        }
        self.holder.as_ref()
    }
}

/// Locks of every handle of one backend.
#[derive(Debug, Default)]
pub(crate) struct LockStore {
    keys: Mutex<HashMap<String, KeyState>>,
    /// One counter for every key: strictly increasing per key as required.
    fencing: AtomicU64,
    waiter_ids: AtomicU64,
}

impl LockStore {
    fn keys(&self) -> MutexGuard<'_, HashMap<String, KeyState>> {
        self.keys.lock()
    }

    /// How many keys have an entry.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.keys().len()
    }

    /// Takes the lock for `token` if it is free and nobody waits ahead.
    fn take(&self, key: &str, token: &str, ttl: Duration, waiter: Option<u64>) -> Option<Holder> {
        let now = Instant::now();
        let mut keys = self.keys();
        let state = keys.entry(key.to_owned()).or_default();
        if state.live_holder(now).is_some() {
            return None;
        }
        match (waiter, state.queue.front()) {
            (Some(me), Some(&first)) if me != first => return None,
            (None, Some(_)) => return None,
            _ => {}
        }
        if waiter.is_some() {
            state.queue.pop_front();
        }
        let holder = Holder {
            token: token.to_owned(),
            fencing: self.fencing.fetch_add(1, Ordering::Relaxed) + 1,
            expires_at: now + ttl,
            acquired_at: SystemTime::now(),
        };
        state.holder = Some(holder.clone());
        Some(holder)
    }

    fn notify_of(&self, key: &str) -> Arc<Notify> {
        self.keys()
            .entry(key.to_owned())
            .or_default()
            .notify
            .clone()
    }

    fn leave_queue(&self, key: &str, waiter: u64) {
        let mut keys = self.keys();
        if let Some(state) = keys.get_mut(key) {
            state.queue.retain(|w| *w != waiter);
            state.notify.notify_waiters();
            if state.holder.is_none() && state.queue.is_empty() {
                keys.remove(key);
            }
        }
    }

    /// Extends the lock if `token` still holds it.
    fn refresh(&self, key: &str, token: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        let mut keys = self.keys();
        let Some(state) = keys.get_mut(key) else {
            return false;
        };
        match state.live_holder(now) {
            Some(h) if h.token == token => {
                if let Some(h) = state.holder.as_mut() {
                    h.expires_at = now + ttl;
                }
                true
            }
            _ => false,
        }
    }

    /// Releases the lock if `token` still holds it.
    fn release(&self, key: &str, token: &str) -> bool {
        let now = Instant::now();
        let mut keys = self.keys();
        let Some(state) = keys.get_mut(key) else {
            return false;
        };
        let mine = matches!(state.live_holder(now), Some(h) if h.token == token);
        if mine {
            state.holder = None;
            state.notify.notify_waiters();
        }
        // Nothing left of the key (released, or its holder expired): the
        // entry goes, so keys used once do not pile up.
        if state.holder.is_none() && state.queue.is_empty() {
            keys.remove(key);
        }
        mine
    }

    fn holder(&self, key: &str) -> Option<Holder> {
        let now = Instant::now();
        let mut keys = self.keys();
        keys.get_mut(key).and_then(|s| s.live_holder(now).cloned())
    }

    /// When the current holder's lease ends, if any.
    fn expiry(&self, key: &str) -> Option<Instant> {
        self.keys()
            .get(key)
            .and_then(|s| s.holder.as_ref().map(|h| h.expires_at))
    }
}

/// Removes a waiter from the queue when its `acquire` ends in any way.
struct QueueTicket<'a> {
    store: &'a LockStore,
    key: &'a str,
    id: u64,
    done: bool,
}

impl Drop for QueueTicket<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.store.leave_queue(self.key, self.id);
        }
    }
}

/// The lock service of a [`MemoryBackend`](crate::MemoryBackend). Fair:
/// waiters acquire in arrival order. The backend hands it out inside an
/// [`ObservedLock`](im_infra::layer::ObservedLock), which checks the
/// arguments and does the telemetry.
pub(crate) struct MemoryLock {
    shared: Arc<Shared>,
}

impl MemoryLock {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MemoryLock { shared }
    }

    fn store(&self) -> &LockStore {
        &self.shared.locks
    }

    fn guard(
        &self,
        key: &str,
        token: String,
        holder: Holder,
        opts: LockOptions,
        sent: Tick,
    ) -> Box<dyn LockGuard> {
        let lease = Lease::start(
            HeldLock {
                shared: self.shared.clone(),
                key: key.to_owned(),
                token,
            },
            opts.lease_options(crate::NAME, opts.ttl),
            sent,
        );
        Box::new(LeasedGuard::new(key, holder.fencing, lease))
    }
}

#[async_trait]
impl DistributedLock for MemoryLock {
    fn capabilities(&self) -> LockCapabilities {
        LockCapabilities::default()
            .with_fair()
            .with_info()
            .with_fencing()
    }

    async fn acquire(&self, key: &str, opts: LockOptions) -> Result<Box<dyn LockGuard>> {
        self.shared.check_open()?;
        let token = uuid::Uuid::new_v4().to_string();
        let store = self.store();
        let deadline = opts
            .wait_deadline(Instant::now())
            .map(tokio::time::Instant::from_std);
        let id = store.waiter_ids.fetch_add(1, Ordering::Relaxed);
        store
            .keys()
            .entry(key.to_owned())
            .or_default()
            .queue
            .push_back(id);
        let mut ticket = QueueTicket {
            store,
            key,
            id,
            done: false,
        };
        let notify = store.notify_of(key);
        let closed = self.shared.stop().clone();
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // A backend closed while this waited grants nothing more.
            self.shared.check_open()?;
            let sent = Tick::now();
            if let Some(holder) = store.take(key, &token, opts.ttl, Some(id)) {
                ticket.done = true;
                return Ok(self.guard(key, token, holder, opts, sent));
            }
            // Wake up at the holder's expiry at the latest (a dead holder
            // does not notify).
            let expiry = store.expiry(key).map(tokio::time::Instant::from_std);
            let wake = match (expiry, deadline) {
                (Some(e), Some(d)) => Some(e.min(d)),
                (e, d) => e.or(d),
            };
            match wake {
                Some(wake) => tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep_until(wake) => {}
                    _ = closed.cancelled() => {}
                },
                None => tokio::select! {
                    _ = &mut notified => {}
                    _ = closed.cancelled() => {}
                },
            }
            self.shared.check_open()?;
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                let sent = Tick::now();
                if let Some(holder) = store.take(key, &token, opts.ttl, Some(id)) {
                    ticket.done = true;
                    return Ok(self.guard(key, token, holder, opts, sent));
                }
                return Err(im_infra::lock::not_acquired(key, opts.wait_timeout));
            }
        }
    }

    async fn try_acquire(
        &self,
        key: &str,
        opts: LockOptions,
    ) -> Result<Option<Box<dyn LockGuard>>> {
        self.shared.check_open()?;
        let token = uuid::Uuid::new_v4().to_string();
        let sent = Tick::now();
        Ok(self
            .store()
            .take(key, &token, opts.ttl, None)
            .map(|h| self.guard(key, token, h, opts, sent)))
    }

    async fn is_locked(&self, key: &str) -> Result<bool> {
        self.shared.check_open()?;
        Ok(self.store().holder(key).is_some())
    }

    async fn info(&self, key: &str) -> Result<Option<LockInfo>> {
        self.shared.check_open()?;
        Ok(self.store().holder(key).map(|h| LockInfo {
            key: key.to_owned(),
            owner: h.token,
            fencing_token: h.fencing,
            ttl: Some(h.expires_at.saturating_duration_since(Instant::now())),
            acquired_at: Some(h.acquired_at),
        }))
    }
}

/// A lock held in the store, as the lease core sees it.
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
        self.shared.check_open()?;
        Ok(self.shared.locks.refresh(&self.key, &self.token, ttl))
    }

    async fn release(&self) -> Result<bool> {
        Ok(self.shared.locks.release(&self.key, &self.token))
    }
}
