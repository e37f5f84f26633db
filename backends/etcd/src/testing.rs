//! The conformance fixture of the etcd backend (feature `testing`): every
//! world is a fresh namespace on the server named by
//! `IMINFRA_ETCD_ENDPOINTS`, purged afterwards.
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     im_infra_conformance::run_main(im_infra_etcd::testing::target())
//! }
//! ```

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use async_trait::async_trait;
use im_infra::backend::Backend;
use im_infra_conformance::cases::unique;
use im_infra_conformance::servers::ETCD_ENV;
use im_infra_conformance::{Fixture, Hooks, SuiteKind, Target, World};

use crate::{EtcdBackend, EtcdSettings};

/// The conformance runner's target for this backend.
pub fn target() -> Target {
    Target {
        backend: "etcd",
        env_var: Some(ETCD_ENV),
        fixture: Some(|endpoints| {
            Ok(Arc::new(EtcdFixture {
                endpoints: endpoints.split(',').map(|e| e.trim().to_owned()).collect(),
            }))
        }),
        suite: SuiteKind::Contract,
    }
}

struct EtcdFixture {
    endpoints: Vec<String>,
}

struct EtcdHooks {
    endpoints: Vec<String>,
    ns: String,
    backend: EtcdBackend,
    peer: EtcdBackend,
}

async fn connect(endpoints: &[String], ns: &str) -> Result<EtcdBackend> {
    let mut settings = EtcdSettings::with_endpoints(endpoints.iter().cloned());
    settings.namespace = ns.to_owned();
    settings.request_timeout = Duration::from_secs(10);
    Ok(EtcdBackend::builder().settings(settings).build().await?)
}

#[async_trait]
impl Hooks for EtcdHooks {
    async fn revoke_registration(&self, service: &str, id: &str) -> Result<()> {
        let revoked = self.backend.revoke_registration(service, id).await?;
        ensure!(revoked, "{service}/{id} was not registered");
        Ok(())
    }

    async fn revoke_worker_id(&self, id: u64) -> Result<()> {
        let revoked = self.backend.revoke_worker_id(id).await?;
        ensure!(revoked, "worker id {id} was not leased");
        Ok(())
    }

    async fn compact_config_history(&self) -> Result<()> {
        Ok(self.backend.compact_config_history().await?)
    }

    async fn cleanup(&self) -> Result<()> {
        self.peer.close().await?;
        self.backend.close().await?;
        let sweeper = connect(&self.endpoints, &self.ns).await?;
        sweeper.purge_namespace().await?;
        sweeper.close().await?;
        Ok(())
    }
}

#[async_trait]
impl Fixture for EtcdFixture {
    async fn world(&self) -> Result<World> {
        let ns = format!("/{}", unique("t"));
        let backend = connect(&self.endpoints, &ns).await?;
        let peer = connect(&self.endpoints, &ns).await?;
        Ok(World {
            backend: Arc::new(backend.clone()),
            peer: Arc::new(peer.clone()),
            hooks: Arc::new(EtcdHooks {
                endpoints: self.endpoints.clone(),
                ns,
                backend,
                peer,
            }),
        })
    }
}
