//! The failover example as a test, against the etcd of
//! `scripts/services.sh` (required under `IMINFRA_REQUIRE_BACKENDS`).

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
