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

use anyhow::Result;
use async_trait::async_trait;
use im_infra_conformance::cases::unique;
use im_infra_conformance::servers::ETCD_ENV;
use im_infra_conformance::{maintained, Fixture, SuiteKind, Target, World};

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

async fn connect(endpoints: Vec<String>, ns: String) -> Result<EtcdBackend> {
    let mut settings = EtcdSettings::with_endpoints(endpoints);
    settings.namespace = ns;
    settings.request_timeout = Duration::from_secs(10);
    Ok(EtcdBackend::builder().settings(settings).build().await?)
}

#[async_trait]
impl Fixture for EtcdFixture {
    async fn world(&self) -> Result<World> {
        let endpoints = self.endpoints.clone();
        let ns = format!("/{}", unique("t"));
        maintained::world(ns, move |ns| connect(endpoints.clone(), ns)).await
    }
}
