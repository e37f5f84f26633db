//! `WorkerIdAllocator` contract (and Snowflake generators on leased ids).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use im_infra::backend::Capability;
use im_infra::uid::{IdGenerator, Layout, Snowflake};
use im_infra::ErrorKind;

use super::{eventually, expect_kind};
use crate::harness::{Case, World};

const TTL: Duration = Duration::from_secs(3);

async fn leased_ids_are_unique(w: World) -> Result<()> {
    let a = w.backend.worker_ids().await?;
    let b = w.peer.worker_ids().await?;
    let mut leases = Vec::new();
    for i in 0..6 {
        let alloc = if i % 2 == 0 { &a } else { &b };
        leases.push(alloc.allocate(1023, TTL).await?);
    }
    let ids: HashSet<u64> = leases.iter().map(|l| l.worker_id()).collect();
    ensure!(ids.len() == 6, "ids {ids:?} must be distinct");
    ensure!(ids.iter().all(|id| *id <= 1023));
    Ok(())
}

async fn exhausted_range_is_resource_exhausted(w: World) -> Result<()> {
    let alloc = w.backend.worker_ids().await?;
    let one = alloc.allocate(1, TTL).await?;
    let two = alloc.allocate(1, TTL).await?;
    ensure!(one.worker_id() != two.worker_id());
    expect_kind(
        alloc.allocate(1, TTL).await.map(|l| l.worker_id()),
        ErrorKind::ResourceExhausted,
        "third id of two",
    )?;
    Ok(())
}

async fn released_id_is_reused(w: World) -> Result<()> {
    let alloc = w.backend.worker_ids().await?;
    let lease = alloc.allocate(0, TTL).await?;
    ensure!(lease.worker_id() == 0);
    lease.release().await?;
    ensure!(
        lease.lost().is_cancelled(),
        "a released lease reads as lost"
    );
    let again = alloc.allocate(0, TTL).await?;
    ensure!(again.worker_id() == 0, "the released id is free again");
    Ok(())
}

async fn renewal_keeps_the_lease(w: World) -> Result<()> {
    let alloc = w.backend.worker_ids().await?;
    let lease = alloc.allocate(0, TTL).await?;
    tokio::time::sleep(TTL * 2).await;
    ensure!(!lease.lost().is_cancelled(), "a renewed lease is not lost");
    expect_kind(
        w.peer
            .worker_ids()
            .await?
            .allocate(0, TTL)
            .await
            .map(|l| l.worker_id()),
        ErrorKind::ResourceExhausted,
        "a renewed id is not handed out again",
    )
}

async fn generator_on_a_lost_lease_stops_issuing(w: World) -> Result<()> {
    let alloc = w.backend.worker_ids().await?;
    let lease = alloc.allocate(1023, TTL).await?;
    let id = lease.worker_id();
    let gen = Snowflake::with_lease(Layout::default(), lease)?;
    ensure!(gen.next_id().is_ok());
    w.hooks.revoke_worker_id(id).await?;
    eventually(Duration::from_secs(10), "the generator stops", || {
        let res = gen.next_id();
        async move { Ok(res.err().map(|e| e.kind()) == Some(ErrorKind::LeaseLost)) }
    })
    .await
}

async fn ids_from_leased_generators_are_unique_across_threads(w: World) -> Result<()> {
    let layout = Layout::default();
    let g1 = Arc::new(Snowflake::with_lease(
        layout,
        w.backend.worker_ids().await?.allocate(1023, TTL).await?,
    )?);
    let g2 = Arc::new(Snowflake::with_lease(
        layout,
        w.peer.worker_ids().await?.allocate(1023, TTL).await?,
    )?);
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let g = if i % 2 == 0 { g1.clone() } else { g2.clone() };
            std::thread::spawn(move || {
                (0..20_000)
                    .map(|_| g.next_id())
                    .collect::<im_infra::Result<Vec<_>>>()
            })
        })
        .collect();
    let mut all = HashSet::new();
    for h in handles {
        let ids = h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
        ensure!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids increase within a thread"
        );
        all.extend(ids);
    }
    ensure!(all.len() == 80_000, "{} unique of 80000", all.len());
    Ok(())
}

async fn a_reused_id_starts_after_its_previous_holder(w: World) -> Result<()> {
    let alloc = w.backend.worker_ids().await?;
    let layout = Layout::default();
    let first = alloc.allocate(0, TTL).await?;
    let gen = Snowflake::with_lease(layout, first)?;
    let mut last = 0;
    for _ in 0..1000 {
        last = gen.next_id()?;
    }
    let last_time = gen.decompose(last).time;
    drop(gen); // releases the id, recording when its holder stopped
    let again = eventually_allocated(&*w.peer.worker_ids().await?).await?;
    ensure!(again.worker_id() == 0, "the same id");
    let not_before = std::time::UNIX_EPOCH + Duration::from_millis(again.not_before_millis());
    ensure!(
        not_before >= last_time,
        "the previous holder issued an id at {last_time:?}, the next holder may start at {not_before:?}"
    );
    let gen = Snowflake::with_lease(layout, again)?;
    let next = gen.next_id()?;
    ensure!(next > last, "{next} after {last}");
    Ok(())
}

/// A holder that took an id while its previous holder may still issue ids
/// (lost, not released: its lease had a minute to run) starts after that
/// holder's bound, and releasing the id at once does not lower it: the
/// holder after it starts no earlier.
async fn a_released_id_keeps_the_bound_its_holder_inherited(w: World) -> Result<()> {
    let alloc = w.backend.worker_ids().await?;
    let lost = alloc.allocate(0, Duration::from_secs(60)).await?;
    w.hooks.revoke_worker_id(lost.worker_id()).await?;
    let peer = w.peer.worker_ids().await?;
    let second = eventually_allocated(&*peer).await?;
    let inherited = second.not_before_millis();
    let lost_until = std::time::SystemTime::now() + Duration::from_secs(50);
    ensure!(
        std::time::UNIX_EPOCH + Duration::from_millis(inherited) >= lost_until,
        "the next holder may start at {inherited} ms, before the lost holder's lease ran out"
    );
    second.release().await?;
    let third = eventually_allocated(&*peer).await?;
    ensure!(
        third.not_before_millis() >= inherited,
        "released at once, the id's bound went down from {inherited} ms to {} ms",
        third.not_before_millis()
    );
    drop(lost);
    Ok(())
}

/// Id 0 once the background release of a dropped lease went through.
async fn eventually_allocated(
    alloc: &dyn im_infra::uid::WorkerIdAllocator,
) -> Result<im_infra::uid::WorkerLease> {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match alloc.allocate(0, TTL).await {
            Ok(l) => return Ok(l),
            Err(e)
                if e.kind() == ErrorKind::ResourceExhausted
                    && std::time::Instant::now() < until =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The worker-id cases.
pub fn cases() -> Vec<Case> {
    let on = |c: &crate::harness::Claims| c.has(Capability::WorkerIds);
    vec![
        crate::case!(
            "uid",
            a_reused_id_starts_after_its_previous_holder,
            when = on
        ),
        crate::case!(
            "uid",
            a_released_id_keeps_the_bound_its_holder_inherited,
            when = on
        ),
        crate::case!("uid", leased_ids_are_unique, when = on),
        crate::case!("uid", exhausted_range_is_resource_exhausted, when = on),
        crate::case!("uid", released_id_is_reused, when = on),
        crate::case!("uid", renewal_keeps_the_lease, when = on),
        crate::case!("uid", generator_on_a_lost_lease_stops_issuing, when = on),
        crate::case!(
            "uid",
            ids_from_leased_generators_are_unique_across_threads,
            when = on
        ),
    ]
}
