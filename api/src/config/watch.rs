//! Book-keeping shared by every backend's resumable watch.
//!
//! A [`WatchCursor`] remembers the last version a watch delivered and which
//! keys it reported present. Backends feed it the changes they read from
//! their history (etcd revisions, a Redis stream, a change-log table);
//! it drops duplicates after a reconnect, and after history was compacted it
//! turns a snapshot of the current state into the events that bring the
//! consumer up to date.
//!
//! ```
//! use bytes::Bytes;
//! use im_infra::config::watch::{WatchCursor, WatchTarget};
//! use im_infra::config::{ConfigEvent, ConfigEventKind, Versioned};
//!
//! let mut cursor = WatchCursor::new(WatchTarget::Prefix("/app/".into()), 0);
//! let put = |k: &str, v: u64| ConfigEvent { kind: ConfigEventKind::Put, key: k.into(), value: Some(Bytes::new()), version: v };
//! assert!(cursor.accept(put("/app/a", 3)).is_some());
//! assert!(cursor.accept(put("/app/a", 3)).is_none(), "duplicate after a reconnect");
//! assert!(cursor.accept(put("/other", 4)).is_none(), "outside the target");
//! // History lost: "/app/a" is gone, "/app/b" changed at version 9.
//! let events = cursor.resync(vec![("/app/b".into(), Versioned { value: Bytes::new(), version: 9 })], 10);
//! assert_eq!(events.len(), 2);
//! assert_eq!(cursor.last_version(), 10);
//! ```

use std::collections::BTreeSet;

use super::{ConfigEvent, ConfigEventKind, Versioned};

/// What a watch covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchTarget {
    /// One key.
    Key(String),
    /// Every key starting with the prefix.
    Prefix(String),
}

impl WatchTarget {
    /// Whether `key` is covered.
    pub fn matches(&self, key: &str) -> bool {
        match self {
            WatchTarget::Key(k) => k == key,
            WatchTarget::Prefix(p) => key.starts_with(p.as_str()),
        }
    }
}

/// The resumable position of one watch.
#[derive(Debug, Clone)]
pub struct WatchCursor {
    target: WatchTarget,
    last_version: u64,
    present: BTreeSet<String>,
}

impl WatchCursor {
    /// A cursor that has delivered everything up to `after_version`. For a
    /// key watch with `after_version > 0`, the key counts as present (the
    /// caller read it at that version), so a resync reports its deletion.
    pub fn new(target: WatchTarget, after_version: u64) -> Self {
        let mut present = BTreeSet::new();
        if let WatchTarget::Key(k) = &target {
            if after_version > 0 {
                present.insert(k.clone());
            }
        }
        WatchCursor {
            target,
            last_version: after_version,
            present,
        }
    }

    /// The target.
    pub fn target(&self) -> &WatchTarget {
        &self.target
    }

    /// The last version delivered (or skipped over by a resync).
    pub fn last_version(&self) -> u64 {
        self.last_version
    }

    /// Moves the cursor past `version` without delivering anything (for a
    /// watch that starts "now" at the store's current revision).
    pub fn advance_to(&mut self, version: u64) {
        self.last_version = self.last_version.max(version);
    }

    /// Returns `event` if it is covered and newer than anything delivered.
    pub fn accept(&mut self, event: ConfigEvent) -> Option<ConfigEvent> {
        if event.version <= self.last_version || !self.target.matches(&event.key) {
            return None;
        }
        self.last_version = event.version;
        match event.kind {
            ConfigEventKind::Put => {
                self.present.insert(event.key.clone());
            }
            ConfigEventKind::Delete => {
                self.present.remove(&event.key);
            }
        }
        Some(event)
    }

    /// After the history below the cursor was lost: given every covered
    /// entry that exists now and the store's current revision, returns the
    /// events that bring the consumer to the current state, in version
    /// order, and moves the cursor to `revision`.
    pub fn resync(&mut self, current: Vec<(String, Versioned)>, revision: u64) -> Vec<ConfigEvent> {
        let mut events = Vec::new();
        let now_present: BTreeSet<String> = current
            .iter()
            .filter(|(k, _)| self.target.matches(k))
            .map(|(k, _)| k.clone())
            .collect();
        for (key, v) in current {
            if self.target.matches(&key) && v.version > self.last_version {
                events.push(ConfigEvent {
                    kind: ConfigEventKind::Put,
                    key,
                    value: Some(v.value),
                    version: v.version,
                });
            }
        }
        events.sort_by_key(|e| e.version);
        let gone: Vec<String> = self.present.difference(&now_present).cloned().collect();
        let delete_version = revision.max(events.last().map_or(0, |e| e.version));
        if delete_version > self.last_version {
            for key in gone {
                events.push(ConfigEvent {
                    kind: ConfigEventKind::Delete,
                    key,
                    value: None,
                    version: delete_version,
                });
            }
        }
        self.present = now_present;
        self.last_version = self.last_version.max(revision).max(delete_version);
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn v(version: u64) -> Versioned {
        Versioned {
            value: Bytes::from_static(b"{}"),
            version,
        }
    }

    #[test]
    fn key_watch_reports_deletion_on_resync() {
        let mut c = WatchCursor::new(WatchTarget::Key("/k".into()), 5);
        let events = c.resync(vec![], 8);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, ConfigEventKind::Delete);
        assert_eq!(events[0].version, 8);
        // A second resync with nothing new reports nothing.
        assert!(c.resync(vec![], 8).is_empty());
    }

    #[test]
    fn resync_skips_unchanged_keys() {
        let mut c = WatchCursor::new(WatchTarget::Prefix("/p/".into()), 10);
        let events = c.resync(vec![("/p/a".into(), v(4)), ("/p/b".into(), v(12))], 12);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].key, "/p/b");
    }

    #[test]
    fn fresh_key_watch_without_version_reports_no_spurious_delete() {
        let mut c = WatchCursor::new(WatchTarget::Key("/k".into()), 0);
        assert!(c.resync(vec![], 3).is_empty());
    }
}
