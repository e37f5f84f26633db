//! The conformance suite on the Kafka backend, against the tansu broker from `scripts/services.sh` (`IMINFRA_KAFKA_BROKERS`).

fn main() -> std::process::ExitCode {
    im_infra_conformance::run_main(im_infra_kafka::testing::target())
}
