//! Several callers' misses read from the server in one call.
//!
//! At most [`MAX_IN_FLIGHT`] reads of the server run at once. A miss that
//! finds one free reads its key alone; otherwise it queues, and when a
//! read ends, the callers queued then ([`MAX_KEYS`] at most) are read
//! together by the first of them. Alone, a miss is one read as before;
//! under load the reads grow instead of queueing behind one another, so a
//! round trip and the call around it are paid once per batch.
//!
//! Errors: the server's trouble (a retryable error) or an operation the
//! cache lacks is every caller's answer; any other error may be one key's
//! fault (a Redis key holding another type), so each caller then reads its
//! own key alone.
//!
//! Cancellation: a caller dropped while it reads for others hands the
//! right to read to the first of them, who reads for itself and the rest.
//! A caller dropped while queued is skipped (its key may still be read).
//! The right to read is handed on even when the caller it was handed to
//! has gone, so no cancellation lets more reads out at once than the
//! bound, nor loses one.

use std::collections::VecDeque;

use bytes::Bytes;
use futures::channel::oneshot;
use parking_lot::Mutex;

use crate::cache::{Cache, KeyTtl};
use crate::error::{Error, ErrorKind, Result};

/// Reads of the server at once, at most.
pub(crate) const MAX_IN_FLIGHT: usize = 4;
/// Keys in one read, at most.
pub(crate) const MAX_KEYS: usize = 128;

type Read = Result<(Option<Bytes>, KeyTtl)>;

enum Message {
    /// The key's value and TTL (or the read's error).
    Answer(Read),
    /// Read now: the key and these callers' keys.
    Lead(VecDeque<Waiter>),
}

struct Waiter {
    key: super::state::Key,
    tx: oneshot::Sender<Message>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiter>,
    in_flight: usize,
}

/// The batching of one near cache's misses; see the [module](self).
#[derive(Default)]
pub(crate) struct Batcher {
    queue: Mutex<Queue>,
}

impl Batcher {
    /// `key`'s value and TTL from `inner`, read alone or with other
    /// callers' keys.
    pub(crate) async fn read(&self, inner: &dyn Cache, key: &str) -> Read {
        let rx = {
            let mut q = self.queue.lock();
            if q.in_flight < MAX_IN_FLIGHT {
                q.in_flight += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                q.waiting.push_back(Waiter {
                    key: key.into(),
                    tx,
                });
                Some(rx)
            }
        };
        let others = match rx {
            // Nothing waits while a read is free.
            None => VecDeque::new(),
            Some(rx) => {
                let mut queued = Queued { batcher: self, rx };
                match (&mut queued.rx).await {
                    Ok(Message::Answer(read)) => return read,
                    Ok(Message::Lead(others)) => others,
                    // The caller reading for us failed on another key's
                    // error: read alone.
                    Err(oneshot::Canceled) => return inner.get_with_ttl(key).await,
                }
            }
        };
        self.lead(inner, key, others).await
    }

    /// Reads `key` and the keys of `others`, answers them, hands the right
    /// to read on.
    async fn lead(&self, inner: &dyn Cache, key: &str, others: VecDeque<Waiter>) -> Read {
        let leading = Leading {
            batcher: self,
            others,
        };
        if leading.others.is_empty() {
            return inner.get_with_ttl(key).await;
        }
        let keys: Vec<&str> = std::iter::once(key)
            .chain(leading.others.iter().map(|w| w.key.as_str()))
            .collect();
        let read = inner.get_many_with_ttl(&keys).await.and_then(|values| {
            if values.len() == keys.len() {
                Ok(values)
            } else {
                Err(Error::new(
                    ErrorKind::Internal,
                    format!("{} answers for {} keys", values.len(), keys.len()),
                ))
            }
        });
        drop(keys);
        // The next read may start while these answers are handed out.
        let others = leading.others_taken();
        match read {
            Ok(values) => {
                let mut values = values.into_iter();
                // There are as many answers as keys (checked above).
                let own = values.next().unwrap_or((None, KeyTtl::Missing));
                for (waiter, value) in others.into_iter().zip(values) {
                    let _ = waiter.tx.send(Message::Answer(Ok(value)));
                }
                Ok(own)
            }
            // The server's trouble, or an operation the cache lacks: the
            // same answer for every key.
            Err(e) if e.is_retryable() || e.kind() == ErrorKind::Unsupported => {
                for waiter in others {
                    let _ = waiter.tx.send(Message::Answer(Err(e.clone())));
                }
                Err(e)
            }
            // Maybe one key's fault (a Redis key of another type): each
            // caller reads its own key alone and gets its own answer.
            Err(_) => {
                drop(others);
                inner.get_with_ttl(key).await
            }
        }
    }

    /// Reads of the server under way.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.queue.lock().in_flight
    }

    /// A read ended: the next read goes to the first queued caller still
    /// waiting, with the callers queued behind it; with none, the right to
    /// read goes back to the pool.
    fn release(&self) {
        let mut q = self.queue.lock();
        loop {
            let n = q.waiting.len().min(MAX_KEYS);
            if n == 0 {
                q.in_flight -= 1;
                return;
            }
            let group = q.waiting.drain(..n).collect();
            if hand_on(group) {
                return;
            }
        }
    }
}

/// Gives the read to the first caller of `group` still waiting, with the
/// rest; `false` if none is.
fn hand_on(mut group: VecDeque<Waiter>) -> bool {
    while let Some(next) = group.pop_front() {
        match next.tx.send(Message::Lead(group)) {
            Ok(()) => return true,
            Err(Message::Lead(back)) => group = back,
            Err(Message::Answer(_)) => return false,
        }
    }
    false
}

/// The right to read, held by a caller reading for itself and `others`;
/// handed on when dropped, finished or not.
struct Leading<'a> {
    batcher: &'a Batcher,
    others: VecDeque<Waiter>,
}

impl Leading<'_> {
    /// Hands the right to read on and keeps the callers to answer.
    fn others_taken(mut self) -> VecDeque<Waiter> {
        std::mem::take(&mut self.others)
    }
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        // Unanswered callers (a dropped read) get the right to read: the
        // first of them still waiting reads for itself and the rest, so a
        // dropped read lets no more reads out at once than the bound.
        if !hand_on(std::mem::take(&mut self.others)) {
            self.batcher.release();
        }
    }
}

/// A queued caller; if it is dropped after the read was handed to it, it
/// hands the read on.
struct Queued<'a> {
    batcher: &'a Batcher,
    rx: oneshot::Receiver<Message>,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        // Closed first: a hand-off racing with this drop is then either
        // received here or refused to its sender, which hands it on; never
        // lost with the channel.
        self.rx.close();
        if let Ok(Some(Message::Lead(group))) = self.rx.try_recv() {
            if !hand_on(group) {
                self.batcher.release();
            }
        }
    }
}
