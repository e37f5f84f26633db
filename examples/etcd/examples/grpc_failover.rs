//! Two gRPC servers registered in etcd, a client balancing over them, one
//! server killed: all traffic moves to the other.
//!
//! ```text
//! scripts/services.sh up && source .services/env
//! cargo run -p im-infra-examples-etcd --example grpc_failover
//! ```

use anyhow::Result;

#[tokio::main]
async fn main() -> Result<()> {
    let endpoints: Vec<String> = std::env::var("IMINFRA_ETCD_ENDPOINTS")
        .unwrap_or_else(|_| "http://127.0.0.1:2379".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    let report = im_infra_examples_etcd::failover(&endpoints).await?;
    println!("calls while both servers ran: {:?}", report.before);
    println!(
        "server a killed: {} calls failed, the last {:?} after the kill",
        report.failed_after_kill, report.last_failure_after
    );
    println!("calls after the kill: {:?}", report.after);
    im_infra_examples_etcd::check(&report)?;
    println!("ok: all traffic moved to server b");
    Ok(())
}
