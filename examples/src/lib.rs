//! Runnable examples of im-infra; see the `examples/` folder:
//!
//! - `cargo run --example quickstart`: every capability, started by the
//!   runtime, printing what it does.
//! - `cargo run --example <capability> [basic|advanced]`, one per
//!   capability (`cache`, `ratelimit`, `lock`, `config`, `registry`,
//!   `once`, `mq`, `uid`): a basic and an advanced use (both without an
//!   argument).
//!
//! Every example runs in process with no configuration, and on the real
//! servers with one variable: `IMINFRA_CONFIG=examples/servers.yaml` (the
//! servers at their default ports; `scripts/examples.sh` runs every example
//! both ways, giving the file the addresses of the servers
//! `scripts/services.sh` started).
#![deny(missing_docs)]

use std::time::{SystemTime, UNIX_EPOCH};

use im_infra_runtime::Runtime;

/// Which part of an example to run, from the first argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    /// Run the basic use.
    pub basic: bool,
    /// Run the advanced use.
    pub advanced: bool,
}

/// The parts the command line asks for: `basic`, `advanced`, or both when
/// there is no argument.
///
/// ```
/// let parts = im_infra_examples::parts_from(["advanced".to_string()]).unwrap();
/// assert!(!parts.basic && parts.advanced);
/// assert!(im_infra_examples::parts_from(["fancy".to_string()]).is_err());
/// ```
pub fn parts_from(args: impl IntoIterator<Item = String>) -> anyhow::Result<Parts> {
    match args.into_iter().next().as_deref() {
        None => Ok(Parts {
            basic: true,
            advanced: true,
        }),
        Some("basic") => Ok(Parts {
            basic: true,
            advanced: false,
        }),
        Some("advanced") => Ok(Parts {
            basic: false,
            advanced: true,
        }),
        Some(other) => anyhow::bail!("unknown part {other:?}: basic or advanced"),
    }
}

/// [`parts_from`] the process's arguments.
pub fn parts() -> anyhow::Result<Parts> {
    parts_from(std::env::args().skip(1))
}

/// A suffix unique to this run, so that a run on the real servers does not
/// meet the keys of an earlier one.
pub fn run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}", nanos % (1 << 48))
}

/// The runtime of the example `service`: in process without configuration,
/// on the servers `IMINFRA_CONFIG` names. Logs go to stdout at `warn`
/// unless `RUST_LOG` says otherwise.
pub async fn start(service: &str) -> im_infra::Result<Runtime> {
    Runtime::builder(service)
        .section("clog", serde_json::json!({"level": std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into())}))
        .start()
        .await
}
