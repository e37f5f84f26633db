//! The near cache's entries and the rules that keep them no older than the
//! server: a fill stores its value only if no invalidation of its key (and
//! no loss of the invalidation channel) came in while it was reading.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

/// One cached answer: a value, or a remembered miss, until `expires`.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) value: Option<Bytes>,
    pub(crate) expires: quanta::Instant,
}

const SHARDS: usize = 16;

/// An entry's weight: its key and value bytes, at least `floor` (the share
/// of the byte budget one entry may take), so the byte bound also bounds
/// the number of entries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Weight {
    pub(crate) floor: u64,
}

impl quick_cache::Weighter<String, Entry> for Weight {
    fn weight(&self, key: &String, entry: &Entry) -> u64 {
        let bytes = (key.len() + entry.value.as_ref().map_or(0, Bytes::len)) as u64;
        bytes.max(self.floor)
    }
}

/// Counts evictions for the size bound.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CountEvictions;

impl quick_cache::Lifecycle<String, Entry> for CountEvictions {
    type RequestState = ();

    fn begin_request(&self) -> Self::RequestState {}

    fn on_evict(&self, _: &mut (), _: String, _: Entry) {
        metrics::counter!("im_infra_near_cache_evictions_total").increment(1);
    }
}

pub(crate) type Entries =
    quick_cache::sync::Cache<String, Entry, Weight, foldhash::fast::RandomState, CountEvictions>;

/// A fill in progress: its key's token and the generation it started in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fill {
    token: u64,
    generation: u64,
}

pub(crate) struct NearState {
    /// This near cache among all of the process (never 0): its entries in
    /// the threads' fronts are told apart by it.
    pub(crate) id: u64,
    pub(crate) entries: Entries,
    /// Held (shared) by a fill between its last check and its insert, and
    /// (exclusive) by dropping everything: so no fill that started before
    /// a drop can store after it.
    drop_all: RwLock<()>,
    /// Whether invalidations are flowing (always, with a staleness bound
    /// instead of a channel). While false every read goes to the server.
    live: AtomicBool,
    /// Bumped when everything is dropped at once (channel lost, flush).
    generation: AtomicU64,
    /// Bumped when the channel comes (back) up.
    readies: AtomicU64,
    /// Bumped by every invalidation: a read joins only a fill that began
    /// in the same epoch, so no caller gets a value an invalidation it
    /// could have seen overtook.
    epoch: AtomicU64,
    next_token: AtomicU64,
    /// Fills in progress, by key: an invalidation of the key removes its
    /// token, so the fill does not store what it read.
    pending: [Mutex<HashMap<String, u64>>; SHARDS],
}

impl NearState {
    pub(crate) fn new(entries: Entries, live: bool) -> Self {
        static IDS: AtomicU64 = AtomicU64::new(1);
        NearState {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            entries,
            drop_all: RwLock::new(()),
            live: AtomicBool::new(live),
            generation: AtomicU64::new(0),
            readies: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            next_token: AtomicU64::new(1),
            pending: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, u64>> {
        use std::hash::BuildHasher;
        let h = foldhash::fast::FixedState::default().hash_one(key);
        &self.pending[(h as usize) % SHARDS]
    }

    /// The invalidation epoch (see the field).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub(crate) fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Begins a fill of `key`.
    pub(crate) fn begin(&self, key: &str) -> Fill {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        // The generation is read before the token is visible: a loss after
        // this point is seen at `finish`.
        let generation = self.generation.load(Ordering::Acquire);
        self.shard(key).lock().insert(key.to_owned(), token);
        Fill { token, generation }
    }

    /// Ends a fill: stores `entry` unless the key was invalidated, the
    /// channel lost, or everything dropped since [`begin`](Self::begin).
    /// Returns whether it was stored.
    pub(crate) fn finish(&self, key: &str, fill: Fill, entry: Option<Entry>) -> bool {
        let _no_drop_meanwhile = self.drop_all.read();
        let mut pending = self.shard(key).lock();
        let ours = pending.get(key) == Some(&fill.token);
        if ours {
            pending.remove(key);
        }
        let store =
            ours && self.is_live() && self.generation.load(Ordering::Acquire) == fill.generation;
        match entry {
            // Inserted under the shard's lock: an invalidation of this key
            // waits for it, then removes it.
            Some(entry) if store => {
                self.entries.insert(key.to_owned(), entry);
                true
            }
            _ => false,
        }
    }

    /// Forgets a fill that will not finish (its caller was cancelled).
    pub(crate) fn abandon(&self, key: &str, fill: Fill) {
        let mut pending = self.shard(key).lock();
        if pending.get(key) == Some(&fill.token) {
            pending.remove(key);
        }
    }

    /// Drops `key` and any fill of it in progress.
    pub(crate) fn invalidate(&self, key: &str) {
        let mut pending = self.shard(key).lock();
        pending.remove(key);
        self.entries.remove(key);
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Drops everything, including fills in progress.
    pub(crate) fn invalidate_all(&self) {
        let _exclusive = self.drop_all.write();
        self.drop_everything();
    }

    /// Under `drop_all`, exclusively.
    fn drop_everything(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.entries.clear();
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// The channel is down: drop everything and read from the server until
    /// [`ready`](Self::ready). Ordered with `ready` by `drop_all`: the
    /// later of the two wins.
    pub(crate) fn lost(&self) {
        let _exclusive = self.drop_all.write();
        self.live.store(false, Ordering::Release);
        self.drop_everything();
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
        let _exclusive = self.drop_all.write();
        if self.readies.load(Ordering::Acquire) == seen {
            self.live.store(false, Ordering::Release);
            self.drop_everything();
        }
    }

    /// The channel is (back) up: entries may be kept again.
    pub(crate) fn ready(&self) {
        let _exclusive = self.drop_all.write();
        // Whatever was cached before the channel came back may have missed
        // invalidations while it was down.
        self.drop_everything();
        self.readies.fetch_add(1, Ordering::AcqRel);
        self.live.store(true, Ordering::Release);
    }
}
