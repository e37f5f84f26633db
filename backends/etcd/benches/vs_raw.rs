//! im-infra's etcd backend against the raw `etcd-client`, in one run.
//!
//! ```text
//! scripts/services.sh up && source .services/env
//! cargo bench -p im-infra-etcd --bench vs_raw
//! ```
//!
//! - config get: 32 tasks reading one key, paired 1.5 s rounds; the median
//!   of the per-pair throughput ratios.
//! - lock acquire + release: uncontended (one task, 100 cycles) and with 8
//!   contenders on one key (8 × 20 cycles), both sides granting a lease per
//!   acquisition (the raw side uses etcd's lock service: grant, lock,
//!   unlock, revoke). Median latencies and the ratio raw / im-infra (above 1
//!   means im-infra is faster).

use std::sync::Arc;
use std::time::Duration;

use im_infra::backend::{Backend, Maintenance};
use im_infra::config::ConfigCenterExt;
use im_infra::lock::LockOptions;
use im_infra_bench_support::{compare_throughput, latency_ms, server_env, Rounds};
use im_infra_etcd::{EtcdBackend, EtcdSettings};

fn main() {
    let Some(eps) = server_env("IMINFRA_ETCD_ENDPOINTS") else {
        return;
    };
    im_infra_bench_support::runtime().block_on(async move {
        let endpoints: Vec<String> = eps.split(',').map(str::to_owned).collect();
        let mut cfg = EtcdSettings::with_endpoints(endpoints.clone());
        cfg.namespace = "/bench".into();
        let etcd = EtcdBackend::builder().settings(cfg).build().await.expect("connect");
        // The raw client gets the same options as the backend's.
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let raw = etcd_client::Client::connect(endpoints, Some(options)).await.expect("connect");

        // Config get.
        let center = etcd.config().await.expect("config");
        center.set_json("/cfg/key", &serde_json_value()).await.expect("seed");
        let c = center.clone();
        let ours = Arc::new(move |_: usize| {
            let c = c.clone();
            async move { c.get_with_version("/cfg/key").await.map(|v| v.is_some()).unwrap_or(false) }
        });
        let r = raw.clone();
        let rawf = Arc::new(move |_: usize| {
            let mut r = r.clone();
            async move { r.get("/bench/cfg/key", None).await.map(|v| !v.kvs().is_empty()).unwrap_or(false) }
        });
        compare_throughput("etcd config get", Rounds::default(), rawf, ours).await;

        // Lock acquire + release.
        let locks = etcd.lock().await.expect("lock");
        let opts = LockOptions::new(Duration::from_secs(10)).no_renewal().wait(Duration::from_secs(60));
        let l = locks.clone();
        let ours = Arc::new(move || {
            let l = l.clone();
            async move {
                match l.acquire("bench-lock", opts).await {
                    Ok(g) => g.release().await.is_ok(),
                    Err(_) => false,
                }
            }
        });
        let r = raw.clone();
        let rawf = Arc::new(move || {
            let mut r = r.clone();
            async move {
                let Ok(lease) = r.lease_grant(10, None).await else { return false };
                let Ok(held) = r
                    .lock("/bench/raw-lock", Some(etcd_client::LockOptions::new().with_lease(lease.id())))
                    .await
                else {
                    return false;
                };
                let ok = r.unlock(held.key()).await.is_ok();
                ok && r.lease_revoke(lease.id()).await.is_ok()
            }
        });
        for (name, tasks, cycles) in [("uncontended", 1, 100), ("8 contenders", 8, 20)] {
            let raw_ms = latency_ms(tasks, cycles, rawf.clone()).await;
            let ours_ms = latency_ms(tasks, cycles, ours.clone()).await;
            println!(
                "RATIO etcd lock acquire+release {name}: im-infra {ours_ms:.2} ms, raw etcd-client {raw_ms:.2} ms (median latency), ratio raw/im-infra {:.3}",
                raw_ms / ours_ms
            );
        }
        etcd.purge_namespace().await.expect("purge");
        etcd.close().await.expect("close");
    });
}

fn serde_json_value() -> Vec<u32> {
    (0..64).collect()
}
