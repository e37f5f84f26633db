//! [`Maintenance`]: what tests and tear-down tools ask of a backend beyond
//! its capabilities, with the same names and shapes on every backend.

use async_trait::async_trait;

use super::Backend;
use crate::error::{Error, Result};

/// Tear-down and fault injection, the same on every backend that stores
/// state on a server. An operation a backend cannot do answers
/// `Unsupported`.
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
    async fn purge_namespace(&self) -> Result<u64>;

    /// Fault injection: ends the lease of registered instance `id` of
    /// `service` now, as if it had expired; `false` if it was not
    /// registered. Its registry notices and registers it again.
    async fn revoke_registration(&self, service: &str, id: &str) -> Result<bool> {
        let _ = (service, id);
        Err(Error::unsupported("maintenance.revoke_registration").with_backend(self.name()))
    }

    /// Fault injection: ends the lease of worker id `id` now, as if it had
    /// expired; `false` if it was not leased.
    async fn revoke_worker_id(&self, id: u64) -> Result<bool> {
        let _ = id;
        Err(Error::unsupported("maintenance.revoke_worker_id").with_backend(self.name()))
    }

    /// Discards the config change history up to now, so that a watch
    /// resuming from an older version must resynchronise from the current
    /// state.
    async fn compact_config_history(&self) -> Result<()> {
        Err(Error::unsupported("maintenance.compact_config_history").with_backend(self.name()))
    }
}
