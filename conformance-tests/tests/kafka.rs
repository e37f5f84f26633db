//! The conformance runner of the kafka backend. Until the backend crate lands
//! it checks that the server from `scripts/services.sh` answers
//! (`kafka::server::reachable`).

use std::process::ExitCode;

use im_infra_conformance::servers::KAFKA_ENV;
use im_infra_conformance::{run_main, SuiteKind, Target};

fn main() -> ExitCode {
    run_main(Target {
        backend: "kafka",
        env_var: Some(KAFKA_ENV),
        fixture: None,
        suite: SuiteKind::Contract,
    })
}
