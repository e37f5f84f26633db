//! The conformance fixture of the MySQL backend (feature `testing`): every
//! world is a fresh namespace in test tables on the server named by
//! `IMINFRA_MYSQL_URL`, purged afterwards.
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     im_infra_conformance::run_main(im_infra_mysql::testing::target())
//! }
//! ```

use std::time::Duration;

use anyhow::Result;
use im_infra_conformance::cases::unique;
use im_infra_conformance::servers::MYSQL_ENV;
use im_infra_conformance::{maintained, SuiteKind, Target};

use crate::MysqlBackend;

/// The tables of test runs; every world has a namespace of its own in them.
const TABLE_PREFIX: &str = "iminfra_test_";

/// The conformance runner's target for this backend.
pub fn target() -> Target {
    Target {
        backend: "mysql",
        env_var: Some(MYSQL_ENV),
        fixture: Some(|url| {
            Ok(maintained::fixture(
                url,
                || format!("{}/", unique("t")),
                connect,
            ))
        }),
        suite: SuiteKind::Contract,
    }
}

async fn connect(url: String, ns: String) -> Result<MysqlBackend> {
    Ok(MysqlBackend::builder()
        .url(url)
        .namespace(ns)
        .table_prefix(TABLE_PREFIX)
        .request_timeout(Duration::from_secs(10))
        .config_poll_interval(Duration::from_millis(50))
        .build()
        .await?)
}
