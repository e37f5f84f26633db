//! The conformance suite on the Redis backend in cluster mode, against the
//! three-primary Redis Cluster from `scripts/services.sh`
//! (`IMINFRA_REDIS_CLUSTER_URLS`).

fn main() -> std::process::ExitCode {
    im_infra_conformance::run_main(im_infra_redis::testing::cluster_target())
}
