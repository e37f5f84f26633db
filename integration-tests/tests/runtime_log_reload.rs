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
    let file = json!({"directory": dir.path(), "prefix": "svc", "rotation": "never"});
    let rt = Runtime::builder("svc-log")
        .environment(false)
        .section(
            "clog",
            json!({"level": "info", "stdout": false, "file": file}),
        )
        .start()
        .await?;

    tracing::info!(target: "svc_log", "info-before");
    tracing::debug!(target: "svc_log", "debug-before");
    let text = log_text(dir.path());
    ensure!(
        text.contains("info-before"),
        "the file's settings apply from the start:\n{text}"
    );
    ensure!(
        !text.contains("debug-before"),
        "info filters debug out:\n{text}"
    );
    ensure!(
        text.contains("runtime_log_reload.rs:"),
        "the caller's file and line:\n{text}"
    );

    let path = format!("/config/{}/svc-log/clog", rt.env());
    rt.config()
        .set_json(&path, &json!({"level": "info", "filters": {"svc_log": "debug"}, "stdout": false, "format": "json", "file": file}))
        .await?;
    let mut n = 0;
    let dir_path = dir.path();
    until(
        Duration::from_secs(2),
        "debug events of svc_log appear",
        || {
            n += 1;
            tracing::debug!(target: "svc_log", "debug-after-{n}");
            async move { log_text(dir_path).contains("debug-after-") }
        },
    )
    .await?;
    tracing::debug!(target: "other", "debug-of-another-module");
    let text = log_text(dir.path());
    let last = text.lines().last().unwrap_or_default();
    let event: serde_json::Value = serde_json::from_str(last)
        .map_err(|e| anyhow::anyhow!("the new format is JSON: {e}: {last}"))?;
    ensure!(
        event["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("debug-after-")),
        "{event}"
    );
    ensure!(
        event["line_number"].as_u64().is_some() && event["filename"].is_string(),
        "{event}"
    );
    ensure!(
        !text.contains("debug-of-another-module"),
        "only the filtered module is at debug"
    );

    // A bad value is refused and the last good one stays.
    rt.config()
        .set_json(&path, &json!({"level": "loud"}))
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    tracing::debug!(target: "svc_log", "still-debug");
    ensure!(log_text(dir.path()).contains("still-debug"));
    rt.shutdown().await?;
    Ok(())
}
