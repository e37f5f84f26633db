//! Helpers of the fault tests (`tests/*_faults.rs`), which stop and start
//! the real servers: waiting for recovery, checking that failures are
//! retryable, the limiter's failure policies, and writes and watches that
//! span an outage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Result};
use futures::StreamExt;
use im_infra::config::{ConfigCenter, ConfigCenterExt, ConfigEvent, WatchStream};
use im_infra::ratelimit::{
    DecisionSource, DenyReason, FailurePolicy, Limiter, LimiterSettings, Rule, Rules,
};

/// Polls `f` every 100 ms until it answers `true`; fails after `within`.
pub async fn until<F, Fut>(within: Duration, what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        if start.elapsed() > within {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Fails unless `result` is a retryable error (`what` names the call).
pub fn expect_retryable<T: std::fmt::Debug>(what: &str, result: im_infra::Result<T>) -> Result<()> {
    match result {
        Err(e) => ensure!(
            e.is_retryable(),
            "{what} while the server was down: {e} is not retryable"
        ),
        Ok(v) => bail!("{what} succeeded while the server was down: {v:?}"),
    }
    Ok(())
}

/// One rule, `api` at 1000/s, under `policy`.
pub fn limiter_rules(policy: FailurePolicy) -> Result<Rules> {
    let mut cfg = LimiterSettings::with_rule("api", Rule::per_second(1000));
    cfg.failure_policy = policy;
    Ok(Rules::fixed(cfg)?)
}

/// The three limiters of a backend, one per failure policy, on
/// [`limiter_rules`].
pub struct PolicyLimiters {
    /// `FailurePolicy::Local`.
    pub local: Arc<dyn Limiter>,
    /// `FailurePolicy::FailOpen`.
    pub open: Arc<dyn Limiter>,
    /// `FailurePolicy::FailClosed`.
    pub closed: Arc<dyn Limiter>,
}

impl PolicyLimiters {
    /// Builds them on `backend`.
    pub async fn of(backend: &dyn im_infra::backend::Backend) -> Result<Self> {
        Ok(PolicyLimiters {
            local: backend
                .limiter(limiter_rules(FailurePolicy::Local)?)
                .await?,
            open: backend
                .limiter(limiter_rules(FailurePolicy::FailOpen)?)
                .await?,
            closed: backend
                .limiter(limiter_rules(FailurePolicy::FailClosed)?)
                .await?,
        })
    }

    /// Fails unless the backend decides (the server is up).
    pub async fn expect_backend(&self) -> Result<()> {
        let d = self.local.check("api", "u", 1).await?;
        ensure!(d.source == DecisionSource::Backend, "{d:?}");
        Ok(())
    }

    /// Fails unless each limiter decides by its policy (the server is down).
    pub async fn expect_policies(&self) -> Result<()> {
        let d = self.local.check("api", "u", 1).await?;
        ensure!(
            d.source == DecisionSource::Local && d.allowed,
            "local policy: {d:?}"
        );
        let d = self.open.check("api", "u", 1).await?;
        ensure!(
            d.source == DecisionSource::FailOpen && d.allowed,
            "fail-open policy: {d:?}"
        );
        let d = self.closed.check("api", "u", 1).await?;
        ensure!(
            d.source == DecisionSource::FailClosed
                && !d.allowed
                && d.denied == Some(DenyReason::BackendUnavailable),
            "fail-closed policy: {d:?}"
        );
        Ok(())
    }

    /// Fails unless each limiter answers `Closed` (its backend was closed),
    /// also the ones whose failure policy was deciding.
    pub async fn expect_closed(&self) -> Result<()> {
        for (policy, limiter) in [
            ("local", &self.local),
            ("fail-open", &self.open),
            ("fail-closed", &self.closed),
        ] {
            let r = limiter.check("api", "u", 1).await;
            ensure!(
                matches!(&r, Err(e) if e.kind() == im_infra::ErrorKind::Closed),
                "{policy} limiter of a closed backend: {r:?}"
            );
        }
        Ok(())
    }

    /// Waits until the backend decides again (the server is back).
    pub async fn expect_recovery(&self, within: Duration) -> Result<()> {
        until(within, "the limiter switches back to the backend", || {
            let local = self.local.clone();
            async move { matches!(local.check("api", "u", 1).await, Ok(d) if d.source == DecisionSource::Backend) }
        })
        .await
    }
}

/// Stores `value` as JSON under `key`, retrying retryable errors every
/// `pause`; returns the version.
pub async fn set_retrying<T: serde::Serialize + Sync>(
    center: &dyn ConfigCenter,
    key: &str,
    value: &T,
    pause: Duration,
) -> Result<u64> {
    loop {
        match center.set_json(key, value).await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() => tokio::time::sleep(pause).await,
            Err(e) => bail!("writing {key}: {e}"),
        }
    }
}

/// Reads `events` until one at `last` or later arrived; fails when the
/// watch ends or stalls for `stall`.
pub async fn events_until(
    events: &mut WatchStream,
    last: u64,
    stall: Duration,
) -> Result<Vec<ConfigEvent>> {
    let mut seen: Vec<ConfigEvent> = Vec::new();
    while seen.last().is_none_or(|e| e.version < last) {
        let e = tokio::time::timeout(stall, events.next())
            .await
            .map_err(|_| anyhow!("the watch stalled after {} events", seen.len()))?
            .ok_or_else(|| anyhow!("the watch ended"))??;
        seen.push(e);
    }
    Ok(seen)
}
