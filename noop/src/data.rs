//! Null cache, limiter and once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use im_infra::cache::{Cache, CacheCapabilities, KeyTtl};
use im_infra::lease::LeaseBackend;
use im_infra::once::{Claim, ClaimLease, Once};
use im_infra::ratelimit::{Check, Decision, DecisionSource, Limiter};
use im_infra::Result;

/// A cache that stores nothing: every read misses.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopCache;

#[async_trait]
impl Cache for NoopCache {
    fn capabilities(&self) -> CacheCapabilities {
        let mut caps = CacheCapabilities::storing(usize::MAX);
        caps.stores_values = false;
        caps
    }

    async fn get(&self, _key: &str) -> Result<Option<Bytes>> {
        Ok(None)
    }

    async fn set(&self, _key: &str, _value: Bytes, _ttl: Option<Duration>) -> Result<()> {
        Ok(())
    }

    async fn set_nx(&self, _key: &str, _value: Bytes, _ttl: Option<Duration>) -> Result<bool> {
        Ok(true)
    }

    async fn delete<'k>(&self, _keys: &[&'k str]) -> Result<u64> {
        Ok(0)
    }

    async fn exists(&self, _key: &str) -> Result<bool> {
        Ok(false)
    }

    async fn expire(&self, _key: &str, _ttl: Duration) -> Result<bool> {
        Ok(false)
    }

    async fn ttl(&self, _key: &str) -> Result<KeyTtl> {
        Ok(KeyTtl::Missing)
    }

    async fn incr_by(&self, _key: &str, delta: i64) -> Result<i64> {
        Ok(delta)
    }

    async fn get_many<'k>(&self, keys: &[&'k str]) -> Result<Vec<Option<Bytes>>> {
        Ok(vec![None; keys.len()])
    }

    async fn set_many<'k>(
        &self,
        _entries: &[(&'k str, Bytes)],
        _ttl: Option<Duration>,
    ) -> Result<()> {
        Ok(())
    }
}

/// A limiter that allows everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopLimiter;

impl Limiter for NoopLimiter {
    fn check<'a>(&'a self, _resource: &'a str, _key: &'a str, _n: u64) -> Check<'a> {
        Check::ready(Ok(Decision {
            allowed: true,
            limit: u64::MAX,
            remaining: u64::MAX,
            retry_after: Duration::ZERO,
            reset_after: Duration::ZERO,
            denied: None,
            source: DecisionSource::Backend,
        }))
    }
}

/// A claim that holds nothing anywhere, kept forever.
struct NothingClaimed(String);

#[async_trait]
impl LeaseBackend for NothingClaimed {
    fn describe(&self) -> String {
        format!("noop once claim {:?}", self.0)
    }

    async fn extend(&self, _ttl: Duration) -> Result<bool> {
        Ok(true)
    }

    async fn release(&self) -> Result<bool> {
        Ok(true)
    }
}

#[async_trait]
impl ClaimLease for NothingClaimed {
    async fn complete(&self, _outcome: Bytes, _ttl: Duration) -> Result<()> {
        Ok(())
    }
}

/// Idempotency that always lets the work run and stores nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopOnce;

#[async_trait]
impl Once for NoopOnce {
    fn claim_lease(&self, key: &str, _token: &str) -> Arc<dyn ClaimLease> {
        Arc::new(NothingClaimed(key.to_owned()))
    }

    async fn claim(&self, _key: &str, _ttl: Duration) -> Result<Claim> {
        Ok(Claim::Acquired {
            token: String::new(),
        })
    }

    async fn complete(
        &self,
        _key: &str,
        _token: &str,
        _outcome: Bytes,
        _ttl: Duration,
    ) -> Result<()> {
        Ok(())
    }

    async fn abandon(&self, _key: &str, _token: &str) -> Result<()> {
        Ok(())
    }

    async fn outcome(&self, _key: &str) -> Result<Option<Bytes>> {
        Ok(None)
    }

    async fn reset(&self, _key: &str) -> Result<bool> {
        Ok(false)
    }
}
