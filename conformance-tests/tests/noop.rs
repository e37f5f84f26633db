//! The null backend's documented semantics.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use im_infra_conformance::{run_main, Fixture, Hooks, SuiteKind, Target, World};
use im_infra_noop::NoopBackend;

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

fn main() -> ExitCode {
    run_main(Target {
        backend: "noop",
        env_var: None,
        fixture: Some(|_| Ok(Arc::new(NoopFixture))),
        suite: SuiteKind::Noop,
    })
}
