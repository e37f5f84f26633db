//! Rate limiting with the Generic Cell Rate Algorithm.
//!
//! A [`Limiter`] decides whether `n` units of work for `key` of a
//! `resource` may proceed now, under the [`Rule`] of that resource (rate,
//! period, burst). Rules come from [`Rules`]: fixed, or hot-reloaded from the
//! config center through a [`ConfigManager`](crate::config::ConfigManager).
//! Two limiter instances on one distributed backend share one budget.
//!
//! ```
//! use std::sync::Arc;
//! use im_infra::ratelimit::{Limiter, LimiterExt};
//!
//! async fn send(limiter: Arc<dyn Limiter>, user: &str) -> im_infra::Result<()> {
//!     let decision = limiter.check("send_message", user, 1).await?;
//!     if !decision.allowed {
//!         println!("slow down, retry in {:?}", decision.retry_after);
//!     }
//!     if limiter.allow("login", user).await {
//!         // proceed
//!     }
//!     Ok(())
//! }
//! ```

mod check;
pub mod gcra;
mod local;
mod policy;
mod rule;
mod table;
#[cfg(feature = "tower")]
pub mod tower;

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Result;

pub use check::Check;
pub use local::{BucketStore, LocalLimiter};
pub use policy::{FailurePolicy, FallbackLimiter, LimiterFallback};
pub use rule::{LimiterSettings, Rule, Rules};
pub use table::RuleTable;

/// Why a request was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// The budget is used up for now; retry after `retry_after`.
    RateExceeded,
    /// `n` is larger than the burst: this request can never be allowed.
    ExceedsBurst,
    /// The backend is unreachable and the failure policy is fail-closed.
    BackendUnavailable,
}

/// Who took a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionSource {
    /// The backend's shared state.
    Backend,
    /// The fail-open policy (backend unreachable).
    FailOpen,
    /// The fail-closed policy (backend unreachable).
    FailClosed,
    /// The in-process fallback limiter (backend unreachable).
    Local,
}

/// The answer of a limiter.
// `repr(C)` and this order: the durations at 16-byte offsets, so that a
// decision moves between frames in whole, aligned 16-byte copies. In the
// compiler's order a 44-byte run was copied in overlapping pieces, and
// each copy waited for the one before it to reach memory (about 18 ns a
// call through `Arc<dyn Limiter>` in the limiter benchmark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Decision {
    /// The burst size of the rule.
    pub limit: u64,
    /// Units that would still be allowed right now after this decision.
    pub remaining: u64,
    /// When denied, how long until the same request would be allowed
    /// (`Duration::MAX` when it never can be); zero when allowed.
    pub retry_after: Duration,
    /// How long until the bucket is full again.
    pub reset_after: Duration,
    /// Whether the request may proceed.
    pub allowed: bool,
    /// Why the request was denied (`None` when allowed).
    pub denied: Option<DenyReason>,
    /// Who decided.
    pub source: DecisionSource,
}

/// A rate limiter.
///
/// `check` returns a [`Check`], a future that is ready at once when the
/// decision is taken in this process (no allocation, no await point: the
/// in-process limiter through `Arc<dyn Limiter>` costs what its decision
/// costs) and boxed when a server decides. Await it either way.
pub trait Limiter: Send + Sync + 'static {
    /// Takes `n` units (n ≥ 1) for `key` under the rule of `resource`.
    ///
    /// Errors: `InvalidArgument` for an empty key or `n = 0`; `NotFound` when
    /// `resource` has no rule and there is no default rule.
    fn check<'a>(&'a self, resource: &'a str, key: &'a str, n: u64) -> Check<'a>;
}

#[cfg(feature = "mock")]
mockall::mock! {
    /// A mockall mock of [`Limiter`]: `expect_check()` sets what
    /// `check` answers (its decision is ready at once).
    pub Limiter {
        /// What [`Limiter::check`] answers.
        pub fn check(&self, resource: &str, key: &str, n: u64) -> Result<Decision>;
    }
}

#[cfg(feature = "mock")]
impl Limiter for MockLimiter {
    fn check<'a>(&'a self, resource: &'a str, key: &'a str, n: u64) -> Check<'a> {
        Check::ready(MockLimiter::check(self, resource, key, n))
    }
}

impl<L: Limiter + ?Sized> Limiter for std::sync::Arc<L> {
    #[inline]
    fn check<'a>(&'a self, resource: &'a str, key: &'a str, n: u64) -> Check<'a> {
        (**self).check(resource, key, n)
    }
}

/// Conveniences for every [`Limiter`].
pub trait LimiterExt: Limiter {
    /// Takes one unit; `false` when denied. An error (bad input, no rule)
    /// is logged and counts as a denial.
    fn allow<'a>(
        &'a self,
        resource: &'a str,
        key: &'a str,
    ) -> impl Future<Output = bool> + Send + 'a {
        let check = self.check(resource, key, 1);
        async move {
            match check.await {
                Ok(d) => d.allowed,
                Err(e) => {
                    tracing::warn!(error = %e, resource, "rate-limit check failed; denying");
                    false
                }
            }
        }
    }
}

impl<L: Limiter + ?Sized> LimiterExt for L {}

/// Checks the arguments of [`Limiter::check`].
#[inline(always)]
pub fn validate_check(resource: &str, key: &str, n: u64) -> Result<()> {
    crate::validate::key(resource)?;
    crate::validate::key(key)?;
    if n == 0 {
        return Err(crate::Error::invalid_argument("n must be at least 1"));
    }
    Ok(())
}
