//! The conformance suite on the MySQL backend, against the MariaDB server
//! from `scripts/services.sh` (`IMINFRA_MYSQL_URL`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use async_trait::async_trait;
use im_infra::backend::Backend;
use im_infra_conformance::servers::MYSQL_ENV;
use im_infra_conformance::{run_main, Fixture, Hooks, SuiteKind, Target, World};
use im_infra_mysql::MysqlBackend;

/// The tables of test runs; every world has a namespace of its own in them.
const TABLE_PREFIX: &str = "iminfra_test_";

struct MysqlFixture {
    url: String,
}

struct MysqlHooks {
    backend: MysqlBackend,
    peer: MysqlBackend,
}

async fn connect(url: &str, ns: &str) -> Result<MysqlBackend> {
    Ok(MysqlBackend::builder()
        .url(url)
        .namespace(ns)
        .table_prefix(TABLE_PREFIX)
        .query_timeout(Duration::from_secs(10))
        .config_poll_interval(Duration::from_millis(50))
        .build()
        .await?)
}

#[async_trait]
impl Hooks for MysqlHooks {
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
        self.backend.purge_namespace().await?;
        self.backend.close().await?;
        Ok(())
    }
}

#[async_trait]
impl Fixture for MysqlFixture {
    async fn world(&self) -> Result<World> {
        let ns = format!("t-{}/", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let backend = connect(&self.url, &ns).await?;
        let peer = connect(&self.url, &ns).await?;
        Ok(World {
            backend: Arc::new(backend.clone()),
            peer: Arc::new(peer.clone()),
            hooks: Arc::new(MysqlHooks { backend, peer }),
        })
    }
}

fn main() -> ExitCode {
    run_main(Target {
        backend: "mysql",
        env_var: Some(MYSQL_ENV),
        fixture: Some(|url| {
            Ok(Arc::new(MysqlFixture {
                url: url.to_owned(),
            }))
        }),
        suite: SuiteKind::Contract,
    })
}
