//! [`Lease`]: the local deadline, the background keeper, refresh and release.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::clock::{self, nanos, Tick};
use super::{LeaseBackend, LeaseOptions};
use crate::error::{ErrorKind, Result};
use crate::telemetry::OpMetrics;

/// First pause after a failed renewal; it doubles up to a tenth of the TTL
/// (between this and [`RETRY_MAX`]).
const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// A lease kept by this process: its local deadline, its keeper task and
/// the lost signal. See the [module documentation](super) for the rules.
///
/// Without a tokio runtime at [`start`](Lease::start) no keeper runs:
/// nothing renews the lease and [`lost`](Lease::lost) does not fire by
/// itself, but [`is_held`](Lease::is_held) still turns false at the deadline.
pub struct Lease {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Box<dyn LeaseBackend>,
    opts: LeaseOptions,
    /// Local deadline on the lease clock; 0 once lost or released.
    deadline: AtomicU64,
    /// The TTL renewals apply, in nanoseconds.
    ttl: AtomicU64,
    /// The smallest TTL of an extension whose outcome is unknown (it may be
    /// applied by the server at any later time); `u64::MAX`: none. Deadlines
    /// are computed with at most this TTL.
    floor: AtomicU64,
    /// When the keeper renews next, on the lease clock.
    next_renew: AtomicU64,
    auto_renew: AtomicBool,
    extensions: AtomicU64,
    /// Background renewals stop when `extensions` reaches this.
    max_extensions: AtomicU64,
    lost: CancellationToken,
    /// Stops the keeper and any outstanding extension.
    stop: CancellationToken,
    released: AtomicBool,
    /// A release was asked of the server and not confirmed (it failed, or
    /// its call was dropped): the next `release`, or the drop, asks again.
    release_unconfirmed: AtomicBool,
    /// Whether the lease was held when its release began (what a retried
    /// release reports together with the server's answer).
    held_at_release: AtomicBool,
    /// Wakes the keeper when the TTL, the deadline or `auto_renew` changed.
    changed: Notify,
    /// One extension at a time (the keeper's or a refresh).
    extending: tokio::sync::Mutex<()>,
    extend_op: OpMetrics,
    release_op: OpMetrics,
}

enum Step {
    Extended,
    Ended,
    Failed(crate::Error),
}

impl Inner {
    fn ttl(&self) -> Duration {
        Duration::from_nanos(self.ttl.load(Ordering::Acquire))
    }

    /// The deadline a lease of `ttl` gets when its request was sent at `sent`.
    fn deadline_for(&self, sent: u64, ttl: Duration) -> u64 {
        let eff = nanos(ttl).min(self.floor.load(Ordering::Acquire));
        let margin = nanos(self.opts.margin_for(Duration::from_nanos(eff)));
        sent.saturating_add(eff.saturating_sub(margin)).max(1)
    }

    /// Moves the deadline unless the lease already ended.
    fn set_deadline(&self, f: impl Fn(u64) -> u64) {
        let _ = self
            .deadline
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (d != 0).then(|| f(d).max(1))
            });
    }

    /// Ends the lease (lost); logs once.
    fn end(&self, why: &str) {
        let was = self.deadline.swap(0, Ordering::AcqRel);
        self.stop.cancel();
        self.lost.cancel();
        if was != 0 && !self.released.load(Ordering::Acquire) {
            tracing::warn!(
                lease = %self.backend.describe(),
                backend = self.opts.backend,
                capability = self.opts.capability,
                "lease lost: {why}"
            );
        }
    }

    fn renewed(&self, sent: u64, ttl: Duration, refresh: bool) {
        if refresh {
            self.ttl.store(nanos(ttl), Ordering::Release);
        }
        let deadline = self.deadline_for(sent, ttl);
        self.set_deadline(|_| deadline);
        let eff = nanos(ttl).min(self.floor.load(Ordering::Acquire));
        self.next_renew
            .store(sent.saturating_add(eff / 3), Ordering::Release);
        if !refresh {
            let n = self.extensions.fetch_add(1, Ordering::AcqRel) + 1;
            if n >= self.max_extensions.load(Ordering::Acquire) {
                self.auto_renew.store(false, Ordering::Release);
            }
        }
        self.changed.notify_one();
    }

    /// One extension to `ttl`, raced against the local deadline.
    async fn extend(&self, ttl: Duration, refresh: bool) -> Step {
        let _turn = tokio::select! {
            biased;
            _ = self.stop.cancelled() => return Step::Ended,
            turn = self.extending.lock() => turn,
        };
        let deadline = self.deadline.load(Ordering::Acquire);
        let sent = clock::now();
        if deadline == 0 {
            return Step::Ended;
        }
        if sent >= deadline {
            self.end("its deadline passed before it could be renewed");
            return Step::Ended;
        }
        // Until an answer is read, the server may apply this request at
        // any later time, also when the call fails or is dropped (a
        // caller's timeout around `refresh`): never count on more than its
        // TTL from then on.
        let mut unanswered = Unanswered {
            inner: self,
            ttl,
            sent,
            answered: false,
        };
        let res = tokio::select! {
            biased;
            _ = self.stop.cancelled() => return Step::Ended,
            r = self.extend_op.run(self.backend.extend(ttl)) => r,
            _ = tokio::time::sleep(Duration::from_nanos(deadline - sent)) => {
                self.end("its deadline passed while a renewal was outstanding");
                return Step::Ended;
            }
        };
        match res {
            Ok(true) => {
                unanswered.answered();
                self.renewed(sent, ttl, refresh);
                Step::Extended
            }
            Ok(false) => {
                self.end("the server no longer has it (expired, revoked or taken over)");
                Step::Ended
            }
            Err(e) if e.kind() == ErrorKind::Closed => {
                self.end("the backend was closed");
                Step::Failed(e)
            }
            Err(e) => Step::Failed(e),
        }
    }
}

impl Inner {
    /// Asks the server to release the lease. Until it answers, the release
    /// counts as unconfirmed: an error, or the call dropped midway, leaves
    /// it for the next `release` or the drop to ask again.
    async fn release_on_server(&self) -> Result<bool> {
        let mut unconfirmed = Unconfirmed(Some(&self.release_unconfirmed));
        let on_server = self.release_op.run(self.backend.release()).await?;
        unconfirmed.0 = None;
        Ok(self.held_at_release.load(Ordering::Acquire) && on_server)
    }
}

/// A release asked of the server and not answered: dropped while still
/// armed, it marks the release unconfirmed.
struct Unconfirmed<'a>(Option<&'a AtomicBool>);

impl Drop for Unconfirmed<'_> {
    fn drop(&mut self) {
        if let Some(flag) = self.0 {
            flag.store(true, Ordering::Release);
        }
    }
}

/// An extension sent and not answered: dropped (failed, or cancelled
/// mid-call), it bounds the lease by what the server may still apply.
struct Unanswered<'a> {
    inner: &'a Inner,
    ttl: Duration,
    sent: u64,
    answered: bool,
}

impl Unanswered<'_> {
    fn answered(&mut self) {
        self.answered = true;
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let inner = self.inner;
        inner.floor.fetch_min(nanos(self.ttl), Ordering::AcqRel);
        let bound = inner.deadline_for(self.sent, self.ttl);
        inner.set_deadline(|d| d.min(bound));
    }
}

/// Renews at a third of the TTL, retries failures with backoff, and ends
/// the lease at its deadline.
async fn keep(inner: Arc<Inner>) {
    let mut retry: Option<Duration> = None;
    loop {
        let now = clock::now();
        let deadline = inner.deadline.load(Ordering::Acquire);
        if deadline == 0 {
            return;
        }
        if now >= deadline {
            inner.end("its deadline passed without a successful renewal");
            return;
        }
        let renew_at = if inner.auto_renew.load(Ordering::Acquire) {
            inner.next_renew.load(Ordering::Acquire)
        } else {
            u64::MAX
        };
        if now < renew_at {
            let wake = renew_at.min(deadline);
            tokio::select! {
                biased;
                _ = inner.stop.cancelled() => return,
                _ = inner.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_nanos(wake - now)) => {}
            }
            continue;
        }
        match inner.extend(inner.ttl(), false).await {
            Step::Extended => retry = None,
            Step::Ended => return,
            Step::Failed(e) => {
                let cap = (inner.ttl() / 10).clamp(RETRY_MIN, RETRY_MAX);
                let pause = retry.map_or(RETRY_MIN, |d| (d * 2).min(cap));
                retry = Some(pause);
                inner
                    .next_renew
                    .store(clock::now().saturating_add(nanos(pause)), Ordering::Release);
                tracing::debug!(
                    lease = %inner.backend.describe(),
                    error = %e,
                    ?pause,
                    "lease renewal failed; retrying"
                );
            }
        }
    }
}

/// Ends the lease when the server announces it gone.
async fn listen(inner: Arc<Inner>) {
    tokio::select! {
        _ = inner.stop.cancelled() => {}
        _ = inner.backend.gone() => inner.end("the server announced it gone"),
    }
}

impl Lease {
    /// Starts keeping a lease the server granted for `opts.ttl` in reply to
    /// a request sent at `sent`.
    pub fn start(backend: impl LeaseBackend, opts: LeaseOptions, sent: Tick) -> Lease {
        Lease::start_boxed(Box::new(backend), opts, sent)
    }

    /// [`start`](Lease::start) with a boxed backend.
    pub fn start_boxed(backend: Box<dyn LeaseBackend>, opts: LeaseOptions, sent: Tick) -> Lease {
        let lease = Lease::build(backend, opts, sent);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(keep(lease.inner.clone()));
            if lease.inner.backend.announces_loss() {
                rt.spawn(listen(lease.inner.clone()));
            }
        }
        lease
    }

    fn build(backend: Box<dyn LeaseBackend>, opts: LeaseOptions, sent: Tick) -> Lease {
        let m = |op| OpMetrics::new(opts.backend, opts.capability, op);
        let inner = Arc::new(Inner {
            backend,
            opts,
            deadline: AtomicU64::new(1),
            ttl: AtomicU64::new(nanos(opts.ttl)),
            floor: AtomicU64::new(u64::MAX),
            next_renew: AtomicU64::new(sent.0.saturating_add(nanos(opts.ttl) / 3)),
            // No renewal at all when none is allowed.
            auto_renew: AtomicBool::new(opts.auto_renew && opts.max_extensions != Some(0)),
            extensions: AtomicU64::new(0),
            max_extensions: AtomicU64::new(opts.max_extensions.unwrap_or(u64::MAX)),
            lost: CancellationToken::new(),
            stop: CancellationToken::new(),
            released: AtomicBool::new(false),
            release_unconfirmed: AtomicBool::new(false),
            held_at_release: AtomicBool::new(false),
            changed: Notify::new(),
            extending: tokio::sync::Mutex::new(()),
            extend_op: m("lease.extend"),
            release_op: m("lease.release"),
        });
        inner
            .deadline
            .store(inner.deadline_for(sent.0, opts.ttl), Ordering::Release);
        Lease { inner }
    }

    /// A lease that never ends and has nothing on any server (a fixed
    /// worker id, a backend without leases). Releasing it only marks it
    /// released.
    pub fn unbounded(what: impl Into<String>) -> Lease {
        struct Unbounded(String);
        #[async_trait]
        impl LeaseBackend for Unbounded {
            fn describe(&self) -> String {
                self.0.clone()
            }
            async fn extend(&self, _ttl: Duration) -> Result<bool> {
                Ok(true)
            }
            async fn release(&self) -> Result<bool> {
                Ok(true)
            }
        }
        let opts = LeaseOptions::new(crate::validate::MAX_TTL).auto_renew(false);
        let lease = Lease::build(Box::new(Unbounded(what.into())), opts, Tick::now());
        lease.inner.deadline.store(u64::MAX, Ordering::Release);
        lease
    }

    /// Whether the lease is held: before its local deadline, not lost, not
    /// released. Costs one clock read and one atomic load.
    #[inline]
    pub fn is_held(&self) -> bool {
        clock::now() < self.inner.deadline.load(Ordering::Acquire)
    }

    /// [`is_held`](Lease::is_held) at `now`, a reading taken by the caller
    /// (to share one clock read with other work on a hot path).
    #[inline]
    pub fn is_held_at(&self, now: Tick) -> bool {
        now.0 < self.inner.deadline.load(Ordering::Acquire)
    }

    /// Cancelled when the lease ends: lost (deadline passed, gone on the
    /// server, backend closed) or released.
    pub fn lost(&self) -> CancellationToken {
        self.inner.lost.clone()
    }

    /// The TTL the lease is renewed with.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl()
    }

    /// Time left before the local deadline; `None` when not held.
    pub fn remaining(&self) -> Option<Duration> {
        let deadline = self.inner.deadline.load(Ordering::Acquire);
        let now = clock::now();
        (now < deadline).then(|| Duration::from_nanos(deadline - now))
    }

    /// How many background renewals succeeded.
    pub fn extensions(&self) -> u64 {
        self.inner.extensions.load(Ordering::Acquire)
    }

    /// What the lease protects (from the backend).
    pub fn describe(&self) -> String {
        self.inner.backend.describe()
    }

    /// Allows `n` more background renewals from now on (then the lease
    /// ends at its deadline).
    pub fn limit_extensions(&self, n: u64) {
        let now = self.inner.extensions.load(Ordering::Acquire);
        self.inner
            .max_extensions
            .store(now.saturating_add(n), Ordering::Release);
        if n == 0 {
            self.inner.auto_renew.store(false, Ordering::Release);
        }
        self.inner.changed.notify_one();
    }

    /// Turns background renewal on or off.
    pub fn set_auto_renew(&self, on: bool) {
        self.inner.auto_renew.store(on, Ordering::Release);
        self.inner.changed.notify_one();
    }

    /// Extends the lease now to `ttl`, and renews with `ttl` from then on.
    /// `Ok(false)` when the lease is not held any more (it has then ended);
    /// `Err` when the server could not be asked (the lease is kept, with a
    /// deadline no later than `ttl` from now).
    pub async fn refresh(&self, ttl: Duration) -> Result<bool> {
        crate::validate::ttl(ttl)?;
        if !self.is_held() {
            return Ok(false);
        }
        match self.inner.extend(ttl, true).await {
            Step::Extended => Ok(true),
            Step::Ended => Ok(false),
            Step::Failed(e) => Err(e),
        }
    }

    /// Stops keeping the lease without releasing it on the server, because
    /// what it protected now belongs to something else there (a completed
    /// once-claim, say). Fires [`lost`](Lease::lost).
    pub fn detach(self) {
        let inner = &self.inner;
        inner.released.store(true, Ordering::Release);
        inner.release_unconfirmed.store(false, Ordering::Release);
        inner.deadline.store(0, Ordering::Release);
        inner.stop.cancel();
        inner.lost.cancel();
    }

    /// Gives the lease up: stops the keeper, fires [`lost`](Lease::lost)
    /// and releases it on the server. `Ok(true)` only if it was held up to
    /// this call (locally and on the server); `Ok(false)` if it had been
    /// lost or released before.
    ///
    /// The lease is given up locally at once, whatever the server answers.
    /// When the server could not be asked (`Err`, or this call dropped
    /// midway), what it holds there is not lost track of: the next
    /// `release` asks again (and answers as this call would have, except
    /// that a first attempt applied before its answer was lost makes it
    /// `Ok(false)`), and dropping the lease asks again in the background.
    pub async fn release(&self) -> Result<bool> {
        let inner = &self.inner;
        if inner.released.swap(true, Ordering::AcqRel) {
            if inner.release_unconfirmed.swap(false, Ordering::AcqRel) {
                return inner.release_on_server().await;
            }
            return Ok(false);
        }
        inner
            .held_at_release
            .store(self.is_held(), Ordering::Release);
        inner.deadline.store(0, Ordering::Release);
        inner.stop.cancel();
        inner.lost.cancel();
        inner.release_on_server().await
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("lease", &self.inner.backend.describe())
            .field("ttl", &self.ttl())
            .field("held", &self.is_held())
            .field("remaining", &self.remaining())
            .finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let inner = &self.inner;
        if inner.released.swap(true, Ordering::AcqRel)
            && !inner.release_unconfirmed.swap(false, Ordering::AcqRel)
        {
            return;
        }
        inner.deadline.store(0, Ordering::Release);
        inner.stop.cancel();
        inner.lost.cancel();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let inner = inner.clone();
            rt.spawn(async move {
                if let Err(e) = inner.release_on_server().await {
                    tracing::debug!(
                        lease = %inner.backend.describe(),
                        error = %e,
                        "background release of a dropped lease failed; it will expire"
                    );
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU8;
    use std::sync::Mutex;
    use std::time::Instant;

    use super::*;
    use crate::Error;

    const OK: u8 = 0;
    const HANG: u8 = 1;
    const FAIL: u8 = 2;
    const GONE: u8 = 3;

    /// A server whose answers the test controls.
    #[derive(Default)]
    struct Server {
        mode: AtomicU8,
        extends: Mutex<Vec<(Instant, Duration)>>,
        releases: AtomicU64,
        /// How many of the next releases fail (after being counted).
        failing_releases: AtomicU64,
    }

    impl Server {
        fn set(&self, mode: u8) {
            self.mode.store(mode, Ordering::SeqCst);
        }
        fn extends(&self) -> Vec<(Instant, Duration)> {
            self.extends.lock().unwrap().clone()
        }
    }

    struct Handle(Arc<Server>);

    #[async_trait]
    impl LeaseBackend for Handle {
        fn describe(&self) -> String {
            "test lease".into()
        }
        async fn extend(&self, ttl: Duration) -> Result<bool> {
            self.0.extends.lock().unwrap().push((Instant::now(), ttl));
            match self.0.mode.load(Ordering::SeqCst) {
                OK => Ok(true),
                HANG => std::future::pending().await,
                FAIL => Err(Error::new(ErrorKind::Unavailable, "down")),
                _ => Ok(false),
            }
        }
        async fn release(&self) -> Result<bool> {
            self.0.releases.fetch_add(1, Ordering::SeqCst);
            let failing = &self.0.failing_releases;
            if failing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(Error::new(ErrorKind::Timeout, "no answer"));
            }
            if self.0.mode.load(Ordering::SeqCst) == HANG {
                std::future::pending::<()>().await;
            }
            Ok(true)
        }
    }

    fn kept(ttl_ms: u64, f: impl FnOnce(LeaseOptions) -> LeaseOptions) -> (Lease, Arc<Server>) {
        let server = Arc::new(Server::default());
        let opts = f(LeaseOptions::new(Duration::from_millis(ttl_ms)));
        (
            Lease::start(Handle(server.clone()), opts, Tick::now()),
            server,
        )
    }

    async fn lost_within(lease: &Lease, within: Duration) -> Option<Duration> {
        let t = Instant::now();
        tokio::time::timeout(within, lease.lost().cancelled())
            .await
            .ok()
            .map(|_| t.elapsed())
    }

    #[tokio::test]
    async fn renews_every_third_of_the_ttl_and_stays_held() {
        let (lease, server) = kept(90, |o| o);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(lease.is_held());
        let n = server.extends().len();
        assert!((4..=20).contains(&n), "{n} renewals in 400 ms at 30 ms");
        assert_eq!(lease.extensions() as usize, n);
        assert!(lease.remaining().unwrap() > Duration::from_millis(20));
    }

    #[tokio::test]
    async fn a_frozen_server_ends_the_lease_before_its_ttl_runs_out_there() {
        let (lease, server) = kept(300, |o| o);
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Every renewal the server applied was sent before this instant, so
        // its expiry there is at least the last one's send + 300 ms.
        let frozen_at = Instant::now();
        server.set(HANG);
        let last_sent = server
            .extends()
            .iter()
            .map(|(t, _)| *t)
            .filter(|t| *t <= frozen_at)
            .max()
            .unwrap();
        tokio::time::sleep_until((last_sent + Duration::from_millis(300)).into()).await;
        assert!(!lease.is_held(), "not held when the server's TTL runs out");
        assert!(
            lost_within(&lease, Duration::from_secs(2)).await.is_some(),
            "lost fires while the renewal hangs"
        );
        // Not needlessly early either: the deadline is send + TTL − margin.
        let since_last = last_sent.elapsed();
        assert!(since_last >= Duration::from_millis(280), "{since_last:?}");
    }

    #[tokio::test]
    async fn gone_on_the_server_ends_the_lease_at_once() {
        let (lease, server) = kept(150, |o| o);
        server.set(GONE);
        assert!(lost_within(&lease, Duration::from_secs(1)).await.is_some());
        assert_eq!(server.extends().len(), 1, "ended at the first answer");
        assert!(!lease.is_held());
        assert_eq!(lease.remaining(), None);
    }

    #[tokio::test]
    async fn failed_renewals_are_retried_and_a_recovery_in_time_keeps_the_lease() {
        let (lease, server) = kept(300, |o| o);
        tokio::time::sleep(Duration::from_millis(110)).await;
        server.set(FAIL);
        tokio::time::sleep(Duration::from_millis(120)).await;
        let failed = server.extends().len();
        server.set(OK);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(lease.is_held(), "recovered before the deadline");
        assert!(failed >= 2, "failures retried quickly: {failed} calls");
        // Failing for longer than the TTL loses it.
        server.set(FAIL);
        assert!(lost_within(&lease, Duration::from_secs(1)).await.is_some());
    }

    #[tokio::test]
    async fn refresh_changes_the_ttl_the_keeper_renews_with() {
        let (lease, server) = kept(60, |o| o);
        assert!(lease.refresh(Duration::from_millis(600)).await.unwrap());
        assert_eq!(lease.ttl(), Duration::from_millis(600));
        tokio::time::sleep(Duration::from_millis(450)).await;
        let ttls: Vec<Duration> = server.extends().iter().map(|e| e.1).collect();
        assert!(ttls.len() >= 2, "{ttls:?}");
        assert!(
            ttls.iter().all(|t| *t == Duration::from_millis(600)),
            "every extension after the refresh uses the new TTL: {ttls:?}"
        );
        assert!(lease.remaining().unwrap() > Duration::from_millis(200));
    }

    #[tokio::test]
    async fn without_renewal_the_lease_ends_at_its_deadline_and_refresh_pushes_it() {
        let (lease, server) = kept(100, |o| o.auto_renew(false));
        tokio::time::sleep(Duration::from_millis(60)).await;
        let t = Instant::now();
        assert!(lease.refresh(Duration::from_millis(100)).await.unwrap());
        let left = lease.remaining().unwrap();
        assert!(left <= Duration::from_millis(95), "{left:?}");
        assert!(left >= Duration::from_millis(60), "{left:?}");
        lease.lost().cancelled().await;
        assert!(t.elapsed() >= Duration::from_millis(90));
        assert!(!lease.is_held());
        assert_eq!(server.extends().len(), 1, "only the refresh");
    }

    #[tokio::test]
    async fn the_bound_on_extensions_stops_renewal() {
        let (lease, server) = kept(60, |o| o.max_extensions(2));
        assert!(lost_within(&lease, Duration::from_secs(1)).await.is_some());
        assert_eq!(server.extends().len(), 2);
        assert_eq!(lease.extensions(), 2);
    }

    #[tokio::test]
    async fn an_extension_of_unknown_outcome_bounds_later_deadlines() {
        let (lease, server) = kept(200, |o| o.auto_renew(false));
        server.set(FAIL);
        assert!(lease.refresh(Duration::from_millis(100)).await.is_err());
        server.set(OK);
        assert!(lease.refresh(Duration::from_secs(10)).await.unwrap());
        // The failed 100 ms extension may still be applied by the server.
        assert!(lease.remaining().unwrap() <= Duration::from_millis(100));
    }

    /// A refresh dropped mid-call (a caller's timeout around it) may still
    /// be applied by the server: it bounds the deadline as a failed one
    /// does.
    #[tokio::test]
    async fn a_refresh_dropped_mid_call_bounds_later_deadlines() {
        let (lease, server) = kept(10_000, |o| o.auto_renew(false));
        server.set(HANG);
        let refresh = lease.refresh(Duration::from_millis(300));
        let cut = tokio::time::timeout(Duration::from_millis(20), refresh).await;
        assert!(cut.is_err(), "the refresh hangs until dropped");
        let left = lease.remaining().expect("still held");
        assert!(left <= Duration::from_millis(300), "{left:?}");
        server.set(OK);
        assert!(lease.refresh(Duration::from_secs(10)).await.unwrap());
        assert!(lease.remaining().unwrap() <= Duration::from_millis(300));
    }

    /// No renewal is allowed: none is made, the lease ends at its first
    /// deadline.
    #[tokio::test]
    async fn no_extension_allowed_means_no_renewal() {
        let (lease, server) = kept(60, |o| o.max_extensions(0));
        assert!(lost_within(&lease, Duration::from_secs(1)).await.is_some());
        assert!(server.extends().is_empty(), "{:?}", server.extends());
    }

    #[tokio::test]
    async fn release_gives_it_up_once_and_drop_releases_in_the_background() {
        let (lease, server) = kept(1000, |o| o);
        assert!(lease.release().await.unwrap());
        assert!(!lease.is_held() && lease.lost().is_cancelled());
        assert!(!lease.release().await.unwrap(), "a second release");
        assert!(!lease.refresh(Duration::from_secs(1)).await.unwrap());
        assert_eq!(server.releases.load(Ordering::SeqCst), 1);

        let (lease, server) = kept(1000, |o| o);
        drop(lease);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(server.releases.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failed_release_is_asked_again_by_the_next_release() {
        let (lease, server) = kept(1000, |o| o);
        server.failing_releases.store(1, Ordering::SeqCst);
        let err = lease.release().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout);
        assert!(!lease.is_held() && lease.lost().is_cancelled());
        assert!(
            lease.release().await.unwrap(),
            "the retry releases what was held when the release began"
        );
        assert_eq!(server.releases.load(Ordering::SeqCst), 2);
        assert!(
            !lease.release().await.unwrap(),
            "confirmed: not asked again"
        );
        assert_eq!(server.releases.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_release_dropped_midway_is_asked_again_by_the_drop() {
        let (lease, server) = kept(1000, |o| o);
        server.set(HANG);
        let cut = tokio::time::timeout(Duration::from_millis(20), lease.release()).await;
        assert!(cut.is_err(), "the release was cut off");
        assert_eq!(server.releases.load(Ordering::SeqCst), 1);
        server.set(OK);
        drop(lease);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            server.releases.load(Ordering::SeqCst),
            2,
            "the drop asked the server again"
        );
    }

    #[tokio::test]
    async fn a_detached_lease_is_not_released_again_after_a_failed_release() {
        let (lease, server) = kept(1000, |o| o);
        server.failing_releases.store(1, Ordering::SeqCst);
        assert!(lease.release().await.is_err());
        lease.detach();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(server.releases.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_lease_lost_before_release_reports_false() {
        let (lease, server) = kept(100, |o| o);
        server.set(GONE);
        lease.lost().cancelled().await;
        assert!(!lease.release().await.unwrap());
    }

    #[tokio::test]
    async fn closed_backend_ends_the_lease() {
        struct Closed;
        #[async_trait]
        impl LeaseBackend for Closed {
            fn describe(&self) -> String {
                "closed".into()
            }
            async fn extend(&self, _: Duration) -> Result<bool> {
                Err(Error::new(ErrorKind::Closed, "closed"))
            }
            async fn release(&self) -> Result<bool> {
                Ok(false)
            }
        }
        let lease = Lease::start(
            Closed,
            LeaseOptions::new(Duration::from_secs(3)),
            Tick::now(),
        );
        let after = lost_within(&lease, Duration::from_secs(2)).await;
        assert!(
            after.is_some(),
            "ended at the first renewal, not at the deadline"
        );
    }

    #[tokio::test]
    async fn a_loss_the_server_announces_ends_the_lease_before_the_next_renewal() {
        struct Announcing(Arc<Notify>);
        #[async_trait]
        impl LeaseBackend for Announcing {
            fn describe(&self) -> String {
                "announcing".into()
            }
            async fn extend(&self, _: Duration) -> Result<bool> {
                Ok(true)
            }
            async fn release(&self) -> Result<bool> {
                Ok(true)
            }
            fn announces_loss(&self) -> bool {
                true
            }
            async fn gone(&self) {
                self.0.notified().await
            }
        }
        let deleted = Arc::new(Notify::new());
        let lease = Lease::start(
            Announcing(deleted.clone()),
            LeaseOptions::new(Duration::from_secs(30)),
            Tick::now(),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(lease.is_held());
        deleted.notify_one();
        assert!(
            lost_within(&lease, Duration::from_secs(1)).await.is_some(),
            "ended long before the renewal at 10 s"
        );
        assert!(!lease.is_held());
    }

    #[tokio::test]
    async fn unbounded_never_ends_and_bad_ttls_are_refused() {
        let lease = Lease::unbounded("fixed");
        assert!(lease.is_held());
        assert!(lease.remaining().unwrap() > Duration::from_secs(3600 * 24 * 365));
        assert!(lease.refresh(Duration::ZERO).await.is_err());
        assert!(lease.refresh(Duration::MAX).await.is_err());
        assert!(lease.release().await.unwrap());
        assert!(!lease.is_held());
    }

    #[test]
    fn without_a_runtime_the_deadline_still_counts() {
        let server = Arc::new(Server::default());
        let lease = Lease::start(
            Handle(server),
            LeaseOptions::new(Duration::from_millis(20)),
            Tick::now(),
        );
        assert!(lease.is_held());
        std::thread::sleep(Duration::from_millis(25));
        assert!(!lease.is_held());
    }
}
