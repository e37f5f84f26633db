//! etcd calls that etcd applied but whose answer was lost (the call timed
//! out): what was promised must still hold. Against the server from
//! `scripts/services.sh` (`IMINFRA_ETCD_ENDPOINTS`).

use std::time::Duration;

use anyhow::{ensure, Result};
use im_infra::backend::Backend;
use im_infra::lock::LockOptions;
use im_infra::ErrorKind;
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
