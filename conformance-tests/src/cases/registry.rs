//! `ServiceRegistry` / `ServiceDiscovery` contract.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use im_infra::backend::Capability;
use im_infra::registry::{
    RegisterOptions, ServiceDiscoveryExt, ServiceEvent, ServiceEventKind, ServiceEventStream,
    ServiceInfo, ServiceInstance,
};
use im_infra::ErrorKind;

use super::{eventually, expect_kind, unique};
use crate::harness::{Case, Claims, World};

/// Lease TTL used by the cases: long enough for every backend's minimum
/// (etcd grants whole seconds), short enough to watch expiry happen.
const TTL: Duration = Duration::from_secs(2);

async fn next_event(stream: &mut ServiceEventStream) -> Result<ServiceEvent> {
    let item = tokio::time::timeout(Duration::from_secs(15), stream.next())
        .await
        .context("no registry event within 15 s")?
        .context("the watch stream ended")?;
    Ok(item?)
}

fn instance(service: &str, id: &str, port: u16) -> ServiceInstance {
    ServiceInstance::new(service, id, format!("127.0.0.1:{port}")).with_metadata("zone", "a")
}

async fn registered_instances_are_discovered(w: World) -> Result<()> {
    let service = unique("svc");
    let reg = w.backend.registry().await?;
    reg.register(&instance(&service, "i-2", 9002), TTL).await?;
    reg.register(
        &instance(&service, "i-1", 9001).with_metadata("version", "1.2"),
        TTL,
    )
    .await?;
    let found = w.peer.discovery().await?.instances(&service).await?;
    ensure!(found.len() == 2, "found {found:?}");
    ensure!(
        found[0].id == "i-1" && found[1].id == "i-2",
        "sorted by id: {found:?}"
    );
    ensure!(
        found[0].metadata.get("version").map(String::as_str) == Some("1.2"),
        "metadata kept"
    );
    ensure!(found[0].address == "127.0.0.1:9001");
    let endpoints = w.backend.discovery().await?.endpoints(&service).await?;
    ensure!(endpoints == ["127.0.0.1:9001", "127.0.0.1:9002"]);
    Ok(())
}

async fn deregister_removes_the_instance(w: World) -> Result<()> {
    let service = unique("svc");
    let reg = w.backend.registry().await?;
    reg.register(&instance(&service, "i-1", 9001), TTL).await?;
    reg.deregister(&service, "i-1").await?;
    ensure!(w
        .backend
        .discovery()
        .await?
        .instances(&service)
        .await?
        .is_empty());
    expect_kind(
        reg.deregister(&service, "i-1").await,
        ErrorKind::NotRegistered,
        "second deregister",
    )?;
    Ok(())
}

async fn list_services_gives_each_service_with_its_instances(w: World) -> Result<()> {
    let (a, b) = (unique("alpha"), unique("beta"));
    let reg = w.backend.registry().await?;
    reg.register(&instance(&a, "1", 9001), TTL).await?;
    reg.register(&instance(&b, "2", 9003).with_metadata("version", "2"), TTL)
        .await?;
    reg.register(&instance(&b, "1", 9002), TTL).await?;
    let services = reg.list_services().await?;
    ensure!(
        services.windows(2).all(|w| w[0].name < w[1].name),
        "sorted by name and unique: {services:?}"
    );
    let of = |name: &str| services.iter().find(|s| s.name == name);
    let plain = |s: &ServiceInfo| -> Vec<ServiceInstance> {
        s.instances
            .iter()
            .map(ServiceInstance::registered)
            .collect()
    };
    let a = of(&a).context("alpha listed")?;
    ensure!(plain(a) == vec![instance(&a.name, "1", 9001)], "{a:?}");
    let b = of(&b).context("beta listed")?;
    ensure!(
        plain(b)
            == vec![
                instance(&b.name, "1", 9002),
                instance(&b.name, "2", 9003).with_metadata("version", "2"),
            ],
        "instances sorted by id, with address and metadata: {b:?}"
    );
    Ok(())
}

async fn discovered_instances_carry_their_ttl(w: World) -> Result<()> {
    let service = unique("svc");
    let reg = w.backend.registry().await?;
    reg.register(&instance(&service, "i-1", 9001), TTL).await?;
    let disc = w.peer.discovery().await?;
    let live = disc.instances(&service).await?;
    ensure!(
        live.len() == 1 && live[0].ttl == Some(TTL),
        "instances() gives the TTL: {live:?}"
    );
    let mut events = disc.watch(&service).await?;
    let e = next_event(&mut events).await?;
    ensure!(e.instance.ttl == Some(TTL), "a watch gives the TTL: {e:?}");
    // An update keeps the TTL the instance was registered with.
    reg.update(&instance(&service, "i-1", 9002)).await?;
    let e = next_event(&mut events).await?;
    ensure!(
        e.kind == ServiceEventKind::Update && e.instance.ttl == Some(TTL),
        "{e:?}"
    );
    reg.deregister(&service, "i-1").await?;
    Ok(())
}

async fn register_without_a_ttl_uses_the_default(w: World) -> Result<()> {
    let service = unique("svc");
    let reg = w.backend.registry().await?;
    reg.register_with(&instance(&service, "i-1", 9001), RegisterOptions::default())
        .await?;
    let live = w.peer.discovery().await?.instances(&service).await?;
    ensure!(
        live.len() == 1 && live[0].ttl.is_some_and(|t| t >= Duration::from_secs(1)),
        "registered with the backend's default TTL: {live:?}"
    );
    reg.deregister(&service, "i-1").await?;
    Ok(())
}

async fn a_ttl_under_the_minimum_is_raised_to_it(w: World) -> Result<()> {
    let service = unique("svc");
    let reg = w.backend.registry().await?;
    let disc = w.peer.discovery().await?;
    let min = disc.capabilities().min_ttl;
    reg.register(&instance(&service, "i-1", 9001), Duration::from_millis(1))
        .await?;
    // A short minimum (50 ms in process) may lapse under load and be
    // registered again: what counts is the TTL it is kept with, and that it
    // is still kept three of them later.
    let expected = Some(min.max(Duration::from_millis(1)));
    let kept_with_the_minimum = || {
        let (disc, service) = (disc.clone(), service.clone());
        async move {
            let live = disc.instances(&service).await?;
            Ok(live.len() == 1 && live[0].ttl == expected)
        }
    };
    eventually(
        Duration::from_secs(5),
        "kept with the minimum TTL",
        kept_with_the_minimum,
    )
    .await?;
    tokio::time::sleep(min * 3).await;
    eventually(Duration::from_secs(5), "still kept", kept_with_the_minimum).await?;
    reg.deregister(&service, "i-1").await?;
    Ok(())
}

async fn update_from_another_handle_changes_a_registered_instance(w: World) -> Result<()> {
    let service = unique("svc");
    let owner = w.backend.registry().await?;
    owner
        .register(&instance(&service, "i-1", 9001), TTL)
        .await?;
    // Another handle, of another backend instance (another process).
    let other = w.peer.registry().await?;
    other
        .update(&instance(&service, "i-1", 9009).with_metadata("weight", "5"))
        .await?;
    let live = w.backend.discovery().await?.instances(&service).await?;
    ensure!(
        live.len() == 1
            && live[0].address == "127.0.0.1:9009"
            && live[0].metadata.get("weight").map(String::as_str) == Some("5")
            && live[0].ttl == Some(TTL),
        "the update is what discovery sees, with the TTL it was registered with: {live:?}"
    );
    // The registration keeps its lease: it is still alive after its TTL.
    tokio::time::sleep(TTL + TTL / 2).await;
    ensure!(
        w.backend
            .discovery()
            .await?
            .instances(&service)
            .await?
            .len()
            == 1,
        "the updated instance is still kept alive by its owner"
    );
    owner.deregister(&service, "i-1").await?;
    expect_kind(
        other.update(&instance(&service, "i-1", 9001)).await,
        ErrorKind::NotRegistered,
        "update of a deregistered instance from another handle",
    )
}

async fn update_of_a_lost_registration_is_never_a_silent_ok(w: World) -> Result<()> {
    let service = unique("svc");
    let reg = w.backend.registry().await?;
    reg.register(&instance(&service, "i-1", 9001), TTL).await?;
    w.hooks.revoke_registration(&service, "i-1").await?;
    let updated = instance(&service, "i-1", 9002);
    // Either the registration is already back and the update reaches the
    // server, or the update reports the loss; both end with the new value.
    match reg.update(&updated).await {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::LeaseLost => {}
        Err(e) => return Err(e.into()),
    }
    let disc = w.backend.discovery().await?;
    eventually(
        Duration::from_secs(10),
        "registered again with the new value",
        || {
            let (disc, service, updated) = (disc.clone(), service.clone(), updated.clone());
            async move {
                let live = disc.instances(&service).await?;
                Ok(live
                    .iter()
                    .map(ServiceInstance::registered)
                    .collect::<Vec<_>>()
                    == vec![updated])
            }
        },
    )
    .await
}

async fn watch_starts_with_live_instances_then_follows_changes(w: World) -> Result<()> {
    let service = unique("svc");
    let reg = w.backend.registry().await?;
    reg.register(&instance(&service, "i-1", 9001), TTL).await?;
    let mut events = w.peer.discovery().await?.watch(&service).await?;
    let e = next_event(&mut events).await?;
    ensure!(
        e.kind == ServiceEventKind::Add && e.instance.id == "i-1",
        "initial Add: {e:?}"
    );
    reg.register(&instance(&service, "i-2", 9002), TTL).await?;
    let e = next_event(&mut events).await?;
    ensure!(
        e.kind == ServiceEventKind::Add && e.instance.id == "i-2",
        "{e:?}"
    );
    reg.update(&instance(&service, "i-2", 9002).with_metadata("weight", "5"))
        .await?;
    let e = next_event(&mut events).await?;
    ensure!(
        e.kind == ServiceEventKind::Update
            && e.instance.metadata.get("weight").map(String::as_str) == Some("5"),
        "{e:?}"
    );
    reg.deregister(&service, "i-1").await?;
    let e = next_event(&mut events).await?;
    ensure!(
        e.kind == ServiceEventKind::Delete && e.instance.id == "i-1",
        "{e:?}"
    );
    Ok(())
}

async fn update_of_an_unknown_instance_is_not_registered(w: World) -> Result<()> {
    let reg = w.backend.registry().await?;
    expect_kind(
        reg.update(&instance(&unique("svc"), "nope", 9001)).await,
        ErrorKind::NotRegistered,
        "update unknown",
    )
}

async fn keepalive_keeps_the_instance(w: World) -> Result<()> {
    let service = unique("svc");
    let reg = w.backend.registry().await?;
    reg.register(&instance(&service, "i-1", 9001), TTL).await?;
    tokio::time::sleep(TTL * 3).await;
    let found = w.backend.discovery().await?.instances(&service).await?;
    ensure!(
        found.len() == 1,
        "a kept-alive instance outlives its TTL: {found:?}"
    );
    Ok(())
}

async fn instance_expires_when_its_registry_goes_away(w: World) -> Result<()> {
    let service = unique("svc");
    let reg = w.peer.registry().await?;
    reg.register(&instance(&service, "i-1", 9001), TTL).await?;
    let mut events = w.backend.discovery().await?.watch(&service).await?;
    ensure!(next_event(&mut events).await?.kind == ServiceEventKind::Add);
    // The registering "process" dies: no keep-alive any more.
    drop(reg);
    let e = next_event(&mut events).await?;
    ensure!(
        e.kind == ServiceEventKind::Delete && e.instance.id == "i-1",
        "{e:?}"
    );
    ensure!(w
        .backend
        .discovery()
        .await?
        .instances(&service)
        .await?
        .is_empty());
    Ok(())
}

async fn lost_lease_is_registered_again(w: World) -> Result<()> {
    let service = unique("svc");
    let reg = w.backend.registry().await?;
    reg.register(&instance(&service, "i-1", 9001), TTL).await?;
    let mut events = w.backend.discovery().await?.watch(&service).await?;
    ensure!(next_event(&mut events).await?.kind == ServiceEventKind::Add);
    w.hooks.revoke_registration(&service, "i-1").await?;
    let e = next_event(&mut events).await?;
    ensure!(
        e.kind == ServiceEventKind::Delete,
        "the revoked lease removes the instance: {e:?}"
    );
    let e = next_event(&mut events).await?;
    ensure!(
        e.kind == ServiceEventKind::Add && e.instance.id == "i-1",
        "registered again: {e:?}"
    );
    let disc = w.backend.discovery().await?;
    eventually(Duration::from_secs(5), "instance listed again", || {
        let disc = disc.clone();
        let service = service.clone();
        async move { Ok(disc.instances(&service).await?.len() == 1) }
    })
    .await
}

/// The key can go without the lease going: another registry registers
/// the same id (taking the key) and deregisters it. The owner's keeper
/// notices on its next renewal and registers it again.
async fn an_instance_deleted_elsewhere_is_registered_again(w: World) -> Result<()> {
    let service = unique("svc");
    let owner = w.backend.registry().await?;
    owner
        .register(&instance(&service, "i-1", 9001), TTL)
        .await?;
    let other = w.peer.registry().await?;
    other
        .register(&instance(&service, "i-1", 9002), TTL)
        .await?;
    // Which of the two holds the key at this instant is a race the
    // keepers settle; either way the other one's deregistration ends its
    // own claim.
    let _ = other.deregister(&service, "i-1").await;
    let disc = w.backend.discovery().await?;
    eventually(
        Duration::from_secs(10),
        "the owner's instance listed again",
        || {
            let (disc, service) = (disc.clone(), service.clone());
            async move {
                let live = disc.instances(&service).await?;
                Ok(live.len() == 1 && live[0].address == "127.0.0.1:9001")
            }
        },
    )
    .await?;
    owner.deregister(&service, "i-1").await?;
    Ok(())
}

async fn resolve_filters_by_metadata(w: World) -> Result<()> {
    let service = unique("svc");
    let reg = w.backend.registry().await?;
    reg.register(
        &instance(&service, "a", 9001).with_metadata("region", "eu"),
        TTL,
    )
    .await?;
    reg.register(
        &instance(&service, "b", 9002).with_metadata("region", "us"),
        TTL,
    )
    .await?;
    let disc = w.backend.discovery().await?;
    let mut filter = BTreeMap::new();
    filter.insert("region".to_owned(), "us".to_owned());
    let found = disc.resolve(&service, &filter).await?;
    ensure!(found.len() == 1 && found[0].id == "b", "{found:?}");
    filter.insert("region".to_owned(), "ap".to_owned());
    expect_kind(
        disc.resolve(&service, &filter).await,
        ErrorKind::NoInstances,
        "no match",
    )?;
    Ok(())
}

async fn services_are_isolated(w: World) -> Result<()> {
    let (a, b) = (unique("svc-a"), unique("svc-b"));
    w.backend
        .registry()
        .await?
        .register(&instance(&a, "1", 9001), TTL)
        .await?;
    ensure!(w.backend.discovery().await?.instances(&b).await?.is_empty());
    Ok(())
}

async fn bad_input_is_invalid_argument(w: World) -> Result<()> {
    let reg = w.backend.registry().await?;
    let disc = w.backend.discovery().await?;
    for bad in [
        ServiceInstance::new("", "id", "127.0.0.1:1"),
        ServiceInstance::new("svc", "", "127.0.0.1:1"),
        ServiceInstance::new("s/v", "id", "127.0.0.1:1"),
        ServiceInstance::new("svc", "id", "no-port"),
        ServiceInstance::new("svc", "id", "host:99999"),
    ] {
        expect_kind(
            reg.register(&bad, TTL).await,
            ErrorKind::InvalidArgument,
            "bad instance",
        )?;
    }
    expect_kind(
        reg.register(&instance("svc", "id", 1), Duration::ZERO)
            .await,
        ErrorKind::InvalidArgument,
        "zero ttl",
    )?;
    expect_kind(
        disc.instances("").await,
        ErrorKind::InvalidArgument,
        "empty service",
    )?;
    ensure!(
        disc.instances("svc").await?.is_empty(),
        "nothing refused was registered"
    );
    Ok(())
}

async fn a_callers_lease_is_unsupported_where_not_claimed(w: World) -> Result<()> {
    let reg = w.backend.registry().await?;
    let opts = RegisterOptions::default().ttl(TTL).lease_id(0x7a);
    expect_kind(
        reg.register_with(&instance("svc", "id", 1), opts).await,
        ErrorKind::Unsupported,
        "a registration on a caller's lease",
    )?;
    let live = w.backend.discovery().await?.instances("svc").await?;
    ensure!(live.is_empty(), "nothing was registered: {live:?}");
    Ok(())
}

fn without_caller_leases(c: &Claims) -> bool {
    on(c) && c.registry.as_ref().is_some_and(|r| !r.caller_leases)
}

fn on(c: &Claims) -> bool {
    c.has(Capability::Registry) && c.registry.as_ref().is_some_and(|r| r.watch)
}

/// The registry cases.
pub fn cases() -> Vec<Case> {
    vec![
        crate::case!("registry", registered_instances_are_discovered, when = on),
        crate::case!("registry", deregister_removes_the_instance, when = on),
        crate::case!(
            "registry",
            list_services_gives_each_service_with_its_instances,
            when = on
        ),
        crate::case!(
            "registry",
            register_without_a_ttl_uses_the_default,
            when = on
        ),
        crate::case!("registry", discovered_instances_carry_their_ttl, when = on),
        crate::case!(
            "registry",
            a_ttl_under_the_minimum_is_raised_to_it,
            when = on
        ),
        crate::case!(
            "registry",
            update_from_another_handle_changes_a_registered_instance,
            when = on
        ),
        crate::case!(
            "registry",
            update_of_a_lost_registration_is_never_a_silent_ok,
            when = on
        ),
        crate::case!(
            "registry",
            watch_starts_with_live_instances_then_follows_changes,
            when = on
        ),
        crate::case!(
            "registry",
            update_of_an_unknown_instance_is_not_registered,
            when = on
        ),
        crate::case!("registry", keepalive_keeps_the_instance, when = on),
        crate::case!(
            "registry",
            instance_expires_when_its_registry_goes_away,
            when = on
        ),
        crate::case!("registry", lost_lease_is_registered_again, when = on),
        crate::case!(
            "registry",
            an_instance_deleted_elsewhere_is_registered_again,
            when = on
        ),
        crate::case!(
            "registry",
            a_callers_lease_is_unsupported_where_not_claimed,
            when = without_caller_leases
        ),
        crate::case!("registry", resolve_filters_by_metadata, when = on),
        crate::case!("registry", services_are_isolated, when = on),
        crate::case!("registry", bad_input_is_invalid_argument, when = on),
    ]
}
