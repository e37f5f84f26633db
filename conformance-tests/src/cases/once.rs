//! `Once` contract.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use im_infra::backend::Capability;
use im_infra::once::{Once, OnceExt, OnceOptions, Outcome, RunError};
use im_infra::ErrorKind;

use super::unique;
use crate::harness::{Case, World};

const HOUR: Duration = Duration::from_secs(3600);

async fn once(w: &World) -> Result<Arc<dyn Once>> {
    Ok(w.backend.once().await?)
}

type Run = Result<Outcome<String>, RunError<std::io::Error>>;

async fn runs_once_then_returns_the_stored_outcome(w: World) -> Result<()> {
    let o = once(&w).await?;
    let key = unique("job");
    let runs = AtomicUsize::new(0);
    let first: Run = o
        .run(&key, HOUR, || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok("receipt-1".to_string())
        })
        .await;
    ensure!(
        matches!(&first, Ok(Outcome::Executed(v)) if v == "receipt-1"),
        "{first:?}"
    );
    let second: Run = o
        .run(&key, HOUR, || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok("receipt-2".to_string())
        })
        .await;
    ensure!(
        matches!(&second, Ok(Outcome::AlreadyDone(v)) if v == "receipt-1"),
        "{second:?}"
    );
    ensure!(runs.load(Ordering::SeqCst) == 1);
    ensure!(
        o.outcome(&key).await?.as_deref() == Some(&b"\"receipt-1\""[..]),
        "stored outcome readable"
    );
    Ok(())
}

async fn concurrent_callers_run_the_work_once(w: World) -> Result<()> {
    let key = unique("job");
    let runs = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for i in 0..12 {
        let o = if i % 2 == 0 {
            once(&w).await?
        } else {
            w.peer.once().await?
        };
        let key = key.clone();
        let runs = runs.clone();
        handles.push(tokio::spawn(async move {
            let r: Run = o
                .run(&key, HOUR, || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok("done".to_string())
                })
                .await;
            r
        }));
    }
    let (mut executed, mut in_progress, mut done) = (0, 0, 0);
    for h in handles {
        match h.await? {
            Ok(Outcome::Executed(_)) => executed += 1,
            Ok(Outcome::AlreadyDone(_)) => done += 1,
            Err(RunError::Infra(e)) if e.kind() == ErrorKind::InProgress => in_progress += 1,
            other => bail!("unexpected outcome {other:?}"),
        }
    }
    ensure!(
        runs.load(Ordering::SeqCst) == 1,
        "the work ran {} times",
        runs.load(Ordering::SeqCst)
    );
    ensure!(
        executed == 1 && in_progress + done == 11,
        "executed {executed}, in progress {in_progress}, done {done}"
    );
    Ok(())
}

async fn waiting_callers_get_the_outcome(w: World) -> Result<()> {
    let key = unique("job");
    let runs = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for i in 0..8 {
        let o = if i % 2 == 0 {
            once(&w).await?
        } else {
            w.peer.once().await?
        };
        let key = key.clone();
        let runs = runs.clone();
        handles.push(tokio::spawn(async move {
            let r: Run = o
                .run_with(
                    &key,
                    OnceOptions::new(HOUR).wait(Duration::from_secs(10)),
                    || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok("shared".to_string())
                    },
                )
                .await;
            r
        }));
    }
    for h in handles {
        let out = h.await?.map_err(|e| anyhow::anyhow!("{e}"))?;
        ensure!(out.into_inner() == "shared");
    }
    ensure!(runs.load(Ordering::SeqCst) == 1);
    Ok(())
}

async fn failed_work_releases_the_key(w: World) -> Result<()> {
    let o = once(&w).await?;
    let key = unique("job");
    let failed: Run = o
        .run(&key, HOUR, || async {
            Err(std::io::Error::other("card declined"))
        })
        .await;
    ensure!(matches!(failed, Err(RunError::Task(_))), "{failed:?}");
    ensure!(
        o.outcome(&key).await?.is_none(),
        "a failure stores no outcome"
    );
    let retry: Run = o
        .run(&key, HOUR, || async { Ok("second try".to_string()) })
        .await;
    ensure!(
        matches!(&retry, Ok(Outcome::Executed(v)) if v == "second try"),
        "{retry:?}"
    );
    Ok(())
}

async fn outcome_expires_with_its_ttl(w: World) -> Result<()> {
    let o = once(&w).await?;
    let key = unique("job");
    let ttl = Duration::from_millis(300).max(o.capabilities().min_ttl);
    let _: Run = o.run(&key, ttl, || async { Ok("first".to_string()) }).await;
    tokio::time::sleep(ttl * 2 + Duration::from_millis(600)).await;
    let again: Run = o.run(&key, ttl, || async { Ok("again".to_string()) }).await;
    ensure!(
        matches!(&again, Ok(Outcome::Executed(v)) if v == "again"),
        "{again:?}"
    );
    Ok(())
}

async fn reset_forgets_the_key(w: World) -> Result<()> {
    let o = once(&w).await?;
    let key = unique("job");
    let _: Run = o.run(&key, HOUR, || async { Ok("one".to_string()) }).await;
    ensure!(o.reset(&key).await?, "reset of a done key");
    ensure!(!o.reset(&key).await?, "nothing left to reset");
    let again: Run = o.run(&key, HOUR, || async { Ok("two".to_string()) }).await;
    ensure!(again.map(|x| x.executed()).unwrap_or(false));
    Ok(())
}

async fn stale_claims_cannot_complete(w: World) -> Result<()> {
    let o = once(&w).await?;
    let key = unique("job");
    let im_infra::once::Claim::Acquired { token } = o.claim(&key, HOUR).await? else {
        bail!("a fresh key must be claimable")
    };
    match o.claim(&key, HOUR).await? {
        im_infra::once::Claim::InProgress => {}
        other => bail!("a claimed key is in progress, got {other:?}"),
    }
    let wrong = o
        .complete(&key, "not-the-token", bytes::Bytes::from_static(b"1"), HOUR)
        .await;
    ensure!(
        wrong.err().map(|e| e.kind()) == Some(ErrorKind::LockNotHeld),
        "wrong token must not complete"
    );
    o.complete(&key, &token, bytes::Bytes::from_static(b"1"), HOUR)
        .await?;
    Ok(())
}

async fn bad_input_is_invalid_argument(w: World) -> Result<()> {
    let o = once(&w).await?;
    let r: Run = o.run("", HOUR, || async { Ok(String::new()) }).await;
    ensure!(
        matches!(&r, Err(RunError::Infra(e)) if e.kind() == ErrorKind::InvalidArgument),
        "{r:?}"
    );
    let r: Run = o
        .run("k", Duration::ZERO, || async { Ok(String::new()) })
        .await;
    ensure!(
        matches!(&r, Err(RunError::Infra(e)) if e.kind() == ErrorKind::InvalidArgument),
        "{r:?}"
    );
    ensure!(o.claim("", HOUR).await.err().map(|e| e.kind()) == Some(ErrorKind::InvalidArgument));
    Ok(())
}

/// A claim TTL the backend honours, short enough to expire several times
/// during a test. One second, renewed every third of it: at 300 ms the
/// renewals on a loaded 2-core CI machine once fell more than 200 ms
/// behind on MySQL, the claim lapsed and a peer ran the work (one
/// clean-clone run in three).
fn short_claim(o: &Arc<dyn Once>) -> Duration {
    Duration::from_secs(1).max(o.capabilities().min_ttl)
}

async fn a_long_run_keeps_its_claim(w: World) -> Result<()> {
    let o = once(&w).await?;
    let peer = w.peer.once().await?;
    let key = unique("job");
    let claim = short_claim(&o);
    let opts = OnceOptions::new(HOUR).claim_ttl(claim);
    let work = o.run_with(&key, opts, || async {
        tokio::time::sleep(claim * 3).await;
        Ok::<_, std::io::Error>("done".to_string())
    });
    let probe = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let until = tokio::time::Instant::now() + claim * 5 / 2;
        while tokio::time::Instant::now() < until {
            let r: Run = peer
                .run(&key, HOUR, || async { Ok("twice".to_string()) })
                .await;
            match r {
                Err(RunError::Infra(e)) if e.kind() == ErrorKind::InProgress => {}
                other => bail!("while the work runs past its claim TTL: {other:?}"),
            }
            tokio::time::sleep(claim / 4).await;
        }
        Ok(())
    };
    let (done, probed) = tokio::join!(work, probe);
    probed?;
    ensure!(
        matches!(&done, Ok(Outcome::Executed(v)) if v == "done"),
        "{done:?}"
    );
    Ok(())
}

/// A peer runs the work of `key` within `within` (the first caller's claim
/// was released, not left to expire).
async fn peer_runs_soon(w: &World, key: &str, within: Duration) -> Result<()> {
    let peer = w.peer.once().await?;
    let until = tokio::time::Instant::now() + within;
    loop {
        let r: Run = peer
            .run(key, HOUR, || async { Ok("second".to_string()) })
            .await;
        match r {
            Ok(Outcome::Executed(_)) => return Ok(()),
            Err(RunError::Infra(e))
                if e.kind() == ErrorKind::InProgress && tokio::time::Instant::now() < until =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => bail!("the key is still blocked: {other:?}"),
        }
    }
}

async fn a_cancelled_run_releases_the_key(w: World) -> Result<()> {
    let o = once(&w).await?;
    let key = unique("job");
    let opts = OnceOptions::new(HOUR).claim_ttl(Duration::from_secs(60));
    let run = o.run_with(&key, opts, || async {
        std::future::pending::<()>().await;
        Ok::<_, std::io::Error>(String::new())
    });
    ensure!(
        tokio::time::timeout(Duration::from_millis(200), run)
            .await
            .is_err(),
        "the work never finishes"
    );
    // Not 60 s: the dropped run released its claim.
    peer_runs_soon(&w, &key, Duration::from_secs(5)).await
}

/// A caller that goes away as soon as its work returned (its future
/// dropped while the outcome is being stored) leaves the work done: a
/// later caller waits for the outcome and never runs it again.
async fn a_caller_gone_after_its_work_ran_leaves_it_done(w: World) -> Result<()> {
    let o = once(&w).await?;
    let key = unique("job");
    let runs = AtomicUsize::new(0);
    let returned = tokio::sync::Notify::new();
    let run = o.run(&key, HOUR, || async {
        runs.fetch_add(1, Ordering::SeqCst);
        returned.notify_one();
        Ok::<_, std::io::Error>("receipt".to_string())
    });
    tokio::select! {
        _ = run => {}
        _ = returned.notified() => {}
    }
    let opts = OnceOptions::new(HOUR).wait(Duration::from_secs(10));
    let later: Run = w
        .peer
        .once()
        .await?
        .run_with(&key, opts, || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok("again".to_string())
        })
        .await;
    ensure!(
        matches!(&later, Ok(Outcome::AlreadyDone(v)) if v == "receipt"),
        "{later:?}"
    );
    ensure!(runs.load(Ordering::SeqCst) == 1, "the work ran twice");
    Ok(())
}

async fn a_panicking_run_releases_the_key(w: World) -> Result<()> {
    let o = once(&w).await?;
    let key = unique("job");
    let k = key.clone();
    let task = tokio::spawn(async move {
        let opts = OnceOptions::new(HOUR).claim_ttl(Duration::from_secs(60));
        let _: Run = o
            .run_with(&k, opts, || async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                panic!("expected: this case checks that a panicking run releases its key");
            })
            .await;
    });
    ensure!(task.await.is_err_and(|e| e.is_panic()), "the run panicked");
    peer_runs_soon(&w, &key, Duration::from_secs(5)).await
}

async fn an_oversized_outcome_never_reruns_the_work(w: World) -> Result<()> {
    let o = once(&w).await?;
    let limit = o.capabilities().max_outcome_bytes;
    if limit > 16 << 20 {
        // Nothing that large in a test; the local check is the same.
        return Ok(());
    }
    let key = unique("job");
    let runs = AtomicUsize::new(0);
    let big = "x".repeat(limit + 1);
    let first: Run = o
        .run(&key, HOUR, || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(big.clone())
        })
        .await;
    ensure!(
        matches!(&first, Ok(Outcome::Executed(v)) if v.len() == limit + 1),
        "the caller that ran the work gets its output: {:?}",
        first.as_ref().map(|o| o.executed())
    );
    let second: Run = o
        .run(&key, HOUR, || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok("again".to_string())
        })
        .await;
    ensure!(
        matches!(&second, Err(RunError::Infra(e)) if e.kind() == ErrorKind::Serialization),
        "later callers learn the outcome was not kept: {second:?}"
    );
    ensure!(runs.load(Ordering::SeqCst) == 1, "the work ran again");
    Ok(())
}

async fn wait_without_limit_gets_the_outcome(w: World) -> Result<()> {
    let o = once(&w).await?;
    let peer = w.peer.once().await?;
    let key = unique("job");
    let first = o.run(&key, HOUR, || async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok::<_, std::io::Error>("result".to_string())
    });
    let second = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peer.run_with(&key, OnceOptions::new(HOUR).wait(Duration::MAX), || async {
            Ok::<_, std::io::Error>("not me".to_string())
        })
        .await
    };
    let (a, b) = tokio::join!(first, second);
    ensure!(
        matches!(&a, Ok(Outcome::Executed(v)) if v == "result"),
        "{a:?}"
    );
    ensure!(
        matches!(&b, Ok(Outcome::AlreadyDone(v)) if v == "result"),
        "{b:?}"
    );
    Ok(())
}

/// The once cases.
pub fn cases() -> Vec<Case> {
    let on = |c: &crate::harness::Claims| c.has(Capability::Once);
    vec![
        crate::case!("once", runs_once_then_returns_the_stored_outcome, when = on),
        crate::case!("once", concurrent_callers_run_the_work_once, when = on),
        crate::case!("once", waiting_callers_get_the_outcome, when = on),
        crate::case!("once", failed_work_releases_the_key, when = on),
        crate::case!("once", outcome_expires_with_its_ttl, when = on),
        crate::case!("once", reset_forgets_the_key, when = on),
        crate::case!("once", stale_claims_cannot_complete, when = on),
        crate::case!("once", bad_input_is_invalid_argument, when = on),
        crate::case!("once", a_long_run_keeps_its_claim, when = on),
        crate::case!("once", a_cancelled_run_releases_the_key, when = on),
        crate::case!("once", a_panicking_run_releases_the_key, when = on),
        crate::case!(
            "once",
            a_caller_gone_after_its_work_ran_leaves_it_done,
            when = on
        ),
        crate::case!(
            "once",
            an_oversized_outcome_never_reruns_the_work,
            when = on
        ),
        crate::case!("once", wait_without_limit_gets_the_outcome, when = on),
    ]
}
