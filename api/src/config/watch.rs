//! Book-keeping shared by every backend's resumable watch.
//!
//! A [`WatchCursor`] remembers the last version a watch delivered and which
//! keys it reported present. Backends feed it the changes they read from
//! their history (etcd revisions, a Redis stream, a change-log table);
//! it drops duplicates after a reconnect, and after history was compacted it
//! turns a snapshot of the current state into the events that bring the
//! consumer up to date.
//!
//! A store may also come back with *older* data than a watch has seen (a
//! Redis restarted from an old snapshot, a database restored from a backup,
//! a failover to a lagging replica): the changes after some point are gone,
//! and the writes made since continue from there. A backend that detects
//! this (its revision is behind the cursor, or the change the cursor last
//! delivered is missing from a history that should still hold it) calls
//! [`WatchCursor::resync_regressed`], which reports every key whose state
//! may differ from what was delivered and moves the cursor back to the
//! store's revision.
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

use std::collections::{BTreeMap, BTreeSet};

use super::{ConfigEvent, ConfigEventKind, Versioned};
use crate::error::Result;

/// What a watch covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchTarget {
    /// One key.
    Key(String),
    /// Every key starting with the prefix.
    Prefix(String),
}

impl WatchTarget {
    /// A watch of `key`, checked the way every backend checks a watched key
    /// ([`validate::key`](crate::validate::key)).
    ///
    /// ```
    /// use im_infra::config::watch::WatchTarget;
    ///
    /// assert_eq!(WatchTarget::key("/a/b").unwrap(), WatchTarget::Key("/a/b".into()));
    /// assert!(WatchTarget::key("").is_err());
    /// ```
    pub fn key(key: &str) -> Result<Self> {
        crate::validate::key(key)?;
        Ok(WatchTarget::Key(key.to_owned()))
    }

    /// A watch of every key starting with `prefix` (empty: every key),
    /// checked with [`validate::prefix`](crate::validate::prefix).
    ///
    /// ```
    /// use im_infra::config::watch::WatchTarget;
    ///
    /// assert!(WatchTarget::prefix("/a/").unwrap().matches("/a/b"));
    /// assert!(WatchTarget::prefix("").unwrap().matches("/anything"));
    /// assert!(WatchTarget::prefix("a\0").is_err());
    /// ```
    pub fn prefix(prefix: &str) -> Result<Self> {
        crate::validate::prefix(prefix)?;
        Ok(WatchTarget::Prefix(prefix.to_owned()))
    }

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
    anchor: u64,
    /// Keys the consumer was told exist, with the version it was told
    /// (0: unknown).
    present: BTreeMap<String, u64>,
}

impl WatchCursor {
    /// A cursor that has delivered everything up to `after_version`. For a
    /// key watch with `after_version > 0`, the key counts as present (the
    /// caller read it at that version), so a resync reports its deletion.
    pub fn new(target: WatchTarget, after_version: u64) -> Self {
        let mut present = BTreeMap::new();
        if let WatchTarget::Key(k) = &target {
            if after_version > 0 {
                present.insert(k.clone(), 0);
            }
        }
        WatchCursor {
            target,
            last_version: after_version,
            anchor: after_version,
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

    /// The newest version known to be a change in the store's history: the
    /// last change delivered, the newest value a resync reported, or the
    /// version the watch started after (0: none). Unlike
    /// [`last_version`](Self::last_version) it never comes from
    /// [`advance_to`](Self::advance_to), so it belongs to the watched keys.
    /// Unless the history was purged up to it, a store that still has it
    /// has not lost what the consumer was told; a backend whose history
    /// cannot otherwise show a regression checks that it still exists.
    pub fn anchor(&self) -> u64 {
        self.anchor
    }

    /// Moves the cursor past `version` without delivering anything (for a
    /// watch that starts "now" at the store's current revision).
    pub fn advance_to(&mut self, version: u64) {
        self.last_version = self.last_version.max(version);
    }

    /// Starts a watch "now": the store at `revision` holds `current`, which
    /// counts as delivered, so that a later resync after lost history
    /// reports a deletion (or an older value) of those keys too.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use im_infra::config::watch::{WatchCursor, WatchTarget};
    /// use im_infra::config::{ConfigEventKind, Versioned};
    ///
    /// let mut cursor = WatchCursor::new(WatchTarget::Prefix("/app/".into()), 0);
    /// let a = Versioned { value: Bytes::new(), version: 3 };
    /// cursor.start_at(vec![("/app/a".into(), a)], 5);
    /// assert_eq!(cursor.last_version(), 5);
    /// // History lost while disconnected, and "/app/a" deleted meanwhile.
    /// let events = cursor.resync(vec![], 9);
    /// assert_eq!(events.len(), 1);
    /// assert_eq!((events[0].kind, events[0].key.as_str()), (ConfigEventKind::Delete, "/app/a"));
    /// ```
    pub fn start_at(&mut self, current: Vec<(String, Versioned)>, revision: u64) {
        let current = self.covered(current);
        self.present = present(&current);
        self.advance_to(revision);
    }

    /// Returns `event` if it is covered and newer than anything delivered.
    pub fn accept(&mut self, event: ConfigEvent) -> Option<ConfigEvent> {
        if event.version <= self.last_version || !self.target.matches(&event.key) {
            return None;
        }
        self.last_version = event.version;
        self.anchor = event.version;
        match event.kind {
            ConfigEventKind::Put => {
                self.present.insert(event.key.clone(), event.version);
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
    /// order, and moves the cursor to `revision`. Besides what changed
    /// after the cursor, a key whose version is not the one delivered for
    /// it is reported too (the store lost that change and has the key's
    /// older value again: a restore with its revision bumped past the
    /// cursor, then compacted). Such a put carries the store's version,
    /// below one delivered before: as after
    /// [`resync_regressed`](Self::resync_regressed), a consumer must apply
    /// it.
    pub fn resync(&mut self, current: Vec<(String, Versioned)>, revision: u64) -> Vec<ConfigEvent> {
        let current = self.covered(current);
        let mut events: Vec<ConfigEvent> = current
            .iter()
            .filter(|(key, v)| {
                v.version > self.last_version
                    || matches!(self.present.get(key), Some(&seen) if seen != 0 && seen != v.version)
            })
            .map(|(key, v)| put(key, v))
            .collect();
        events.sort_by_key(|e| e.version);
        let delete_version = revision.max(events.last().map_or(0, |e| e.version));
        if delete_version > self.last_version {
            events.extend(self.gone(&current, delete_version));
        }
        self.anchor = self.anchor.max(newest(&current));
        self.present = present(&current);
        self.last_version = self.last_version.max(revision).max(delete_version);
        events
    }

    /// After the store lost changes this cursor may have delivered (it came
    /// back with older data, so its history no longer continues from the
    /// cursor): given every covered entry that exists now and the store's
    /// current revision, returns the events that bring the consumer to the
    /// current state, and moves the cursor to `revision` — back, when the
    /// store is behind it — so that the changes written from there on are
    /// delivered.
    ///
    /// The events are a put for every covered entry whose version is not
    /// the one this cursor delivered for its key (a key it never delivered
    /// counts as changed: a lost delete may have hidden it), in version
    /// order, then a delete at `revision` for every key it delivered that
    /// is gone. Their versions are the store's and may be at or below
    /// versions delivered before: they describe the values the store has
    /// now, and a consumer must apply them even though it has seen higher
    /// versions (a consumer that skips versions it has seen keeps lost
    /// values until their keys change again).
    pub fn resync_regressed(
        &mut self,
        current: Vec<(String, Versioned)>,
        revision: u64,
    ) -> Vec<ConfigEvent> {
        let current = self.covered(current);
        let mut events: Vec<ConfigEvent> = current
            .iter()
            .filter(|(key, v)| self.present.get(key) != Some(&v.version))
            .map(|(key, v)| put(key, v))
            .collect();
        events.sort_by_key(|e| e.version);
        let delete_version = revision.max(newest(&current));
        events.extend(self.gone(&current, delete_version));
        self.anchor = newest(&current);
        self.present = present(&current);
        self.last_version = delete_version;
        events
    }

    /// The entries of `current` this cursor covers.
    fn covered(&self, current: Vec<(String, Versioned)>) -> Vec<(String, Versioned)> {
        current
            .into_iter()
            .filter(|(k, _)| self.target.matches(k))
            .collect()
    }

    /// Deletes, at `version`, of the keys delivered as present that are not
    /// in `current`.
    fn gone(&self, current: &[(String, Versioned)], version: u64) -> Vec<ConfigEvent> {
        let now: BTreeSet<&str> = current.iter().map(|(k, _)| k.as_str()).collect();
        self.present
            .keys()
            .filter(|k| !now.contains(k.as_str()))
            .map(|key| ConfigEvent {
                kind: ConfigEventKind::Delete,
                key: key.clone(),
                value: None,
                version,
            })
            .collect()
    }
}

fn put(key: &str, v: &Versioned) -> ConfigEvent {
    ConfigEvent {
        kind: ConfigEventKind::Put,
        key: key.to_owned(),
        value: Some(v.value.clone()),
        version: v.version,
    }
}

fn newest(current: &[(String, Versioned)]) -> u64 {
    current.iter().map(|(_, v)| v.version).max().unwrap_or(0)
}

fn present(current: &[(String, Versioned)]) -> BTreeMap<String, u64> {
    current
        .iter()
        .map(|(k, v)| (k.clone(), v.version))
        .collect()
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

    fn put_at(key: &str, version: u64) -> ConfigEvent {
        ConfigEvent {
            kind: ConfigEventKind::Put,
            key: key.into(),
            value: Some(Bytes::from_static(b"{}")),
            version,
        }
    }

    #[test]
    fn regressed_resync_moves_back_and_reports_what_changed() {
        let mut c = WatchCursor::new(WatchTarget::Prefix("/p/".into()), 0);
        for (k, v) in [("/p/a", 3), ("/p/b", 4), ("/p/a", 7), ("/p/c", 8)] {
            assert!(c.accept(put_at(k, v)).is_some());
        }
        assert_eq!(c.anchor(), 8);
        // The store came back at revision 5: "/p/a" is at 3 again, "/p/c"
        // never existed, "/p/b" is unchanged, "/p/x" was never delivered.
        let events = c.resync_regressed(
            vec![
                ("/p/a".into(), v(3)),
                ("/p/b".into(), v(4)),
                ("/p/x".into(), v(2)),
            ],
            5,
        );
        let got: Vec<(ConfigEventKind, &str, u64)> = events
            .iter()
            .map(|e| (e.kind, e.key.as_str(), e.version))
            .collect();
        assert_eq!(
            got,
            vec![
                (ConfigEventKind::Put, "/p/x", 2),
                (ConfigEventKind::Put, "/p/a", 3),
                (ConfigEventKind::Delete, "/p/c", 5),
            ]
        );
        assert_eq!(c.last_version(), 5, "the cursor moved back");
        assert_eq!(c.anchor(), 4);
        // Changes written after the regression are delivered again.
        assert!(c.accept(put_at("/p/b", 6)).is_some());
        // Nothing more to report against the same state.
        assert!(c
            .resync_regressed(
                vec![
                    ("/p/a".into(), v(3)),
                    ("/p/b".into(), v(6)),
                    ("/p/x".into(), v(2))
                ],
                6
            )
            .is_empty());
    }

    #[test]
    fn regressed_resync_of_a_key_watch_reports_its_value_or_deletion() {
        let mut c = WatchCursor::new(WatchTarget::Key("/k".into()), 9);
        let events = c.resync_regressed(vec![("/k".into(), v(4))], 6);
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].kind, events[0].version),
            (ConfigEventKind::Put, 4)
        );
        let mut c = WatchCursor::new(WatchTarget::Key("/k".into()), 9);
        let events = c.resync_regressed(vec![], 6);
        assert_eq!(events.len(), 1);
        assert_eq!(
            (events[0].kind, events[0].version),
            (ConfigEventKind::Delete, 6)
        );
        assert_eq!(c.last_version(), 6);
    }

    #[test]
    fn resync_reports_a_key_back_at_an_older_version() {
        let mut c = WatchCursor::new(WatchTarget::Prefix("/p/".into()), 0);
        for (k, ver) in [("/p/a", 3), ("/p/b", 4), ("/p/a", 7)] {
            assert!(c.accept(put_at(k, ver)).is_some());
        }
        // Restored with the revision bumped past the cursor, then compacted:
        // "/p/a" has its value of version 3 again, "/p/b" is unchanged.
        let events = c.resync(vec![("/p/a".into(), v(3)), ("/p/b".into(), v(4))], 20);
        let got: Vec<(ConfigEventKind, &str, u64)> = events
            .iter()
            .map(|e| (e.kind, e.key.as_str(), e.version))
            .collect();
        assert_eq!(got, vec![(ConfigEventKind::Put, "/p/a", 3)]);
        assert!(c
            .resync(vec![("/p/a".into(), v(3)), ("/p/b".into(), v(4))], 21)
            .is_empty());
    }

    #[test]
    fn advance_to_does_not_move_the_anchor() {
        let mut c = WatchCursor::new(WatchTarget::Key("/k".into()), 0);
        c.advance_to(40);
        assert_eq!((c.last_version(), c.anchor()), (40, 0));
        assert!(c.accept(put_at("/k", 41)).is_some());
        assert_eq!(c.anchor(), 41);
    }
}
