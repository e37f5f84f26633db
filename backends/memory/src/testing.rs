//! The conformance fixture of the in-process backend (feature `testing`):
//! every world is a fresh backend, its peer a second handle on the same
//! state.
//!
//! ```no_run
//! // tests/conformance.rs of this crate, with `harness = false`:
//! fn main() -> std::process::ExitCode {
//!     im_infra_conformance::run_main(im_infra_memory::testing::target())
//! }
//! ```

use std::sync::Arc;

use anyhow::{ensure, Result};
use async_trait::async_trait;
use im_infra::backend::{Backend, Maintenance};
use im_infra::mq::TopicSpec;
use im_infra_conformance::{Fixture, Hooks, SuiteKind, Target, World};

use crate::MemoryBackend;

/// The conformance runner's target for this backend.
pub fn target() -> Target {
    Target {
        backend: "memory",
        env_var: None,
        fixture: Some(|_| Ok(Arc::new(MemoryFixture))),
        suite: SuiteKind::Contract,
    }
}

struct MemoryFixture;

struct MemoryHooks(MemoryBackend);

#[async_trait]
impl Hooks for MemoryHooks {
    async fn revoke_registration(&self, service: &str, id: &str) -> Result<()> {
        let revoked = self.0.revoke_registration(service, id).await?;
        ensure!(revoked, "{service}/{id} was not registered");
        Ok(())
    }

    async fn revoke_worker_id(&self, id: u64) -> Result<()> {
        let revoked = self.0.revoke_worker_id(id).await?;
        ensure!(revoked, "worker id {id} was not leased");
        Ok(())
    }

    async fn create_topic(&self, spec: &TopicSpec) -> Result<bool> {
        Ok(self.0.create_topic(spec).await?)
    }

    async fn compact_config_history(&self) -> Result<()> {
        Ok(self.0.compact_config_history().await?)
    }

    async fn cleanup(&self) -> Result<()> {
        Ok(self.0.close().await?)
    }
}

#[async_trait]
impl Fixture for MemoryFixture {
    async fn world(&self) -> Result<World> {
        let backend = MemoryBackend::new();
        Ok(World {
            backend: Arc::new(backend.clone()),
            peer: Arc::new(backend.clone()),
            hooks: Arc::new(MemoryHooks(backend)),
        })
    }
}
