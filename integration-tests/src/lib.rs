//! # im-infra-integration-tests
//!
//! The tests beyond the contract, run against the project's own servers
//! (`scripts/services.sh`): fault tests that stop, kill and restart a
//! server; partitions through a freezing proxy; servers that come back with
//! older data; TLS; the telemetry of every backend; settings decoding; the
//! lock-safety check across OS processes; and cluster faults on private
//! Docker networks (an etcd member cut off, a Redis Sentinel failover). The
//! contract itself lives in `im-infra-conformance` and runs from each
//! backend's own crate.
#![deny(missing_docs)]

use anyhow::{bail, Context, Result};

pub mod decoding;
pub mod docker;
pub mod http;
pub mod lock_safety;

/// Runs `scripts/services.sh` with `args` (to stop, kill or start a server
/// in a fault test).
pub fn services(args: &[&str]) -> Result<()> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/services.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "scripts/services.sh {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
