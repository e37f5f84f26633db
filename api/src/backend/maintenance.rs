//! [`Maintenance`]: what tests and tear-down tools ask of a backend beyond
//! its capabilities, with the same names, argument checks and telemetry on
//! every backend.
//!
//! A backend implements [`RawMaintenance`], only what its server does;
//! every such backend is then a [`Maintenance`], which checks the
//! arguments, runs each operation in one `im_infra.op` span and counts it
//! (capability `maintenance`, ops `maintenance.purge_namespace`, ...; see
//! [`telemetry`](crate::telemetry)).

use async_trait::async_trait;

use super::Backend;
use crate::error::{Error, Result};
use crate::telemetry::OpMetrics;
use crate::validate;

/// Tear-down and fault injection, the same on every backend. An operation
/// a backend cannot do answers `Unsupported`.
///
/// Implemented for every [`RawMaintenance`]; backends implement that.
///
/// ```
/// use im_infra::backend::Maintenance;
///
/// // After a test: nothing of the namespace stays behind.
/// async fn tear_down(backend: &impl Maintenance) -> im_infra::Result<()> {
///     let removed = backend.purge_namespace().await?;
///     println!("{removed} keys or rows removed");
///     backend.close().await
/// }
/// ```
#[async_trait]
pub trait Maintenance: Backend {
    /// Deletes everything stored under the backend's namespace (keys,
    /// rows, leases); how many keys or rows were deleted. For tests and
    /// tear-down tools: a backend still in use may write again afterwards.
    ///
    /// Refused (`InvalidArgument`) when the backend shares its store and
    /// its namespace is empty: "everything under the namespace" would then
    /// be everything every other namespace stored there too.
    async fn purge_namespace(&self) -> Result<u64>;

    /// Fault injection: ends the lease of registered instance `id` of
    /// `service` now, as if it had expired; `false` if it was not
    /// registered. Its registry notices and registers it again.
    async fn revoke_registration(&self, service: &str, id: &str) -> Result<bool>;

    /// Fault injection: ends the lease of worker id `id` now, as if it had
    /// expired; `false` if it was not leased.
    async fn revoke_worker_id(&self, id: u64) -> Result<bool>;

    /// Discards the config change history up to now, so that a watch
    /// resuming from an older version must resynchronise from the current
    /// state.
    async fn compact_config_history(&self) -> Result<()>;
}

/// What a backend's server does for [`Maintenance`], without argument
/// checks or telemetry: [`Maintenance`] adds those, once for every backend.
/// An operation not overridden answers `Unsupported`.
///
/// ```
/// use std::sync::Arc;
///
/// use async_trait::async_trait;
/// use im_infra::backend::{Backend, Capability, Maintenance, RawMaintenance};
///
/// /// A backend over a store it shares with others, under a namespace.
/// struct Shared {
///     namespace: String,
/// }
///
/// #[async_trait]
/// impl Backend for Shared {
///     fn name(&self) -> &'static str {
///         "shared"
///     }
///     fn capabilities(&self) -> &'static [Capability] {
///         &[]
///     }
///     async fn health_check(&self) -> im_infra::Result<()> {
///         Ok(())
///     }
///     async fn close(&self) -> im_infra::Result<()> {
///         Ok(())
///     }
/// }
///
/// #[async_trait]
/// impl RawMaintenance for Shared {
///     fn namespace(&self) -> Option<&str> {
///         Some(&self.namespace)
///     }
///     async fn purge_namespace(&self) -> im_infra::Result<u64> {
///         Ok(3) // what the server deleted
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let named = Shared { namespace: "chat".into() };
/// assert_eq!(Maintenance::purge_namespace(&named).await.unwrap(), 3);
///
/// // Everything in a shared store is not one namespace's to purge.
/// let unnamed = Shared { namespace: String::new() };
/// let err = Maintenance::purge_namespace(&unnamed).await.unwrap_err();
/// assert_eq!(err.kind(), im_infra::ErrorKind::InvalidArgument);
/// assert_eq!(err.operation(), Some("maintenance.purge_namespace"));
///
/// let err = Maintenance::revoke_worker_id(&named, 7).await.unwrap_err();
/// assert_eq!(err.kind(), im_infra::ErrorKind::Unsupported);
/// # }
/// ```
#[async_trait]
pub trait RawMaintenance: Backend {
    /// The namespace [`purge_namespace`](Self::purge_namespace) deletes;
    /// `None` when the backend's store is its own (in process), so that
    /// everything in it is the backend's.
    fn namespace(&self) -> Option<&str>;

    /// Deletes everything stored under [`namespace`](Self::namespace).
    /// Called only with a namespace that is not empty.
    async fn purge_namespace(&self) -> Result<u64>;

    /// Ends the lease of registered instance `id` of `service` now.
    async fn revoke_registration(&self, service: &str, id: &str) -> Result<bool> {
        let _ = (service, id);
        Err(Error::unsupported("maintenance.revoke_registration"))
    }

    /// Ends the lease of worker id `id` now.
    async fn revoke_worker_id(&self, id: u64) -> Result<bool> {
        let _ = id;
        Err(Error::unsupported("maintenance.revoke_worker_id"))
    }

    /// Discards the config change history up to now.
    async fn compact_config_history(&self) -> Result<()> {
        Err(Error::unsupported("maintenance.compact_config_history"))
    }
}

/// One run of a maintenance operation of `backend`: its span, its counts,
/// and the operation and backend stamped on an error. Maintenance is rare,
/// so the handles are registered per run.
fn observed(backend: &(impl Backend + ?Sized), op: &'static str) -> OpMetrics {
    OpMetrics::new(backend.name(), "maintenance", op)
}

#[async_trait]
impl<B: RawMaintenance + ?Sized> Maintenance for B {
    async fn purge_namespace(&self) -> Result<u64> {
        let ops = observed(self, "maintenance.purge_namespace");
        ops.run(async {
            if self.namespace() == Some("") {
                return Err(Error::invalid_argument(
                    "refusing to purge an empty namespace of a shared store: \
                     that would delete every other namespace's data too",
                ));
            }
            RawMaintenance::purge_namespace(self).await
        })
        .await
    }

    async fn revoke_registration(&self, service: &str, id: &str) -> Result<bool> {
        let ops = observed(self, "maintenance.revoke_registration");
        ops.run(async {
            validate::name("service name", service)?;
            validate::name("instance id", id)?;
            RawMaintenance::revoke_registration(self, service, id).await
        })
        .await
    }

    async fn revoke_worker_id(&self, id: u64) -> Result<bool> {
        let ops = observed(self, "maintenance.revoke_worker_id");
        ops.run(RawMaintenance::revoke_worker_id(self, id)).await
    }

    async fn compact_config_history(&self) -> Result<()> {
        let ops = observed(self, "maintenance.compact_config_history");
        ops.run(RawMaintenance::compact_config_history(self)).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::backend::Capability;
    use crate::ErrorKind;

    /// A raw backend that counts the calls that reach it.
    struct Raw {
        namespace: Option<&'static str>,
        calls: AtomicUsize,
    }

    impl Raw {
        fn new(namespace: Option<&'static str>) -> Self {
            Raw {
                namespace,
                calls: AtomicUsize::new(0),
            }
        }

        fn called(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl Backend for Raw {
        fn name(&self) -> &'static str {
            "raw"
        }
        fn capabilities(&self) -> &'static [Capability] {
            &[]
        }
        async fn health_check(&self) -> Result<()> {
            Ok(())
        }
        async fn close(&self) -> Result<()> {
            Ok(())
        }
    }

    #[async_trait]
    impl RawMaintenance for Raw {
        fn namespace(&self) -> Option<&str> {
            self.namespace
        }
        async fn purge_namespace(&self) -> Result<u64> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(5)
        }
        async fn revoke_registration(&self, _service: &str, _id: &str) -> Result<bool> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(true)
        }
    }

    #[tokio::test]
    async fn an_empty_namespace_of_a_shared_store_is_never_purged() {
        let raw = Raw::new(Some(""));
        let err = Maintenance::purge_namespace(&raw).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert_eq!(err.operation(), Some("maintenance.purge_namespace"));
        assert_eq!(err.backend(), Some("raw"));
        assert_eq!(raw.called(), 0, "the server must not be asked");
    }

    #[tokio::test]
    async fn a_named_namespace_or_a_store_of_its_own_is_purged() {
        for namespace in [Some("chat"), None] {
            let raw = Raw::new(namespace);
            assert_eq!(Maintenance::purge_namespace(&raw).await.unwrap(), 5);
            assert_eq!(raw.called(), 1);
        }
    }

    #[tokio::test]
    async fn a_bad_service_or_instance_is_refused_before_the_server_is_asked() {
        let raw = Raw::new(Some("chat"));
        for (service, id) in [("", "i1"), ("svc", ""), ("a/b", "i1"), ("svc", "i 1")] {
            let err = Maintenance::revoke_registration(&raw, service, id)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{service:?}/{id:?}");
        }
        assert_eq!(raw.called(), 0);
        assert!(Maintenance::revoke_registration(&raw, "svc", "i1")
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn what_a_backend_does_not_do_is_unsupported_and_names_itself() {
        let raw = Raw::new(Some("chat"));
        let err = Maintenance::revoke_worker_id(&raw, 3).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert_eq!(err.operation(), Some("maintenance.revoke_worker_id"));
        assert_eq!(err.backend(), Some("raw"));
        let err = Maintenance::compact_config_history(&raw).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
    }
}
