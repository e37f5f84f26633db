//! The in-process limiter: [`LocalLimiter`] on the backend's buckets, so
//! that every limiter handle of one backend shares its budgets.

use std::sync::Arc;

use im_infra::ratelimit::{Check, Limiter, LocalLimiter, Rules};

use crate::Shared;

/// A limiter handle of a [`MemoryBackend`](crate::MemoryBackend): GCRA in
/// this process, one atomic per (resource, key) in a lock-free map, no
/// await point. Handles of one backend share their budgets; a hot-reloaded
/// rule applies from the next decision. The backend hands it out inside an
/// [`ObservedLimiter`](im_infra::layer::ObservedLimiter), which checks the
/// arguments and does the telemetry.
pub(crate) struct MemoryLimiter {
    shared: Arc<Shared>,
    local: LocalLimiter,
}

impl std::fmt::Debug for MemoryLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLimiter")
            .field("rules", self.local.rules())
            .finish()
    }
}

impl MemoryLimiter {
    pub(crate) fn new(shared: Arc<Shared>, rules: Rules) -> Self {
        let local = LocalLimiter::on(shared.limiter.clone(), rules);
        MemoryLimiter { shared, local }
    }
}

impl Limiter for MemoryLimiter {
    #[inline(always)]
    fn check<'a>(&'a self, resource: &'a str, key: &'a str, n: u64) -> Check<'a> {
        Check::ready(
            self.shared
                .check_open()
                .and_then(|()| self.local.decide_unchecked(resource, key, n)),
        )
    }
}
