//! `Once` on one Redis hash per key.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use im_infra::once::{claim_lease, Claim, ClaimLease, ClaimStore, Once, OnceCapabilities};
use im_infra::{validate, Result};

use crate::client;
use crate::Shared;

static CLAIM: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("scripts/once_claim.lua")));
static FINISH: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("scripts/once_finish.lua")));

/// Idempotency on a [`RedisBackend`](crate::RedisBackend): a hash
/// `{state, token, outcome}` per key with a `PX` expiry; claim, complete
/// and abandon are Lua scripts that check the claim's owner. Handed out
/// inside [`ObservedOnce`](im_infra::layer::ObservedOnce), which checks
/// keys, TTLs and outcome sizes.
pub(crate) struct RedisOnce {
    shared: Arc<Shared>,
}

impl RedisOnce {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RedisOnce { shared }
    }

    async fn finish(
        &self,
        key: &str,
        token: &str,
        action: &str,
        outcome: &[u8],
        ttl: Duration,
    ) -> Result<()> {
        if finish(&self.shared, key, token, action, outcome, ttl).await? {
            Ok(())
        } else {
            Err(im_infra::once::not_held(key))
        }
    }
}

/// Runs the finishing script; true when the claim was `token`'s.
async fn finish(
    shared: &Shared,
    key: &str,
    token: &str,
    action: &str,
    outcome: &[u8],
    ttl: Duration,
) -> Result<bool> {
    let mut cmd = client::evalsha(&FINISH, [shared.keys.once(key)]);
    cmd.arg(token)
        .arg(action)
        .arg(outcome)
        .arg(validate::ttl_millis(ttl));
    let ok: i64 = shared.client.script(&FINISH, &cmd).await?;
    Ok(ok == 1)
}

#[async_trait]
impl ClaimStore for Shared {
    async fn renew_claim(&self, key: &str, token: &str, ttl: Duration) -> Result<bool> {
        finish(self, key, token, "renew", b"", ttl).await
    }

    async fn abandon_claim(&self, key: &str, token: &str) -> Result<bool> {
        finish(self, key, token, "abandon", b"", Duration::from_millis(1)).await
    }

    async fn complete_claim(
        &self,
        key: &str,
        token: &str,
        outcome: Bytes,
        ttl: Duration,
    ) -> Result<()> {
        if finish(self, key, token, "complete", &outcome, ttl).await? {
            Ok(())
        } else {
            Err(im_infra::once::not_held(key))
        }
    }
}

#[async_trait]
impl Once for RedisOnce {
    fn capabilities(&self) -> OnceCapabilities {
        OnceCapabilities::default().with_max_outcome(self.shared.client.settings().max_value_bytes)
    }

    fn claim_lease(&self, key: &str, token: &str) -> Arc<dyn ClaimLease> {
        claim_lease(self.shared.clone(), key, token)
    }

    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim> {
        let token = uuid::Uuid::new_v4().to_string();
        let mut cmd = client::evalsha(&CLAIM, [self.shared.keys.once(key)]);
        cmd.arg(&token).arg(validate::ttl_millis(ttl));
        let (state, outcome): (i64, Vec<u8>) = self.shared.client.script(&CLAIM, &cmd).await?;
        Ok(match state {
            0 => Claim::Acquired { token },
            1 => Claim::InProgress,
            _ => Claim::Done(Bytes::from(outcome)),
        })
    }

    async fn complete(&self, key: &str, token: &str, outcome: Bytes, ttl: Duration) -> Result<()> {
        self.shared.complete_claim(key, token, outcome, ttl).await
    }

    async fn abandon(&self, key: &str, token: &str) -> Result<()> {
        self.finish(key, token, "abandon", b"", Duration::from_millis(1))
            .await
    }

    async fn outcome(&self, key: &str) -> Result<Option<Bytes>> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.shared.keys.once(key))
            .arg("state")
            .arg("outcome");
        let (state, outcome): (Option<String>, Option<Vec<u8>>) =
            self.shared.client.query(&cmd).await?;
        Ok(match (state.as_deref(), outcome) {
            (Some("done"), Some(o)) => Some(Bytes::from(o)),
            _ => None,
        })
    }

    async fn reset(&self, key: &str) -> Result<bool> {
        let n: u64 = self
            .shared
            .client
            .query(redis::cmd("DEL").arg(self.shared.keys.once(key)))
            .await?;
        Ok(n == 1)
    }
}
