//! The coordinator facade of the original system: one object that hands
//! out the coordination services of a backend (locks, registry, discovery,
//! configuration), checks its health and closes it. It is a thin adapter
//! over any [`Backend`]: nothing here is specific to one.
//!
//! ```
//! use std::sync::Arc;
//! use im_infra::backend::Backend;
//! use im_infra::coord::Coordinator;
//!
//! async fn boot(backend: Arc<dyn Backend>) -> im_infra::Result<()> {
//!     let coord = Coordinator::new(backend);
//!     coord.health_check().await?;
//!     let locks = coord.lock().await?;
//!     let config = coord.config().await?;
//!     # let _ = (locks, config);
//!     coord.close().await // everything the backend handed out is closed
//! }
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::backend::Backend;
use crate::config::ConfigCenter;
use crate::error::Result;
use crate::lock::DistributedLock;
use crate::registry::{ServiceDiscovery, ServiceRegistry};

/// The coordination services of one backend.
pub struct Coordinator {
    backend: Arc<dyn Backend>,
    closed: AtomicBool,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("backend", &self.backend.name())
            .field("closed", &self.closed.load(Ordering::Acquire))
            .finish()
    }
}

impl Coordinator {
    /// The coordinator of `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Coordinator {
            backend,
            closed: AtomicBool::new(false),
        }
    }

    /// The backend behind it.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The distributed lock service.
    pub async fn lock(&self) -> Result<Arc<dyn DistributedLock>> {
        self.backend.lock().await
    }

    /// A service registry handle.
    pub async fn registry(&self) -> Result<Arc<dyn ServiceRegistry>> {
        self.backend.registry().await
    }

    /// Service discovery.
    pub async fn discovery(&self) -> Result<Arc<dyn ServiceDiscovery>> {
        self.backend.discovery().await
    }

    /// The configuration center.
    pub async fn config(&self) -> Result<Arc<dyn ConfigCenter>> {
        self.backend.config().await
    }

    /// Checks that the backend answers (bounded by its timeout).
    pub async fn health_check(&self) -> Result<()> {
        self.backend.health_check().await
    }

    /// Whether the backend answered a health check now and the coordinator
    /// was not closed.
    pub async fn is_ready(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && self.backend.health_check().await.is_ok()
    }

    /// Closes the backend: every handle it handed out is closed (registered
    /// instances deregistered, consumers shut down, producers flushed),
    /// background work stops, connections close. Idempotent.
    pub async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.backend.close().await
    }
}
