//! The api crate depends on no backend client library (DESIGN §2).

use std::process::Command;

#[test]
fn api_has_no_client_library_in_its_tree() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "im-infra",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        tree.lines().any(|l| l.starts_with("im-infra ")),
        "the tree lists im-infra itself"
    );
    for forbidden in ["etcd-client", "redis", "mysql_async", "rdkafka", "tonic"] {
        assert!(
            !tree
                .lines()
                .any(|l| l.starts_with(&format!("{forbidden} "))),
            "im-infra must not depend on {forbidden}"
        );
    }
}
