//! `DistributedLock` contract.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use im_infra::backend::Capability;
use im_infra::lock::{DistributedLock, LockExt, LockOptions};
use im_infra::ErrorKind;

use super::{expect_kind, unique};
use crate::harness::{Case, Claims, World};

async fn locks(w: &World) -> Result<Arc<dyn DistributedLock>> {
    Ok(w.backend.lock().await?)
}

fn ttl(ms: u64) -> LockOptions {
    LockOptions::new(Duration::from_millis(ms))
}

/// A short TTL of at least `ms`, and at least what the backend honours.
fn short(l: &Arc<dyn DistributedLock>, ms: u64) -> Duration {
    Duration::from_millis(ms).max(l.capabilities().min_ttl)
}

/// Long enough for a lock of `ttl` to have expired (backends check expiry
/// with some delay: etcd every 500 ms).
fn expired_after(ttl: Duration) -> Duration {
    ttl * 2 + Duration::from_millis(600)
}

async fn try_acquire_when_held_returns_none(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    let g = l
        .try_acquire(&key, ttl(10_000))
        .await?
        .context("a free lock must be granted")?;
    ensure!(g.key() == key && g.is_held());
    let other = w.peer.lock().await?;
    ensure!(
        other.try_acquire(&key, ttl(10_000)).await?.is_none(),
        "a held lock is not granted twice"
    );
    g.release().await?;
    ensure!(
        other.try_acquire(&key, ttl(10_000)).await?.is_some(),
        "a released lock is free"
    );
    Ok(())
}

async fn try_lock_of_a_held_lock_is_lock_already_held(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    let g = l.try_lock(&key, Duration::from_secs(10)).await?;
    let other = w.peer.lock().await?;
    let err = expect_kind(
        other
            .try_lock(&key, Duration::from_secs(10))
            .await
            .map(|g| g.fencing_token()),
        ErrorKind::LockAlreadyHeld,
        "try_lock of a held lock",
    );
    g.release().await?;
    err?;
    ensure!(
        other
            .try_lock(&key, Duration::from_secs(10))
            .await?
            .is_held(),
        "a released lock is free for try_lock"
    );
    Ok(())
}

async fn release_frees_the_lock(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    let g = l.acquire(&key, ttl(10_000)).await?;
    ensure!(l.is_locked(&key).await?, "is_locked while held");
    g.release().await?;
    ensure!(!l.is_locked(&key).await?, "not locked after release");
    ensure!(!g.is_held());
    ensure!(g.lost().is_cancelled(), "the lost token fires on release");
    Ok(())
}

async fn fencing_token_increases(w: World) -> Result<()> {
    let key = unique("lock");
    let mut last = 0;
    for i in 0..6 {
        let l = if i % 2 == 0 {
            locks(&w).await?
        } else {
            w.peer.lock().await?
        };
        let g = l.acquire(&key, ttl(10_000)).await?;
        ensure!(
            g.fencing_token() > last,
            "token {} after {last}",
            g.fencing_token()
        );
        last = g.fencing_token();
        g.release().await?;
    }
    Ok(())
}

async fn acquire_waits_for_release(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    let first = l.acquire(&key, ttl(10_000)).await?;
    let token = first.fencing_token();
    let other = w.peer.lock().await?;
    let k = key.clone();
    let started = Instant::now();
    let waiter = tokio::spawn(async move {
        other
            .acquire(&k, ttl(10_000).wait(Duration::from_secs(10)))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        !waiter.is_finished(),
        "the waiter must wait while the lock is held"
    );
    first.release().await?;
    let second = waiter.await??;
    ensure!(started.elapsed() >= Duration::from_millis(250));
    ensure!(second.fencing_token() > token);
    second.release().await?;
    Ok(())
}

async fn acquire_times_out(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    let _held = l.acquire(&key, ttl(10_000)).await?;
    let started = Instant::now();
    let res = w
        .peer
        .lock()
        .await?
        .acquire(&key, ttl(10_000).wait(Duration::from_millis(300)))
        .await;
    expect_kind(
        res.map(|g| g.fencing_token()),
        ErrorKind::LockNotAcquired,
        "acquire of a held lock",
    )?;
    let waited = started.elapsed();
    ensure!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "waited {waited:?} for a 300 ms bound"
    );
    Ok(())
}

async fn mutual_exclusion_loses_no_increment(w: World) -> Result<()> {
    let key = unique("counter-lock");
    let counter = Arc::new(AtomicU64::new(0));
    let (tasks, rounds) = (8u64, 15u64);
    let mut handles = Vec::new();
    for i in 0..tasks {
        let l = if i % 2 == 0 {
            locks(&w).await?
        } else {
            w.peer.lock().await?
        };
        let key = key.clone();
        let counter = counter.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..rounds {
                let g = l
                    .acquire(&key, ttl(10_000).wait(Duration::from_secs(30)))
                    .await?;
                // A non-atomic read-modify-write: overlapping holders lose updates.
                let v = counter.load(Ordering::SeqCst);
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
                counter.store(v + 1, Ordering::SeqCst);
                g.release().await?;
            }
            Ok::<_, im_infra::Error>(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let got = counter.load(Ordering::SeqCst);
    ensure!(
        got == tasks * rounds,
        "counter {got}, expected {}",
        tasks * rounds
    );
    Ok(())
}

async fn release_after_expiry_is_lock_not_held(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    let t = short(&l, 200);
    let g = l.acquire(&key, LockOptions::new(t).no_renewal()).await?;
    tokio::time::sleep(expired_after(t)).await;
    expect_kind(
        g.release().await,
        ErrorKind::LockNotHeld,
        "release of an expired lock",
    )?;
    Ok(())
}

async fn only_the_owner_releases(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    let t = short(&l, 200);
    let stale = l.acquire(&key, LockOptions::new(t).no_renewal()).await?;
    tokio::time::sleep(expired_after(t)).await;
    let other = w.peer.lock().await?;
    let current = other
        .acquire(&key, ttl(10_000).wait(Duration::from_secs(5)))
        .await?;
    ensure!(current.fencing_token() > stale.fencing_token());
    expect_kind(
        stale.release().await,
        ErrorKind::LockNotHeld,
        "release by a stale holder",
    )?;
    ensure!(
        l.is_locked(&key).await?,
        "the stale release must not free the new holder's lock"
    );
    expect_kind(
        stale.refresh(Duration::from_secs(5)).await,
        ErrorKind::LockNotHeld,
        "refresh by a stale holder",
    )?;
    current.release().await?;
    Ok(())
}

async fn holder_that_dies_frees_the_lock_after_its_ttl(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    let t = short(&l, 400);
    let g = l.acquire(&key, LockOptions::new(t).no_renewal()).await?;
    // The holder "dies": no release, no renewal.
    std::mem::forget(g);
    let other = w.peer.lock().await?;
    ensure!(
        other.try_acquire(&key, ttl(10_000)).await?.is_none(),
        "still held before the TTL"
    );
    let started = Instant::now();
    let g = other
        .acquire(&key, ttl(10_000).wait(Duration::from_secs(30)))
        .await?;
    ensure!(
        started.elapsed() < expired_after(t) + Duration::from_secs(2),
        "freed after its TTL, not much later"
    );
    g.release().await?;
    Ok(())
}

async fn auto_renewal_keeps_the_lock(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    let t = short(&l, 1_000);
    let g = l.acquire(&key, LockOptions::new(t)).await?;
    tokio::time::sleep(t * 5 / 2).await;
    ensure!(
        g.is_held() && !g.lost().is_cancelled(),
        "renewal must keep the lock"
    );
    ensure!(w
        .peer
        .lock()
        .await?
        .try_acquire(&key, ttl(1_000))
        .await?
        .is_none());
    g.release().await?;
    Ok(())
}

async fn refresh_extends_the_lock(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    let t = short(&l, 600);
    let g = l.acquire(&key, LockOptions::new(t).no_renewal()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    g.refresh(Duration::from_secs(10)).await?;
    ensure!(g.ttl() == Duration::from_secs(10));
    tokio::time::sleep(expired_after(t)).await;
    ensure!(l.is_locked(&key).await?, "refresh must extend the TTL");
    ensure!(g.is_held());
    g.release().await?;
    Ok(())
}

async fn lost_signal_fires_when_the_lock_expires(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    let t = short(&l, 300);
    let g = l.acquire(&key, LockOptions::new(t).no_renewal()).await?;
    let lost = g.lost();
    tokio::time::timeout(expired_after(t) + Duration::from_secs(3), lost.cancelled())
        .await
        .context("the lost token must fire after the TTL")?;
    ensure!(!g.is_held());
    Ok(())
}

async fn release_twice_is_lock_not_held(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let g = l.acquire(&unique("lock"), ttl(10_000)).await?;
    g.release().await?;
    expect_kind(g.release().await, ErrorKind::LockNotHeld, "second release")
}

async fn info_names_the_holder(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    ensure!(l.info(&key).await?.is_none(), "no info for a free lock");
    let before = SystemTime::now();
    let g = l.acquire(&key, ttl(10_000)).await?;
    let after = SystemTime::now();
    let info = w
        .peer
        .lock()
        .await?
        .info(&key)
        .await?
        .context("info of a held lock")?;
    ensure!(info.key == key && !info.owner.is_empty());
    ensure!(
        info.fencing_token == g.fencing_token(),
        "info token {} != guard token {}",
        info.fencing_token,
        g.fencing_token()
    );
    // The remaining TTL and the acquisition time (the seed's `TTL(ctx)`
    // and holder details), on the server's clock: within a second of ours.
    let t = info.ttl.context("info gives the remaining TTL")?;
    ensure!(
        t > Duration::ZERO && t <= Duration::from_secs(10),
        "ttl {t:?}"
    );
    let at = info
        .acquired_at
        .context("info gives the acquisition time")?;
    let skew = Duration::from_secs(1);
    ensure!(
        at + skew >= before && at <= after + skew,
        "acquired at {at:?}, between {before:?} and {after:?}"
    );
    let left = g
        .remaining()
        .context("the guard gives its remaining time")?;
    ensure!(left <= Duration::from_secs(10), "remaining {left:?}");
    g.release().await?;
    Ok(())
}

async fn cancelled_acquire_leaves_nothing_behind(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    let held = l.acquire(&key, ttl(10_000)).await?;
    let other = w.peer.lock().await?;
    // Start waiting, then give up by dropping the future.
    let waiting = other.acquire(&key, ttl(10_000).wait(Duration::from_secs(30)));
    ensure!(tokio::time::timeout(Duration::from_millis(300), waiting)
        .await
        .is_err());
    held.release().await?;
    let third = locks(&w).await?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let g = loop {
        if let Some(g) = third.try_acquire(&key, ttl(10_000)).await? {
            break g;
        }
        ensure!(
            Instant::now() < deadline,
            "the cancelled waiter still blocks the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    g.release().await?;
    Ok(())
}

async fn fair_waiters_acquire_in_arrival_order(w: World) -> Result<()> {
    let key = unique("lock");
    let held = locks(&w).await?.acquire(&key, ttl(10_000)).await?;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for i in 0..4 {
        let l = locks(&w).await?;
        let key = key.clone();
        let order = order.clone();
        handles.push(tokio::spawn(async move {
            let g = l
                .acquire(&key, ttl(10_000).wait(Duration::from_secs(20)))
                .await?;
            order.lock().unwrap_or_else(|p| p.into_inner()).push(i);
            g.release().await?;
            Ok::<_, im_infra::Error>(())
        }));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    held.release().await?;
    for h in handles {
        h.await??;
    }
    let order = order.lock().unwrap_or_else(|p| p.into_inner()).clone();
    ensure!(
        order == vec![0, 1, 2, 3],
        "waiters acquired in order {order:?}"
    );
    Ok(())
}

async fn with_lock_runs_and_releases(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    let out = l.with_lock(&key, ttl(10_000), || async { 41 + 1 }).await?;
    ensure!(out == 42);
    ensure!(!l.is_locked(&key).await?, "with_lock releases");
    Ok(())
}

async fn bad_input_is_invalid_argument(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let fence =
        |r: im_infra::Result<Box<dyn im_infra::lock::LockGuard>>| r.map(|g| g.fencing_token());
    expect_kind(
        fence(l.acquire("", ttl(1000)).await),
        ErrorKind::InvalidArgument,
        "empty key",
    )?;
    expect_kind(
        fence(l.acquire("k", LockOptions::new(Duration::ZERO)).await),
        ErrorKind::InvalidArgument,
        "zero ttl",
    )?;
    match l.try_acquire(&"k".repeat(5000), ttl(1000)).await {
        Err(e) if e.kind() == ErrorKind::InvalidArgument => {}
        other => bail!("oversized key: {:?}", other.map(|g| g.is_some())),
    }
    expect_kind(
        l.is_locked("").await,
        ErrorKind::InvalidArgument,
        "is_locked empty key",
    )?;
    expect_kind(
        fence(l.acquire("k", LockOptions::new(Duration::MAX)).await),
        ErrorKind::InvalidArgument,
        "ttl Duration::MAX",
    )?;
    let g = l.acquire(&unique("lock"), ttl(10_000)).await?;
    expect_kind(
        g.refresh(Duration::MAX).await,
        ErrorKind::InvalidArgument,
        "refresh Duration::MAX",
    )?;
    expect_kind(
        g.refresh(Duration::ZERO).await,
        ErrorKind::InvalidArgument,
        "refresh zero",
    )?;
    ensure!(g.is_held(), "a refused refresh keeps the lock");
    // An unlimited wait on a free lock is granted at once.
    let free = l
        .acquire(&unique("lock"), ttl(10_000).wait(Duration::MAX))
        .await?;
    free.release().await?;
    g.release().await?;
    Ok(())
}

async fn refresh_with_auto_renew_keeps_the_new_ttl(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    let t = short(&l, 600);
    let long = t * 20;
    let g = l.acquire(&key, LockOptions::new(t)).await?;
    g.refresh(long).await?;
    // Several renewal periods of the old TTL: the keeper must renew with
    // the new one, not put the old one back.
    tokio::time::sleep(t * 2).await;
    ensure!(
        g.ttl() == long,
        "ttl {:?} after refreshing to {long:?}",
        g.ttl()
    );
    let left = g.remaining().context("held")?;
    ensure!(
        left > long / 2,
        "{left:?} left of {long:?}: the renewals went back to {t:?}"
    );
    if l.capabilities().info {
        let info = l.info(&key).await?.context("info of a held lock")?;
        if let Some(server) = info.ttl {
            ensure!(
                server > t * 2,
                "the server's TTL is {server:?}: the renewals went back to {t:?}"
            );
        }
    }
    g.release().await?;
    Ok(())
}

async fn the_holder_learns_of_expiry_before_anyone_else_acquires(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    let t = short(&l, 300);
    let g = l.acquire(&key, LockOptions::new(t).no_renewal()).await?;
    let lost = g.lost();
    let other = w.peer.lock().await?;
    let deadline = Instant::now() + expired_after(t) + Duration::from_secs(3);
    loop {
        // Looked at before the attempt: a grant after it must find it lost.
        let lost_before = lost.is_cancelled() && !g.is_held();
        if let Some(next) = other.try_acquire(&key, ttl(10_000)).await? {
            ensure!(
                lost_before,
                "another caller acquired the lock while its holder still believed it held"
            );
            ensure!(next.fencing_token() > g.fencing_token());
            next.release().await?;
            break;
        }
        ensure!(Instant::now() < deadline, "the lock never expired");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

async fn remaining_counts_down_and_ends(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let t = short(&l, 2_000);
    let g = l
        .acquire(&unique("lock"), LockOptions::new(t).no_renewal())
        .await?;
    let first = g.remaining().context("held")?;
    ensure!(first <= t && first > t / 2, "{first:?} of {t:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let later = g.remaining().context("still held")?;
    ensure!(later < first, "{later:?} after {first:?}");
    g.release().await?;
    ensure!(g.remaining().is_none(), "nothing left once released");
    Ok(())
}

async fn acquire_cancelled_in_flight_leaves_nothing_behind(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let other = w.peer.lock().await?;
    let key = unique("lock");
    // Drop the acquisition at many points of its round trips, including
    // after the server granted it but before the answer was read.
    for i in 0..16u64 {
        let cut = Duration::from_micros(i * 250);
        match tokio::time::timeout(cut, l.acquire(&key, ttl(60_000))).await {
            Ok(granted) => granted?.release().await?,
            Err(_) => {
                // Whatever the dropped call took must not block the lock
                // for its 60 s TTL.
                let g = other
                    .acquire(&key, ttl(60_000).wait(Duration::from_secs(5)))
                    .await
                    .with_context(|| format!("after an acquisition cut at {cut:?}"))?;
                g.release().await?;
            }
        }
    }
    Ok(())
}

async fn timed_out_acquire_leaves_nothing_behind(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let other = w.peer.lock().await?;
    let key = unique("lock");
    let t = short(&l, 300);
    for _ in 0..3 {
        // The waiter gives up right around the time the holder's lock
        // expires: it may win the lock in its last attempt.
        let _held = l.acquire(&key, LockOptions::new(t).no_renewal()).await?;
        let res = other
            .acquire(&key, ttl(60_000).wait(t + Duration::from_millis(100)))
            .await;
        match res {
            Ok(g) => g.release().await?,
            Err(e) if e.kind() == ErrorKind::LockNotAcquired => {}
            Err(e) => return Err(e.into()),
        }
        let g = l
            .acquire(
                &key,
                ttl(60_000).wait(expired_after(t) + Duration::from_secs(3)),
            )
            .await
            .context("a timed-out acquisition left the lock taken")?;
        g.release().await?;
    }
    Ok(())
}

async fn wait_without_limit_waits_for_the_release(w: World) -> Result<()> {
    let l = locks(&w).await?;
    let key = unique("lock");
    let held = l.acquire(&key, ttl(10_000)).await?;
    let other = w.peer.lock().await?;
    let k = key.clone();
    let waiter =
        tokio::spawn(async move { other.acquire(&k, ttl(10_000).wait(Duration::MAX)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(!waiter.is_finished(), "an unlimited wait waits");
    held.release().await?;
    let g = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .context("the waiter did not get the released lock")???;
    ensure!(g.fencing_token() > held.fencing_token());
    g.release().await?;
    Ok(())
}

fn on(c: &Claims) -> bool {
    c.has(Capability::Lock) && c.lock.as_ref().is_some_and(|l| l.fencing)
}

/// The lock cases.
pub fn cases() -> Vec<Case> {
    vec![
        crate::case!("lock", try_acquire_when_held_returns_none, when = on),
        crate::case!(
            "lock",
            try_lock_of_a_held_lock_is_lock_already_held,
            when = on
        ),
        crate::case!("lock", release_frees_the_lock, when = on),
        crate::case!("lock", fencing_token_increases, when = on),
        crate::case!("lock", acquire_waits_for_release, when = on),
        crate::case!("lock", acquire_times_out, when = on),
        crate::case!("lock", mutual_exclusion_loses_no_increment, when = on),
        crate::case!("lock", release_after_expiry_is_lock_not_held, when = on),
        crate::case!("lock", only_the_owner_releases, when = on),
        crate::case!(
            "lock",
            holder_that_dies_frees_the_lock_after_its_ttl,
            when = on
        ),
        crate::case!("lock", auto_renewal_keeps_the_lock, when = on),
        crate::case!("lock", refresh_extends_the_lock, when = on),
        crate::case!("lock", lost_signal_fires_when_the_lock_expires, when = on),
        crate::case!("lock", release_twice_is_lock_not_held, when = on),
        crate::case!(
            "lock",
            info_names_the_holder,
            when = |c| on(c) && c.lock.as_ref().is_some_and(|l| l.info)
        ),
        crate::case!("lock", cancelled_acquire_leaves_nothing_behind, when = on),
        crate::case!(
            "lock",
            fair_waiters_acquire_in_arrival_order,
            when = |c| on(c) && c.lock.as_ref().is_some_and(|l| l.fair)
        ),
        crate::case!("lock", with_lock_runs_and_releases, when = on),
        crate::case!("lock", refresh_with_auto_renew_keeps_the_new_ttl, when = on),
        crate::case!(
            "lock",
            the_holder_learns_of_expiry_before_anyone_else_acquires,
            when = on
        ),
        crate::case!("lock", remaining_counts_down_and_ends, when = on),
        crate::case!(
            "lock",
            acquire_cancelled_in_flight_leaves_nothing_behind,
            when = on
        ),
        crate::case!("lock", timed_out_acquire_leaves_nothing_behind, when = on),
        crate::case!("lock", wait_without_limit_waits_for_the_release, when = on),
        crate::case!("lock", bad_input_is_invalid_argument, when = on),
    ]
}
