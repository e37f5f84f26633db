//! The layer of [`Once`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::Result;
use crate::lease::LeaseBackend;
use crate::once::{Claim, ClaimLease, Once, OnceCapabilities};
use crate::telemetry::OpMetrics;
use crate::validate;

ops!(OnceOps, "once" {
    claim => "once.claim",
    complete => "once.complete",
    abandon => "once.abandon",
    outcome => "once.outcome",
    reset => "once.reset",
});

/// Argument checks (keys, TTLs, outcomes against the inner backend's
/// [`OnceCapabilities::max_outcome_bytes`]) and telemetry (`once.*`)
/// around an idempotency backend. The claim's lease is the inner
/// backend's (its renewals are the lease core's `lease.*` operations).
///
/// ```
/// use std::sync::Arc;
/// use im_infra::layer::ObservedOnce;
/// use im_infra::once::Once;
///
/// fn hand_out<O: Once>(raw: O) -> Arc<dyn Once> {
///     Arc::new(ObservedOnce::new("redis", raw))
/// }
/// ```
pub struct ObservedOnce<O> {
    inner: O,
    ops: OnceOps,
    max_outcome_bytes: usize,
}

impl<O: Once> ObservedOnce<O> {
    /// `inner`, observed as the idempotency backend of `backend`.
    pub fn new(backend: &'static str, inner: O) -> Self {
        ObservedOnce {
            max_outcome_bytes: inner.capabilities().max_outcome_bytes,
            ops: OnceOps::new(backend),
            inner,
        }
    }

    /// The inner backend.
    pub fn inner(&self) -> &O {
        &self.inner
    }
}

impl<O> std::fmt::Debug for ObservedOnce<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedOnce")
            .field("max_outcome_bytes", &self.max_outcome_bytes)
            .finish_non_exhaustive()
    }
}

/// A claim of the inner backend whose completion is checked and counted.
struct ObservedClaim {
    inner: Arc<dyn ClaimLease>,
    complete: OpMetrics,
    max_outcome_bytes: usize,
}

#[async_trait]
impl LeaseBackend for ObservedClaim {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn extend(&self, ttl: Duration) -> Result<bool> {
        self.inner.extend(ttl).await
    }
    async fn release(&self) -> Result<bool> {
        self.inner.release().await
    }
}

#[async_trait]
impl ClaimLease for ObservedClaim {
    async fn complete(&self, outcome: Bytes, ttl: Duration) -> Result<()> {
        self.complete
            .run(async {
                validate::ttl(ttl)?;
                validate::value(outcome.len(), self.max_outcome_bytes)?;
                self.inner.complete(outcome, ttl).await
            })
            .await
    }
}

#[async_trait]
impl<O: Once> Once for ObservedOnce<O> {
    fn capabilities(&self) -> OnceCapabilities {
        self.inner.capabilities()
    }

    /// The inner backend's claim, its completion checked and counted as
    /// `once.complete`.
    fn claim_lease(&self, key: &str, token: &str) -> Arc<dyn ClaimLease> {
        Arc::new(ObservedClaim {
            inner: self.inner.claim_lease(key, token),
            complete: self.ops.complete.clone(),
            max_outcome_bytes: self.max_outcome_bytes,
        })
    }

    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim> {
        self.ops
            .claim
            .run(async {
                validate::key(key)?;
                validate::ttl(ttl)?;
                self.inner.claim(key, ttl).await
            })
            .await
    }

    async fn complete(&self, key: &str, token: &str, outcome: Bytes, ttl: Duration) -> Result<()> {
        self.ops
            .complete
            .run(async {
                validate::key(key)?;
                validate::ttl(ttl)?;
                validate::value(outcome.len(), self.max_outcome_bytes)?;
                self.inner.complete(key, token, outcome, ttl).await
            })
            .await
    }

    async fn abandon(&self, key: &str, token: &str) -> Result<()> {
        self.ops
            .abandon
            .run(async {
                validate::key(key)?;
                self.inner.abandon(key, token).await
            })
            .await
    }

    async fn outcome(&self, key: &str) -> Result<Option<Bytes>> {
        self.ops
            .outcome
            .run(async {
                validate::key(key)?;
                self.inner.outcome(key).await
            })
            .await
    }

    async fn reset(&self, key: &str) -> Result<bool> {
        self.ops
            .reset
            .run(async {
                validate::key(key)?;
                self.inner.reset(key).await
            })
            .await
    }
}
