//! The null backend's documented semantics.

fn main() -> std::process::ExitCode {
    im_infra_conformance::run_main(im_infra_noop::testing::target())
}
