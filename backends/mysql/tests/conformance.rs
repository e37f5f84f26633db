//! The conformance suite on the MySQL backend, against the MariaDB server from `scripts/services.sh` (`IMINFRA_MYSQL_URL`).

fn main() -> std::process::ExitCode {
    im_infra_conformance::run_main(im_infra_mysql::testing::target())
}
