//! The whole conformance suite on [`CountingBackend`] around the in-process
//! backend, with nothing of the project but the contract crate: the fixture
//! below is all a backend written elsewhere has to supply.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{ensure, Result};
use async_trait::async_trait;
use im_infra::backend::{Backend, Maintenance};
use im_infra::mq::TopicSpec;
use im_infra_conformance::{run_main, Fixture, Hooks, SuiteKind, Target, World};
use im_infra_example_wrapped_backend::CountingBackend;
use im_infra_memory::MemoryBackend;

struct CountingFixture;

/// Fault hooks go to the wrapped backend, which offers them as methods.
struct CountingHooks {
    inner: MemoryBackend,
    wrapper: CountingBackend,
}

#[async_trait]
impl Hooks for CountingHooks {
    async fn revoke_registration(&self, service: &str, id: &str) -> Result<()> {
        let revoked = self.inner.revoke_registration(service, id).await?;
        ensure!(revoked, "{service}/{id} was not registered");
        Ok(())
    }

    async fn revoke_worker_id(&self, id: u64) -> Result<()> {
        let revoked = self.inner.revoke_worker_id(id).await?;
        ensure!(revoked, "worker id {id} was not leased");
        Ok(())
    }

    async fn create_topic(&self, spec: &TopicSpec) -> Result<bool> {
        Ok(self.inner.create_topic(spec).await?)
    }

    async fn compact_config_history(&self) -> Result<()> {
        Ok(self.inner.compact_config_history().await?)
    }

    async fn cleanup(&self) -> Result<()> {
        Ok(self.wrapper.close().await?)
    }
}

#[async_trait]
impl Fixture for CountingFixture {
    async fn world(&self) -> Result<World> {
        let inner = MemoryBackend::new();
        let wrapper = CountingBackend::new(Arc::new(inner.clone()));
        Ok(World {
            backend: Arc::new(wrapper.clone()),
            peer: Arc::new(wrapper.clone()),
            hooks: Arc::new(CountingHooks { inner, wrapper }),
        })
    }
}

fn main() -> ExitCode {
    run_main(Target {
        backend: "counting",
        env_var: None,
        fixture: Some(|_| Ok(Arc::new(CountingFixture))),
        suite: SuiteKind::Contract,
    })
}
