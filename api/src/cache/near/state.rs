//! The near cache's entries and the rules that keep them no older than the
//! server: a fill stores its value only if no invalidation of its key (and
//! no loss of the invalidation channel) came in while it was reading.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use futures::channel::oneshot;
use parking_lot::{Mutex, MutexGuard};

use crate::error::Result;

/// One cached answer: a value, or a remembered miss, until `expires`.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) value: Option<Bytes>,
    pub(crate) expires: quanta::Instant,
}

const SHARDS: usize = 16;

/// A key as the near cache holds it: inline up to 24 bytes.
pub(crate) type Key = compact_str::CompactString;

/// An entry's weight: its key and value bytes, at least `floor` (the share
/// of the byte budget one entry may take), so the byte bound also bounds
/// the number of entries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Weight {
    pub(crate) floor: u64,
}

impl quick_cache::Weighter<Key, Entry> for Weight {
    fn weight(&self, key: &Key, entry: &Entry) -> u64 {
        let bytes = (key.len() + entry.value.as_ref().map_or(0, Bytes::len)) as u64;
        bytes.max(self.floor)
    }
}

/// Counts evictions for the size bound.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CountEvictions;

impl quick_cache::Lifecycle<Key, Entry> for CountEvictions {
    type RequestState = ();

    fn begin_request(&self) -> Self::RequestState {}

    fn on_evict(&self, _: &mut (), _: Key, _: Entry) {
        metrics::counter!("im_infra_near_cache_evictions_total").increment(1);
    }
}

pub(crate) type Entries =
    quick_cache::sync::Cache<Key, Entry, Weight, foldhash::fast::RandomState, CountEvictions>;

/// What a read that missed gets.
pub(crate) type Outcome = Result<Option<Bytes>>;

/// A fill in progress: its token in its key's flight.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fill {
    token: u64,
}

/// A read that missed: it reads the key itself, or waits for the read in
/// flight.
pub(crate) enum Joined {
    /// No read of the key was in flight: this caller reads it, then calls
    /// [`NearState::finish`] (or [`NearState::abandon`]).
    Lead(Fill),
    /// A read of the key is in flight: its answer comes here. A closed
    /// channel means the read was abandoned or overtaken by an
    /// invalidation: join again.
    Wait(oneshot::Receiver<Outcome>),
}

/// The read in flight for one key and the callers waiting for it.
struct Flight {
    token: u64,
    waiters: Vec<oneshot::Sender<Outcome>>,
}

/// One shard of the reads in flight.
#[derive(Default)]
struct Shard {
    next_token: u64,
    flights: HashMap<Key, Flight, foldhash::fast::RandomState>,
}

pub(crate) struct NearState {
    /// This near cache among all of the process (never 0): its entries in
    /// the threads' fronts are told apart by it.
    pub(crate) id: u64,
    pub(crate) entries: Entries,
    /// Whether invalidations are flowing (always, with a staleness bound
    /// instead of a channel). While false every read goes to the server.
    live: AtomicBool,
    /// Bumped when the channel comes (back) up.
    readies: AtomicU64,
    /// Bumped by every invalidation, after the entries changed: a copy of
    /// an entry outside the store (a thread's front) answers only in the
    /// epoch it was taken in.
    epoch: AtomicU64,
    /// Reads in flight, by key (one per key: the single flight of misses).
    /// A fill stores only if its flight is still there when it finishes,
    /// and stores under its shard's lock; an invalidation removes the
    /// key's flight under the same lock, and dropping everything removes
    /// every flight under all of them. So nothing read before an
    /// invalidation is stored after it, nor handed to a caller that came
    /// after it.
    flights: [Mutex<Shard>; SHARDS],
}

impl NearState {
    pub(crate) fn new(entries: Entries, live: bool) -> Self {
        static IDS: AtomicU64 = AtomicU64::new(1);
        NearState {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            entries,
            live: AtomicBool::new(live),
            readies: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            flights: std::array::from_fn(|_| Mutex::new(Shard::default())),
        }
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        use std::hash::BuildHasher;
        let h = foldhash::fast::FixedState::default().hash_one(key);
        self.flights[(h as usize) % SHARDS].lock()
    }

    /// Every shard, locked in order: nothing is stored meanwhile.
    fn exclusive(&self) -> [MutexGuard<'_, Shard>; SHARDS] {
        std::array::from_fn(|i| self.flights[i].lock())
    }

    /// The invalidation epoch (see the field).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub(crate) fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// A read of `key` missed: lead its fill, or wait for the one in
    /// flight.
    pub(crate) fn join(&self, key: &str) -> Joined {
        let mut shard = self.shard(key);
        if let Some(flight) = shard.flights.get_mut(key) {
            let (tx, rx) = oneshot::channel();
            flight.waiters.push(tx);
            return Joined::Wait(rx);
        }
        shard.next_token += 1;
        let token = shard.next_token;
        shard.flights.insert(
            Key::new(key),
            Flight {
                token,
                waiters: Vec::new(),
            },
        );
        Joined::Lead(Fill { token })
    }

    /// Ends a fill: stores `entry` unless the key was invalidated, the
    /// channel lost, or everything dropped since [`join`](Self::join).
    /// Returns the callers waiting for the answer (none if the fill was
    /// overtaken: they were told to join again).
    pub(crate) fn finish(
        &self,
        key: &str,
        fill: Fill,
        entry: Option<Entry>,
    ) -> Vec<oneshot::Sender<Outcome>> {
        let mut shard = self.shard(key);
        if shard.flights.get(key).is_none_or(|f| f.token != fill.token) {
            return Vec::new();
        }
        let Some((key, flight)) = shard.flights.remove_entry(key) else {
            return Vec::new();
        };
        if let Some(entry) = entry.filter(|_| self.is_live()) {
            // Inserted under the shard's lock: an invalidation of this key
            // waits for it, then removes it.
            self.entries.insert(key, entry);
        }
        flight.waiters
    }

    /// Forgets a fill that will not finish (its caller was cancelled): its
    /// waiters join again.
    pub(crate) fn abandon(&self, key: &str, fill: Fill) {
        let mut shard = self.shard(key);
        if shard
            .flights
            .get(key)
            .is_some_and(|f| f.token == fill.token)
        {
            shard.flights.remove(key);
        }
    }

    /// Drops `key` and any fill of it in flight.
    pub(crate) fn invalidate(&self, key: &str) {
        let mut shard = self.shard(key);
        shard.flights.remove(key);
        self.entries.remove(key);
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Drops everything, including fills in flight.
    pub(crate) fn invalidate_all(&self) {
        let mut shards = self.exclusive();
        self.drop_everything(&mut shards);
    }

    /// Under every shard's lock.
    fn drop_everything(&self, shards: &mut [MutexGuard<'_, Shard>; SHARDS]) {
        for shard in shards.iter_mut() {
            shard.flights.clear();
        }
        self.entries.clear();
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// The channel is down: drop everything and read from the server until
    /// [`ready`](Self::ready). Ordered with `ready` by the shards' locks:
    /// the later of the two wins.
    pub(crate) fn lost(&self) {
        let mut shards = self.exclusive();
        self.live.store(false, Ordering::Release);
        self.drop_everything(&mut shards);
    }

    /// How many times the channel came up (see
    /// [`lost_unless_ready_since`](Self::lost_unless_ready_since)).
    pub(crate) fn readies(&self) -> u64 {
        self.readies.load(Ordering::Acquire)
    }

    /// [`lost`](Self::lost), unless the channel came up again since
    /// `readies` read `seen`: a failure the source has already recovered
    /// from must not leave the cache bypassed.
    pub(crate) fn lost_unless_ready_since(&self, seen: u64) {
        let mut shards = self.exclusive();
        if self.readies.load(Ordering::Acquire) == seen {
            self.live.store(false, Ordering::Release);
            self.drop_everything(&mut shards);
        }
    }

    /// The channel is (back) up: entries may be kept again.
    pub(crate) fn ready(&self) {
        let mut shards = self.exclusive();
        // Whatever was cached or read before the channel came back may
        // have missed invalidations while it was down.
        self.drop_everything(&mut shards);
        self.readies.fetch_add(1, Ordering::AcqRel);
        self.live.store(true, Ordering::Release);
    }
}
