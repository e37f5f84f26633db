//! One load per key at a time within a process.

use std::collections::HashMap;
use std::future::Future;
use std::sync::LazyLock;

use parking_lot::Mutex;

use bytes::Bytes;
use tokio::sync::watch;

use crate::error::Result;

type Outcome = Result<Option<Bytes>>;
type Slot = watch::Receiver<Option<Outcome>>;

/// In-flight loads, keyed by (cache instance address, key).
static IN_FLIGHT: LazyLock<Mutex<HashMap<(usize, String), Slot>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Removes the in-flight entry when the leader finishes or is cancelled.
struct LeaderGuard {
    id: (usize, String),
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        IN_FLIGHT.lock().remove(&self.id);
    }
}

/// Runs `work` for `(instance, key)` unless another caller of this process is
/// already running it, in which case this caller waits for that outcome. A
/// leader that is cancelled hands the work over to one of the waiters.
pub(crate) async fn run<F, Fut>(instance: usize, key: &str, mut work: F) -> Outcome
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Outcome>,
{
    let id = (instance, key.to_owned());
    loop {
        let role = {
            let mut map = IN_FLIGHT.lock();
            match map.get(&id) {
                Some(rx) => Role::Follower(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(id.clone(), rx);
                    Role::Leader(tx)
                }
            }
        };
        match role {
            Role::Leader(tx) => {
                let _guard = LeaderGuard { id: id.clone() };
                let outcome = work().await;
                let _ = tx.send(Some(outcome.clone()));
                return outcome;
            }
            Role::Follower(mut rx) => loop {
                if let Some(outcome) = rx.borrow_and_update().clone() {
                    return outcome;
                }
                if rx.changed().await.is_err() {
                    // The leader went away without an outcome: take over.
                    break;
                }
            },
        }
    }
}

enum Role {
    Leader(watch::Sender<Option<Outcome>>),
    Follower(Slot),
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
                run(1, "k", || {
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
            run(2, "k", || async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(None)
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let follower = tokio::spawn(async {
            run(2, "k", || async { Ok(Some(Bytes::from_static(b"second"))) }).await
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
