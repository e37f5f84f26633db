//! The conformance suite on the in-process backend.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use im_infra_conformance::{run_main, Fixture, Hooks, SuiteKind, Target, World};
use im_infra_memory::MemoryBackend;

struct MemoryFixture;

struct MemoryHooks(MemoryBackend);

#[async_trait]
impl Hooks for MemoryHooks {
    async fn revoke_registration(&self, service: &str, id: &str) -> Result<()> {
        anyhow::ensure!(
            self.0.revoke_registration(service, id),
            "{service}/{id} was not registered"
        );
        Ok(())
    }

    async fn revoke_worker_id(&self, id: u64) -> Result<()> {
        anyhow::ensure!(self.0.revoke_worker_id(id), "worker id {id} was not leased");
        Ok(())
    }

    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        Ok(self.0.create_topic(topic, partitions)?)
    }

    async fn compact_config_history(&self) -> Result<()> {
        // The fixture keeps a short history: the writes before this call
        // already pushed the old versions out.
        Ok(())
    }

    async fn cleanup(&self) -> Result<()> {
        use im_infra::backend::Backend;
        Ok(self.0.close().await?)
    }
}

#[async_trait]
impl Fixture for MemoryFixture {
    async fn world(&self) -> Result<World> {
        let backend = MemoryBackend::builder().config_history(8).build()?;
        Ok(World {
            backend: Arc::new(backend.clone()),
            peer: Arc::new(backend.clone()),
            hooks: Arc::new(MemoryHooks(backend)),
        })
    }
}

fn main() -> ExitCode {
    run_main(Target {
        backend: "memory",
        env_var: None,
        fixture: Some(|_| Ok(Arc::new(MemoryFixture))),
        suite: SuiteKind::Contract,
    })
}
