//! Service registry and discovery. Basic: register an instance with a TTL,
//! find it, deregister it. Advanced: watch a service while instances come,
//! change and go; list every service.
//!
//! ```text
//! cargo run --example registry [basic|advanced]
//! IMINFRA_CONFIG=examples/servers.yaml cargo run --example registry
//! ```

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use im_infra::registry::{ServiceDiscoveryExt, ServiceEventKind, ServiceInstance};
use im_infra_examples::{parts, run_id, start};
use im_infra_runtime::Runtime;

async fn basic(runtime: &Runtime, run: &str) -> Result<()> {
    let (registry, discovery) = (runtime.registry(), runtime.discovery());
    let service = format!("im-logic-{run}");
    let instance =
        ServiceInstance::new(&service, "logic-1", "10.0.0.1:9001").with_metadata("zone", "a");
    registry
        .register(&instance, Duration::from_secs(10))
        .await?;
    let endpoints = discovery.endpoints(&service).await?;
    println!("basic: {service} at {endpoints:?}");
    ensure!(endpoints == vec!["10.0.0.1:9001".to_string()]);
    registry.deregister(&service, "logic-1").await?;
    ensure!(discovery.instances(&service).await?.is_empty());
    Ok(())
}

async fn advanced(runtime: &Runtime, run: &str) -> Result<()> {
    let (registry, discovery) = (runtime.registry(), runtime.discovery());
    let service = format!("im-gateway-{run}");
    let mut events = discovery.watch(&service).await?;
    let a = ServiceInstance::new(&service, "gw-a", "10.0.0.2:80");
    registry.register(&a, Duration::from_secs(10)).await?;
    registry
        .register(
            &ServiceInstance::new(&service, "gw-b", "10.0.0.3:80"),
            Duration::from_secs(10),
        )
        .await?;
    registry
        .update(&a.clone().with_metadata("weight", "5"))
        .await?;
    registry.deregister(&service, "gw-b").await?;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let e = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .context("the watch answers")?
            .context("the watch goes on")??;
        seen.push((e.kind, e.instance.id));
    }
    println!("advanced: watch saw {seen:?}");
    ensure!(seen.contains(&(ServiceEventKind::Update, "gw-a".into())));
    ensure!(seen.contains(&(ServiceEventKind::Delete, "gw-b".into())));
    let services = registry.list_services().await?;
    ensure!(services
        .iter()
        .any(|s| s.name == service && s.instances.len() == 1));
    // Left registered on purpose: the runtime deregisters it at shutdown.
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let parts = parts()?;
    let runtime = start("example-registry").await?;
    let run = run_id();
    if parts.basic {
        basic(&runtime, &run).await?;
    }
    if parts.advanced {
        advanced(&runtime, &run).await?;
    }
    runtime.shutdown().await?;
    Ok(())
}
