//! Rate limiting. Basic: a rule per resource (3 a minute), checked per
//! user, with the time to wait when denied. Advanced: rules changed in the config center
//! while the service runs, a default rule, and requests costing several
//! units.
//!
//! ```text
//! cargo run --example ratelimit [basic|advanced]
//! IMINFRA_CONFIG=examples/servers.yaml cargo run --example ratelimit
//! ```

use std::time::Duration;

use anyhow::{ensure, Result};
use im_infra::config::ConfigCenterExt;
use im_infra::ratelimit::{LimiterSettings, Rule};
use im_infra_examples::{parts, run_id, start};
use im_infra_runtime::Runtime;

async fn basic(runtime: &Runtime, run: &str) -> Result<()> {
    let limiter = runtime.limiter();
    let user = format!("alice-{run}");
    let mut verdicts = Vec::new();
    for _ in 0..5 {
        verdicts.push(limiter.check("send", &user, 1).await?);
    }
    let allowed = verdicts.iter().filter(|d| d.allowed).count();
    println!(
        "basic: 5 sends at once, {allowed} allowed; the next in {:?}",
        verdicts.last().map(|d| d.retry_after)
    );
    ensure!(allowed == 3, "a burst of 3");
    ensure!(
        limiter
            .check("send", &format!("bob-{run}"), 1)
            .await?
            .allowed,
        "per user"
    );
    Ok(())
}

async fn advanced(runtime: &Runtime, run: &str) -> Result<()> {
    let limiter = runtime.limiter();
    let center = runtime.config();
    let path = format!("/config/{}/{}/ratelimit", runtime.env(), runtime.service());
    // One upload a minute, and 100 units a minute for everything else.
    let mut rules = LimiterSettings::with_rule("upload", Rule::per_minute(1));
    rules.default_rule = Some(Rule::per_minute(100));
    center.set_json(&path, &rules).await?;
    let user = format!("carol-{run}");
    let mut applied = false;
    for _ in 0..250 {
        let key = format!("{user}-{}", run_id());
        // Until the new rules arrive, "upload" has no rule (NotFound).
        let first = limiter
            .check("upload", &key, 1)
            .await
            .is_ok_and(|d| d.allowed);
        let second = limiter
            .check("upload", &key, 1)
            .await
            .is_ok_and(|d| d.allowed);
        if first && !second {
            applied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        applied,
        "the rule written to the center applies within a second"
    );
    let big = limiter.check("search", &user, 60).await?;
    let bigger = limiter.check("search", &user, 60).await?;
    println!(
        "advanced: new rules live; 60 units allowed={}, 60 more allowed={}",
        big.allowed, bigger.allowed
    );
    ensure!(
        big.allowed && !bigger.allowed,
        "the default rule's burst is 100 units"
    );
    center.delete(&path).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let parts = parts()?;
    let runtime = im_infra_runtime::Runtime::builder("example-ratelimit")
        .section("clog", serde_json::json!({"level": "warn"}))
        .section(
            "ratelimit",
            LimiterSettings::with_rule("send", Rule::per_second(3)),
        )
        .start()
        .await?;
    let _ = start; // the other examples' helper; this one sets its rules in code
    let run = run_id();
    if parts.basic {
        basic(&runtime, &run).await?;
    }
    if parts.advanced {
        advanced(&runtime, &run).await?;
    }
    runtime.shutdown().await?;
    Ok(())
}
