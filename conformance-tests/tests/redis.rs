//! The conformance suite on the Redis backend, against the server from
//! `scripts/services.sh` (`IMINFRA_REDIS_URL`).

use std::process::ExitCode;

use im_infra_conformance::servers::REDIS_ENV;
use im_infra_conformance::{run_main, SuiteKind, Target};

#[path = "support/redis_fixture.rs"]
mod redis_fixture;

fn main() -> ExitCode {
    run_main(Target {
        backend: "redis",
        env_var: Some(REDIS_ENV),
        fixture: Some(redis_fixture::make),
        suite: SuiteKind::Contract,
    })
}
