//! The conformance suite on the etcd backend, against the server from `scripts/services.sh` (`IMINFRA_ETCD_ENDPOINTS`).

fn main() -> std::process::ExitCode {
    im_infra_conformance::run_main(im_infra_etcd::testing::target())
}
