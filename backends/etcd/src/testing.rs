//! The conformance fixture of the etcd backend (feature `testing`): every
//! world is a fresh namespace on the server named by
//! `IMINFRA_ETCD_ENDPOINTS`, purged afterwards.
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     im_infra_conformance::run_main(im_infra_etcd::testing::target())
//! }
//! ```

use std::time::Duration;

use anyhow::Result;
use im_infra_conformance::cases::unique;
use im_infra_conformance::servers::ETCD_ENV;
use im_infra_conformance::{maintained, SuiteKind, Target};

use crate::{EtcdBackend, EtcdSettings};

/// The conformance runner's target for this backend.
pub fn target() -> Target {
    Target {
        backend: "etcd",
        env_var: Some(ETCD_ENV),
        fixture: Some(|endpoints| {
            Ok(maintained::fixture(
                endpoints,
                || format!("/{}", unique("t")),
                connect,
            ))
        }),
        suite: SuiteKind::Contract,
    }
}

/// `endpoints` separated by commas.
async fn connect(endpoints: String, ns: String) -> Result<EtcdBackend> {
    let endpoints: Vec<String> = endpoints.split(',').map(|e| e.trim().to_owned()).collect();
    let mut settings = EtcdSettings::with_endpoints(endpoints);
    settings.namespace = ns;
    settings.request_timeout = Duration::from_secs(10);
    Ok(EtcdBackend::builder().settings(settings).build().await?)
}
