//! Where a near cache hears that keys changed on the server.

use std::sync::Arc;

use async_trait::async_trait;

use super::state::NearState;
use crate::error::Result;

/// The near cache's side of an invalidation channel: a source reports
/// through it when the channel is up, which keys changed, and when the
/// channel was lost. Cheap to clone.
#[derive(Clone)]
pub struct InvalidationSink {
    pub(super) state: Arc<NearState>,
}

impl std::fmt::Debug for InvalidationSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvalidationSink")
            .field("live", &self.state.is_live())
            .finish()
    }
}

impl InvalidationSink {
    /// The channel is up: from now on every change is reported. Drops
    /// whatever was cached before.
    pub fn ready(&self) {
        self.state.ready();
    }

    /// `keys` (without the backend's namespace) changed.
    pub fn invalidate<S: AsRef<str>>(&self, keys: &[S]) {
        for key in keys {
            self.state.invalidate(key.as_ref());
        }
        metrics::counter!("im_infra_near_cache_invalidations_total").increment(keys.len() as u64);
    }

    /// Every key may have changed (a flush).
    pub fn invalidate_all(&self) {
        self.state.invalidate_all();
        metrics::counter!("im_infra_near_cache_invalidations_total").increment(1);
    }

    /// The channel is down: changes may go unreported. The near cache is
    /// emptied and every read goes to the server until
    /// [`ready`](Self::ready).
    pub fn lost(&self) {
        self.state.lost();
    }
}

/// Stops a subscription when dropped.
pub struct Subscription {
    _guard: Box<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl Subscription {
    /// A subscription that ends when `guard` is dropped (a cancellation
    /// token's drop guard, a task handle that aborts on drop, …).
    pub fn new(guard: impl std::any::Any + Send + Sync) -> Self {
        Subscription {
            _guard: Box::new(guard),
        }
    }
}

/// A server's channel of changed keys (Redis client-side caching, the
/// in-process backend's own writes).
///
/// The contract: after [`subscribe`](Self::subscribe) has called
/// [`InvalidationSink::ready`], every change of a key of the cache is
/// reported through [`InvalidationSink::invalidate`] (or `invalidate_all`)
/// until the source calls [`InvalidationSink::lost`]; a source that cannot
/// be sure it saw every change calls `lost`, then `ready` again once it is.
#[async_trait]
pub trait InvalidationSource: Send + Sync + 'static {
    /// Starts reporting to `sink` (in the background); reporting stops
    /// when the returned subscription is dropped.
    async fn subscribe(&self, sink: InvalidationSink) -> Result<Subscription>;

    /// Returns once every change acknowledged to any client before the call
    /// has been reported to the sinks of this source; an error when that
    /// cannot be known (the channel is down).
    async fn sync(&self) -> Result<()>;
}
