//! The conformance suite on the Redis backend, against the server from
//! `scripts/services.sh` (`IMINFRA_REDIS_URL`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use async_trait::async_trait;
use im_infra::backend::Backend;
use im_infra_conformance::servers::REDIS_ENV;
use im_infra_conformance::{run_main, Fixture, Hooks, SuiteKind, Target, World};
use im_infra_redis::RedisBackend;

struct RedisFixture {
    url: String,
}

struct RedisHooks {
    url: String,
    ns: String,
    backend: RedisBackend,
    peer: RedisBackend,
}

async fn connect(url: &str, ns: &str) -> Result<RedisBackend> {
    Ok(RedisBackend::builder()
        .url(url)
        .namespace(ns)
        .response_timeout(Duration::from_secs(5))
        .build()
        .await?)
}

#[async_trait]
impl Hooks for RedisHooks {
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
        Ok(self.backend.compact_config_history().await?)
    }

    async fn cleanup(&self) -> Result<()> {
        self.peer.close().await?;
        self.backend.close().await?;
        let sweeper = connect(&self.url, &self.ns).await?;
        sweeper.purge_namespace().await?;
        sweeper.close().await?;
        Ok(())
    }
}

#[async_trait]
impl Fixture for RedisFixture {
    async fn world(&self) -> Result<World> {
        let ns = format!("t-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let backend = connect(&self.url, &ns).await?;
        let peer = connect(&self.url, &ns).await?;
        Ok(World {
            backend: Arc::new(backend.clone()),
            peer: Arc::new(peer.clone()),
            hooks: Arc::new(RedisHooks {
                url: self.url.clone(),
                ns,
                backend,
                peer,
            }),
        })
    }
}

fn main() -> ExitCode {
    run_main(Target {
        backend: "redis",
        env_var: Some(REDIS_ENV),
        fixture: Some(|url| {
            Ok(Arc::new(RedisFixture {
                url: url.to_owned(),
            }))
        }),
        suite: SuiteKind::Contract,
    })
}
