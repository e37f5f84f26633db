//! Instance records this version cannot read (written by another client or
//! version) on the real Redis and etcd: they hide no other instance, and a
//! watch counts such an instance as gone, as a listing leaves it out.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use im_infra::backend::{Backend, Maintenance};
use im_infra::registry::{
    ServiceEvent, ServiceEventKind, ServiceEventStream, ServiceInstance, ServiceRegistry,
};
use im_infra_conformance::servers::{server_or_skip, ETCD_ENV, REDIS_ENV};
use im_infra_etcd::{EtcdBackend, EtcdSettings};
use im_infra_redis::RedisBackend;

/// An instance whose address is not a string: its service and id can be
/// read, the whole record cannot.
fn unreadable(id: &str) -> String {
    format!(r#"{{"service":"svc","id":"{id}","address":42}}"#)
}

fn namespace(what: &str) -> String {
    format!("{what}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// The next event of `watch`, within 10 s.
async fn next(watch: &mut ServiceEventStream) -> Result<ServiceEvent> {
    Ok(tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .context("no event within 10 s")?
        .context("the watch ended")??)
}

/// Registers `a` and `b`, starts a watch and reads its first two events.
async fn two_instances_watched(
    backend: &dyn Backend,
) -> Result<(Arc<dyn ServiceRegistry>, ServiceEventStream)> {
    let registry = backend.registry().await?;
    for (id, address) in [("a", "127.0.0.1:1"), ("b", "127.0.0.1:2")] {
        registry
            .register(
                &ServiceInstance::new("svc", id, address),
                Duration::from_secs(30),
            )
            .await?;
    }
    let mut watch = backend.discovery().await?.watch("svc").await?;
    for _ in 0..2 {
        let e = next(&mut watch).await?;
        ensure!(e.kind == ServiceEventKind::Add, "{e:?}");
    }
    Ok((registry, watch))
}

/// An unreadable record in Redis's instance hash is left out of listings
/// (not an error that hides every instance of every service), and its
/// deregistration reaches a watch as a delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_an_unreadable_instance_hides_no_other_and_its_removal_is_seen() -> Result<()> {
    let Some(url) = server_or_skip("redis", REDIS_ENV) else {
        return Ok(());
    };
    let ns = namespace("dec");
    let backend = RedisBackend::builder()
        .url(&url)
        .namespace(&ns)
        .build()
        .await?;
    let (registry, mut watch) = two_instances_watched(&backend).await?;
    let mut raw = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let _: i64 = redis::cmd("HSET")
        .arg(format!("{ns}:{{reg}}:inst"))
        .arg("svc/b")
        .arg(unreadable("b"))
        .query_async(&mut raw)
        .await?;
    let discovery = backend.discovery().await?;
    let found = discovery.instances("svc").await?;
    ensure!(
        found.len() == 1 && found[0].id == "a",
        "the readable instance is listed, the other left out: {found:?}"
    );
    ensure!(
        registry.list_services().await.is_ok(),
        "the services are still listed"
    );
    registry.deregister("svc", "b").await?;
    let e = next(&mut watch).await?;
    ensure!(
        e.kind == ServiceEventKind::Delete && e.instance.id == "b",
        "the watch saw b go: {e:?}"
    );
    backend.purge_namespace().await?;
    backend.close().await?;
    Ok(())
}

/// A value of an etcd instance key replaced by one this version cannot
/// read reaches a watch as the instance's deletion (the listing leaves it
/// out too), not as nothing, which would keep its old address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_an_instance_that_became_unreadable_is_gone_for_a_watch() -> Result<()> {
    let Some(eps) = server_or_skip("etcd", ETCD_ENV) else {
        return Ok(());
    };
    let endpoints: Vec<String> = eps.split(',').map(str::to_owned).collect();
    let mut settings = EtcdSettings::with_endpoints(endpoints.clone());
    settings.namespace = format!("/{}", namespace("dec"));
    let key = format!("{}{}/svc/b", settings.namespace, settings.service_prefix);
    let backend = EtcdBackend::builder().settings(settings).build().await?;
    let (_registry, mut watch) = two_instances_watched(&backend).await?;
    let mut raw = etcd_client::Client::connect(endpoints, None).await?;
    raw.put(key, unreadable("b"), None).await?;
    let e = next(&mut watch).await?;
    ensure!(
        e.kind == ServiceEventKind::Delete && e.instance.id == "b",
        "the watch counts b as gone: {e:?}"
    );
    let found = backend.discovery().await?.instances("svc").await?;
    ensure!(found.len() == 1 && found[0].id == "a", "{found:?}");
    backend.purge_namespace().await?;
    backend.close().await?;
    Ok(())
}
