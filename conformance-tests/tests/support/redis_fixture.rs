//! The Redis conformance fixture, shared by the single-server runner
//! (`redis.rs`) and the cluster runner (`redis_cluster.rs`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use async_trait::async_trait;
use im_infra::backend::Backend;
use im_infra_conformance::{Fixture, Hooks, World};
use im_infra_redis::{RedisBackend, RedisConfig};

/// The fixture for the server(s) at `urls` (comma-separated: a cluster).
pub fn make(urls: &str) -> Result<Arc<dyn Fixture>> {
    Ok(Arc::new(RedisFixture {
        url: urls.to_owned(),
    }))
}

struct RedisFixture {
    url: String,
}

struct RedisHooks {
    url: String,
    ns: String,
    backend: RedisBackend,
    peer: RedisBackend,
}

/// One URL, or several separated by commas (a Redis Cluster).
async fn connect(urls: &str, ns: &str) -> Result<RedisBackend> {
    let mut cfg = RedisConfig::new(urls);
    cfg.urls = urls.split(',').map(str::to_owned).collect();
    cfg.namespace = ns.to_owned();
    cfg.response_timeout = Duration::from_secs(5);
    Ok(RedisBackend::builder().config(cfg).build().await?)
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
