//! The conformance suite on the Redis backend, against the server from
//! `scripts/services.sh` (`IMINFRA_REDIS_URL`).

fn main() -> std::process::ExitCode {
    im_infra_conformance::run_main(im_infra_redis::testing::target())
}
