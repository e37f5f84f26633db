//! Capability gating, both ways: what a backend claims is provided; what it
//! does not claim answers `Unsupported`.

use std::sync::Arc;

use anyhow::{Context, Result};
use im_infra::backend::{Backend, Capability};
use im_infra::mq::ConsumerSettings;
use im_infra::ratelimit::{Rule, Rules};
use im_infra::ErrorKind;

use super::expect_kind;
use crate::harness::{Case, World};

/// Calls the backend's accessor of `c`.
async fn accessor(b: &Arc<dyn Backend>, c: Capability) -> im_infra::Result<()> {
    match c {
        Capability::Cache => b.cache().await.map(drop),
        Capability::Limiter => b
            .limiter(Rules::single("gating", Rule::per_second(1))?)
            .await
            .map(drop),
        Capability::Lock => b.lock().await.map(drop),
        Capability::Config => b.config().await.map(drop),
        Capability::Registry => {
            b.registry().await?;
            b.discovery().await.map(drop)
        }
        Capability::Once => b.once().await.map(drop),
        Capability::Messaging => {
            b.producer().await?;
            b.consumer(ConsumerSettings::new("gating", ["gating"]))
                .await
                .map(drop)
        }
        Capability::WorkerIds => b.worker_ids().await.map(drop),
        _ => Err(im_infra::Error::unsupported("unknown capability")),
    }
}

macro_rules! gates {
    ($( $cap:ident => $label:literal, $provided:ident, $unsupported:ident; )*) => {
        $(
            async fn $provided(w: World) -> Result<()> {
                accessor(&w.backend, Capability::$cap)
                    .await
                    .with_context(|| format!("{} is claimed but its accessor failed", $label))
            }

            async fn $unsupported(w: World) -> Result<()> {
                expect_kind(accessor(&w.backend, Capability::$cap).await, ErrorKind::Unsupported, $label)
            }
        )*

        /// The gating cases.
        pub fn cases() -> Vec<Case> {
            let mut v: Vec<Case> = vec![$(
                Case { name: "provided", ..crate::case!($label, $provided, when = |c| c.has(Capability::$cap)) },
                Case { name: "unsupported", ..crate::case!($label, $unsupported, when = |c| !c.has(Capability::$cap)) },
            )*];
            v.extend(optional_operations());
            v
        }
    };
}

gates! {
    Cache => "cache", cache_provided, cache_unsupported;
    Limiter => "ratelimit", limiter_provided, limiter_unsupported;
    Lock => "lock", lock_provided, lock_unsupported;
    Config => "config", config_provided, config_unsupported;
    Registry => "registry", registry_provided, registry_unsupported;
    Once => "once", once_provided, once_unsupported;
    Messaging => "mq", mq_provided, mq_unsupported;
    WorkerIds => "uid", uid_provided, uid_unsupported;
}

async fn lock_info_unsupported(w: World) -> Result<()> {
    let locks = w.backend.lock().await?;
    expect_kind(locks.info("k").await, ErrorKind::Unsupported, "lock.info")
}

async fn config_cas_unsupported(w: World) -> Result<()> {
    let center = w.backend.config().await?;
    expect_kind(
        center
            .compare_and_set("/k", bytes::Bytes::from_static(b"1"), 0)
            .await,
        ErrorKind::Unsupported,
        "config.compare_and_set",
    )
}

async fn config_watch_unsupported(w: World) -> Result<()> {
    let center = w.backend.config().await?;
    let res = center
        .watch("/k", Default::default())
        .await
        .map(|_| "a watch stream");
    expect_kind(res, ErrorKind::Unsupported, "config.watch")
}

async fn consumer_pause_unsupported(w: World) -> Result<()> {
    let consumer = w
        .backend
        .consumer(ConsumerSettings::new("g", ["t"]))
        .await?;
    expect_kind(
        consumer.pause().await,
        ErrorKind::Unsupported,
        "consumer.pause",
    )?;
    expect_kind(
        consumer.resume().await,
        ErrorKind::Unsupported,
        "consumer.resume",
    )
}

fn optional_operations() -> Vec<Case> {
    vec![
        crate::case!(
            "lock",
            lock_info_unsupported,
            when = |c| c.lock.as_ref().is_some_and(|l| !l.info)
        ),
        crate::case!(
            "config",
            config_cas_unsupported,
            when = |c| c.config.as_ref().is_some_and(|x| !x.compare_and_set)
        ),
        crate::case!(
            "config",
            config_watch_unsupported,
            when = |c| c.config.as_ref().is_some_and(|x| !x.watch)
        ),
        crate::case!(
            "mq",
            consumer_pause_unsupported,
            when = |c| c.consumer.as_ref().is_some_and(|x| !x.pause_resume)
        ),
    ]
}
