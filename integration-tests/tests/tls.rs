//! The backends' TLS options against the TLS listeners of the servers from
//! `scripts/services.sh` (a private CA made by the script,
//! `IMINFRA_TLS_CA_FILE`): each backend works over TLS when given the CA,
//! and refuses the server with a clear, typed error when it is not.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use im_infra::backend::{Backend, Maintenance};
use im_infra::cache::near::NearCache;
use im_infra::cache::Cache;
use im_infra::config::ConfigCenterExt;
use im_infra::ErrorKind;
use im_infra_conformance::servers::{server_or_skip, MYSQL_ENV};
use im_infra_etcd::{EtcdBackend, TlsFiles};
use im_infra_mysql::{MysqlBackend, MysqlSettings, MysqlTls};
use im_infra_redis::{RedisBackend, RedisSettings, RedisTls};

const CA_ENV: &str = "IMINFRA_TLS_CA_FILE";
const REDIS_TLS_ENV: &str = "IMINFRA_REDIS_TLS_URL";
const ETCD_TLS_ENV: &str = "IMINFRA_ETCD_TLS_ENDPOINTS";

fn unique(what: &str) -> String {
    format!("{what}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// A CA that did not sign the servers' certificates (the system roots do
/// not know the test CA either; this one makes the refusal explicit).
fn other_ca() -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("other-ca.pem");
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=not the test CA", "-keyout"])
        .arg(dir.path().join("other-ca.key"))
        .arg("-out")
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .status()
        .context("running openssl")?;
    ensure!(status.success(), "openssl failed");
    Ok((dir, path))
}

/// The build must fail because the server's certificate is not trusted: a
/// connection-level error that names the certificate, not any failure.
fn expect_refused<T>(built: im_infra::Result<T>) -> Result<()> {
    let err = built
        .err()
        .context("a server signed by another CA must be refused")?;
    ensure!(
        matches!(err.kind(), ErrorKind::Connection | ErrorKind::Unavailable),
        "{err} ({:?})",
        err.kind()
    );
    let text = format!("{err:#}").to_lowercase();
    ensure!(
        text.contains("certificate") || text.contains("unknownissuer"),
        "refused, but not for the certificate: {err}"
    );
    println!("refused with another CA: {err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_the_ca_and_refused_without_it() -> Result<()> {
    let (Some(url), Some(ca)) = (
        server_or_skip("redis", REDIS_TLS_ENV),
        server_or_skip("redis", CA_ENV),
    ) else {
        return Ok(());
    };
    let mut cfg = RedisSettings::new(&url);
    cfg.namespace = unique("tls");
    cfg.tls = Some(RedisTls {
        ca_file: Some(ca.into()),
        ..RedisTls::default()
    });
    let backend = RedisBackend::builder()
        .settings(cfg.clone())
        .build()
        .await?;
    let cache = backend.cache().await?;
    cache
        .set(
            "k",
            Bytes::from_static(b"over tls"),
            Some(Duration::from_secs(60)),
        )
        .await?;
    ensure!(cache.get("k").await?.as_deref() == Some(&b"over tls"[..]));
    // A near cache's tracking connection goes over the same TLS: another
    // instance's write is not read stale after `sync()`.
    let near = NearCache::builder(cache.clone())
        .invalidation(backend.invalidations())
        .build()
        .await?;
    ensure!(near.is_live(), "tracking over tls");
    ensure!(near.get("k").await?.as_deref() == Some(&b"over tls"[..]));
    let writer = RedisBackend::builder()
        .settings(cfg.clone())
        .build()
        .await?;
    writer
        .cache()
        .await?
        .set("k", Bytes::from_static(b"rewritten"), None)
        .await?;
    near.sync().await;
    ensure!(near.get("k").await?.as_deref() == Some(&b"rewritten"[..]));
    writer.close().await?;
    drop(near);
    backend.close().await?;

    let (_dir, wrong) = other_ca()?;
    cfg.tls = Some(RedisTls {
        ca_file: Some(wrong),
        ..RedisTls::default()
    });
    cfg.connect_timeout = Duration::from_secs(1);
    expect_refused(RedisBackend::builder().settings(cfg.clone()).build().await)?;

    cfg.tls = Some(RedisTls {
        ca_file: Some("/nonexistent/ca.pem".into()),
        ..RedisTls::default()
    });
    let err = RedisBackend::builder()
        .settings(cfg)
        .build()
        .await
        .err()
        .context("a missing CA file must be refused")?;
    ensure!(
        err.kind() == ErrorKind::InvalidConfig && err.message().contains("/nonexistent/ca.pem"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_over_tls_with_the_ca_and_refused_without_it() -> Result<()> {
    let (Some(url), Some(ca)) = (
        server_or_skip("mysql", MYSQL_ENV),
        server_or_skip("mysql", CA_ENV),
    ) else {
        return Ok(());
    };
    let cfg = MysqlSettings {
        url: Some(url),
        namespace: format!("{}/", unique("tls")),
        table_prefix: "iminfra_test_".into(),
        tls: Some(MysqlTls {
            ca_file: Some(ca.into()),
            ..MysqlTls::default()
        }),
        ..MysqlSettings::default()
    };
    let backend = MysqlBackend::builder()
        .settings(cfg.clone())
        .build()
        .await?;
    let cipher: Option<(String, String)> = backend
        .db()
        .query_first("SHOW SESSION STATUS LIKE 'Ssl_cipher'", ())
        .await?;
    let cipher = cipher.map(|(_, c)| c).unwrap_or_default();
    ensure!(!cipher.is_empty(), "the session is not encrypted");
    let center = backend.config().await?;
    center.set_json("/tls/k", &1).await?;
    ensure!(center.get_json::<i32>("/tls/k").await? == Some(1));
    backend.purge_namespace().await?;
    backend.close().await?;
    println!("mysql: TLS session with cipher {cipher}");

    let (_dir, wrong) = other_ca()?;
    let refused = MysqlSettings {
        tls: Some(MysqlTls {
            ca_file: Some(wrong),
            ..MysqlTls::default()
        }),
        connect_timeout: Duration::from_secs(2),
        ..cfg
    };
    expect_refused(MysqlBackend::builder().settings(refused).build().await)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_the_ca_and_refused_without_it() -> Result<()> {
    let (Some(endpoints), Some(ca)) = (
        server_or_skip("etcd", ETCD_TLS_ENV),
        server_or_skip("etcd", CA_ENV),
    ) else {
        return Ok(());
    };
    let backend = EtcdBackend::builder()
        .endpoints(endpoints.split(','))
        .tls(TlsFiles {
            ca_file: Some(ca.into()),
            ..TlsFiles::default()
        })
        .build()
        .await?;
    let center = backend.config().await?;
    let key = format!("/tls/{}", unique("k"));
    center.set_json(&key, &"over tls").await?;
    ensure!(center.get_json::<String>(&key).await?.as_deref() == Some("over tls"));
    center.delete(&key).await?;
    backend.close().await?;

    let (_dir, wrong) = other_ca()?;
    expect_refused(
        EtcdBackend::builder()
            .endpoints(endpoints.split(','))
            .connect_timeout(Duration::from_secs(2))
            .tls(TlsFiles {
                ca_file: Some(wrong),
                ..TlsFiles::default()
            })
            .build()
            .await,
    )?;
    Ok(())
}
