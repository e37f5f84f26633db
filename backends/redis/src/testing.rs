//! The conformance fixture of the Redis backend (feature `testing`), for a
//! single server (`IMINFRA_REDIS_URL`) and for a Redis Cluster
//! (`IMINFRA_REDIS_CLUSTER_URLS`): every world is a fresh namespace, purged
//! afterwards.
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     im_infra_conformance::run_main(im_infra_redis::testing::target())
//! }
//! ```

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use im_infra_conformance::cases::unique;
use im_infra_conformance::servers::{REDIS_CLUSTER_ENV, REDIS_ENV};
use im_infra_conformance::{maintained, Fixture, SuiteKind, Target};

use crate::{RedisBackend, RedisSettings};

/// The conformance runner's target for a single server.
pub fn target() -> Target {
    Target {
        backend: "redis",
        env_var: Some(REDIS_ENV),
        fixture: Some(fixture),
        suite: SuiteKind::Contract,
    }
}

/// The conformance runner's target for a Redis Cluster.
pub fn cluster_target() -> Target {
    Target {
        backend: "redis-cluster",
        env_var: Some(REDIS_CLUSTER_ENV),
        fixture: Some(fixture),
        suite: SuiteKind::Contract,
    }
}

/// The fixture for the server(s) at `urls` (comma-separated: a cluster).
fn fixture(urls: &str) -> Result<Arc<dyn Fixture>> {
    Ok(maintained::fixture(urls, || unique("t"), connect))
}

/// One URL, or several separated by commas (a Redis Cluster).
async fn connect(urls: String, ns: String) -> Result<RedisBackend> {
    let mut settings = RedisSettings::new(&urls);
    settings.urls = urls.split(',').map(str::to_owned).collect();
    settings.namespace = ns;
    settings.request_timeout = Duration::from_secs(5);
    Ok(RedisBackend::builder().settings(settings).build().await?)
}
