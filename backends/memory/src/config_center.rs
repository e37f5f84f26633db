//! The in-process config center: versioned entries, CAS, a bounded change
//! history and ordered, resumable watches.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream;
use im_infra::config::watch::{WatchCursor, WatchTarget};
use im_infra::config::{
    ConfigCapabilities, ConfigCenter, ConfigEvent, ConfigEventKind, Versioned, WatchOptions,
    WatchStream,
};
use im_infra::{Error, ErrorKind, Result};
use tokio::sync::Notify;

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
    changed: Notify,
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

    /// What a watch at `cursor` should deliver next (empty: nothing new).
    fn poll(&self, cursor: &mut WatchCursor) -> Vec<ConfigEvent> {
        let state = self.state();
        if cursor.last_version() >= state.revision {
            return Vec::new();
        }
        if cursor.last_version() < state.history_floor() {
            let current: Vec<(String, Versioned)> = match cursor.target() {
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
            };
            return cursor.resync(current, state.revision);
        }
        let mut events = Vec::new();
        for e in &state.history {
            if e.version > cursor.last_version() {
                events.extend(cursor.accept(e.clone()));
            }
        }
        cursor.advance_to(state.revision);
        events
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

impl std::fmt::Debug for MemoryConfigCenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryConfigCenter").finish_non_exhaustive()
    }
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
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("{key:?} is at version {current}, not {expected}"),
                ));
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
            ConfigEvent {
                kind: ConfigEventKind::Put,
                key: key.to_owned(),
                value: Some(value),
                version,
            },
        );
        Ok(version)
    }

    fn open_watch(&self, target: WatchTarget, opts: WatchOptions) -> Result<WatchStream> {
        self.shared.check_open()?;
        let shared = self.shared.clone();
        let mut cursor = WatchCursor::new(target, opts.after_version.unwrap_or(0));
        if opts.after_version.is_none() {
            cursor.advance_to(shared.configs.state().revision);
        }
        let state = (shared, cursor, VecDeque::<ConfigEvent>::new());
        Ok(Box::pin(stream::unfold(
            state,
            |(shared, mut cursor, mut pending)| async move {
                loop {
                    if let Some(event) = pending.pop_front() {
                        return Some((Ok(event), (shared, cursor, pending)));
                    }
                    if shared.is_closed() {
                        return None;
                    }
                    let changed = shared.configs.changed.notified();
                    tokio::pin!(changed);
                    changed.as_mut().enable();
                    pending.extend(shared.configs.poll(&mut cursor));
                    if pending.is_empty() {
                        tokio::select! {
                            _ = &mut changed => {}
                            _ = shared.shutdown.cancelled() => return None,
                        }
                    }
                }
            },
        )))
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
            ConfigEvent {
                kind: ConfigEventKind::Delete,
                key: key.to_owned(),
                value: None,
                version,
            },
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
        self.open_watch(WatchTarget::key(key)?, opts)
    }

    async fn watch_prefix(&self, prefix: &str, opts: WatchOptions) -> Result<WatchStream> {
        self.open_watch(WatchTarget::prefix(prefix)?, opts)
    }
}
