//! One load per key at a time within a process.

use std::collections::HashMap;
use std::future::Future;
use std::sync::LazyLock;

use bytes::Bytes;
use futures::channel::oneshot;
use parking_lot::Mutex;

use crate::error::Result;

type Outcome = Result<Option<Bytes>>;
type Flights = HashMap<(usize, String), Vec<oneshot::Sender<Outcome>>, foldhash::fast::RandomState>;

/// In-flight loads, keyed by (cache instance address, key), with the
/// callers waiting for each. A load nobody waits for costs one entry: no
/// channel is made until a second caller comes.
static IN_FLIGHT: LazyLock<Mutex<Flights>> = LazyLock::new(|| Mutex::new(HashMap::default()));

/// Takes the load out of the map when the leader finishes or is cancelled;
/// the waiters of a cancelled leader see their senders go and try again.
struct LeaderGuard<'a> {
    id: &'a (usize, String),
}

impl LeaderGuard<'_> {
    fn waiters(self) -> Vec<oneshot::Sender<Outcome>> {
        let waiters = IN_FLIGHT.lock().remove(self.id).unwrap_or_default();
        std::mem::forget(self);
        waiters
    }
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        IN_FLIGHT.lock().remove(self.id);
    }
}

/// Runs `work` for `(instance, key)` unless another caller of this process is
/// already running it, in which case this caller waits for that outcome. A
/// leader that is cancelled hands the work over to one of the waiters.
pub(crate) async fn run<F, Fut>(instance: usize, key: String, mut work: F) -> Outcome
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Outcome>,
{
    let id = (instance, key);
    loop {
        let waiting = {
            let mut map = IN_FLIGHT.lock();
            match map.get_mut(&id) {
                Some(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    map.insert(id.clone(), Vec::new());
                    None
                }
            }
        };
        match waiting {
            None => {
                let guard = LeaderGuard { id: &id };
                let outcome = work().await;
                for waiter in guard.waiters() {
                    let _ = waiter.send(outcome.clone());
                }
                return outcome;
            }
            Some(rx) => match rx.await {
                Ok(outcome) => return outcome,
                // The leader went away without an outcome: the first
                // waiter to come back takes over.
                Err(oneshot::Canceled) => continue,
            },
        }
    }
}

/// Whether a load is in flight for `(instance, key)` (for tests).
#[cfg(test)]
pub(crate) fn in_flight(instance: usize, key: &str) -> bool {
    IN_FLIGHT.lock().contains_key(&(instance, key.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_one_run() {
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let runs = runs.clone();
            tasks.push(tokio::spawn(async move {
                run(1, "k".to_owned(), || {
                    let runs = runs.clone();
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(Some(Bytes::from_static(b"v")))
                    }
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), Some(Bytes::from_static(b"v")));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(!in_flight(1, "k"));
    }

    #[tokio::test]
    async fn cancelled_leader_hands_over() {
        let leader = tokio::spawn(async {
            run(2, "k".to_owned(), || async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(None)
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let follower = tokio::spawn(async {
            run(2, "k".to_owned(), || async {
                Ok(Some(Bytes::from_static(b"second")))
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let got = tokio::time::timeout(Duration::from_secs(5), follower)
            .await
            .expect("follower finished")
            .unwrap()
            .unwrap();
        assert_eq!(got, Some(Bytes::from_static(b"second")));
    }
}
