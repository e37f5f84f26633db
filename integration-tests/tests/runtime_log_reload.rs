//! The runtime's logging: the bootstrap subscriber, then `clog` from the
//! config center, changed while the service runs. Alone in its binary: the
//! subscriber is the process's global one.

use std::time::Duration;

use anyhow::{ensure, Result};
use im_infra::config::ConfigCenterExt;
use im_infra_conformance::faults::until;
use im_infra_runtime::Runtime;
use serde_json::json;

fn log_text(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("svc.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_level_changed_in_the_config_center_changes_the_running_service_output() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let dir_path = dir.path();
    let file = json!({"directory": dir_path, "prefix": "svc", "rotation": "never"});
    let rt = Runtime::builder("svc-log")
        .environment(false)
        .section(
            "clog",
            json!({"level": "info", "stdout": false, "file": file}),
        )
        .start()
        .await?;
    // A span that stays open across every reload below.
    let request = tracing::info_span!("request", id = 7);

    request.in_scope(|| tracing::info!(target: "svc_log", "info-before"));
    tracing::debug!(target: "svc_log", "debug-before");
    tracing_log::log::info!(target: "svc_log", "from-the-log-crate");
    let text = log_text(dir_path);
    ensure!(
        text.contains("from-the-log-crate"),
        "records of the log crate arrive too:\n{text}"
    );
    ensure!(
        text.contains("info-before"),
        "the local settings apply from the start:\n{text}"
    );
    ensure!(
        !text.contains("debug-before"),
        "info filters debug out:\n{text}"
    );
    ensure!(
        text.contains("runtime_log_reload.rs:"),
        "the caller's file and line:\n{text}"
    );

    // Debug for one module, and JSON (which waits for a restart).
    let path = format!("/config/{}/svc-log/clog", rt.env());
    let center = rt.config();
    center
        .set_json(&path, &json!({"level": "info", "filters": {"svc_log": "debug"}, "stdout": false, "format": "json", "file": file}))
        .await?;
    let mut n = 0;
    until(
        Duration::from_secs(2),
        "debug events of svc_log appear",
        || {
            n += 1;
            request.in_scope(|| tracing::debug!(target: "svc_log", "debug-after-{n}"));
            async move { log_text(dir_path).contains("debug-after-") }
        },
    )
    .await?;
    tracing::debug!(target: "other", "debug-of-another-module");
    let text = log_text(dir_path);
    let line = text
        .lines()
        .find(|l| l.contains("debug-after-"))
        .unwrap_or_default();
    ensure!(
        line.contains("request{id=7}"),
        "the open span is on the line: {line}"
    );
    ensure!(
        serde_json::from_str::<serde_json::Value>(line).is_err(),
        "the format stays text until a restart: {line}"
    );
    ensure!(
        !text.contains("debug-of-another-module"),
        "only the filtered module is at debug"
    );

    // A value that would show trace events if it were taken is refused
    // (`*` is no module); the next good value (warn) applies after it.
    center
        .set_json(
            &path,
            &json!({"level": "trace", "filters": {"*": "debug"}, "stdout": false, "file": file}),
        )
        .await?;
    center
        .set_json(
            &path,
            &json!({"level": "warn", "stdout": false, "file": file}),
        )
        .await?;
    let mut n = 0;
    until(Duration::from_secs(2), "the warn level applies", || {
        n += 1;
        tracing::trace!(target: "svc_log", "trace-while-changing-{n}");
        tracing::warn!(target: "svc_log", "warn-{n}");
        tracing::info!(target: "svc_log", "info-{n}");
        let text = log_text(dir_path);
        async move { text.contains(&format!("warn-{n}")) && !text.contains(&format!("info-{n}")) }
    })
    .await?;
    ensure!(
        !log_text(dir_path).contains("trace-while-changing"),
        "the refused value never applied"
    );
    rt.shutdown().await?;
    Ok(())
}
