//! The Snowflake generator: `time | worker | sequence` in 63 bits.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{IdGenerator, IdParts, WorkerLease};
use crate::error::{Error, ErrorKind, Result};
use crate::lease::Tick;
use serde::{Deserialize, Serialize};

/// A source of wall-clock milliseconds (replaceable in tests).
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> u64;

    /// [`now_millis`](Clock::now_millis) and a reading of the lease clock
    /// taken together: a generator on a leased worker id checks the lease's
    /// deadline on every id with it. The default reads both clocks;
    /// [`SystemClock`] derives both from one read.
    fn now_with_tick(&self) -> (u64, Tick) {
        (self.now_millis(), Tick::now())
    }
}

/// The system's wall clock, read cheaply: the lease clock (a
/// time-stamp-counter clock, a few nanoseconds per read) offset to the wall
/// clock, with the offset refreshed from [`SystemTime`] once a second so
/// that wall-clock adjustments (including steps back) are followed.
#[derive(Debug)]
pub struct SystemClock {
    /// Wall-clock milliseconds minus lease-clock milliseconds.
    offset: AtomicI64,
    /// Lease-clock millisecond at which the offset is refreshed next.
    next_sync: AtomicU64,
}

impl Default for SystemClock {
    fn default() -> Self {
        let clock = SystemClock {
            offset: AtomicI64::new(0),
            next_sync: AtomicU64::new(0),
        };
        clock.sync(Tick::now().as_nanos() / 1_000_000);
        clock
    }
}

impl SystemClock {
    /// A clock synchronised with the wall clock now.
    pub fn new() -> Self {
        SystemClock::default()
    }

    fn sync(&self, mono: u64) {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.offset.store(wall - mono as i64, Ordering::Relaxed);
        self.next_sync.store(mono + 1000, Ordering::Relaxed);
    }
}

impl SystemClock {
    #[inline]
    fn wall_millis_at(&self, tick: Tick) -> u64 {
        let mono = tick.as_nanos() / 1_000_000;
        if mono >= self.next_sync.load(Ordering::Relaxed) {
            self.sync(mono);
        }
        (mono as i64)
            .saturating_add(self.offset.load(Ordering::Relaxed))
            .max(0) as u64
    }
}

impl Clock for SystemClock {
    #[inline]
    fn now_millis(&self) -> u64 {
        self.wall_millis_at(Tick::now())
    }

    #[inline]
    fn now_with_tick(&self) -> (u64, Tick) {
        let tick = Tick::now();
        (self.wall_millis_at(tick), tick)
    }
}

/// Bit layout and epoch of the ids.
///
/// The default is the classic 41 bits of milliseconds since
/// 2024-01-01T00:00:00Z (good until 2093), 10 bits of worker id and 12 bits
/// of sequence (4096 ids per millisecond per worker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Layout {
    /// The custom epoch, in milliseconds since the Unix epoch.
    pub epoch_millis: u64,
    /// Bits of the timestamp.
    pub time_bits: u8,
    /// Bits of the worker id.
    pub worker_bits: u8,
    /// Bits of the per-millisecond sequence.
    pub sequence_bits: u8,
    /// How far the clock may step back before `next_id` fails: within this
    /// bound the generator keeps counting on its last timestamp (and waits
    /// for the clock when that millisecond's sequence is used up).
    #[serde(with = "humantime_serde")]
    pub max_backward: Duration,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            epoch_millis: 1_704_067_200_000,
            time_bits: 41,
            worker_bits: 10,
            sequence_bits: 12,
            max_backward: Duration::from_millis(50),
        }
    }
}

impl Layout {
    /// Checks that the parts fill exactly 63 bits, each at least 1 bit.
    pub fn validate(&self) -> Result<()> {
        let total =
            u32::from(self.time_bits) + u32::from(self.worker_bits) + u32::from(self.sequence_bits);
        if total != 63 || self.time_bits == 0 || self.sequence_bits == 0 {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "snowflake layout {}+{}+{} bits must add up to 63 with time and sequence non-empty",
                    self.time_bits, self.worker_bits, self.sequence_bits
                ),
            ));
        }
        Ok(())
    }

    /// The largest worker id of this layout.
    pub fn max_worker_id(&self) -> u64 {
        (1u64 << self.worker_bits) - 1
    }

    fn max_sequence(&self) -> u64 {
        (1u64 << self.sequence_bits) - 1
    }

    fn max_time(&self) -> u64 {
        (1u64 << self.time_bits) - 1
    }
}

/// A lock-free Snowflake generator.
///
/// Ids increase strictly within one generator, also when the wall clock
/// steps back by up to [`Layout::max_backward`]; beyond that `next_id` fails
/// with `InvalidState` rather than risk a duplicate. On a leased worker id
/// ([`Snowflake::with_lease`]) every `next_id` also checks the lease's local
/// deadline (one clock read) and fails with `LeaseLost` once it has passed —
/// before the server can hand the id to another process — and the first id
/// comes after the previous holder's last possible timestamp.
pub struct Snowflake<C: Clock = SystemClock> {
    layout: Layout,
    worker_id: u64,
    /// `millis_since_epoch << sequence_bits | sequence` of the last id.
    state: AtomicU64,
    clock: C,
    lease: Option<WorkerLease>,
}

impl<C: Clock> std::fmt::Debug for Snowflake<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snowflake")
            .field("layout", &self.layout)
            .field("worker_id", &self.worker_id)
            .finish()
    }
}

impl Snowflake<SystemClock> {
    /// A generator for a fixed worker id.
    pub fn new(layout: Layout, worker_id: u64) -> Result<Self> {
        Snowflake::with_clock(layout, worker_id, SystemClock::new())
    }

    /// A generator on a leased worker id; it stops issuing when the
    /// lease's local deadline passes or the lease is lost, starts after the
    /// previous holder's last possible timestamp, and releases the lease
    /// when dropped.
    pub fn with_lease(layout: Layout, lease: WorkerLease) -> Result<Self> {
        Snowflake::with_clock(layout, lease.worker_id(), SystemClock::new())?.on_lease(lease)
    }
}

impl<C: Clock> Snowflake<C> {
    /// A generator reading time from `clock`.
    pub fn with_clock(layout: Layout, worker_id: u64, clock: C) -> Result<Self> {
        layout.validate()?;
        if worker_id > layout.max_worker_id() {
            return Err(Error::invalid_argument(format!(
                "worker id {worker_id} exceeds the layout maximum {}",
                layout.max_worker_id()
            )));
        }
        Ok(Snowflake {
            layout,
            worker_id,
            state: AtomicU64::new(0),
            clock,
            lease: None,
        })
    }

    /// Builds on `lease` (its worker id must be this generator's): ids
    /// stop when it ends, and start after its
    /// [`not_before_millis`](WorkerLease::not_before_millis).
    pub fn on_lease(mut self, lease: WorkerLease) -> Result<Self> {
        if lease.worker_id() != self.worker_id {
            return Err(Error::invalid_argument(format!(
                "the lease is for worker id {}, the generator for {}",
                lease.worker_id(),
                self.worker_id
            )));
        }
        let floor = lease
            .not_before_millis()
            .saturating_sub(self.layout.epoch_millis)
            .min(self.layout.max_time());
        if floor > 0 {
            // As if the previous holder's last millisecond were used up here.
            self.state =
                AtomicU64::new((floor << self.layout.sequence_bits) | self.layout.max_sequence());
        }
        self.lease = Some(lease);
        Ok(self)
    }

    /// The worker lease this generator issues on, if any.
    pub fn lease(&self) -> Option<&WorkerLease> {
        self.lease.as_ref()
    }

    /// The worker id of this generator.
    pub fn worker_id(&self) -> u64 {
        self.worker_id
    }

    /// The layout of this generator.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Milliseconds since the layout's epoch; on a leased worker id, fails
    /// once the lease's local deadline has passed (one clock read for both).
    #[inline]
    fn since_epoch(&self) -> Result<u64> {
        let now = match &self.lease {
            None => self.clock.now_millis(),
            Some(lease) => {
                let (now, tick) = self.clock.now_with_tick();
                if !lease.is_held_at(tick) {
                    return Err(lease_ended());
                }
                now
            }
        };
        let t = now.checked_sub(self.layout.epoch_millis).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidState,
                "the clock is before the layout epoch",
            )
        })?;
        if t > self.layout.max_time() {
            return Err(Error::new(
                ErrorKind::InvalidState,
                "the layout's time bits are exhausted",
            ));
        }
        Ok(t)
    }

    #[inline]
    fn compose(&self, state: u64) -> i64 {
        let seq_bits = self.layout.sequence_bits;
        let time = state >> seq_bits;
        let seq = state & self.layout.max_sequence();
        ((time << (self.layout.worker_bits + seq_bits)) | (self.worker_id << seq_bits) | seq) as i64
    }
}

#[cold]
fn lease_ended() -> Error {
    Error::new(
        ErrorKind::LeaseLost,
        "the worker id lease ended (its local deadline passed, or it was lost or released); no more ids from this generator",
    )
}

#[cold]
fn clock_behind(by: u64, max_back: u64) -> Error {
    Error::new(
        ErrorKind::InvalidState,
        format!(
            "the clock is {by} ms behind the last timestamp used (this generator's, or the previous holder's of this worker id), more than the tolerated {max_back} ms"
        ),
    )
}

impl<C: Clock> IdGenerator for Snowflake<C> {
    #[inline]
    fn next_id(&self) -> Result<i64> {
        let seq_bits = self.layout.sequence_bits;
        let max_seq = self.layout.max_sequence();
        let max_back = self.layout.max_backward.as_millis() as u64;
        let mut cur = self.state.load(Ordering::Relaxed);
        loop {
            let now = self.since_epoch()?;
            let last = cur >> seq_bits;
            let next = if now > last {
                now << seq_bits
            } else {
                if last - now > max_back {
                    return Err(clock_behind(last - now, max_back));
                }
                if cur & max_seq == max_seq {
                    // This millisecond is used up: wait for the clock.
                    std::hint::spin_loop();
                    std::thread::yield_now();
                    cur = self.state.load(Ordering::Relaxed);
                    continue;
                }
                cur + 1
            };
            match self
                .state
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(self.compose(next)),
                Err(actual) => cur = actual,
            }
        }
    }

    fn decompose(&self, id: i64) -> IdParts {
        let id = id as u64;
        let seq_bits = self.layout.sequence_bits;
        let worker_bits = self.layout.worker_bits;
        let millis = id >> (seq_bits + worker_bits);
        IdParts {
            millis_since_epoch: millis,
            time: UNIX_EPOCH
                + Duration::from_millis(self.layout.epoch_millis.saturating_add(millis)),
            worker_id: (id >> seq_bits) & self.layout.max_worker_id(),
            sequence: id & self.layout.max_sequence(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[derive(Clone)]
    struct FakeClock(Arc<AtomicU64>);

    impl Clock for FakeClock {
        fn now_millis(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn fake(start: u64) -> (Snowflake<FakeClock>, Arc<AtomicU64>) {
        let t = Arc::new(AtomicU64::new(start));
        let layout = Layout {
            epoch_millis: 1_000,
            ..Layout::default()
        };
        (
            Snowflake::with_clock(layout, 3, FakeClock(t.clone())).unwrap(),
            t,
        )
    }

    #[test]
    fn decompose_inverts_compose() {
        let (g, _) = fake(5_000);
        let id = g.next_id().unwrap();
        let p = g.decompose(id);
        assert_eq!(
            (p.millis_since_epoch, p.worker_id, p.sequence),
            (4_000, 3, 0)
        );
        let p2 = g.decompose(g.next_id().unwrap());
        assert_eq!(p2.sequence, 1);
    }

    #[test]
    fn small_rollback_keeps_ids_increasing() {
        let (g, t) = fake(5_000);
        let a = g.next_id().unwrap();
        t.store(4_990, Ordering::SeqCst); // 10 ms back, within 50 ms
        let b = g.next_id().unwrap();
        assert!(b > a);
        assert_eq!(g.decompose(b).millis_since_epoch, 4_000);
    }

    #[test]
    fn large_rollback_is_an_error_not_a_duplicate() {
        let (g, t) = fake(5_000);
        g.next_id().unwrap();
        t.store(4_000, Ordering::SeqCst);
        assert_eq!(g.next_id().unwrap_err().kind(), ErrorKind::InvalidState);
    }

    #[test]
    fn exhausted_sequence_waits_for_the_next_millisecond() {
        let (g, t) = fake(5_000);
        for _ in 0..4096 {
            g.next_id().unwrap();
        }
        let t2 = t.clone();
        let bump = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            t2.store(5_001, Ordering::SeqCst);
        });
        let id = g.next_id().unwrap();
        bump.join().unwrap();
        assert_eq!(g.decompose(id).millis_since_epoch, 4_001);
    }

    #[test]
    fn bad_layouts_and_workers_are_rejected() {
        let bad = Layout {
            time_bits: 40,
            ..Layout::default()
        };
        assert_eq!(
            Snowflake::new(bad, 0).unwrap_err().kind(),
            ErrorKind::InvalidConfig
        );
        assert_eq!(
            Snowflake::new(Layout::default(), 1024).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn system_clock_follows_the_wall_clock() {
        let c = SystemClock::new();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let ours = c.now_millis();
        assert!(ours.abs_diff(wall) < 50, "{ours} vs {wall}");
    }

    #[test]
    fn ids_are_unique_across_threads() {
        let g = Arc::new(Snowflake::new(Layout::default(), 1).unwrap());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || {
                    (0..20_000)
                        .map(|_| g.next_id().unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            let ids = h.join().unwrap();
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "increasing per thread");
            all.extend(ids);
        }
        assert_eq!(all.len(), 80_000);
    }

    struct Gone;

    #[async_trait::async_trait]
    impl crate::lease::LeaseBackend for Gone {
        fn describe(&self) -> String {
            "worker id 3".into()
        }
        async fn extend(&self, _: Duration) -> Result<bool> {
            Ok(false)
        }
        async fn release(&self) -> Result<bool> {
            Ok(false)
        }
    }

    #[test]
    fn a_lease_past_its_local_deadline_stops_the_ids() {
        use crate::lease::{Lease, LeaseOptions, Tick};
        let (g, _) = fake(5_000);
        let opts = LeaseOptions::new(Duration::from_millis(30)).auto_renew(false);
        let lease = WorkerLease::new(3, Lease::start(Gone, opts, Tick::now()));
        let g = g.on_lease(lease).unwrap();
        assert!(g.next_id().is_ok());
        std::thread::sleep(Duration::from_millis(30));
        // No keeper ran (no runtime): the deadline alone stops the ids.
        assert_eq!(g.next_id().unwrap_err().kind(), ErrorKind::LeaseLost);
        assert!(!g.lease().unwrap().is_held());
    }

    #[test]
    fn a_reused_worker_id_starts_after_the_previous_holders_last_timestamp() {
        // The previous holder's clock was 20 ms ahead of ours: wait for it.
        let (g, t) = fake(5_000);
        let g = g
            .on_lease(WorkerLease::fixed(3).with_not_before(5_020))
            .unwrap();
        let t2 = t.clone();
        let bump = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            t2.store(5_021, Ordering::SeqCst);
        });
        let id = g.next_id().unwrap();
        bump.join().unwrap();
        assert!(g.decompose(id).millis_since_epoch > 4_020);

        // 2 s ahead: refuse rather than wait that long (or repeat an id).
        let (g, t) = fake(5_000);
        let g = g
            .on_lease(WorkerLease::fixed(3).with_not_before(7_000))
            .unwrap();
        assert_eq!(g.next_id().unwrap_err().kind(), ErrorKind::InvalidState);
        t.store(7_001, Ordering::SeqCst);
        assert_eq!(g.decompose(g.next_id().unwrap()).millis_since_epoch, 6_001);

        let (g, _) = fake(5_000);
        assert!(
            g.on_lease(WorkerLease::fixed(4)).is_err(),
            "another worker id"
        );
    }
}
