//! In-process idempotency records.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use im_infra::once::{Claim, Once};
use im_infra::telemetry::OpMetrics;
use im_infra::{validate, Error, ErrorKind, Result};

use crate::Shared;

#[derive(Debug, Clone)]
enum Record {
    Claimed { token: String, expires_at: Instant },
    Done { outcome: Bytes, expires_at: Instant },
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
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn purge(&self) {
        let now = Instant::now();
        self.records().retain(|_, r| r.live(now));
    }
}

/// The idempotency handle of a [`MemoryBackend`](crate::MemoryBackend).
pub struct MemoryOnce {
    shared: Arc<Shared>,
    claim: OpMetrics,
    complete: OpMetrics,
    abandon: OpMetrics,
    outcome: OpMetrics,
    reset: OpMetrics,
}

impl std::fmt::Debug for MemoryOnce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryOnce").finish_non_exhaustive()
    }
}

impl MemoryOnce {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let m = |op| OpMetrics::new(crate::NAME, "once", op);
        MemoryOnce {
            shared,
            claim: m("once.claim"),
            complete: m("once.complete"),
            abandon: m("once.abandon"),
            outcome: m("once.outcome"),
            reset: m("once.reset"),
        }
    }

    /// Whether `token` holds a live claim on `key`.
    fn holds(records: &HashMap<String, Record>, key: &str, token: &str, now: Instant) -> bool {
        matches!(records.get(key), Some(Record::Claimed { token: t, expires_at }) if t == token && *expires_at > now)
    }

    fn not_held(key: &str) -> Error {
        Error::new(
            ErrorKind::LockNotHeld,
            format!("the claim on {key:?} expired or belongs to another caller"),
        )
    }
}

#[async_trait]
impl Once for MemoryOnce {
    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim> {
        self.claim.run_sync(|| {
            self.shared.check_open()?;
            validate::key(key)?;
            validate::ttl(ttl)?;
            let now = Instant::now();
            let mut records = self.shared.once.records();
            match records.get(key) {
                Some(Record::Done {
                    outcome,
                    expires_at,
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
        })
    }

    async fn complete(&self, key: &str, token: &str, outcome: Bytes, ttl: Duration) -> Result<()> {
        self.complete.run_sync(|| {
            self.shared.check_open()?;
            validate::key(key)?;
            validate::ttl(ttl)?;
            validate::value(outcome.len(), self.shared.config.max_value_bytes)?;
            let now = Instant::now();
            let mut records = self.shared.once.records();
            if !Self::holds(&records, key, token, now) {
                return Err(Self::not_held(key));
            }
            records.insert(
                key.to_owned(),
                Record::Done {
                    outcome,
                    expires_at: now + ttl,
                },
            );
            Ok(())
        })
    }

    async fn abandon(&self, key: &str, token: &str) -> Result<()> {
        self.abandon.run_sync(|| {
            self.shared.check_open()?;
            validate::key(key)?;
            let now = Instant::now();
            let mut records = self.shared.once.records();
            if !Self::holds(&records, key, token, now) {
                return Err(Self::not_held(key));
            }
            records.remove(key);
            Ok(())
        })
    }

    async fn outcome(&self, key: &str) -> Result<Option<Bytes>> {
        self.outcome.run_sync(|| {
            self.shared.check_open()?;
            validate::key(key)?;
            let now = Instant::now();
            Ok(match self.shared.once.records().get(key) {
                Some(Record::Done {
                    outcome,
                    expires_at,
                }) if *expires_at > now => Some(outcome.clone()),
                _ => None,
            })
        })
    }

    async fn reset(&self, key: &str) -> Result<bool> {
        self.reset.run_sync(|| {
            self.shared.check_open()?;
            validate::key(key)?;
            let now = Instant::now();
            Ok(self
                .shared
                .once
                .records()
                .remove(key)
                .is_some_and(|r| r.live(now)))
        })
    }
}
