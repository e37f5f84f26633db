//! The failover example as a test, against the etcd of
//! `scripts/services.sh` (required under `IMINFRA_REQUIRE_BACKENDS`).

use im_infra::backend::Maintenance;
use im_infra_conformance::servers::{server_or_skip, ETCD_ENV};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_server_moves_all_traffic_to_the_other() -> anyhow::Result<()> {
    let Some(eps) = server_or_skip("etcd", ETCD_ENV) else {
        return Ok(());
    };
    let endpoints: Vec<String> = eps.split(',').map(str::to_owned).collect();
    let report = im_infra_examples_etcd::failover(&endpoints).await?;
    println!("{report:?}");
    im_infra_examples_etcd::check(&report)
}

/// A balanced channel speaks TLS to instances registered as `https`: with
/// the CA and a client certificate its calls reach a server that requires
/// client certificates; without the client certificate, or trusting
/// another CA, no call succeeds; a plain-text instance next to it
/// (`scheme = "http"`) is reached in plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balanced_channel_speaks_mutual_tls_to_https_instances() -> anyhow::Result<()> {
    use std::time::Duration;

    use anyhow::{ensure, Context};
    use im_infra::backend::Backend;
    use im_infra::registry::grpc::{BalancedChannel, GrpcOptions, GrpcTls, SCHEME_KEY};
    use im_infra::registry::ServiceInstance;
    use im_infra_etcd::{EtcdBackend, EtcdSettings};
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    use tonic_health::pb::health_client::HealthClient;

    let Some(eps) = server_or_skip("etcd", ETCD_ENV) else {
        return Ok(());
    };
    let file = |var: &str| -> anyhow::Result<String> {
        let path = std::env::var(var)
            .with_context(|| format!("{var} is not set (scripts/services.sh up)"))?;
        std::fs::read_to_string(&path).with_context(|| format!("{var}={path}"))
    };
    let (ca, cert, key) = (
        file("IMINFRA_TLS_CA_FILE")?,
        file("IMINFRA_TLS_CERT_FILE")?,
        file("IMINFRA_TLS_KEY_FILE")?,
    );
    let mut settings = EtcdSettings::with_endpoints(eps.split(',').map(str::to_owned));
    settings.namespace = format!("/tls-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let etcd = EtcdBackend::builder().settings(settings).build().await?;

    let server_tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&cert, &key))
        .client_ca_root(Certificate::from_pem(&ca));
    let (secure_addr, mut secure) =
        im_infra_examples_etcd::serve("secure", Some(server_tls)).await?;
    let (plain_addr, mut plain) = im_infra_examples_etcd::serve("plain", None).await?;
    let registry = etcd.registry().await?;
    let ttl = Duration::from_secs(10);
    registry
        .register(
            &ServiceInstance::new("tls-echo", "secure", &secure_addr)
                .with_metadata(SCHEME_KEY, "https"),
            ttl,
        )
        .await?;
    let discovery = etcd.discovery().await?;

    // The CA and a client certificate: the TLS server answers.
    let with = |tls: GrpcTls| GrpcOptions::default().tls(tls);
    let channel = BalancedChannel::connect(
        discovery.clone(),
        "tls-echo",
        with(GrpcTls::new(ca.clone()).identity(cert.clone(), key.clone())),
    )
    .await?;
    let mut client = HealthClient::new(channel);
    for _ in 0..5 {
        let id = im_infra_examples_etcd::call(&mut client)
            .await
            .context("a call over mutual TLS failed")?;
        ensure!(id == "secure", "answered by {id}");
    }

    // No client certificate: the server refuses the handshake.
    let channel = BalancedChannel::connect(
        discovery.clone(),
        "tls-echo",
        with(GrpcTls::new(ca.clone())),
    )
    .await?;
    // The instance is there: a failed call is the handshake's.
    ensure!(channel.endpoints() == vec![secure_addr.clone()]);
    let mut client = HealthClient::new(channel);
    ensure!(
        im_infra_examples_etcd::call(&mut client).await.is_none(),
        "a client without a certificate was served"
    );
    // Trusting another CA (the server's own certificate, which is no CA):
    // the server's certificate is not accepted.
    let channel = BalancedChannel::connect(
        discovery.clone(),
        "tls-echo",
        with(GrpcTls::new(cert.clone()).identity(cert.clone(), key.clone())),
    )
    .await?;
    ensure!(channel.endpoints() == vec![secure_addr.clone()]);
    let mut client = HealthClient::new(channel);
    ensure!(
        im_infra_examples_etcd::call(&mut client).await.is_none(),
        "a server certificate from an untrusted CA was accepted"
    );

    // A plain-text instance beside it, labelled http: one channel reaches
    // the TLS instance over TLS and this one in plain text.
    registry
        .register(
            &ServiceInstance::new("tls-echo", "plain", &plain_addr)
                .with_metadata(SCHEME_KEY, "http"),
            ttl,
        )
        .await?;
    let channel = BalancedChannel::connect(
        discovery,
        "tls-echo",
        with(GrpcTls::new(ca).identity(cert, key)),
    )
    .await?;
    let mut client = HealthClient::new(channel);
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let id = im_infra_examples_etcd::call(&mut client)
            .await
            .context("a call over the mixed channel failed")?;
        answered.insert(id);
    }
    ensure!(
        answered == ["plain".to_owned(), "secure".to_owned()].into(),
        "round-robin over both schemes: {answered:?}"
    );

    secure.kill();
    plain.kill();
    registry.deregister("tls-echo", "secure").await?;
    registry.deregister("tls-echo", "plain").await?;
    etcd.purge_namespace().await?;
    etcd.close().await?;
    Ok(())
}

/// One instance's network freezes (a proxy holds every byte and closes
/// nothing): the channel's HTTP/2 keepalive closes that connection within
/// two intervals, so the calls sent to it fail fast instead of hanging
/// until their deadline, the instance is ejected, and every later call goes
/// to the other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_is_ejected_by_the_keepalive_not_by_call_deadlines() -> anyhow::Result<()>
{
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use anyhow::ensure;
    use im_infra::backend::Backend;
    use im_infra::registry::grpc::{BalancePolicy, BalancedChannel, GrpcOptions};
    use im_infra::registry::ServiceInstance;
    use im_infra_conformance::proxy::FreezeProxy;
    use im_infra_etcd::{EtcdBackend, EtcdSettings};
    use tonic_health::pb::health_client::HealthClient;

    let Some(eps) = server_or_skip("etcd", ETCD_ENV) else {
        return Ok(());
    };
    let mut settings = EtcdSettings::with_endpoints(eps.split(',').map(str::to_owned));
    settings.namespace = format!(
        "/freeze-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let etcd = EtcdBackend::builder().settings(settings).build().await?;
    let (addr_a, mut a) = im_infra_examples_etcd::serve("a", None).await?;
    let (addr_b, mut b) = im_infra_examples_etcd::serve("b", None).await?;
    let proxy = FreezeProxy::start(&addr_a).await?;
    let registry = etcd.registry().await?;
    let ttl = Duration::from_secs(10);
    registry
        .register(
            &ServiceInstance::new("echo", "a", proxy.addr().to_string()),
            ttl,
        )
        .await?;
    registry
        .register(&ServiceInstance::new("echo", "b", &addr_b), ttl)
        .await?;
    let keepalive = Duration::from_millis(300);
    let mut opts = GrpcOptions::default().policy(BalancePolicy::RoundRobin);
    opts.keepalive = Some(keepalive);
    opts.eject_for = Duration::from_secs(30);
    let channel = BalancedChannel::connect(etcd.discovery().await?, "echo", opts).await?;
    let mut client = HealthClient::new(channel);

    let mut before = BTreeMap::new();
    for _ in 0..20 {
        if let Some(id) = im_infra_examples_etcd::call(&mut client).await {
            *before.entry(id).or_insert(0) += 1;
        }
    }
    ensure!(
        before.len() == 2,
        "both answer before the freeze: {before:?}"
    );

    proxy.freeze();
    let frozen = Instant::now();
    let (mut failures, mut slowest_failure, mut after) = (0, Duration::ZERO, BTreeMap::new());
    while frozen.elapsed() < Duration::from_secs(4) {
        let started = Instant::now();
        // `call` gives up after 2 s: a failure that took that long hung
        // until the deadline.
        match im_infra_examples_etcd::call(&mut client).await {
            Some(id) => *after.entry(id).or_insert(0) += 1,
            None => {
                failures += 1;
                slowest_failure = slowest_failure.max(started.elapsed());
            }
        }
    }
    println!("after the freeze: {after:?}, {failures} failed calls, the slowest failed after {slowest_failure:?}");
    ensure!(
        !after.contains_key("a"),
        "the frozen instance answered: {after:?}"
    );
    ensure!(
        after.get("b").copied().unwrap_or(0) > 20,
        "b takes the traffic: {after:?}"
    );
    ensure!(
        slowest_failure < keepalive * 2 + Duration::from_secs(1),
        "a call to the frozen instance hung {slowest_failure:?}: the keepalive did not close it"
    );
    ensure!(
        failures <= 2,
        "{failures} calls failed: the instance was not ejected"
    );

    proxy.thaw();
    a.kill();
    b.kill();
    etcd.purge_namespace().await?;
    etcd.close().await?;
    Ok(())
}
