//! Layers: what every backend needs around its raw operations, written
//! once and applied by the backend's accessors (the way tower and OpenDAL
//! layer a service).
//!
//! A layer implements a capability's trait over an inner implementation of
//! the same trait: it checks the arguments (so bad input gets the same
//! `InvalidArgument` on every backend, before any server is asked), runs
//! the operation inside one `im_infra.op` span, and updates
//! `im_infra_ops_total` and `im_infra_op_duration_seconds`
//! ([`telemetry`](crate::telemetry)). A backend implements only its raw
//! operations and hands out the layered value:
//!
//! ```
//! use std::sync::Arc;
//! use im_infra::layer::ObservedLimiter;
//! use im_infra::ratelimit::{Limiter, LocalLimiter, Rule, Rules};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> im_infra::Result<()> {
//! let raw = LocalLimiter::new(Rules::single("api", Rule::per_second(10))?);
//! let limiter: Arc<dyn Limiter> = Arc::new(ObservedLimiter::new("memory", raw));
//! assert!(limiter.check("api", "ana", 1).await?.allowed);
//! let err = limiter.check("api", "", 1).await.unwrap_err();
//! assert_eq!(err.operation(), Some("ratelimit.check"));
//! assert_eq!(err.backend(), Some("memory"));
//! # Ok(()) }
//! ```
//!
//! With no `tracing` subscriber and no `metrics` recorder installed a layer
//! reads no clock and allocates nothing: the in-process limiter through
//! `Arc<dyn Limiter>` costs what its decision costs (see the limiter
//! benchmark).

/// One [`OpMetrics`](crate::telemetry::OpMetrics) per operation of a
/// capability, registered once when the layer is built.
macro_rules! ops {
    ($name:ident, $capability:literal { $($field:ident => $op:literal),* $(,)? }) => {
        struct $name {
            $($field: crate::telemetry::OpMetrics,)*
        }

        impl $name {
            fn new(backend: &'static str) -> Self {
                $name {
                    $($field: crate::telemetry::OpMetrics::new(backend, $capability, $op),)*
                }
            }
        }
    };
}

mod cache;
mod config;
mod limiter;
mod lock;
mod mq;
mod once;
mod registry;
mod uid;

pub use cache::ObservedCache;
pub use config::ObservedConfigCenter;
pub use limiter::ObservedLimiter;
pub use lock::ObservedLock;
pub use mq::{ObservedConsumer, ObservedProducer};
pub use once::ObservedOnce;
pub use registry::{ObservedDiscovery, ObservedRegistry};
pub use uid::ObservedWorkerIds;
