//! Worlds and hooks for any backend that implements
//! [`Maintenance`]: a fixture supplies only how to connect on a namespace.

use std::future::Future;
use std::sync::Arc;

use anyhow::{ensure, Result};
use async_trait::async_trait;
use futures::future::BoxFuture;
use im_infra::backend::Maintenance;

use crate::{Fixture, Hooks, World};

/// Connects a backend on a namespace.
type Connect<B> = Arc<dyn Fn(String) -> BoxFuture<'static, Result<B>> + Send + Sync>;

/// A world of two instances of one backend on the fresh namespace `ns`,
/// each made by `connect`, with [`Maintenance`] as its hooks. Its cleanup
/// closes both, then purges the namespace through a third instance: so
/// nothing the two ran in the background (a keep-alive, a registration)
/// writes after the purge.
///
/// ```no_run
/// use std::future::Future;
///
/// use im_infra::backend::Maintenance;
/// use im_infra_conformance::{cases::unique, maintained, World};
///
/// // A fixture's `world`, given how its backend connects on a namespace.
/// async fn fresh<B, Fut>(connect: fn(String) -> Fut) -> anyhow::Result<World>
/// where
///     B: Maintenance + Clone + 'static,
///     Fut: Future<Output = anyhow::Result<B>> + Send + 'static,
/// {
///     maintained::world(unique("t"), connect).await
/// }
/// ```
pub async fn world<B, F, Fut>(ns: String, connect: F) -> Result<World>
where
    B: Maintenance + Clone + 'static,
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<B>> + Send + 'static,
{
    let connect: Connect<B> = Arc::new(move |ns| Box::pin(connect(ns)));
    let backend = connect(ns.clone()).await?;
    let peer = connect(ns.clone()).await?;
    Ok(World {
        backend: Arc::new(backend.clone()),
        peer: Arc::new(peer.clone()),
        hooks: Arc::new(MaintainedHooks {
            ns,
            connect,
            backend,
            peer,
        }),
    })
}

/// A fixture whose worlds are [`world`]s: each on a fresh namespace from
/// `namespace`, each instance made by `connect(address, namespace)`, where
/// `address` is the server address the runner read from the target's
/// environment variable. All a backend needs for its
/// [`Target`](crate::Target):
///
/// ```no_run
/// use im_infra_conformance::{cases::unique, maintained, SuiteKind, Target};
/// # #[derive(Clone)]
/// # struct MyBackend;
/// # #[async_trait::async_trait]
/// # impl im_infra::backend::Backend for MyBackend {
/// #     fn name(&self) -> &'static str { "mine" }
/// #     fn capabilities(&self) -> &'static [im_infra::backend::Capability] { &[] }
/// #     async fn health_check(&self) -> im_infra::Result<()> { Ok(()) }
/// #     async fn close(&self) -> im_infra::Result<()> { Ok(()) }
/// # }
/// # #[async_trait::async_trait]
/// # impl im_infra::backend::RawMaintenance for MyBackend {
/// #     fn namespace(&self) -> Option<&str> { None }
/// #     async fn purge_namespace(&self) -> im_infra::Result<u64> { Ok(0) }
/// # }
/// # async fn connect_mine(_url: &str, _ns: &str) -> im_infra::Result<MyBackend> { Ok(MyBackend) }
///
/// async fn connect(url: String, ns: String) -> anyhow::Result<MyBackend> {
///     Ok(connect_mine(&url, &ns).await?)
/// }
///
/// pub fn target() -> Target {
///     Target {
///         backend: "mine",
///         env_var: Some("MINE_URL"),
///         fixture: Some(|url| Ok(maintained::fixture(url, || unique("t"), connect))),
///         suite: SuiteKind::Contract,
///     }
/// }
/// ```
pub fn fixture<B, Fut>(
    address: &str,
    namespace: fn() -> String,
    connect: fn(String, String) -> Fut,
) -> Arc<dyn Fixture>
where
    B: Maintenance + Clone + 'static,
    Fut: Future<Output = Result<B>> + Send + 'static,
{
    Arc::new(MaintainedFixture {
        address: address.to_owned(),
        namespace,
        connect,
    })
}

/// The fixture made by [`fixture`].
struct MaintainedFixture<Fut> {
    address: String,
    namespace: fn() -> String,
    connect: fn(String, String) -> Fut,
}

#[async_trait]
impl<B, Fut> Fixture for MaintainedFixture<Fut>
where
    B: Maintenance + Clone + 'static,
    Fut: Future<Output = Result<B>> + Send + 'static,
{
    async fn world(&self) -> Result<World> {
        let (address, connect) = (self.address.clone(), self.connect);
        world((self.namespace)(), move |ns| connect(address.clone(), ns)).await
    }
}

/// The hooks of a world made by [`world`].
struct MaintainedHooks<B> {
    ns: String,
    connect: Connect<B>,
    backend: B,
    peer: B,
}

#[async_trait]
impl<B: Maintenance + Clone + 'static> Hooks for MaintainedHooks<B> {
    async fn revoke_registration(&self, service: &str, id: &str) -> Result<()> {
        let revoked = self.backend.revoke_registration(service, id).await?;
        ensure!(revoked, "{service}/{id} was not registered");
        Ok(())
    }

    async fn revoke_worker_id(&self, id: u64) -> Result<()> {
        let revoked = self.backend.revoke_worker_id(id).await?;
        ensure!(revoked, "worker id {id} was not leased");
        Ok(())
    }

    async fn compact_config_history(&self) -> Result<()> {
        Ok(self.backend.compact_config_history().await?)
    }

    async fn cleanup(&self) -> Result<()> {
        self.peer.close().await?;
        self.backend.close().await?;
        let sweeper = (self.connect)(self.ns.clone()).await?;
        sweeper.purge_namespace().await?;
        sweeper.close().await?;
        Ok(())
    }
}
