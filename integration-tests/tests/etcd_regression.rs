//! etcd coming back with older data: a private `etcd` (never the shared
//! one of `scripts/services.sh`) saves a snapshot, accepts more writes,
//! then crashes and is restored from the snapshot — its revision goes back
//! to the snapshot's, below revisions a watch already delivered. The watch
//! must notice (etcd's revision is behind its cursor), converge on the
//! restored state, and deliver the writes made after the restore although
//! their revisions repeat ones it saw before.

#[path = "support/private_etcd.rs"]
mod private_etcd;
#[allow(dead_code)] // the shared scenario is for servers whose versions never go back
#[path = "support/regression.rs"]
mod regression;

use std::time::Duration;

use anyhow::{ensure, Result};
use im_infra::backend::Backend;
use im_infra::config::{ConfigCenterExt, WatchOptions};
use im_infra_conformance::faults::{events_until, set_retrying};
use im_infra_etcd::{EtcdBackend, EtcdSettings};
use private_etcd::PrivateEtcd;
use regression::{apply, converge, json, server_state};

async fn backend(endpoint: &str) -> Result<EtcdBackend> {
    let mut cfg = EtcdSettings::with_endpoints([endpoint.to_owned()]);
    cfg.namespace = "/regression".into();
    cfg.request_timeout = Duration::from_secs(2);
    cfg.connect_timeout = Duration::from_secs(2);
    cfg.retry.max_interval = Duration::from_millis(500);
    Ok(EtcdBackend::builder().settings(cfg).build().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_watch_converges_after_a_restore_from_an_older_snapshot() -> Result<()> {
    let Some(server) = PrivateEtcd::start_or_skip().await? else {
        return Ok(());
    };
    let etcd = backend(&server.endpoint()).await?;
    let center = etcd.config().await?;
    for (k, v) in [("/app/a", "a1"), ("/app/b", "b1"), ("/app/c", "c1")] {
        center.set_json(k, &v).await?;
    }
    let mut events = center
        .watch_prefix("/app/", WatchOptions::default())
        .await?;
    let mut model = server_state(&*center, "/app/").await?;
    server.snapshot().await?;

    // Changes after the snapshot: delivered, then lost.
    center.set_json("/app/a", &"a2-lost").await?;
    center.delete("/app/b").await?;
    let lost_last = center.set_json("/app/d", &"d1-lost").await?;
    for e in events_until(&mut events, lost_last, Duration::from_secs(10)).await? {
        apply(&mut model, e);
    }
    ensure!(model.get("/app/d") == Some(&json("d1-lost")), "{model:?}");

    server.crash_and_restore().await?;
    let restored = server_state(&*center, "/app/").await?;
    ensure!(
        restored.get("/app/a") == Some(&json("a1")) && restored.contains_key("/app/b"),
        "etcd came back with the snapshot: {restored:?}"
    );
    // Without any write since, the watch notices that etcd is behind it
    // and lands on the restored state.
    converge(&mut events, &mut model, &restored).await?;

    // Writes after the restore reuse revisions the watch saw before the
    // restore: they are delivered all the same.
    let pause = Duration::from_millis(100);
    let c2 = set_retrying(&*center, "/app/c", &"c2", pause).await?;
    set_retrying(&*center, "/app/e", &"e1", pause).await?;
    println!("revision {c2} after the restore; {lost_last} was delivered before it");
    let want = server_state(&*center, "/app/").await?;
    converge(&mut events, &mut model, &want).await?;
    ensure!(model.get("/app/e") == Some(&json("e1")), "{model:?}");
    etcd.close().await?;
    Ok(())
}
