//! etcd calls that etcd applied but whose answer was lost (the call timed
//! out): what was promised must still hold. Against the server from
//! `scripts/services.sh` (`IMINFRA_ETCD_ENDPOINTS`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{ensure, Result};
use im_infra::backend::Backend;
use im_infra::lock::LockOptions;
use im_infra::once::{OnceExt, Outcome};
use im_infra::registry::ServiceInstance;
use im_infra::ErrorKind;
use im_infra_conformance::cases::eventually;
use im_infra_conformance::servers::{server_or_skip, ETCD_ENV};
use im_infra_etcd::{EtcdBackend, EtcdSettings};

async fn backend(endpoints: &str, namespace: &str) -> Result<EtcdBackend> {
    let mut settings = EtcdSettings::with_endpoints(endpoints.split(',').map(str::to_owned));
    settings.namespace = namespace.to_owned();
    Ok(EtcdBackend::builder().settings(settings).build().await?)
}

fn namespace() -> String {
    format!("/lost-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// A refresh to a TTL of other whole seconds moves the lock's key to a new
/// lease. When etcd moved it but the answer was lost, the lock stays held
/// by its holder alone: the new lease is not revoked with the key on it,
/// the next renewal finds the key there and renews that lease, and the
/// next refresh succeeds.
#[tokio::test]
async fn a_lock_refresh_whose_answer_was_lost_keeps_the_lock() -> Result<()> {
    let Some(eps) = server_or_skip("etcd", ETCD_ENV) else {
        return Ok(());
    };
    let ns = namespace();
    let (holder, other) = (backend(&eps, &ns).await?, backend(&eps, &ns).await?);
    let ten = LockOptions::new(Duration::from_secs(10));
    let guard = holder.lock().await?.acquire("job", ten).await?;
    holder.connection().lose_next_answer("lock.refresh");
    let err = guard
        .refresh(Duration::from_secs(20))
        .await
        .expect_err("the answer was lost");
    ensure!(err.kind() == ErrorKind::Timeout, "{err}");
    // Past the next renewal (a third of 10 s), which finds the key on the
    // new lease and renews that one.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let others = other.lock().await?;
    ensure!(guard.is_held(), "the holder still holds the lock");
    ensure!(
        others.try_acquire("job", ten).await?.is_none(),
        "another caller took the lock after a refresh whose answer was lost"
    );
    guard.refresh(Duration::from_secs(20)).await?;
    ensure!(guard.ttl() == Duration::from_secs(20), "{:?}", guard.ttl());
    ensure!(others.try_acquire("job", ten).await?.is_none());
    guard.release().await?;
    ensure!(
        others.try_acquire("job", ten).await?.is_some(),
        "released at the end"
    );
    holder.close().await?;
    other.close().await?;
    Ok(())
}

/// A registration whose put etcd applied but whose answer was lost fails,
/// and leaves no instance for others to find: its lease is revoked, so the
/// instance goes at once, not after its TTL.
#[tokio::test]
async fn a_registration_whose_answer_was_lost_leaves_no_instance() -> Result<()> {
    let Some(eps) = server_or_skip("etcd", ETCD_ENV) else {
        return Ok(());
    };
    let ns = namespace();
    let (holder, other) = (backend(&eps, &ns).await?, backend(&eps, &ns).await?);
    let instance = ServiceInstance::new("svc", "a", "127.0.0.1:1");
    holder.connection().lose_next_answer("registry.put");
    let err = holder
        .registry()
        .await?
        .register(&instance, Duration::from_secs(60))
        .await
        .expect_err("the answer was lost");
    ensure!(err.kind() == ErrorKind::Timeout, "{err}");
    let discovery = other.discovery().await?;
    eventually(
        Duration::from_secs(5),
        "the instance of a failed registration is gone",
        || async { Ok(discovery.instances("svc").await?.is_empty()) },
    )
    .await?;
    // Registering again works and is found.
    holder
        .registry()
        .await?
        .register(&instance, Duration::from_secs(60))
        .await?;
    let found = discovery.instances("svc").await?;
    ensure!(found.len() == 1 && found[0].id == "a", "{found:?}");
    holder.close().await?;
    other.close().await?;
    Ok(())
}

/// A once-claim completion etcd applied but whose answer was lost: the
/// retry finds the key done by this claim, the caller gets its own
/// outcome, and a later caller gets it as already done, the work having
/// run once.
#[tokio::test]
async fn a_completion_whose_answer_was_lost_is_done_once() -> Result<()> {
    let Some(eps) = server_or_skip("etcd", ETCD_ENV) else {
        return Ok(());
    };
    let ns = namespace();
    let (holder, other) = (backend(&eps, &ns).await?, backend(&eps, &ns).await?);
    let runs = AtomicUsize::new(0);
    let hour = Duration::from_secs(3600);
    holder.connection().lose_next_answer("once.complete");
    let first = holder
        .once()
        .await?
        .run("job", hour, || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>("receipt".to_string())
        })
        .await;
    ensure!(
        matches!(&first, Ok(Outcome::Executed(v)) if v == "receipt"),
        "{first:?}"
    );
    let later = other
        .once()
        .await?
        .run("job", hour, || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>("again".to_string())
        })
        .await;
    ensure!(
        matches!(&later, Ok(Outcome::AlreadyDone(v)) if v == "receipt"),
        "{later:?}"
    );
    ensure!(runs.load(Ordering::SeqCst) == 1, "the work ran twice");
    holder.close().await?;
    other.close().await?;
    Ok(())
}
