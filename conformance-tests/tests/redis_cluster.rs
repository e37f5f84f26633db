//! The conformance suite on the Redis backend in cluster mode, against the
//! three-primary Redis Cluster from `scripts/services.sh`
//! (`IMINFRA_REDIS_CLUSTER_URLS`).

use std::process::ExitCode;

use im_infra_conformance::servers::REDIS_CLUSTER_ENV;
use im_infra_conformance::{run_main, SuiteKind, Target};

#[path = "support/redis_fixture.rs"]
mod redis_fixture;

fn main() -> ExitCode {
    run_main(Target {
        backend: "redis-cluster",
        env_var: Some(REDIS_CLUSTER_ENV),
        fixture: Some(redis_fixture::make),
        suite: SuiteKind::Contract,
    })
}
