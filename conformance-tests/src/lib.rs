//! # im-infra-conformance
//!
//! The contract of every im-infra capability as code, and the harness that
//! runs it on any backend. This crate depends on the trait crate
//! (`im-infra`) alone: a backend, in this workspace or outside it, runs the
//! whole suite from one test target of its own crate (`harness = false`)
//! that hands [`run_main`] a [`Target`] with its [`Fixture`]:
//!
//! ```no_run
//! use std::sync::Arc;
//! use im_infra_conformance::{run_main, Fixture, Hooks, SuiteKind, Target, World};
//!
//! struct MyFixture;
//! struct NoHooks;
//! impl Hooks for NoHooks {}
//!
//! #[async_trait::async_trait]
//! impl Fixture for MyFixture {
//!     async fn world(&self) -> anyhow::Result<World> {
//!         // A fresh namespace on the backend, and a second instance on it.
//!         # let backend: Arc<dyn im_infra::backend::Backend> = unimplemented!();
//!         Ok(World { backend: backend.clone(), peer: backend, hooks: Arc::new(NoHooks) })
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     run_main(Target {
//!         backend: "mine",
//!         env_var: None,
//!         fixture: Some(|_address| Ok(Arc::new(MyFixture))),
//!         suite: SuiteKind::Contract,
//!     })
//! }
//! ```
//!
//! Trials are named `<backend>::<capability>::<case>` and filter like any
//! `cargo test` (`-- --list`, `-- redis::lock::`). The project's backends
//! keep their fixtures behind a `testing` feature of their own crates
//! (`im_infra_redis::testing::target()`), and run the suite from
//! `tests/conformance.rs`.
//!
//! A backend that needs a server reads its address from the environment
//! (see [`servers`]); without it the backend is reported as skipped, loudly,
//! unless `IMINFRA_REQUIRE_BACKENDS=all` makes that a failure. With
//! `IMINFRA_SERVERS=containers` the runner starts its server instead from a
//! local image with testcontainers and removes it at the end (module
//! `containers`, feature `containers`, which the project's server
//! backends' `testing` features turn on); the trials are the same. [`faults`]
//! and [`proxy`] help with tests beyond the contract: polling, retryable
//! errors, and a TCP proxy that freezes a connection like a partition.
#![deny(missing_docs)]

pub mod cases;
#[cfg(feature = "containers")]
pub mod containers;
pub mod faults;
pub mod harness;
pub mod maintained;
pub mod proxy;
pub mod servers;

pub use harness::{run_main, Case, Claims, Fixture, Hooks, SuiteKind, Target, World};
