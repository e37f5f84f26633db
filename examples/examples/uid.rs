//! Unique ids. Basic: Snowflake ids on a leased worker id, decomposed.
//! Advanced: two processes' worth of generators get different worker ids,
//! and 20 000 ids from both are unique and ordered per generator.
//!
//! ```text
//! cargo run --example uid [basic|advanced]
//! IMINFRA_CONFIG=examples/servers.yaml cargo run --example uid
//! ```

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{ensure, Result};
use im_infra::uid::{IdGenerator, Layout, Snowflake};
use im_infra_examples::{parts, start};
use im_infra_runtime::Runtime;

async fn generator(runtime: &Runtime) -> Result<Snowflake> {
    let layout = Layout::default();
    let lease = runtime
        .worker_ids()
        .allocate(layout.max_worker_id(), Duration::from_secs(30))
        .await?;
    Ok(Snowflake::with_lease(layout, lease)?)
}

async fn basic(runtime: &Runtime) -> Result<()> {
    let ids = generator(runtime).await?;
    let id = ids.next_id()?;
    println!(
        "basic: worker {} made {id} = {:?}",
        ids.worker_id(),
        ids.decompose(id)
    );
    ensure!(ids.decompose(id).worker_id == ids.worker_id());
    Ok(())
}

async fn advanced(runtime: &Runtime) -> Result<()> {
    let (a, b) = (generator(runtime).await?, generator(runtime).await?);
    ensure!(
        a.worker_id() != b.worker_id(),
        "leased worker ids are distinct"
    );
    let mut all = HashSet::new();
    for ids in [&a, &b] {
        let mut last = 0i64;
        for _ in 0..10_000 {
            let id = ids.next_id()?;
            ensure!(id > last, "ordered per generator");
            last = id;
            ensure!(all.insert(id), "unique across generators");
        }
    }
    println!(
        "advanced: workers {} and {}: {} unique ids",
        a.worker_id(),
        b.worker_id(),
        all.len()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let parts = parts()?;
    let runtime = start("example-uid").await?;
    if parts.basic {
        basic(&runtime).await?;
    }
    if parts.advanced {
        advanced(&runtime).await?;
    }
    runtime.shutdown().await?;
    Ok(())
}
