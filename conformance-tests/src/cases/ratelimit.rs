//! `Limiter` contract.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use im_infra::backend::Capability;
use im_infra::config::{ConfigCenter, ConfigManager};
use im_infra::ratelimit::{DenyReason, Limiter, LimiterExt, LimiterSettings, Rule, Rules};
use im_infra::ErrorKind;

use super::{eventually, expect_kind, unique};
use crate::harness::{Case, World};

async fn limiter(w: &World, rules: Rules) -> Result<Arc<dyn Limiter>> {
    Ok(w.backend.limiter(rules).await?)
}

/// A rule that refills so slowly that a test never sees a refill.
fn slow(burst: u64) -> Rule {
    Rule::new(1, Duration::from_secs(3600)).with_burst(burst)
}

async fn allows_the_burst_then_denies(w: World) -> Result<()> {
    let l = limiter(&w, Rules::single("api", Rule::per_second(5))?).await?;
    let key = unique("user");
    for i in 0..5 {
        let d = l.check("api", &key, 1).await?;
        ensure!(d.allowed, "request {i} of the burst must be allowed");
        ensure!(
            d.remaining == 4 - i,
            "remaining {} after {} requests",
            d.remaining,
            i + 1
        );
    }
    let d = l.check("api", &key, 1).await?;
    ensure!(
        !d.allowed && d.denied == Some(DenyReason::RateExceeded),
        "6th must be denied: {d:?}"
    );
    ensure!(
        d.retry_after > Duration::ZERO && d.retry_after <= Duration::from_millis(200),
        "retry_after {:?} must be within one emission interval",
        d.retry_after
    );
    ensure!(d.limit == 5);
    Ok(())
}

async fn refills_at_the_rate(w: World) -> Result<()> {
    let l = limiter(
        &w,
        Rules::single("api", Rule::per_second(10).with_burst(1))?,
    )
    .await?;
    let key = unique("user");
    ensure!(l.check("api", &key, 1).await?.allowed);
    let denied = l.check("api", &key, 1).await?;
    ensure!(!denied.allowed);
    tokio::time::sleep(denied.retry_after + Duration::from_millis(30)).await;
    ensure!(
        l.check("api", &key, 1).await?.allowed,
        "one unit must be back after retry_after"
    );
    Ok(())
}

async fn n_above_burst_is_always_denied(w: World) -> Result<()> {
    let l = limiter(&w, Rules::single("api", slow(3))?).await?;
    let d = l.check("api", &unique("k"), 4).await?;
    ensure!(!d.allowed, "n > burst must be denied");
    ensure!(
        d.denied == Some(DenyReason::ExceedsBurst),
        "with a clear reason: {d:?}"
    );
    let d = l.check("api", &unique("k"), 3).await?;
    ensure!(
        d.allowed && d.remaining == 0,
        "n == burst fits an empty bucket: {d:?}"
    );
    Ok(())
}

async fn bad_input_is_invalid_argument(w: World) -> Result<()> {
    let l = limiter(&w, Rules::single("api", slow(3))?).await?;
    expect_kind(
        l.check("api", "k", 0).await,
        ErrorKind::InvalidArgument,
        "n = 0",
    )?;
    expect_kind(
        l.check("api", "", 1).await,
        ErrorKind::InvalidArgument,
        "empty key",
    )?;
    expect_kind(
        l.check("", "k", 1).await,
        ErrorKind::InvalidArgument,
        "empty resource",
    )?;
    expect_kind(
        l.check("api", &"k".repeat(2000), 1).await,
        ErrorKind::InvalidArgument,
        "oversized key",
    )?;
    ensure!(
        !l.allow("api", "").await,
        "allow() denies what check() rejects"
    );
    Ok(())
}

async fn unknown_resource_is_not_found(w: World) -> Result<()> {
    let l = limiter(&w, Rules::single("api", slow(3))?).await?;
    expect_kind(
        l.check("other", "k", 1).await,
        ErrorKind::NotFound,
        "resource without rule",
    )?;
    let l = limiter(&w, Rules::fixed(slow(2).into())?).await?;
    ensure!(
        l.check("anything", &unique("k"), 1).await?.allowed,
        "the default rule applies"
    );
    Ok(())
}

async fn keys_have_independent_budgets(w: World) -> Result<()> {
    let l = limiter(&w, Rules::single("api", slow(1))?).await?;
    let (a, b) = (unique("a"), unique("b"));
    ensure!(l.allow("api", &a).await);
    ensure!(!l.allow("api", &a).await);
    ensure!(l.allow("api", &b).await, "another key has its own budget");
    Ok(())
}

async fn two_instances_share_one_budget(w: World) -> Result<()> {
    let rules = Rules::single("api", slow(4))?;
    let one = limiter(&w, rules.clone()).await?;
    let two = w.peer.limiter(rules).await?;
    let key = unique("shared");
    ensure!(one.check("api", &key, 2).await?.allowed);
    ensure!(two.check("api", &key, 2).await?.allowed);
    ensure!(
        !one.check("api", &key, 1).await?.allowed,
        "budget is shared: 4 of 4 used"
    );
    ensure!(!two.check("api", &key, 1).await?.allowed);
    Ok(())
}

async fn concurrent_callers_never_exceed_the_budget(w: World) -> Result<()> {
    let burst = 50;
    let rules = Rules::single("api", slow(burst))?;
    let key = unique("hot");
    let mut handles = Vec::new();
    for i in 0..8 {
        let l = if i % 2 == 0 {
            limiter(&w, rules.clone()).await?
        } else {
            w.peer.limiter(rules.clone()).await?
        };
        let key = key.clone();
        handles.push(tokio::spawn(async move {
            let mut allowed = 0u64;
            for _ in 0..25 {
                if l.check("api", &key, 1).await?.allowed {
                    allowed += 1;
                }
            }
            Ok::<_, im_infra::Error>(allowed)
        }));
    }
    let mut total = 0;
    for h in handles {
        total += h.await??;
    }
    ensure!(
        total == burst,
        "{total} of 200 concurrent requests allowed; the budget is exactly {burst}"
    );
    Ok(())
}

async fn hot_reloaded_rule_applies(w: World) -> Result<()> {
    // Rules come from a ConfigManager on the backend's own config center
    // (every limiter backend has one; the case needs both).
    let center: Arc<dyn ConfigCenter> = w.backend.config().await?;
    let manager = ConfigManager::<LimiterSettings>::builder(center, "conformance", "ratelimit")
        .env("test")
        .build()?;
    manager
        .publish(&LimiterSettings::with_rule("api", slow(1)))
        .await?;
    manager.start().await;
    let l = limiter(&w, Rules::Managed(manager.clone())).await?;
    let key = unique("k");
    ensure!(l.allow("api", &key).await);
    ensure!(!l.allow("api", &key).await, "burst 1 is used up");
    let before = manager.version();
    manager
        .publish(&LimiterSettings::with_rule("api", slow(5)))
        .await?;
    eventually(Duration::from_secs(5), "new rule applied", || {
        let m = manager.clone();
        async move { Ok(m.version() > before) }
    })
    .await?;
    ensure!(l.allow("api", &unique("k")).await);
    let d = l.check("api", &unique("fresh"), 5).await?;
    ensure!(
        d.allowed && d.limit == 5,
        "the reloaded burst of 5 applies: {d:?}"
    );
    manager.stop().await;
    Ok(())
}

/// The limiter cases.
pub fn cases() -> Vec<Case> {
    let on = |c: &crate::harness::Claims| c.has(Capability::Limiter);
    vec![
        crate::case!("ratelimit", allows_the_burst_then_denies, when = on),
        crate::case!("ratelimit", refills_at_the_rate, when = on),
        crate::case!("ratelimit", n_above_burst_is_always_denied, when = on),
        crate::case!("ratelimit", bad_input_is_invalid_argument, when = on),
        crate::case!("ratelimit", unknown_resource_is_not_found, when = on),
        crate::case!("ratelimit", keys_have_independent_budgets, when = on),
        crate::case!("ratelimit", two_instances_share_one_budget, when = on),
        crate::case!(
            "ratelimit",
            concurrent_callers_never_exceed_the_budget,
            when = on
        ),
        crate::case!(
            "ratelimit",
            hot_reloaded_rule_applies,
            when = |c| c.has(Capability::Limiter) && c.has(Capability::Config)
        ),
    ]
}
