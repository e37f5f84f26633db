//! Invalidations for a near cache over the in-process cache: every write
//! tells the near caches of the backend before it returns, so they are
//! never behind.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use im_infra::cache::near::{InvalidationSink, InvalidationSource, Subscription};
use im_infra::Result;
use parking_lot::Mutex;

use crate::Shared;

/// The near caches listening to one backend's cache.
#[derive(Debug, Default)]
pub(crate) struct Listeners {
    next: AtomicU64,
    sinks: Mutex<Vec<(u64, InvalidationSink)>>,
}

impl Listeners {
    pub(crate) fn changed<S: AsRef<str>>(&self, keys: &[S]) {
        let sinks = self.sinks.lock();
        for (_, sink) in sinks.iter() {
            sink.invalidate(keys);
        }
    }

    /// The backend closed: its near caches stop holding anything.
    pub(crate) fn closed(&self) {
        for (_, sink) in self.sinks.lock().drain(..) {
            sink.lost();
        }
    }

    fn add(&self, sink: InvalidationSink) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.sinks.lock().push((id, sink));
        id
    }

    fn remove(&self, id: u64) {
        self.sinks.lock().retain(|(i, _)| *i != id);
    }
}

/// Removes its sink when the subscription is dropped.
struct Unsubscribe {
    shared: Weak<Shared>,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.cache.listeners.remove(self.id);
        }
    }
}

/// The invalidation source of a [`MemoryBackend`](crate::MemoryBackend)'s
/// cache.
pub(crate) struct MemoryInvalidations {
    pub(crate) shared: Arc<Shared>,
}

#[async_trait]
impl InvalidationSource for MemoryInvalidations {
    async fn subscribe(&self, sink: InvalidationSink) -> Result<Subscription> {
        self.shared.check_open()?;
        sink.ready();
        let id = self.shared.cache.listeners.add(sink);
        Ok(Subscription::new(Unsubscribe {
            shared: Arc::downgrade(&self.shared),
            id,
        }))
    }

    /// Writes are reported before they return: nothing to wait for.
    async fn sync(&self) -> Result<()> {
        Ok(())
    }
}
