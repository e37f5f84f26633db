//! The coordinator facade: one object that hands out the coordination
//! services of a backend (locks, registry, discovery, configuration).
//!
//! ```
//! use im_infra::coord::Provider;
//!
//! async fn boot(coord: &dyn Provider) -> im_infra::Result<()> {
//!     coord.health_check().await?;
//!     assert!(coord.is_ready());
//!     let _locks = coord.lock();
//!     let _config = coord.config();
//!     coord.close().await
//! }
//! ```

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::ConfigCenter;
use crate::error::Result;
use crate::lock::DistributedLock;
use crate::registry::{ServiceDiscovery, ServiceRegistry};

/// The coordination services of one backend.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The distributed lock service.
    fn lock(&self) -> Arc<dyn DistributedLock>;
    /// The service registry.
    fn registry(&self) -> Arc<dyn ServiceRegistry>;
    /// Service discovery.
    fn discovery(&self) -> Arc<dyn ServiceDiscovery>;
    /// The configuration center.
    fn config(&self) -> Arc<dyn ConfigCenter>;
    /// Checks that the backend answers (bounded by the backend's timeout).
    async fn health_check(&self) -> Result<()>;
    /// Whether the provider is connected and not closed.
    fn is_ready(&self) -> bool;
    /// Stops background work (keep-alives, watches) and disconnects.
    /// Registered instances are deregistered. Idempotent.
    async fn close(&self) -> Result<()>;
}
