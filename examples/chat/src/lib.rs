//! The skeleton of a chat platform on every im-infra capability, as the
//! project's flagship example.
//!
//! Three services, one binary (`chat <role>`):
//!
//! - **logic** (gRPC `chat.v1.Logic`, several instances): registers in
//!   discovery; a send is limited per user by the
//!   [`RateLimitLayer`](im_infra::ratelimit::tower::RateLimitLayer) whose
//!   rules hot-reload from the config center; under the conversation's
//!   [lock](im_infra::lock::DistributedLock) it runs once per client message
//!   id ([`Once`](im_infra::once::Once): a Snowflake id on a leased worker
//!   id and the next sequence number, a cache counter, remembered) and puts
//!   the message on the queue keyed by conversation, also when the send
//!   repeats an earlier one; histories are read through the cache
//!   ([`get_or_load`](im_infra::cache::CacheExt::get_or_load)).
//! - **gateway** (gRPC `chat.v1.Gateway`): the clients' API, forwarded
//!   through a [`BalancedChannel`](im_infra::registry::grpc::BalancedChannel)
//!   over the logic instances; a send whose instance could not be reached,
//!   or whose connection broke, is tried again, on another instance when
//!   there is one (safe: sends are idempotent).
//! - **task**: a consumer group member that stores each message (once, even
//!   when delivered twice) and drops the conversation's cached history.
//!
//! Every role runs on the [runtime](im_infra_runtime): two-phase start-up,
//! logs, the metrics endpoint, graceful shutdown. `chat all` runs the three
//! in one process; with no configuration everything is in process:
//!
//! ```text
//! cargo run -p im-infra-examples-chat --bin chat -- all
//! ```
//!
//! One file moves the platform to etcd, Redis, Kafka and MariaDB, each role
//! its own process (`examples/chat/servers.yaml`):
//!
//! ```text
//! export IMINFRA_CONFIG=examples/chat/servers.yaml
//! chat task & chat logic & chat logic & chat gateway
//! ```
#![deny(missing_docs)]

pub mod gateway;
pub mod logic;
pub mod platform;
pub mod proto;
pub mod servers;
pub mod settings;
pub mod status;
pub mod store;
pub mod task;

pub use platform::{builder, Platform, Role};
pub use settings::{ChatSettings, StoreKind};
pub use store::{MemoryStore, MessageStore, MysqlStore};
