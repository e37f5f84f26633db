//! The suites: one module per capability, each a list of named cases.

pub mod cache;
pub mod config;
pub mod gating;
pub mod lock;
pub mod mq;
pub mod noop;
pub mod once;
pub mod ratelimit;
pub mod registry;
pub mod uid;

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use im_infra::ErrorKind;

use crate::harness::Case;

/// Every contract case (gated by claims when trials are built).
pub fn contract() -> Vec<Case> {
    let mut all = Vec::new();
    all.extend(gating::cases());
    all.extend(cache::cases());
    all.extend(ratelimit::cases());
    all.extend(lock::cases());
    all.extend(config::cases());
    all.extend(registry::cases());
    all.extend(once::cases());
    all.extend(mq::cases());
    all.extend(uid::cases());
    all
}

/// Fails unless `res` is an error of `kind`.
pub fn expect_kind<T: Debug>(res: im_infra::Result<T>, kind: ErrorKind, what: &str) -> Result<()> {
    match res {
        Err(e) if e.kind() == kind => Ok(()),
        Err(e) => bail!("{what}: expected a {kind:?} error, got {e}"),
        Ok(v) => bail!("{what}: expected a {kind:?} error, got Ok({v:?})"),
    }
}

/// Polls `check` until it returns `true` or `within` has passed.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let start = Instant::now();
    loop {
        if check().await? {
            return Ok(());
        }
        if start.elapsed() > within {
            bail!("{what}: not observed within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A name unique to this run (`prefix-1a2b3c4d`).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}
