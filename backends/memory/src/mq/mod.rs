//! In-process messaging: partitioned topics and consumer groups.
//!
//! Topics are append-only logs, one per partition. A consumer group keeps a
//! committed offset per partition and an owner per partition; ownership moves
//! cooperatively: a member gives a partition up only between two messages
//! (after committing), and a member takes a partition only when nobody owns
//! it, so no message is handled by two members between commits.

mod consumer;
mod producer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;

use parking_lot::{Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::Bytes;
use im_infra::mq::{Delivery, Message, ReceivedMessage, StartPosition, TopicSpec};
use im_infra::Result;
use tokio::sync::Notify;

pub(crate) use consumer::MemoryConsumer;
pub(crate) use producer::MemoryProducer;

#[derive(Debug, Clone)]
struct Stored {
    key: Option<Bytes>,
    payload: Bytes,
    headers: Vec<(String, Bytes)>,
    timestamp: SystemTime,
}

#[derive(Debug, Default)]
struct Topic {
    partitions: Vec<Vec<Stored>>,
}

type Partition = (String, i32);

#[derive(Debug, Default)]
struct Group {
    start: StartPosition,
    /// Members and the topics each one reads.
    members: BTreeMap<u64, Vec<String>>,
    /// Next offset to read, per partition.
    committed: HashMap<Partition, i64>,
    /// The member currently reading each partition.
    owners: HashMap<Partition, u64>,
}

#[derive(Debug, Default)]
struct Inner {
    topics: HashMap<String, Topic>,
    groups: HashMap<String, Group>,
    round_robin: u64,
}

/// Topics and groups shared by every producer and consumer of one backend.
#[derive(Debug, Default)]
pub(crate) struct MqStore {
    inner: Mutex<Inner>,
    /// Woken on every new message, commit and membership change.
    changed: Notify,
    member_ids: AtomicU64,
}

/// A message picked for a member.
pub(crate) struct Picked {
    message: ReceivedMessage,
}

/// FNV-1a: a stable hash so that a key always maps to the same partition.
fn partition_of(key: &[u8], partitions: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % partitions as u64) as usize
}

impl MqStore {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// Creates a checked spec's topic (`Ok(false)` when it exists with
    /// that count); `AlreadyExists` when it exists with another.
    pub(crate) fn create_topic(&self, spec: &TopicSpec) -> Result<bool> {
        let mut inner = self.inner();
        match inner.topics.get(&spec.name) {
            Some(t) => spec.exists_with(t.partitions.len()),
            None => {
                inner.topics.insert(
                    spec.name.clone(),
                    Topic {
                        partitions: vec![Vec::new(); spec.partitions as usize],
                    },
                );
                Ok(true)
            }
        }
    }

    fn ensure_topic<'a>(
        inner: &'a mut Inner,
        topic: &str,
        default_partitions: u32,
    ) -> &'a mut Topic {
        inner
            .topics
            .entry(topic.to_owned())
            .or_insert_with(|| Topic {
                partitions: vec![Vec::new(); default_partitions as usize],
            })
    }

    fn append(&self, message: Message, default_partitions: u32) -> Delivery {
        let mut inner = self.inner();
        inner.round_robin = inner.round_robin.wrapping_add(1);
        let rr = inner.round_robin;
        let topic = Self::ensure_topic(&mut inner, &message.topic, default_partitions);
        let n = topic.partitions.len();
        let p = match &message.key {
            Some(k) => partition_of(k, n),
            None => (rr % n as u64) as usize,
        };
        let log = &mut topic.partitions[p];
        log.push(Stored {
            key: message.key,
            payload: message.payload,
            headers: message.headers,
            timestamp: SystemTime::now(),
        });
        let offset = (log.len() - 1) as i64;
        drop(inner);
        self.changed.notify_waiters();
        Delivery {
            partition: p as i32,
            offset,
        }
    }

    fn join(
        &self,
        group: &str,
        member: u64,
        topics: &[String],
        start: StartPosition,
        default_partitions: u32,
    ) {
        let mut inner = self.inner();
        for t in topics {
            Self::ensure_topic(&mut inner, t, default_partitions);
        }
        let ends: Vec<(Partition, i64)> = topics
            .iter()
            .flat_map(|t| {
                inner.topics[t]
                    .partitions
                    .iter()
                    .enumerate()
                    .map(move |(p, log)| ((t.clone(), p as i32), log.len() as i64))
            })
            .collect();
        let g = inner
            .groups
            .entry(group.to_owned())
            .or_insert_with(|| Group {
                start,
                ..Group::default()
            });
        for (partition, end) in ends {
            g.committed.entry(partition).or_insert(match g.start {
                StartPosition::Earliest => 0,
                StartPosition::Latest => end,
            });
        }
        g.members.insert(member, topics.to_vec());
        drop(inner);
        self.changed.notify_waiters();
    }

    fn leave(&self, group: &str, member: u64) {
        let mut inner = self.inner();
        if let Some(g) = inner.groups.get_mut(group) {
            g.members.remove(&member);
            g.owners.retain(|_, owner| *owner != member);
        }
        drop(inner);
        self.changed.notify_waiters();
    }

    /// The partitions `member` should read: each topic's partitions dealt
    /// round-robin over the members reading that topic, in id order.
    fn target(inner: &Inner, g: &Group, member: u64) -> BTreeSet<Partition> {
        let mut out = BTreeSet::new();
        let Some(my_topics) = g.members.get(&member) else {
            return out;
        };
        for topic in my_topics {
            let readers: Vec<u64> = g
                .members
                .iter()
                .filter(|(_, ts)| ts.contains(topic))
                .map(|(m, _)| *m)
                .collect();
            let Some(me) = readers.iter().position(|m| *m == member) else {
                continue;
            };
            let partitions = inner.topics.get(topic).map_or(0, |t| t.partitions.len());
            for p in (me..partitions).step_by(readers.len()) {
                out.insert((topic.clone(), p as i32));
            }
        }
        out
    }

    /// Rebalances `member`'s partitions (between messages) and picks the
    /// next message to handle, rotating over its partitions from `cursor`.
    fn next_for(&self, group: &str, member: u64, cursor: &mut usize) -> Option<Picked> {
        let mut guard = self.inner();
        let inner = &mut *guard;
        let g = inner.groups.get(group)?;
        let target = Self::target(inner, g, member);
        let g = inner.groups.get_mut(group)?;
        let mut released = false;
        g.owners.retain(|p, owner| {
            let keep = *owner != member || target.contains(p);
            released |= !keep;
            keep
        });
        for p in &target {
            g.owners.entry(p.clone()).or_insert(member);
        }
        let owned: Vec<Partition> = target
            .iter()
            .filter(|p| g.owners.get(*p) == Some(&member))
            .cloned()
            .collect();
        if released {
            self.changed.notify_waiters();
        }
        if owned.is_empty() {
            return None;
        }
        for i in 0..owned.len() {
            let (topic, p) = &owned[(*cursor + i) % owned.len()];
            let log = &inner.topics.get(topic)?.partitions[*p as usize];
            let end = log.len() as i64;
            let start = g.start;
            let next = *g
                .committed
                .entry((topic.clone(), *p))
                .or_insert(match start {
                    StartPosition::Earliest => 0,
                    StartPosition::Latest => end,
                });
            if next < end {
                *cursor = (*cursor + i + 1) % owned.len();
                let s = &log[next as usize];
                return Some(Picked {
                    message: ReceivedMessage {
                        topic: topic.clone(),
                        partition: *p,
                        offset: next,
                        key: s.key.clone(),
                        payload: s.payload.clone(),
                        headers: s.headers.clone(),
                        timestamp: Some(s.timestamp),
                        attempt: 1,
                    },
                });
            }
        }
        None
    }

    /// Commits `offset + 1` if `member` still owns the partition.
    fn commit(&self, group: &str, member: u64, topic: &str, partition: i32, offset: i64) -> bool {
        let mut inner = self.inner();
        let Some(g) = inner.groups.get_mut(group) else {
            return false;
        };
        let key = (topic.to_owned(), partition);
        if g.owners.get(&key) != Some(&member) {
            return false;
        }
        let c = g.committed.entry(key).or_insert(0);
        *c = (*c).max(offset + 1);
        drop(inner);
        self.changed.notify_waiters();
        true
    }

    /// The committed offset of a partition for a group (for tests and tools).
    pub(crate) fn committed(&self, group: &str, topic: &str, partition: i32) -> Option<i64> {
        self.inner()
            .groups
            .get(group)
            .and_then(|g| g.committed.get(&(topic.to_owned(), partition)).copied())
    }
}
