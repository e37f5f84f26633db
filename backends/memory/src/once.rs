//! In-process idempotency records.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use im_infra::once::{claim_lease, Claim, ClaimLease, ClaimStore, Once, OnceCapabilities};
use im_infra::Result;

use crate::Shared;

#[derive(Debug, Clone)]
enum Record {
    Claimed {
        token: String,
        expires_at: Instant,
    },
    Done {
        token: String,
        outcome: Bytes,
        expires_at: Instant,
    },
}

impl Record {
    fn live(&self, now: Instant) -> bool {
        match self {
            Record::Claimed { expires_at, .. } | Record::Done { expires_at, .. } => {
                *expires_at > now
            }
        }
    }
}

/// Records shared by every `Once` handle of one backend.
#[derive(Debug, Default)]
pub(crate) struct OnceStore {
    records: Mutex<HashMap<String, Record>>,
}

impl OnceStore {
    fn records(&self) -> MutexGuard<'_, HashMap<String, Record>> {
        self.records.lock()
    }

    /// Extends `token`'s live claim on `key`; true also when `token`
    /// completed it.
    fn renew(&self, key: &str, token: &str, ttl: Duration) -> bool {
        let now = Instant::now();
        match self.records().get_mut(key) {
            Some(Record::Claimed {
                token: t,
                expires_at,
            }) if t == token && *expires_at > now => {
                *expires_at = now + ttl;
                true
            }
            Some(Record::Done { token: t, .. }) => t == token,
            _ => false,
        }
    }

    /// Removes `token`'s live claim on `key`.
    fn abandon(&self, key: &str, token: &str) -> bool {
        let now = Instant::now();
        let mut records = self.records();
        let mine = matches!(records.get(key), Some(Record::Claimed { token: t, expires_at }) if t == token && *expires_at > now);
        if mine {
            records.remove(key);
        }
        mine
    }

    pub(crate) fn purge(&self) {
        let now = Instant::now();
        self.records().retain(|_, r| r.live(now));
    }
}

/// The idempotency handle of a [`MemoryBackend`](crate::MemoryBackend).
/// The backend hands it out inside an
/// [`ObservedOnce`](im_infra::layer::ObservedOnce), which checks the
/// arguments and does the telemetry.
pub(crate) struct MemoryOnce {
    shared: Arc<Shared>,
}

impl MemoryOnce {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MemoryOnce { shared }
    }

    /// Whether `token` holds a live claim on `key`.
    fn holds(records: &HashMap<String, Record>, key: &str, token: &str, now: Instant) -> bool {
        matches!(records.get(key), Some(Record::Claimed { token: t, expires_at }) if t == token && *expires_at > now)
    }
}

#[async_trait]
impl ClaimStore for Shared {
    async fn renew_claim(&self, key: &str, token: &str, ttl: Duration) -> Result<bool> {
        self.check_open()?;
        Ok(self.once.renew(key, token, ttl))
    }

    async fn abandon_claim(&self, key: &str, token: &str) -> Result<bool> {
        Ok(self.once.abandon(key, token))
    }

    async fn complete_claim(
        &self,
        key: &str,
        token: &str,
        outcome: Bytes,
        ttl: Duration,
    ) -> Result<()> {
        self.check_open()?;
        let now = Instant::now();
        let mut records = self.once.records();
        if let Some(Record::Done { token: t, .. }) = records.get(key) {
            if t == token {
                return Ok(()); // completed by this caller already
            }
        }
        if !MemoryOnce::holds(&records, key, token, now) {
            return Err(im_infra::once::not_held(key));
        }
        records.insert(
            key.to_owned(),
            Record::Done {
                token: token.to_owned(),
                outcome,
                expires_at: now + ttl,
            },
        );
        Ok(())
    }
}

#[async_trait]
impl Once for MemoryOnce {
    fn capabilities(&self) -> OnceCapabilities {
        OnceCapabilities::default().with_max_outcome(self.shared.settings.max_value_bytes)
    }

    fn claim_lease(&self, key: &str, token: &str) -> Arc<dyn ClaimLease> {
        claim_lease(self.shared.clone(), key, token)
    }

    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim> {
        self.shared.check_open()?;
        let now = Instant::now();
        let mut records = self.shared.once.records();
        match records.get(key) {
            Some(Record::Done {
                outcome,
                expires_at,
                ..
            }) if *expires_at > now => {
                return Ok(Claim::Done(outcome.clone()));
            }
            Some(Record::Claimed { expires_at, .. }) if *expires_at > now => {
                return Ok(Claim::InProgress)
            }
            _ => {}
        }
        let token = uuid::Uuid::new_v4().to_string();
        records.insert(
            key.to_owned(),
            Record::Claimed {
                token: token.clone(),
                expires_at: now + ttl,
            },
        );
        Ok(Claim::Acquired { token })
    }

    async fn complete(&self, key: &str, token: &str, outcome: Bytes, ttl: Duration) -> Result<()> {
        self.shared.complete_claim(key, token, outcome, ttl).await
    }

    async fn abandon(&self, key: &str, token: &str) -> Result<()> {
        self.shared.check_open()?;
        if !self.shared.once.abandon(key, token) {
            return Err(im_infra::once::not_held(key));
        }
        Ok(())
    }

    async fn outcome(&self, key: &str) -> Result<Option<Bytes>> {
        self.shared.check_open()?;
        let now = Instant::now();
        Ok(match self.shared.once.records().get(key) {
            Some(Record::Done {
                outcome,
                expires_at,
                ..
            }) if *expires_at > now => Some(outcome.clone()),
            _ => None,
        })
    }

    async fn reset(&self, key: &str) -> Result<bool> {
        self.shared.check_open()?;
        let now = Instant::now();
        Ok(self
            .shared
            .once
            .records()
            .remove(key)
            .is_some_and(|r| r.live(now)))
    }
}
