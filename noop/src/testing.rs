//! The conformance fixture of the null backend (feature `testing`): it runs
//! the suite of the null backend's documented semantics, not the contract.
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     im_infra_conformance::run_main(im_infra_noop::testing::target())
//! }
//! ```

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use im_infra_conformance::{Fixture, Hooks, SuiteKind, Target, World};

use crate::NoopBackend;

/// The conformance runner's target for this backend.
pub fn target() -> Target {
    Target {
        backend: "noop",
        env_var: None,
        fixture: Some(|_| Ok(Arc::new(NoopFixture))),
        suite: SuiteKind::Noop,
    }
}

struct NoopFixture;
struct NoHooks;

impl Hooks for NoHooks {}

#[async_trait]
impl Fixture for NoopFixture {
    async fn world(&self) -> Result<World> {
        Ok(World {
            backend: Arc::new(NoopBackend::new()),
            peer: Arc::new(NoopBackend::new()),
            hooks: Arc::new(NoHooks),
        })
    }
}
