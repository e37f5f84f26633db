//! The conformance suite on the etcd backend, against the server from
//! `scripts/services.sh` (`IMINFRA_ETCD_ENDPOINTS`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use async_trait::async_trait;
use im_infra::backend::Backend;
use im_infra_conformance::servers::ETCD_ENV;
use im_infra_conformance::{run_main, Fixture, Hooks, SuiteKind, Target, World};
use im_infra_etcd::{EtcdBackend, EtcdConfig};

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
    let mut cfg = EtcdConfig::with_endpoints(endpoints.iter().cloned());
    cfg.namespace = ns.to_owned();
    cfg.request_timeout = Duration::from_secs(10);
    Ok(EtcdBackend::builder().config(cfg).build().await?)
}

#[async_trait]
impl Hooks for EtcdHooks {
    async fn revoke_registration(&self, service: &str, id: &str) -> Result<()> {
        ensure!(
            self.backend.revoke_registration(service, id).await?,
            "{service}/{id} was not registered"
        );
        Ok(())
    }

    async fn revoke_worker_id(&self, id: u64) -> Result<()> {
        ensure!(
            self.backend.revoke_worker_id(id).await?,
            "worker id {id} was not leased"
        );
        Ok(())
    }

    async fn compact_config_history(&self) -> Result<()> {
        Ok(self.backend.compact().await?)
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
        let ns = format!("/t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
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

fn main() -> ExitCode {
    run_main(Target {
        backend: "etcd",
        env_var: Some(ETCD_ENV),
        fixture: Some(|eps| {
            Ok(Arc::new(EtcdFixture {
                endpoints: eps.split(',').map(|e| e.trim().to_owned()).collect(),
            }))
        }),
        suite: SuiteKind::Contract,
    })
}
