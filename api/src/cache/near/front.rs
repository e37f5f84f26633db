//! A per-thread front of the hottest keys: a hit there writes nothing
//! another thread reads.
//!
//! A hit in the shared store takes its shard's lock and a count on the
//! value, two cache lines every reading thread writes: when several
//! threads read one key, those lines go back and forth between cores and a
//! hit costs several times what it does on one thread. So each thread
//! keeps a copy of the keys it reads most: 64 slots, each holding one
//! key, its value (a copy of its own, at most [`MAX_VALUE`] bytes), its
//! deadline, and the near cache's invalidation epoch when it was copied.
//!
//! A slot answers only while the epoch has not moved: every invalidation,
//! loss and recovery of the channel bumps it, so a copy is never older
//! than what the shared store would answer. The epoch is read before the
//! shared store, and an invalidation removes the key before it bumps the
//! epoch: a copy stamped with an epoch was read from a store no
//! invalidation of that epoch had reached yet.
//!
//! A key is copied on its second shared hit in a row in its slot, so a
//! key read once does not push out a hot one. What a thread holds here is
//! outside the near cache's bounds: at most 64 × (key + 1 KiB) per thread,
//! kept until the slot is reused.

use std::cell::RefCell;

use bytes::Bytes;
use quanta::Instant;

use super::state::Entry;

/// Slots per thread.
const SLOTS: usize = 64;
/// Values larger than this are not copied to the front.
pub(crate) const MAX_VALUE: usize = 1024;

struct Slot {
    /// The near cache's id; 0: empty.
    owner: u64,
    epoch: u64,
    /// The hash of the key that last came to this slot from the shared
    /// store.
    seen: u64,
    key: Box<str>,
    value: Option<Bytes>,
    expires: Instant,
}

thread_local! {
    static FRONT: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
}

/// The hash a key's slot is chosen by.
#[inline]
pub(crate) fn hash(key: &str) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::default().hash_one(key)
}

fn index(hash: u64) -> usize {
    (hash % SLOTS as u64) as usize
}

/// The value of `key` in this thread's front, if a copy of `owner`'s is
/// there, stamped with `epoch` and alive at `now`.
#[inline]
pub(crate) fn get(
    owner: u64,
    epoch: u64,
    hash: u64,
    key: &str,
    now: Instant,
) -> Option<Option<Bytes>> {
    FRONT
        .try_with(|front| {
            let front = front.borrow();
            let slot = front.get(index(hash))?;
            (slot.owner == owner && slot.epoch == epoch && slot.expires > now && *slot.key == *key)
                .then(|| slot.value.clone())
        })
        .ok()
        .flatten()
}

/// `entry` of `key` was just read from `owner`'s shared store, after
/// `epoch` was read: copied to this thread's front if it was the last key
/// read there from the store too.
pub(crate) fn offer(owner: u64, epoch: u64, hash: u64, key: &str, entry: &Entry) {
    if entry.value.as_ref().is_some_and(|v| v.len() > MAX_VALUE) {
        return;
    }
    let _ = FRONT.try_with(|front| {
        let mut front = front.borrow_mut();
        if front.is_empty() {
            front.extend((0..SLOTS).map(|_| Slot {
                owner: 0,
                epoch: 0,
                seen: 0,
                key: Box::from(""),
                value: None,
                expires: entry.expires,
            }));
        }
        let Some(slot) = front.get_mut(index(hash)) else {
            return;
        };
        if slot.seen != hash {
            slot.seen = hash;
            return;
        }
        *slot = Slot {
            owner,
            epoch,
            seen: hash,
            key: Box::from(key),
            // A copy, so that its count is this thread's alone.
            value: entry.value.as_deref().map(Bytes::copy_from_slice),
            expires: entry.expires,
        };
    });
}
