//! What a distributed limiter does while its backend is unreachable.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quanta::Instant;
use tokio_util::sync::CancellationToken;

use serde::{Deserialize, Serialize};

use super::{
    validate_check, BucketStore, Check, Decision, DecisionSource, DenyReason, Limiter,
    LocalLimiter, Rules,
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

/// What every limiter of one distributed backend shares for its failure
/// policy: one in-process [`BucketStore`] (so that two limiters of the
/// backend share one local budget while they decide by
/// [`FailurePolicy::Local`], as they share one on the server), the probe
/// interval, the bound of a call to the server and the backend's shutdown.
/// A backend keeps one and [`guard`](Self::guard)s each limiter it hands
/// out with it.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use im_infra::ratelimit::{Limiter, LimiterFallback, LocalLimiter, Rule, Rules};
/// use tokio_util::sync::CancellationToken;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> im_infra::Result<()> {
/// let fallback = LimiterFallback::new(
///     "example",
///     Duration::from_secs(1),
///     Duration::from_secs(2),
///     CancellationToken::new(),
/// );
/// let rules = Rules::single("login", Rule::per_minute(2))?;
/// // A stand-in for the backend's own limiter.
/// let primary = Arc::new(LocalLimiter::new(rules.clone()));
/// let limiter = fallback.guard(primary, rules);
/// assert!(limiter.check("login", "ana", 1).await?.allowed);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LimiterFallback {
    backend: &'static str,
    store: Arc<BucketStore>,
    probe_interval: Duration,
    call_timeout: Duration,
    shutdown: CancellationToken,
}

impl LimiterFallback {
    /// The failure-policy state of `backend`: the primary is probed again
    /// every `probe_interval` while down, and each call to it is bounded by
    /// `call_timeout`. The local store is purged every 10 s on the current
    /// tokio runtime (if any).
    pub fn new(
        backend: &'static str,
        probe_interval: Duration,
        call_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let store = Arc::new(BucketStore::new());
        store.purge_every(Duration::from_secs(10));
        LimiterFallback {
            backend,
            store,
            probe_interval,
            call_timeout,
            shutdown,
        }
    }

    /// `primary` under the failure policy of `rules`.
    pub fn guard(&self, primary: Arc<dyn Limiter>, rules: Rules) -> FallbackLimiter {
        let local = Arc::new(LocalLimiter::on(self.store.clone(), rules.clone()));
        FallbackLimiter::with_local(
            self.backend,
            primary,
            local,
            rules,
            self.probe_interval,
            self.shutdown.clone(),
        )
        .call_timeout(self.call_timeout)
    }
}

/// Wraps a distributed limiter with the [`FailurePolicy`] of its rules.
///
/// When the primary fails with a connection, unavailability or timeout
/// error, the policy decides instead and the primary is left alone
/// for `probe_interval` (so callers do not each wait for a timeout); then
/// one call probes it again (the others go on deciding by the policy) and,
/// if it answers, decisions switch back. With a
/// [`call_timeout`](Self::call_timeout) a call to the primary that takes
/// longer counts as a timeout, whatever the primary's own bounds (a client
/// waiting to reconnect, say). Every policy decision increments
/// `im_infra_limiter_fallback_total{backend, policy}`.
///
/// Under [`FailurePolicy::Local`] the in-process limiter knows nothing of
/// what the primary decided: switching to it, and back, a key may pass up
/// to one more burst than its rule allows. A closed backend is not an outage: once its `shutdown` token
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
    /// Bound of one call to the primary.
    call_timeout: Option<Duration>,
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
            call_timeout: None,
            shutdown,
        }
    }

    /// Bounds every call to the primary by `timeout` (typically the
    /// backend's request timeout); a call that takes longer is a timeout,
    /// and the policy decides.
    #[must_use]
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    /// The primary's decision, bounded by [`call_timeout`](Self::call_timeout).
    async fn ask_primary(&self, resource: &str, key: &str, n: u64) -> Result<Decision> {
        let asked = self.primary.check(resource, key, n);
        match self.call_timeout {
            None => asked.await,
            Some(limit) => tokio::time::timeout(limit, asked)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorKind::Timeout,
                        format!("the limiter backend did not answer within {limit:?}"),
                    )
                    .with_backend(self.backend))
                }),
        }
    }

    /// Whether the last decision came from the failure policy.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    fn probe_interval_ns(&self) -> u64 {
        u64::try_from(self.probe_interval.as_nanos()).unwrap_or(u64::MAX)
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    async fn by_policy(&self, resource: &str, key: &str, n: u64) -> Result<Decision> {
        let policy = self.rules.failure_policy();
        let decision = self.policy_decision(policy, resource, key, n).await;
        if decision.is_ok() {
            metrics::counter!(LIMITER_FALLBACK_TOTAL, "backend" => self.backend, "policy" => policy.label())
                .increment(1);
        }
        decision
    }

    async fn policy_decision(
        &self,
        policy: FailurePolicy,
        resource: &str,
        key: &str,
        n: u64,
    ) -> Result<Decision> {
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
        let skip_until = self.skip_until.load(Ordering::Acquire);
        let now = self.now_ns();
        if now < skip_until {
            return self.by_policy(resource, key, n).await;
        }
        // Degraded: one caller probes the primary (the one that moves the
        // next probe on); the others go on by the policy meanwhile, instead
        // of each waiting on a primary that may not answer.
        if self.degraded.load(Ordering::Acquire)
            && self
                .skip_until
                .compare_exchange(
                    skip_until,
                    now.saturating_add(self.probe_interval_ns()),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
        {
            return self.by_policy(resource, key, n).await;
        }
        match self.ask_primary(resource, key, n).await {
            Ok(d) => {
                if self.degraded.swap(false, Ordering::AcqRel) {
                    self.skip_until.store(0, Ordering::Release);
                    tracing::info!(backend = self.backend, "limiter backend answers again");
                }
                Ok(d)
            }
            Err(e) if is_unreachable(e.kind()) => {
                let until = self.now_ns().saturating_add(self.probe_interval_ns());
                self.skip_until.store(until, Ordering::Release);
                if !self.degraded.swap(true, Ordering::AcqRel) {
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

    /// A primary that never answers, counting the calls it got.
    #[derive(Default)]
    struct Hung {
        calls: std::sync::atomic::AtomicUsize,
    }

    impl Limiter for Hung {
        fn check<'a>(&'a self, _r: &'a str, _k: &'a str, _n: u64) -> Check<'a> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Check::boxed(std::future::pending())
        }
    }

    #[tokio::test]
    async fn a_primary_that_never_answers_is_probed_by_one_caller_at_a_time() {
        let primary = Arc::new(Hung::default());
        let mut cfg = LimiterSettings::with_rule("r", Rule::per_second(1));
        cfg.failure_policy = FailurePolicy::FailOpen;
        let l = Arc::new(
            FallbackLimiter::new(
                "test",
                primary.clone(),
                Rules::fixed(cfg).unwrap(),
                Duration::from_millis(50),
                CancellationToken::new(),
            )
            .call_timeout(Duration::from_millis(100)),
        );
        // The first call finds the primary hung: a timeout, then the policy.
        let started = std::time::Instant::now();
        let d = l.check("r", "k", 1).await.unwrap();
        assert_eq!(d.source, DecisionSource::FailOpen);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "bounded by the call timeout"
        );
        assert_eq!(primary.calls.load(Ordering::SeqCst), 1);
        // Past the probe interval, 20 callers at once: one probes (and
        // waits), the others are answered by the policy at once.
        tokio::time::sleep(Duration::from_millis(60)).await;
        let started = std::time::Instant::now();
        let calls: Vec<_> = (0..20)
            .map(|i| {
                let l = l.clone();
                tokio::spawn(async move {
                    let d = l.check("r", &format!("k{i}"), 1).await.unwrap();
                    (d.source, std::time::Instant::now())
                })
            })
            .collect();
        let mut quick = 0;
        for c in calls {
            let (source, done) = c.await.unwrap();
            assert_eq!(source, DecisionSource::FailOpen);
            if done - started < Duration::from_millis(50) {
                quick += 1;
            }
        }
        assert_eq!(primary.calls.load(Ordering::SeqCst), 2, "one probe");
        assert!(quick >= 19, "only the probe waited: {quick} quick");
    }

    #[tokio::test]
    async fn the_limiters_of_one_backend_share_one_local_budget() {
        let fallback = LimiterFallback::new(
            "test",
            Duration::from_secs(60),
            Duration::from_secs(1),
            CancellationToken::new(),
        );
        let rules = Rules::fixed(LimiterSettings::with_rule("r", Rule::per_minute(2))).unwrap();
        let down = || {
            Arc::new(Flaky {
                down: AtomicBool::new(true),
            })
        };
        let a = fallback.guard(down(), rules.clone());
        let b = fallback.guard(down(), rules);
        let mut allowed = 0;
        for l in [&a, &b, &a, &b] {
            let d = l.check("r", "k", 1).await.unwrap();
            assert_eq!(d.source, DecisionSource::Local);
            allowed += usize::from(d.allowed);
        }
        assert_eq!(allowed, 2, "one burst of 2 between the two limiters");
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
