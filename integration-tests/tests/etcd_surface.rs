//! The etcd-specific surface against real etcd: the lease manager, the
//! connection manager, and interoperation with `etcdctl lock`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use im_infra::backend::{Backend, Maintenance};
use im_infra::lock::LockOptions;
use im_infra::ErrorKind;
use im_infra_conformance::servers::{server_or_skip, ETCD_ENV};
use im_infra_etcd::{EtcdBackend, EtcdSettings};

async fn backend(endpoints: &str) -> Result<(EtcdBackend, String)> {
    let ns = format!(
        "/surface-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut cfg = EtcdSettings::with_endpoints(endpoints.split(',').map(str::to_owned));
    cfg.namespace = ns.clone();
    Ok((EtcdBackend::builder().settings(cfg).build().await?, ns))
}

#[tokio::test]
async fn lease_manager_creates_keeps_inspects_and_revokes() -> Result<()> {
    let Some(eps) = server_or_skip("etcd", ETCD_ENV) else {
        return Ok(());
    };
    let (etcd, _) = backend(&eps).await?;
    let leases = etcd.leases();
    let id = leases.create(Duration::from_secs(3)).await?;
    ensure!(leases.list().await?.contains(&id), "a new lease is listed");
    let info = leases.info(id).await?;
    ensure!(
        info.granted_ttl == Duration::from_secs(3) && info.ttl <= info.granted_ttl,
        "{info:?}"
    );
    let kept = leases.keep_alive(id).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    ensure!(!kept.lost().is_cancelled(), "kept alive past its TTL");
    ensure!(leases.refresh(id).await? > Duration::ZERO);
    leases.revoke(id).await?;
    let lost = kept.lost();
    tokio::time::timeout(Duration::from_secs(5), lost.cancelled())
        .await
        .context("the keep-alive notices the revocation")?;
    // A lease named by an id etcd does not know: LeaseNotFound (5002) on
    // every operation that takes an id.
    let err = leases
        .info(id)
        .await
        .expect_err("a revoked lease has no info");
    ensure!(
        err.kind() == ErrorKind::LeaseNotFound && err.code() == 5002,
        "{err}"
    );
    let err = leases
        .refresh(id)
        .await
        .expect_err("a revoked lease is not renewed");
    ensure!(err.kind() == ErrorKind::LeaseNotFound, "refresh: {err}");
    let err = leases
        .revoke(id)
        .await
        .expect_err("a revoked lease is not revoked twice");
    ensure!(err.kind() == ErrorKind::LeaseNotFound, "revoke: {err}");
    let err = leases
        .keep_alive(id)
        .await
        .err()
        .context("a revoked lease is not kept alive")?;
    ensure!(err.kind() == ErrorKind::LeaseNotFound, "keep_alive: {err}");
    etcd.close().await?;
    Ok(())
}

/// `keep_alive` cut off at any point (a caller's timeout around it) or
/// failing never revokes the caller's lease: it only stops keeping it.
#[tokio::test]
async fn a_keep_alive_cut_off_midway_leaves_the_lease() -> Result<()> {
    let Some(eps) = server_or_skip("etcd", ETCD_ENV) else {
        return Ok(());
    };
    let (etcd, _) = backend(&eps).await?;
    let leases = etcd.leases();
    let id = leases.create(Duration::from_secs(30)).await?;
    // Cut off after 0, 0.25, 0.5, ... ms: over the info read, the lease's
    // start and its first renewal.
    let mut cut = 0;
    for step in 0..40u64 {
        let call = leases.keep_alive(id);
        if tokio::time::timeout(Duration::from_micros(step * 250), call)
            .await
            .is_err()
        {
            cut += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        ensure!(
            leases.info(id).await.is_ok(),
            "the lease was revoked by a keep-alive cut off after {} µs",
            step * 250
        );
    }
    ensure!(cut > 0, "no call was cut off");
    leases.revoke(id).await?;
    etcd.close().await?;
    Ok(())
}

#[tokio::test]
async fn connection_manager_reports_and_recovers() -> Result<()> {
    let Some(eps) = server_or_skip("etcd", ETCD_ENV) else {
        return Ok(());
    };
    let (etcd, _) = backend(&eps).await?;
    let conn = etcd.connection();
    ensure!(conn.is_connected());
    conn.health_check().await?;
    let status = conn.status();
    ensure!(
        status.connected && status.last_ping.is_some() && status.error.is_none(),
        "{status:?}"
    );
    conn.disconnect();
    ensure!(!conn.is_connected());
    let center = etcd.config().await;
    ensure!(
        center.err().map(|e| e.kind()) == Some(ErrorKind::Closed),
        "requests fail while disconnected"
    );
    conn.reconnect().await?;
    ensure!(conn.is_connected());
    etcd.config().await?.get_with_version("/k").await?;
    // Closing the connection manager itself ends the backend's requests.
    conn.close();
    ensure!(conn.is_closed() && !conn.is_connected());
    let after = conn.health_check().await.expect_err("closed");
    ensure!(after.kind() == ErrorKind::Closed, "{after}");
    etcd.close().await?;
    Ok(())
}

/// With a dead endpoint configured beside the live one, the status names
/// the endpoint that answered, not the configured list.
#[tokio::test]
async fn connection_status_names_the_endpoint_in_use() -> Result<()> {
    let Some(eps) = server_or_skip("etcd", ETCD_ENV) else {
        return Ok(());
    };
    let live = eps.split(',').next().unwrap_or_default().trim().to_owned();
    let configured = format!("http://127.0.0.1:1,{live}");
    let (etcd, _) = backend(&configured).await?;
    let conn = etcd.connection();
    // A check may still be sent to the dead member: it fails retryably, and
    // the next one reaches the live member. The member list that maps the
    // answering member to its endpoint is a second request, which can also
    // meet the dead member: until it succeeds the status keeps the
    // configured list, and a later check fills it in.
    let mut answered = false;
    for _ in 0..40 {
        match conn.health_check().await {
            Ok(()) if conn.status().endpoint != configured => {
                answered = true;
                break;
            }
            Ok(()) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => return Err(e.into()),
        }
    }
    ensure!(
        answered,
        "no health check reached the live member and named it"
    );
    let status = conn.status();
    ensure!(status.endpoint == live, "{status:?} should name {live}");
    etcd.close().await?;
    Ok(())
}

#[tokio::test]
async fn an_unreachable_etcd_fails_within_the_connect_timeout() {
    let started = Instant::now();
    let err = EtcdBackend::builder()
        .settings(EtcdSettings::with_endpoints(["http://127.0.0.1:1"]))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .await
        .expect_err("nothing listens on port 1");
    assert!(err.is_retryable(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn etcdctl_lock_and_ours_exclude_each_other() -> Result<()> {
    let Some(eps) = server_or_skip("etcd", ETCD_ENV) else {
        return Ok(());
    };
    let (etcd, ns) = backend(&eps).await?;
    let locks = etcd.lock().await?;
    // etcd's own mutex under the same prefix our lock "shared-job" uses.
    let name = format!("{ns}/locks/shared-job");
    let mut etcdctl = Command::new("etcdctl")
        .arg(format!("--endpoints={eps}"))
        .args(["lock", &name, "sleep", "3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("etcdctl (installed by scripts/services.sh)")?;
    // Wait until etcdctl holds it.
    let started = Instant::now();
    while !locks.is_locked("shared-job").await? {
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "etcdctl never took the lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opts = LockOptions::new(Duration::from_secs(10)).wait(Duration::from_secs(15));
    ensure!(
        locks.try_acquire("shared-job", opts).await?.is_none(),
        "etcdctl's lock excludes ours"
    );
    let guard = locks.acquire("shared-job", opts).await?;
    ensure!(etcdctl.wait()?.success(), "etcdctl finished");
    ensure!(
        started.elapsed() >= Duration::from_secs(2),
        "ours waited for etcdctl's release"
    );
    // And ours excludes etcdctl: its lock waits while we hold ours.
    let mut second = Command::new("etcdctl")
        .arg(format!("--endpoints={eps}"))
        .args(["lock", &name, "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    ensure!(
        second.try_wait()?.is_none(),
        "etcdctl must wait while we hold the lock"
    );
    guard.release().await?;
    let until = Instant::now() + Duration::from_secs(10);
    while second.try_wait()?.is_none() {
        ensure!(
            Instant::now() < until,
            "etcdctl never got the lock after our release"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    etcd.purge_namespace().await?;
    etcd.close().await?;
    Ok(())
}

/// The lease id the instance's key is on, read with a plain etcd client.
async fn lease_of_instance(endpoints: &str, ns: &str, service: &str, id: &str) -> Result<i64> {
    let eps: Vec<String> = endpoints.split(',').map(str::to_owned).collect();
    let mut c = etcd_client::Client::connect(eps, None).await?;
    let key = format!("{ns}/services/{service}/{id}");
    let r = c.get(key.clone(), None).await?;
    Ok(r.kvs()
        .first()
        .with_context(|| format!("{key} is not in etcd"))?
        .lease())
}

/// A registration without a TTL gets the settings' `default_ttl`; one on an
/// existing lease (the seed's `WithLeaseID`) is put on that lease, and its
/// deregistration leaves the lease to its owner; a lease etcd does not know
/// is `LeaseNotFound`.
#[tokio::test]
async fn registrations_use_the_default_ttl_or_the_callers_lease() -> Result<()> {
    use im_infra::registry::{RegisterOptions, ServiceInstance};

    let Some(eps) = server_or_skip("etcd", ETCD_ENV) else {
        return Ok(());
    };
    let ns = format!(
        "/surface-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut cfg = EtcdSettings::with_endpoints(eps.split(',').map(str::to_owned));
    cfg.namespace = ns.clone();
    cfg.default_ttl = Duration::from_secs(7);
    cfg.default_metadata
        .insert("region".to_owned(), "eu".to_owned());
    let etcd = EtcdBackend::builder().settings(cfg).build().await?;
    let reg = etcd.registry().await?;
    let leases = etcd.leases();

    reg.register_with(
        &ServiceInstance::new("svc", "a", "127.0.0.1:1"),
        RegisterOptions::default(),
    )
    .await?;
    let lease = lease_of_instance(&eps, &ns, "svc", "a").await?;
    let granted = leases.info(lease).await?.granted_ttl;
    ensure!(
        granted == Duration::from_secs(7),
        "granted {granted:?}, default_ttl is 7 s"
    );
    // Discovery names the lease and the TTL, and the settings' default
    // metadata is registered with the instance, also after an update.
    let found = etcd.discovery().await?.instances("svc").await?;
    ensure!(
        found.len() == 1
            && found[0].lease_id == Some(lease)
            && found[0].ttl == Some(Duration::from_secs(7))
            && found[0].metadata.get("region").map(String::as_str) == Some("eu"),
        "{found:?}"
    );
    reg.update(&ServiceInstance::new("svc", "a", "127.0.0.1:3"))
        .await?;
    let found = etcd.discovery().await?.instances("svc").await?;
    ensure!(
        found.len() == 1
            && found[0].address == "127.0.0.1:3"
            && found[0].metadata.get("region").map(String::as_str) == Some("eu"),
        "after an update: {found:?}"
    );

    let mine = leases.create(Duration::from_secs(20)).await?;
    reg.register_with(
        &ServiceInstance::new("svc", "b", "127.0.0.1:2"),
        RegisterOptions::default().lease_id(mine),
    )
    .await?;
    ensure!(
        lease_of_instance(&eps, &ns, "svc", "b").await? == mine,
        "the instance is on the caller's lease"
    );
    // Registered again on the same lease: still there, with the lease's TTL.
    reg.register_with(
        &ServiceInstance::new("svc", "b", "127.0.0.1:4"),
        RegisterOptions::default().lease_id(mine),
    )
    .await?;
    let found = etcd.discovery().await?.instances("svc").await?;
    let b = found
        .iter()
        .find(|i| i.id == "b")
        .context("registering again on the same lease keeps the instance")?;
    ensure!(
        b.address == "127.0.0.1:4"
            && b.lease_id == Some(mine)
            && b.ttl == Some(Duration::from_secs(20)),
        "{b:?}"
    );
    // Registered again on a lease that does not exist: refused, and the
    // earlier registration is left as it was (on the caller's lease, with
    // its value, still kept: it can be updated).
    let err = reg
        .register_with(
            &ServiceInstance::new("svc", "b", "127.0.0.1:5"),
            RegisterOptions::default().lease_id(0x7eed_0000_0001),
        )
        .await
        .expect_err("a lease that does not exist takes no registration");
    ensure!(err.kind() == ErrorKind::LeaseNotFound, "{err}");
    let found = etcd.discovery().await?.instances("svc").await?;
    let b = found
        .iter()
        .find(|i| i.id == "b")
        .context("a failed registration again leaves the earlier one")?;
    ensure!(
        b.address == "127.0.0.1:4" && b.lease_id == Some(mine),
        "{b:?}"
    );
    reg.update(&ServiceInstance::new("svc", "b", "127.0.0.1:6"))
        .await
        .context("the earlier registration is still kept")?;
    reg.deregister("svc", "b").await?;
    ensure!(
        lease_of_instance(&eps, &ns, "svc", "b").await.is_err(),
        "deregistered"
    );
    ensure!(
        leases.info(mine).await.is_ok(),
        "the caller's lease outlives the registration"
    );
    leases.revoke(mine).await?;
    let err = reg
        .register_with(
            &ServiceInstance::new("svc", "c", "127.0.0.1:3"),
            RegisterOptions::default().lease_id(mine),
        )
        .await
        .expect_err("a revoked lease takes no registration");
    ensure!(err.kind() == ErrorKind::LeaseNotFound, "{err}");

    reg.deregister("svc", "a").await?;
    etcd.close().await?;
    Ok(())
}
