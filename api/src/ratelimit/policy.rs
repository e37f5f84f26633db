//! What a distributed limiter does while its backend is unreachable.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quanta::Instant;
use tokio_util::sync::CancellationToken;

use serde::{Deserialize, Serialize};

use super::{
    validate_check, Check, Decision, DecisionSource, DenyReason, Limiter, LocalLimiter, Rules,
};
use crate::error::{Error, ErrorKind, Result};
use crate::telemetry::LIMITER_FALLBACK_TOTAL;

/// Decision policy while the backend cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Allow every request.
    FailOpen,
    /// Deny every request.
    FailClosed,
    /// Decide with an in-process limiter under the same rules (each process
    /// then enforces the budget on its own).
    #[default]
    Local,
}

impl FailurePolicy {
    fn label(self) -> &'static str {
        match self {
            FailurePolicy::FailOpen => "fail_open",
            FailurePolicy::FailClosed => "fail_closed",
            FailurePolicy::Local => "local",
        }
    }
}

/// Wraps a distributed limiter with the [`FailurePolicy`] of its rules.
///
/// When the primary fails with a connection, unavailability or timeout
/// error, the policy decides instead and the primary is left alone
/// for `probe_interval` (so callers do not each wait for a timeout); then the
/// next call probes it again and, if it answers, decisions switch back.
/// Every policy decision increments `im_infra_limiter_fallback_total{backend,
/// policy}`. A closed backend is not an outage: once its `shutdown` token
/// is cancelled every check answers `Closed`, also while the policy would
/// otherwise decide without asking the primary; a `Closed` error of the
/// primary is returned, as are bad arguments and unknown resources.
pub struct FallbackLimiter {
    primary: Arc<dyn Limiter>,
    local: Arc<dyn Limiter>,
    rules: Rules,
    backend: &'static str,
    probe_interval: Duration,
    base: Instant,
    /// Nanoseconds since `base` before which the primary is not asked.
    skip_until: AtomicU64,
    degraded: AtomicBool,
    /// Cancelled when the backend closes.
    shutdown: CancellationToken,
}

impl std::fmt::Debug for FallbackLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FallbackLimiter")
            .field("backend", &self.backend)
            .field("probe_interval", &self.probe_interval)
            .field("degraded", &self.is_degraded())
            .finish()
    }
}

impl FallbackLimiter {
    /// `primary` guarded by the failure policy of `rules`; under
    /// [`FailurePolicy::Local`] an in-process [`LocalLimiter`] on the same
    /// rules decides. Every check answers `Closed` once `shutdown` (the
    /// backend's) is cancelled.
    pub fn new(
        backend: &'static str,
        primary: Arc<dyn Limiter>,
        rules: Rules,
        probe_interval: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let local = Arc::new(LocalLimiter::new(rules.clone()));
        FallbackLimiter::with_local(backend, primary, local, rules, probe_interval, shutdown)
    }

    /// [`new`](Self::new) with another limiter deciding under
    /// [`FailurePolicy::Local`].
    pub fn with_local(
        backend: &'static str,
        primary: Arc<dyn Limiter>,
        local: Arc<dyn Limiter>,
        rules: Rules,
        probe_interval: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        FallbackLimiter {
            primary,
            local,
            rules,
            backend,
            probe_interval,
            base: Instant::now(),
            skip_until: AtomicU64::new(0),
            degraded: AtomicBool::new(false),
            shutdown,
        }
    }

    /// Whether the last decision came from the failure policy.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    async fn by_policy(&self, resource: &str, key: &str, n: u64) -> Result<Decision> {
        let policy = self.rules.failure_policy();
        metrics::counter!(LIMITER_FALLBACK_TOTAL, "backend" => self.backend, "policy" => policy.label())
            .increment(1);
        let rule = self.rules.lookup(resource)?;
        match policy {
            FailurePolicy::FailOpen => Ok(Decision {
                allowed: true,
                limit: rule.burst(),
                remaining: rule.burst(),
                retry_after: Duration::ZERO,
                reset_after: Duration::ZERO,
                denied: None,
                source: DecisionSource::FailOpen,
            }),
            FailurePolicy::FailClosed => Ok(Decision {
                allowed: false,
                limit: rule.burst(),
                remaining: 0,
                retry_after: self.probe_interval,
                reset_after: self.probe_interval,
                denied: Some(DenyReason::BackendUnavailable),
                source: DecisionSource::FailClosed,
            }),
            FailurePolicy::Local => {
                let mut d = self.local.check(resource, key, n).await?;
                d.source = DecisionSource::Local;
                Ok(d)
            }
        }
    }
}

/// Whether an error of the primary means it cannot be reached now. Not
/// `Closed`: a closed backend answers `Closed`, whatever the policy.
fn is_unreachable(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Connection | ErrorKind::Unavailable | ErrorKind::Timeout
    )
}

impl Limiter for FallbackLimiter {
    fn check<'a>(&'a self, resource: &'a str, key: &'a str, n: u64) -> Check<'a> {
        Check::boxed(self.decide(resource, key, n))
    }
}

impl FallbackLimiter {
    async fn decide(&self, resource: &str, key: &str, n: u64) -> Result<Decision> {
        // A closed backend answers Closed first, whatever the input.
        if self.shutdown.is_cancelled() {
            return Err(
                Error::new(ErrorKind::Closed, "the backend was closed").with_backend(self.backend)
            );
        }
        validate_check(resource, key, n)?;
        if self.now_ns() < self.skip_until.load(Ordering::Relaxed) {
            return self.by_policy(resource, key, n).await;
        }
        match self.primary.check(resource, key, n).await {
            Ok(d) => {
                if self.degraded.swap(false, Ordering::Relaxed) {
                    tracing::info!(backend = self.backend, "limiter backend answers again");
                }
                Ok(d)
            }
            Err(e) if is_unreachable(e.kind()) => {
                let until = self.now_ns().saturating_add(
                    u64::try_from(self.probe_interval.as_nanos()).unwrap_or(u64::MAX),
                );
                self.skip_until.store(until, Ordering::Relaxed);
                if !self.degraded.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        backend = self.backend,
                        error = %e,
                        policy = self.rules.failure_policy().label(),
                        "limiter backend unreachable; deciding by failure policy"
                    );
                }
                self.by_policy(resource, key, n).await
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::{LimiterSettings, Rule};
    use crate::Error;
    use std::sync::atomic::AtomicBool;

    struct Flaky {
        down: AtomicBool,
    }

    impl Limiter for Flaky {
        fn check<'a>(&'a self, _r: &'a str, _k: &'a str, _n: u64) -> Check<'a> {
            Check::ready(if self.down.load(Ordering::SeqCst) {
                Err(Error::new(ErrorKind::Unavailable, "down"))
            } else {
                Ok(Decision {
                    allowed: true,
                    limit: 1,
                    remaining: 0,
                    retry_after: Duration::ZERO,
                    reset_after: Duration::ZERO,
                    denied: None,
                    source: DecisionSource::Backend,
                })
            })
        }
    }

    struct DenyAll;

    impl Limiter for DenyAll {
        fn check<'a>(&'a self, _r: &'a str, _k: &'a str, _n: u64) -> Check<'a> {
            Check::ready(Ok(Decision {
                allowed: false,
                limit: 1,
                remaining: 0,
                retry_after: Duration::from_secs(1),
                reset_after: Duration::from_secs(1),
                denied: Some(DenyReason::RateExceeded),
                source: DecisionSource::Backend,
            }))
        }
    }

    fn limiter(policy: FailurePolicy, primary: Arc<Flaky>) -> FallbackLimiter {
        let mut cfg = LimiterSettings::with_rule("r", Rule::per_second(1));
        cfg.failure_policy = policy;
        FallbackLimiter::with_local(
            "test",
            primary,
            Arc::new(DenyAll),
            Rules::fixed(cfg).unwrap(),
            Duration::from_millis(20),
            CancellationToken::new(),
        )
    }

    #[tokio::test]
    async fn each_policy_decides_while_down_and_switches_back() {
        for (policy, allowed, source) in [
            (FailurePolicy::FailOpen, true, DecisionSource::FailOpen),
            (FailurePolicy::FailClosed, false, DecisionSource::FailClosed),
            (FailurePolicy::Local, false, DecisionSource::Local),
        ] {
            let primary = Arc::new(Flaky {
                down: AtomicBool::new(true),
            });
            let l = limiter(policy, primary.clone());
            let d = l.check("r", "k", 1).await.unwrap();
            assert_eq!((d.allowed, d.source), (allowed, source), "{policy:?}");
            assert!(l.is_degraded());
            primary.down.store(false, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(30)).await;
            let d = l.check("r", "k", 1).await.unwrap();
            assert_eq!(d.source, DecisionSource::Backend);
            assert!(!l.is_degraded());
        }
    }

    struct Closed;

    impl Limiter for Closed {
        fn check<'a>(&'a self, _r: &'a str, _k: &'a str, _n: u64) -> Check<'a> {
            Check::ready(Err(Error::new(ErrorKind::Closed, "closed")))
        }
    }

    #[tokio::test]
    async fn a_closed_backend_is_not_decided_by_the_policy() {
        for policy in [
            FailurePolicy::FailOpen,
            FailurePolicy::FailClosed,
            FailurePolicy::Local,
        ] {
            let mut cfg = LimiterSettings::with_rule("r", Rule::per_second(1));
            cfg.failure_policy = policy;
            let l = FallbackLimiter::new(
                "test",
                Arc::new(Closed),
                Rules::fixed(cfg).unwrap(),
                Duration::from_millis(20),
                CancellationToken::new(),
            );
            let e = l.check("r", "k", 1).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Closed, "{policy:?}");
            assert!(!l.is_degraded(), "{policy:?}");
        }
    }

    #[tokio::test]
    async fn a_closed_backend_answers_closed_while_the_policy_decides() {
        for policy in [
            FailurePolicy::FailOpen,
            FailurePolicy::FailClosed,
            FailurePolicy::Local,
        ] {
            let primary = Arc::new(Flaky {
                down: AtomicBool::new(true),
            });
            let mut cfg = LimiterSettings::with_rule("r", Rule::per_second(1));
            cfg.failure_policy = policy;
            let shutdown = CancellationToken::new();
            let l = FallbackLimiter::new(
                "test",
                primary,
                Rules::fixed(cfg).unwrap(),
                Duration::from_secs(60),
                shutdown.clone(),
            );
            l.check("r", "k", 1).await.unwrap();
            assert!(l.is_degraded(), "{policy:?}: the policy decides now");
            shutdown.cancel();
            let e = l.check("r", "k", 1).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Closed, "{policy:?}");
            assert_eq!(e.backend(), Some("test"));
        }
    }

    #[tokio::test]
    async fn bad_input_is_not_hidden_by_the_policy() {
        let primary = Arc::new(Flaky {
            down: AtomicBool::new(true),
        });
        let l = limiter(FailurePolicy::FailOpen, primary);
        assert_eq!(
            l.check("r", "k", 0).await.unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            l.check("r", "", 1).await.unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
}
