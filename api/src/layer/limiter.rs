//! The layer of [`Limiter`].

use crate::ratelimit::{validate_check, Check, Limiter};
use crate::telemetry::OpMetrics;

/// Argument checks and telemetry (`ratelimit.check`) around a limiter. A
/// decision the inner limiter takes at once stays ready: no allocation, no
/// await point.
pub struct ObservedLimiter<L> {
    inner: L,
    op: OpMetrics,
}

impl<L: std::fmt::Debug> std::fmt::Debug for ObservedLimiter<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedLimiter")
            .field("backend", &self.op.backend())
            .field("inner", &self.inner)
            .finish()
    }
}

impl<L: Limiter> ObservedLimiter<L> {
    /// `inner`, observed as the limiter of `backend`.
    pub fn new(backend: &'static str, inner: L) -> Self {
        ObservedLimiter {
            inner,
            op: OpMetrics::new(backend, "ratelimit", "ratelimit.check"),
        }
    }

    /// The inner limiter.
    pub fn inner(&self) -> &L {
        &self.inner
    }
}

impl<L: Limiter> ObservedLimiter<L> {
    /// A check inside the operation's span, counted: out of line, so that
    /// the quiet path stays small.
    #[inline(never)]
    fn check_observed<'a>(&'a self, resource: &'a str, key: &'a str, n: u64) -> Check<'a> {
        let span = self.op.span();
        let entered = span.enter();
        let start = self.op.start();
        let check = match validate_check(resource, key, n) {
            Ok(()) => self.inner.check(resource, key, n),
            Err(e) => Check::ready(Err(e)),
        };
        match check.try_ready() {
            Ok(res) => Check::ready(self.op.finish(res, start, &span)),
            Err(pending) => {
                drop(entered);
                Check::boxed(self.op.run_started(pending, span, start))
            }
        }
    }
}

impl<L: Limiter> Limiter for ObservedLimiter<L> {
    #[inline]
    fn check<'a>(&'a self, resource: &'a str, key: &'a str, n: u64) -> Check<'a> {
        if !self.op.quiet() {
            return self.check_observed(resource, key, n);
        }
        // Nothing to record: the decision goes through untouched, an error
        // only gains the operation and backend.
        let mut check = match validate_check(resource, key, n) {
            Ok(()) => self.inner.check(resource, key, n),
            Err(e) => Check::ready(Err(e)),
        };
        if check.is_ready() {
            check.map_ready_err(|e| self.op.stamp(e));
            return check;
        }
        Check::boxed(self.op.run_started(check, self.op.span(), self.op.start()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ratelimit::{Decision, DecisionSource, LocalLimiter, Rule, Rules};
    use crate::ErrorKind;

    struct Remote;

    impl Limiter for Remote {
        fn check<'a>(&'a self, _: &'a str, _: &'a str, _: u64) -> Check<'a> {
            Check::boxed(async {
                tokio::task::yield_now().await;
                Err(crate::Error::new(ErrorKind::Unavailable, "down"))
            })
        }
    }

    #[tokio::test]
    async fn ready_decisions_stay_ready_and_errors_name_the_operation() {
        let l = ObservedLimiter::new(
            "memory",
            LocalLimiter::new(Rules::single("api", Rule::per_second(5)).unwrap()),
        );
        let c = l.check("api", "k", 1);
        assert!(c.is_ready(), "no allocation for an in-process decision");
        let d: Decision = c.await.unwrap();
        assert!(d.allowed && d.source == DecisionSource::Backend);
        let bad = l.check("api", "k", 0).await.unwrap_err();
        assert_eq!(bad.kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            (bad.operation(), bad.backend()),
            (Some("ratelimit.check"), Some("memory"))
        );
        let missing = l.check("nope", "k", 1).await.unwrap_err();
        assert_eq!(missing.kind(), ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn remote_decisions_are_awaited_inside_the_operation() {
        let l = ObservedLimiter::new("redis", Remote);
        let c = l.check("api", "k", 1);
        assert!(!c.is_ready());
        let err = tokio::time::timeout(Duration::from_secs(1), c)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(
            (err.kind(), err.backend()),
            (ErrorKind::Unavailable, Some("redis"))
        );
        let bad = l.check("api", "", 1);
        assert!(bad.is_ready(), "refused before the server is asked");
    }
}
