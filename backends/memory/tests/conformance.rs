//! The conformance suite on the in-process backend.

fn main() -> std::process::ExitCode {
    im_infra_conformance::run_main(im_infra_memory::testing::target())
}
