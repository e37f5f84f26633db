//! The in-process config center: versioned entries, CAS, a bounded change
//! history and ordered, resumable watches.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use im_infra::config::watch::{WatchCursor, WatchTarget};
use im_infra::config::watch_driver::{spawn_watch, Batch, ConfigHistory};
use im_infra::config::{
    ConfigCapabilities, ConfigCenter, ConfigEvent, Versioned, WatchOptions, WatchStream,
};
use im_infra::{Result, RetrySettings};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::Shared;

#[derive(Debug, Default)]
struct State {
    entries: BTreeMap<String, Versioned>,
    /// Version of the last change (0: none yet).
    revision: u64,
    /// The most recent changes, oldest first.
    history: VecDeque<ConfigEvent>,
}

impl State {
    /// Versions above this one are all still in `history`.
    fn history_floor(&self) -> u64 {
        self.history
            .front()
            .map_or(self.revision, |e| e.version - 1)
    }
}

/// Entries and history shared by every config-center handle of one backend.
#[derive(Debug, Default)]
pub(crate) struct ConfigStore {
    state: Mutex<State>,
    /// Shared with the watches, which hold the backend only weakly.
    changed: Arc<Notify>,
}

impl ConfigStore {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    fn record(&self, state: &mut State, limit: usize, event: ConfigEvent) {
        state.history.push_back(event);
        while state.history.len() > limit {
            state.history.pop_front();
        }
        self.changed.notify_waiters();
    }

    /// Forgets every change so far: a watch resuming from before now
    /// resynchronises from the current entries.
    pub(crate) fn compact(&self) {
        self.state().history.clear();
    }

    /// The entries `target` covers.
    fn covered(state: &State, target: &WatchTarget) -> Vec<(String, Versioned)> {
        match target {
            WatchTarget::Key(k) => state
                .entries
                .get(k)
                .map(|v| (k.clone(), v.clone()))
                .into_iter()
                .collect(),
            WatchTarget::Prefix(p) => state
                .entries
                .range(p.clone()..)
                .take_while(|(k, _)| k.starts_with(p.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

/// The change history as one watch reads it, for the shared watch driver.
/// It holds the backend weakly: a backend dropped without `close` still
/// ends its watches.
struct History {
    shared: Weak<Shared>,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
}

impl History {
    fn shared(&self) -> Result<Arc<Shared>> {
        im_infra::backend::upgrade(&self.shared, crate::NAME)
    }
}

#[async_trait]
impl ConfigHistory for History {
    async fn revision(&mut self) -> Result<u64> {
        Ok(self.shared()?.configs.state().revision)
    }

    async fn snapshot(&mut self, target: &WatchTarget) -> Result<(u64, Vec<(String, Versioned)>)> {
        let shared = self.shared()?;
        let state = shared.configs.state();
        Ok((state.revision, ConfigStore::covered(&state, target)))
    }

    async fn next_batch(&mut self, cursor: &WatchCursor) -> Result<Batch> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let shared = self.shared()?;
                let state = shared.configs.state();
                let after = cursor.last_version();
                if after < state.revision {
                    if after < state.history_floor() {
                        return Ok(Batch::Trimmed);
                    }
                    let events = state.history.iter().filter(|e| e.version > after);
                    return Ok(Batch::changes(events.cloned().collect(), state.revision));
                }
            }
            tokio::select! {
                _ = &mut changed => {}
                _ = self.shutdown.cancelled() => {
                    return Err(im_infra::backend::closed(crate::NAME));
                }
            }
        }
    }
}

/// A config-center handle. Handles of one
/// [`MemoryBackend`](crate::MemoryBackend) see the same entries. The
/// backend hands it out inside an
/// [`ObservedConfigCenter`](im_infra::layer::ObservedConfigCenter), which
/// checks the arguments and does the telemetry.
pub(crate) struct MemoryConfigCenter {
    shared: Arc<Shared>,
}

impl MemoryConfigCenter {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MemoryConfigCenter { shared }
    }

    fn store(&self) -> &ConfigStore {
        &self.shared.configs
    }

    fn write(&self, key: &str, value: Bytes, expected: Option<u64>) -> Result<u64> {
        self.shared.check_open()?;
        let store = self.store();
        let mut state = store.state();
        if let Some(expected) = expected {
            let current = state.entries.get(key).map_or(0, |v| v.version);
            if current != expected {
                return Err(im_infra::config::conflict(key, Some(current), expected));
            }
        }
        state.revision += 1;
        let version = state.revision;
        state.entries.insert(
            key.to_owned(),
            Versioned {
                value: value.clone(),
                version,
            },
        );
        store.record(
            &mut state,
            self.shared.settings.config_history,
            ConfigEvent::put(key, value, version),
        );
        Ok(version)
    }

    async fn open_watch(&self, target: WatchTarget, opts: WatchOptions) -> Result<WatchStream> {
        self.shared.check_open()?;
        let history = History {
            shared: Arc::downgrade(&self.shared),
            changed: self.shared.configs.changed.clone(),
            shutdown: self.shared.stop().clone(),
        };
        let shutdown = self.shared.stop().clone();
        spawn_watch(history, target, opts, RetrySettings::default(), shutdown).await
    }
}

#[async_trait]
impl ConfigCenter for MemoryConfigCenter {
    fn capabilities(&self) -> ConfigCapabilities {
        ConfigCapabilities::full(self.shared.settings.max_value_bytes)
    }

    async fn get_with_version(&self, key: &str) -> Result<Option<Versioned>> {
        self.shared.check_open()?;
        Ok(self.store().state().entries.get(key).cloned())
    }

    async fn set(&self, key: &str, value: Bytes) -> Result<u64> {
        self.write(key, value, None)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        self.shared.check_open()?;
        let store = self.store();
        let mut state = store.state();
        if state.entries.remove(key).is_none() {
            return Ok(false);
        }
        state.revision += 1;
        let version = state.revision;
        store.record(
            &mut state,
            self.shared.settings.config_history,
            ConfigEvent::delete(key, version),
        );
        Ok(true)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.shared.check_open()?;
        let state = self.store().state();
        Ok(state
            .entries
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect())
    }

    async fn compare_and_set(&self, key: &str, value: Bytes, expected_version: u64) -> Result<u64> {
        self.write(key, value, Some(expected_version))
    }

    async fn watch(&self, key: &str, opts: WatchOptions) -> Result<WatchStream> {
        self.open_watch(WatchTarget::key(key)?, opts).await
    }

    async fn watch_prefix(&self, prefix: &str, opts: WatchOptions) -> Result<WatchStream> {
        self.open_watch(WatchTarget::prefix(prefix)?, opts).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use im_infra::backend::Backend;

    use crate::MemoryBackend;

    /// A watch does not keep a backend alive: dropped without `close`,
    /// the backend ends its watches.
    #[tokio::test]
    async fn a_watch_ends_when_its_backend_is_dropped() {
        let backend = MemoryBackend::new();
        let config = backend.config().await.unwrap();
        let mut events = config
            .watch("/k", im_infra::config::WatchOptions::default())
            .await
            .unwrap();
        drop((config, backend));
        let end = tokio::time::timeout(Duration::from_secs(5), events.next()).await;
        assert!(
            matches!(end, Ok(None) | Ok(Some(Err(_)))),
            "the watch goes on: {end:?}"
        );
    }
}
