//! Run a piece of work at most once per key (idempotency).
//!
//! Across every process sharing the backend, the work of a key completes
//! successfully at most once within the TTL. While it runs, other callers
//! get `InProgress` (or wait, with [`OnceOptions::wait`]); if it fails,
//! panics or is cancelled, the key is released so a retry can run it; its
//! outcome is stored and handed to later callers. Once the work returned,
//! its outcome is stored by a task of its own, also when the caller goes
//! away meanwhile (its future dropped); the key is never released after
//! the work ran.
//!
//! While the work runs, the key is held by a short *claim* (its own TTL,
//! [`OnceOptions::claim_ttl`], 10 s by default) kept by a
//! [`Lease`]: renewed in the background, ended at its
//! local deadline if the backend cannot be reached. A crashed caller blocks
//! the key for one claim TTL, not for the outcome's TTL. If the claim was
//! lost while the work ran (the backend unreachable past the deadline),
//! another caller may have run the work; the first caller's completion is
//! then refused with `LockNotHeld`.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use im_infra::once::{Once, OnceExt, Outcome};
//!
//! async fn pay(once: Arc<dyn Once>, order: &str) -> Result<u64, Box<dyn std::error::Error>> {
//!     let receipt = once
//!         .run(&format!("pay:{order}"), Duration::from_secs(3600), || async {
//!             // charge the card exactly once
//!             Ok::<u64, std::io::Error>(7001)
//!         })
//!         .await?;
//!     match &receipt {
//!         Outcome::Executed(id) => println!("charged, receipt {id}"),
//!         Outcome::AlreadyDone(id) => println!("already charged, receipt {id}"),
//!     }
//!     Ok(receipt.into_inner())
//! }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::lease::{Lease, LeaseBackend, LeaseOptions, Tick};

/// The answer of [`Once::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This caller may run the work; pass the token to `complete`/`abandon`.
    Acquired {
        /// Identifies this claim.
        token: String,
    },
    /// Another caller is running the work now.
    InProgress,
    /// The work already completed; its stored outcome.
    Done(Bytes),
}

/// What an idempotency backend offers.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnceCapabilities {
    /// The shortest TTL honoured; shorter TTLs are rounded up.
    pub min_ttl: Duration,
    /// The largest outcome stored, in bytes.
    pub max_outcome_bytes: usize,
}

impl Default for OnceCapabilities {
    fn default() -> Self {
        OnceCapabilities {
            min_ttl: Duration::from_millis(1),
            max_outcome_bytes: usize::MAX,
        }
    }
}

impl OnceCapabilities {
    /// TTLs honoured down to `min_ttl`.
    #[must_use]
    pub fn with_min_ttl(mut self, min_ttl: Duration) -> Self {
        self.min_ttl = min_ttl;
        self
    }

    /// Outcomes stored up to `bytes`.
    #[must_use]
    pub fn with_max_outcome(mut self, bytes: usize) -> Self {
        self.max_outcome_bytes = bytes;
        self
    }
}

/// `LockNotHeld`: the claim on `key` expired or belongs to another caller —
/// what [`Once::complete`] and [`Once::abandon`] answer then, on every
/// backend.
///
/// ```
/// let e = im_infra::once::not_held("order:42");
/// assert_eq!(e.kind(), im_infra::ErrorKind::LockNotHeld);
/// ```
pub fn not_held(key: &str) -> Error {
    Error::new(
        ErrorKind::LockNotHeld,
        format!("the claim on {key:?} expired or belongs to another caller"),
    )
}

/// How a backend renews and abandons one claim: all it writes to keep a
/// claim alive while its work runs, with [`claim_lease`] as its
/// [`Once::claim_lease`].
#[async_trait]
pub trait ClaimStore: Send + Sync + 'static {
    /// Extends `token`'s live claim on `key` to `ttl`; true also when
    /// `token` completed it (the work is done: nothing left to keep).
    async fn renew_claim(&self, key: &str, token: &str, ttl: Duration) -> Result<bool>;

    /// Removes `token`'s live claim on `key`; whether it was there.
    async fn abandon_claim(&self, key: &str, token: &str) -> Result<bool>;

    /// Marks `token`'s claim on `key` done with `outcome`, kept for `ttl`
    /// ([`Once::complete`]).
    async fn complete_claim(
        &self,
        key: &str,
        token: &str,
        outcome: Bytes,
        ttl: Duration,
    ) -> Result<()>;
}

/// One claim, owned: kept by the lease core while the work runs
/// ([`LeaseBackend`]: `extend` renews it, `release` abandons it), and
/// completed by it once the work ran, also after the caller went away.
#[async_trait]
pub trait ClaimLease: LeaseBackend {
    /// [`Once::complete`] for this claim.
    async fn complete(&self, outcome: Bytes, ttl: Duration) -> Result<()>;
}

/// The claim `token` on `key` in `store`, for the lease core to keep and
/// for [`OnceExt::run`] to complete.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use async_trait::async_trait;
/// use bytes::Bytes;
/// use im_infra::once::{claim_lease, ClaimStore};
///
/// struct Claims;
///
/// #[async_trait]
/// impl ClaimStore for Claims {
///     async fn renew_claim(&self, _: &str, token: &str, _: Duration) -> im_infra::Result<bool> {
///         Ok(token == "mine")
///     }
///     async fn abandon_claim(&self, _: &str, _: &str) -> im_infra::Result<bool> {
///         Ok(false)
///     }
///     async fn complete_claim(&self, key: &str, _: &str, _: Bytes, _: Duration) -> im_infra::Result<()> {
///         Err(im_infra::once::not_held(key))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> im_infra::Result<()> {
/// let claim = claim_lease(Arc::new(Claims), "order:42", "mine");
/// assert!(claim.extend(Duration::from_secs(1)).await?);
/// assert!(!claim.release().await?);
/// assert!(claim.complete(Bytes::new(), Duration::from_secs(1)).await.is_err());
/// assert_eq!(claim.describe(), "once claim \"order:42\"");
/// # Ok(()) }
/// ```
pub fn claim_lease<S: ClaimStore>(store: Arc<S>, key: &str, token: &str) -> Arc<dyn ClaimLease> {
    Arc::new(HeldClaim {
        store,
        key: key.to_owned(),
        token: token.to_owned(),
    })
}

/// A claim, as the lease core sees it.
struct HeldClaim<S> {
    store: Arc<S>,
    key: String,
    token: String,
}

#[async_trait]
impl<S: ClaimStore> LeaseBackend for HeldClaim<S> {
    fn describe(&self) -> String {
        format!("once claim {:?}", self.key)
    }

    async fn extend(&self, ttl: Duration) -> Result<bool> {
        self.store.renew_claim(&self.key, &self.token, ttl).await
    }

    async fn release(&self) -> Result<bool> {
        self.store.abandon_claim(&self.key, &self.token).await
    }
}

#[async_trait]
impl<S: ClaimStore> ClaimLease for HeldClaim<S> {
    async fn complete(&self, outcome: Bytes, ttl: Duration) -> Result<()> {
        self.store
            .complete_claim(&self.key, &self.token, outcome, ttl)
            .await
    }
}

/// The backend side of idempotency: claim, complete or abandon a key.
/// Use [`OnceExt::run`] rather than these primitives.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Once: Send + Sync + 'static {
    /// What this backend offers (default: millisecond TTLs).
    fn capabilities(&self) -> OnceCapabilities {
        OnceCapabilities::default()
    }

    /// Claims `key` for `ttl` unless it is claimed or done.
    async fn claim(&self, key: &str, ttl: Duration) -> Result<Claim>;

    /// The claim `token` on `key`, owned: the lease core keeps it while the
    /// work runs (`extend` renews it, true while it is this token's,
    /// running or completed by it; `release` abandons it), and
    /// [`ClaimLease::complete`] completes it.
    fn claim_lease(&self, key: &str, token: &str) -> Arc<dyn ClaimLease>;

    /// Marks a claimed key done with `outcome`, kept for `ttl`.
    /// `LockNotHeld` when the claim expired or belongs to someone else.
    async fn complete(&self, key: &str, token: &str, outcome: Bytes, ttl: Duration) -> Result<()>;

    /// Releases a claim after a failure so that a retry can run.
    /// `LockNotHeld` when the claim expired or belongs to someone else.
    async fn abandon(&self, key: &str, token: &str) -> Result<()>;

    /// The stored outcome of a done key.
    async fn outcome(&self, key: &str) -> Result<Option<Bytes>>;

    /// Forgets a key (done or claimed), so the work can run again; returns
    /// whether anything was stored.
    async fn reset(&self, key: &str) -> Result<bool>;
}

/// How [`OnceExt::run_with`] behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OnceOptions {
    /// How long the outcome is kept.
    pub ttl: Duration,
    /// The TTL of the claim while the work runs (renewed every third of it):
    /// how long a crashed caller blocks the key.
    pub claim_ttl: Duration,
    /// `None`: a caller that finds the work in progress gets `InProgress`.
    /// `Some(d)`: it waits up to `d` for the outcome (or runs the work itself
    /// if the running caller fails), then fails with `Timeout`.
    /// `Duration::MAX` waits without limit.
    pub wait: Option<Duration>,
}

impl OnceOptions {
    /// Default [`claim_ttl`](Self::claim_ttl).
    pub const DEFAULT_CLAIM_TTL: Duration = Duration::from_secs(10);

    /// Keep the outcome for `ttl`; claim for 10 s at a time; do not wait.
    pub fn new(ttl: Duration) -> Self {
        OnceOptions {
            ttl,
            claim_ttl: Self::DEFAULT_CLAIM_TTL,
            wait: None,
        }
    }

    /// Wait up to `d` for a running caller.
    #[must_use]
    pub fn wait(mut self, d: Duration) -> Self {
        self.wait = Some(d);
        self
    }

    /// Sets the claim's TTL.
    #[must_use]
    pub fn claim_ttl(mut self, d: Duration) -> Self {
        self.claim_ttl = d;
        self
    }
}

/// What [`OnceExt::run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// This call ran the work; its output.
    Executed(T),
    /// The work had already completed; the stored output.
    AlreadyDone(T),
}

impl<T> Outcome<T> {
    /// The output, whoever produced it.
    pub fn into_inner(self) -> T {
        match self {
            Outcome::Executed(t) | Outcome::AlreadyDone(t) => t,
        }
    }

    /// Whether this call ran the work.
    pub fn executed(&self) -> bool {
        matches!(self, Outcome::Executed(_))
    }
}

/// Failure of [`OnceExt::run`]: the infrastructure's or the work's own.
#[derive(Debug, thiserror::Error)]
pub enum RunError<E> {
    /// The backend failed, or another caller holds the key (`InProgress`).
    #[error(transparent)]
    Infra(#[from] Error),
    /// The work itself failed; the key was released for a retry.
    #[error("the work failed: {0}")]
    Task(E),
}

impl<E> RunError<E> {
    /// The error kind for an infrastructure failure.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            RunError::Infra(e) => Some(e.kind()),
            RunError::Task(_) => None,
        }
    }
}

/// Conveniences for every [`Once`].
#[async_trait]
pub trait OnceExt: Once {
    /// Runs `f` unless the work of `key` already completed or is running;
    /// keeps the claim and then the JSON-encoded output for `ttl`.
    async fn run<T, E, F, Fut>(
        &self,
        key: &str,
        ttl: Duration,
        f: F,
    ) -> Result<Outcome<T>, RunError<E>>
    where
        T: Serialize + DeserializeOwned + Send,
        E: Send,
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = std::result::Result<T, E>> + Send,
    {
        self.run_with(key, OnceOptions::new(ttl), f).await
    }

    /// [`run`](Self::run) with options (waiting for a running caller).
    async fn run_with<T, E, F, Fut>(
        &self,
        key: &str,
        opts: OnceOptions,
        f: F,
    ) -> Result<Outcome<T>, RunError<E>>
    where
        T: Serialize + DeserializeOwned + Send,
        E: Send,
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = std::result::Result<T, E>> + Send,
    {
        crate::validate::key(key)?;
        crate::validate::ttl(opts.ttl)?;
        crate::validate::ttl(opts.claim_ttl)?;
        let decode = |raw: &Bytes| -> Result<T> {
            if raw.is_empty() {
                return Err(Error::new(
                    ErrorKind::Serialization,
                    format!("the work of {key:?} completed, but its outcome was not kept (larger than the backend stores, or not encodable as JSON)"),
                ));
            }
            serde_json::from_slice(raw).map_err(|e| Error::serialization(key, e))
        };
        let started = Instant::now();
        let mut pause = Duration::from_millis(5);
        let (token, sent) = loop {
            let sent = Tick::now();
            match self.claim(key, opts.claim_ttl).await? {
                Claim::Acquired { token } => break (token, sent),
                Claim::Done(raw) => return Ok(Outcome::AlreadyDone(decode(&raw)?)),
                Claim::InProgress => {
                    let Some(wait) = opts.wait else {
                        return Err(Error::new(
                            ErrorKind::InProgress,
                            format!("the work of {key:?} is running elsewhere"),
                        )
                        .into());
                    };
                    let elapsed = started.elapsed();
                    if elapsed >= wait {
                        return Err(Error::new(
                            ErrorKind::Timeout,
                            format!("waited {wait:?} for the work of {key:?} to finish"),
                        )
                        .into());
                    }
                    tokio::time::sleep(pause.min(wait - elapsed)).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
            }
        };
        // From here the claim is a lease: renewed while the work runs,
        // abandoned if the work fails, panics or is cancelled (drop).
        let held = self.claim_lease(key, &token);
        let claim = Lease::start(
            held.clone(),
            LeaseOptions::new(opts.claim_ttl).labels("once", "once"),
            sent,
        );
        let value = match f().await {
            Ok(value) => value,
            Err(e) => {
                if let Err(release) = claim.release().await {
                    tracing::warn!(key, error = %release, "could not release the key after a failed run");
                }
                return Err(RunError::Task(e));
            }
        };
        let claim = NeverAbandoned(Some(claim));
        // The work ran. From here the claim is never abandoned: the work
        // must not run again because this caller went away or its outcome
        // could not be stored (then the claim expires after its TTL).
        let raw = match serde_json::to_vec(&value) {
            Ok(raw) if raw.len() <= self.capabilities().max_outcome_bytes => raw,
            // Stored as done without the outcome (so it never runs again);
            // the value goes to this caller.
            Ok(raw) => {
                tracing::warn!(
                    key,
                    bytes = raw.len(),
                    limit = self.capabilities().max_outcome_bytes,
                    "the outcome is larger than the backend stores; the key is marked done without it"
                );
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "the outcome cannot be encoded; the key is marked done without it");
                Vec::new()
            }
        };
        // Stored by a task of its own, which finishes even if this caller's
        // future is dropped meanwhile (a timeout around `run`).
        let storing = tokio::spawn(store_outcome(
            held,
            claim,
            Bytes::from(raw),
            opts.ttl,
            key.to_owned(),
        ));
        match storing.await {
            Ok(Ok(())) => Ok(Outcome::Executed(value)),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(Error::new(
                ErrorKind::Internal,
                format!("storing the outcome of {key:?} failed: {e}"),
            )
            .into()),
        }
    }
}

/// Completes the claim with `raw`, retrying a failure while the claim
/// holds (completing again with the same token is recognised as done).
/// Whatever happens, the claim is not abandoned: it is completed, or left
/// to expire.
async fn store_outcome(
    held: Arc<dyn ClaimLease>,
    kept: NeverAbandoned,
    raw: Bytes,
    ttl: Duration,
    key: String,
) -> Result<()> {
    let Some(claim) = kept.0.as_ref() else {
        return Err(claim_lost(&key));
    };
    let mut pause = Duration::from_millis(20);
    let result = loop {
        match held.complete(raw.clone(), ttl).await {
            Ok(()) => break Ok(()),
            Err(e) if e.kind() == ErrorKind::LockNotHeld => break Err(claim_lost(&key)),
            Err(e) if e.is_retryable() && claim.is_held() => {
                tracing::debug!(key, error = %e, "storing the outcome failed; retrying");
                let lost = claim.lost();
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = lost.cancelled() => {}
                }
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Err(e) => break Err(e),
        }
    };
    drop(kept);
    result
}

/// The claim of work that ran: detached however it ends (a panic, a drop
/// before the storing task first ran, included), since a dropped lease
/// would abandon it and let the work run again.
struct NeverAbandoned(Option<Lease>);

impl Drop for NeverAbandoned {
    fn drop(&mut self) {
        if let Some(claim) = self.0.take() {
            claim.detach();
        }
    }
}

fn claim_lost(key: &str) -> Error {
    Error::new(
        ErrorKind::LockNotHeld,
        format!("the claim on {key:?} was lost while the work ran (another caller may have run it); its outcome was not stored"),
    )
}

impl<O: Once + ?Sized> OnceExt for O {}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;

    /// Claims that take their time to complete, and count what they did.
    #[derive(Default)]
    struct Slow {
        completed: Mutex<Vec<Bytes>>,
        abandoned: AtomicUsize,
    }

    #[async_trait]
    impl ClaimStore for Slow {
        async fn renew_claim(&self, _: &str, _: &str, _: Duration) -> Result<bool> {
            Ok(true)
        }
        async fn abandon_claim(&self, _: &str, _: &str) -> Result<bool> {
            self.abandoned.fetch_add(1, Ordering::SeqCst);
            Ok(true)
        }
        async fn complete_claim(
            &self,
            _: &str,
            _: &str,
            outcome: Bytes,
            _: Duration,
        ) -> Result<()> {
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.completed.lock().unwrap().push(outcome);
            Ok(())
        }
    }

    struct SlowOnce(Arc<Slow>);

    #[async_trait]
    impl Once for SlowOnce {
        async fn claim(&self, _: &str, _: Duration) -> Result<Claim> {
            Ok(Claim::Acquired { token: "t".into() })
        }
        fn claim_lease(&self, key: &str, token: &str) -> Arc<dyn ClaimLease> {
            claim_lease(self.0.clone(), key, token)
        }
        async fn complete(
            &self,
            key: &str,
            token: &str,
            outcome: Bytes,
            ttl: Duration,
        ) -> Result<()> {
            self.0.complete_claim(key, token, outcome, ttl).await
        }
        async fn abandon(&self, _: &str, _: &str) -> Result<()> {
            Ok(())
        }
        async fn outcome(&self, _: &str) -> Result<Option<Bytes>> {
            Ok(None)
        }
        async fn reset(&self, _: &str) -> Result<bool> {
            Ok(false)
        }
    }

    /// The caller's future dropped while the outcome is being stored: it is
    /// still stored, and the claim is never abandoned.
    #[tokio::test]
    async fn a_caller_dropped_while_storing_the_outcome_leaves_it_stored() {
        let store = Arc::new(Slow::default());
        let once = SlowOnce(store.clone());
        let run = once.run("job", Duration::from_secs(60), || async {
            Ok::<_, std::io::Error>(7u32)
        });
        let cut = tokio::time::timeout(Duration::from_millis(30), run).await;
        assert!(cut.is_err(), "dropped while storing");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*store.completed.lock().unwrap(), [Bytes::from_static(b"7")]);
        assert_eq!(store.abandoned.load(Ordering::SeqCst), 0, "never abandoned");
    }

    /// An output that cannot be encoded: the work ran, so the key is
    /// marked done (without an outcome) and the value goes to the caller.
    #[tokio::test]
    async fn an_output_that_cannot_be_encoded_marks_the_key_done() {
        let store = Arc::new(Slow::default());
        let once = SlowOnce(store.clone());
        let unencodable = HashMap::from([((1u8, 2u8), 3u8)]);
        let out = once
            .run("job", Duration::from_secs(60), || async {
                Ok::<_, std::io::Error>(unencodable.clone())
            })
            .await
            .unwrap();
        assert_eq!(out, Outcome::Executed(unencodable));
        assert_eq!(*store.completed.lock().unwrap(), [Bytes::new()]);
        assert_eq!(store.abandoned.load(Ordering::SeqCst), 0);
    }
}
