//! # im-infra-mocks
//!
//! [mockall] mocks of every im-infra trait, for unit tests of services that
//! depend on the traits. Each mock is named after its trait (`MockCache`,
//! `MockLimiter`, ...) and set up with mockall's `expect_*` methods.
//!
//! ```
//! use std::sync::Arc;
//! use bytes::Bytes;
//! use im_infra::cache::Cache;
//! use im_infra_mocks::{predicate, MockCache};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let mut cache = MockCache::new();
//! cache
//!     .expect_get()
//!     .with(predicate::eq("user:1"))
//!     .times(1)
//!     .returning(|_| Ok(Some(Bytes::from_static(b"alice"))));
//! let cache: Arc<dyn Cache> = Arc::new(cache);
//! assert_eq!(cache.get("user:1").await.unwrap().as_deref(), Some(&b"alice"[..]));
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub use im_infra::backend::MockBackend;
pub use im_infra::cache::MockCache;
pub use im_infra::config::{MockConfigCenter, MockHotReloadable};
pub use im_infra::lock::{MockDistributedLock, MockLockGuard};
pub use im_infra::mq::{MockConsumer, MockHandler, MockProducer};
pub use im_infra::once::MockOnce;
pub use im_infra::ratelimit::MockLimiter;
pub use im_infra::registry::{MockServiceDiscovery, MockServiceRegistry};
pub use im_infra::uid::{MockIdGenerator, MockWorkerIdAllocator};
pub use mockall::{predicate, Sequence};
