//! # im-infra-conformance
//!
//! The contract of every im-infra capability as code, and the harness that
//! runs it on each backend. One test target per backend (`tests/memory.rs`,
//! `tests/redis.rs`, ...) builds trials named
//! `<backend>::<capability>::<case>`:
//!
//! ```text
//! cargo test -p im-infra-conformance -- --list
//! cargo test -p im-infra-conformance --test memory -- memory::lock::
//! ```
//!
//! A backend that needs a server reads its address from the environment
//! (see [`servers`]); without it the backend is reported as skipped, loudly,
//! unless `IMINFRA_REQUIRE_BACKENDS=all` makes that a failure.
#![deny(missing_docs)]

pub mod cases;
pub mod decoding;
pub mod faults;
pub mod harness;
pub mod lock_safety;
pub mod proxy;
pub mod servers;

pub use harness::{run_main, Case, Claims, Fixture, Hooks, SuiteKind, Target, World};
