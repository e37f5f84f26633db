//! `ConfigCenter` on etcd keys: plain JSON values, version = mod revision,
//! CAS by transaction, watches that resume after disconnects and
//! resynchronise after compaction or a restore from an older snapshot.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, WatchOptions as EtcdWatchOptions,
    WatchStream as EtcdWatchStream,
};
use im_infra::config::watch::{WatchCursor, WatchTarget};
use im_infra::config::watch_driver::{spawn_watch, Batch, ConfigHistory, Continuity};
use im_infra::config::{
    ConfigCapabilities, ConfigCenter, ConfigEvent, ConfigEventKind, Versioned, WatchOptions,
    WatchStream,
};
use im_infra::{Error, ErrorKind, Result};

use crate::connection::ConnectionManager;

/// The config center of an [`EtcdBackend`](crate::EtcdBackend).
///
/// Keys are stored as given (under the backend's namespace, empty by
/// default), so `/config/{env}/{service}/{component}` is plain JSON that
/// `etcdctl get` shows and `etcdctl put` changes. A version is the key's
/// mod revision; compare-and-set is a transaction on it (expected 0: the
/// key must not exist). A watch follows etcd's watch from its last
/// delivered revision: after a disconnect it starts again from there, and
/// when that revision was compacted it re-reads the current state and
/// continues from it. On every reconnection it also reads etcd's revision:
/// one behind the watch's cursor means etcd was restored from an older
/// snapshot and lost changes the watch delivered, so the watch reports
/// every key that may differ and continues from etcd's revision
/// ([`WatchCursor::resync_regressed`]). The loop itself is the shared
/// driver ([`im_infra::config::watch_driver`]).
///
/// Raw operations: the backend hands it out layered
/// ([`ObservedConfigCenter`](im_infra::layer::ObservedConfigCenter):
/// argument checks, value sizes, telemetry).
pub(crate) struct EtcdConfigCenter {
    conn: Arc<ConnectionManager>,
}

impl EtcdConfigCenter {
    pub(crate) fn new(conn: Arc<ConnectionManager>) -> Self {
        EtcdConfigCenter { conn }
    }

    fn full(&self, key: &str) -> String {
        self.conn.settings().key(key)
    }

    fn strip<'a>(&self, full: &'a str) -> &'a str {
        full.strip_prefix(self.conn.settings().namespace.as_str())
            .unwrap_or(full)
    }

    async fn open_watch(&self, target: WatchTarget, opts: WatchOptions) -> Result<WatchStream> {
        let history = History {
            conn: self.conn.clone(),
            stream: None,
        };
        let (retry, shutdown) = (self.conn.settings().retry.clone(), self.conn.stop().clone());
        spawn_watch(history, target, opts, retry, shutdown).await
    }
}

/// The store's current revision (a linearizable read: never behind a
/// revision this client saw, unless etcd lost it).
async fn current_revision(conn: &ConnectionManager) -> Result<u64> {
    let probe = conn.settings().key("/");
    let r = conn
        .call("config.revision", |mut c| async move {
            c.get(probe, Some(GetOptions::new().with_count_only()))
                .await
        })
        .await?;
    Ok(r.header().map_or(0, |h| h.revision()) as u64)
}

/// The current state covered by the cursor's target, with the revision.
async fn snapshot(
    conn: &ConnectionManager,
    target: &WatchTarget,
) -> Result<(u64, Vec<(String, Versioned)>)> {
    let ns = conn.settings().namespace.clone();
    let (key, opts) = match target {
        WatchTarget::Key(k) => (conn.settings().key(k), None),
        WatchTarget::Prefix(p) => (
            conn.settings().key(p),
            Some(GetOptions::new().with_prefix()),
        ),
    };
    let r = conn
        .call(
            "config.snapshot",
            |mut c| async move { c.get(key, opts).await },
        )
        .await?;
    let rev = r.header().map_or(0, |h| h.revision()) as u64;
    let entries = r
        .kvs()
        .iter()
        .map(|kv| {
            let full = String::from_utf8_lossy(kv.key());
            let key = full.strip_prefix(ns.as_str()).unwrap_or(&full).to_owned();
            (
                key,
                Versioned {
                    value: Bytes::copy_from_slice(kv.value()),
                    version: kv.mod_revision() as u64,
                },
            )
        })
        .collect();
    Ok((rev, entries))
}

/// etcd's watch, as one config watch reads it: a server-side watch from
/// the cursor, opened again after a compaction or a failure.
struct History {
    conn: Arc<ConnectionManager>,
    /// The server-side watch (opened by the next batch when `None`).
    stream: Option<EtcdWatchStream>,
}

impl History {
    async fn open(&self, target: &WatchTarget, after: u64) -> Result<EtcdWatchStream> {
        let (key, opts) = match target {
            WatchTarget::Key(k) => (self.conn.settings().key(k), EtcdWatchOptions::new()),
            WatchTarget::Prefix(p) => (
                self.conn.settings().key(p),
                EtcdWatchOptions::new().with_prefix(),
            ),
        };
        let opts = opts
            .with_start_revision(after as i64 + 1)
            .with_progress_notify();
        self.conn
            .call("config.watch", |mut c| async move {
                c.watch(key, Some(opts)).await
            })
            .await
    }

    fn event(&self, ev: &etcd_client::Event) -> Option<ConfigEvent> {
        let kv = ev.kv()?;
        let full = String::from_utf8_lossy(kv.key());
        let ns = self.conn.settings().namespace.as_str();
        let key = full.strip_prefix(ns).unwrap_or(&full).to_owned();
        let (kind, value) = match ev.event_type() {
            EventType::Put => (
                ConfigEventKind::Put,
                Some(Bytes::copy_from_slice(kv.value())),
            ),
            EventType::Delete => (ConfigEventKind::Delete, None),
        };
        Some(ConfigEvent {
            kind,
            key,
            value,
            version: kv.mod_revision() as u64,
        })
    }
}

#[async_trait]
impl ConfigHistory for History {
    async fn revision(&mut self) -> Result<u64> {
        current_revision(&self.conn).await
    }

    async fn snapshot(&mut self, target: &WatchTarget) -> Result<(u64, Vec<(String, Versioned)>)> {
        snapshot(&self.conn, target).await
    }

    /// Revisions never go back unless etcd was restored from an older
    /// snapshot: then the changes the watch delivered are lost.
    async fn connect(&mut self, cursor: &WatchCursor) -> Result<Continuity> {
        self.stream = None;
        let behind = current_revision(&self.conn).await? < cursor.last_version();
        Ok(if behind {
            Continuity::Regressed
        } else {
            Continuity::Continuous
        })
    }

    async fn next_batch(&mut self, cursor: &WatchCursor) -> Result<Batch> {
        let stream = match &mut self.stream {
            Some(s) => s,
            None => {
                let s = self.open(cursor.target(), cursor.last_version()).await?;
                self.stream.insert(s)
            }
        };
        let resp = stream.message().await.map_err(crate::error::from_etcd)?;
        let resp =
            resp.ok_or_else(|| Error::new(ErrorKind::Unavailable, "etcd watch stream ended"))?;
        if resp.compact_revision() > 0 {
            // History after the cursor is gone; etcd ended this watch.
            self.stream = None;
            return Ok(Batch::Trimmed);
        }
        if resp.canceled() {
            let reason = format!("etcd canceled the watch: {}", resp.cancel_reason());
            return Err(Error::new(ErrorKind::Unavailable, reason));
        }
        let events: Vec<ConfigEvent> = resp.events().iter().filter_map(|e| self.event(e)).collect();
        // A progress notification: nothing of ours up to its revision.
        let progress = resp.events().is_empty() && !resp.created();
        let upto = match resp.header() {
            Some(h) if progress => h.revision() as u64,
            _ => 0,
        };
        Ok(Batch::changes(events, upto))
    }
}

#[async_trait]
impl ConfigCenter for EtcdConfigCenter {
    fn capabilities(&self) -> ConfigCapabilities {
        ConfigCapabilities::full(self.conn.settings().max_value_bytes)
    }

    async fn get_with_version(&self, key: &str) -> Result<Option<Versioned>> {
        let full = self.full(key);
        let r = self
            .conn
            .call("config.get", |mut c| async move { c.get(full, None).await })
            .await?;
        Ok(r.kvs().first().map(|kv| Versioned {
            value: Bytes::copy_from_slice(kv.value()),
            version: kv.mod_revision() as u64,
        }))
    }

    async fn set(&self, key: &str, value: Bytes) -> Result<u64> {
        let full = self.full(key);
        let r = self
            .conn
            .call("config.set", |mut c| async move {
                c.put(full, value.to_vec(), None).await
            })
            .await?;
        Ok(r.header().map_or(0, |h| h.revision()) as u64)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let full = self.full(key);
        let r = self
            .conn
            .call("config.delete", |mut c| async move {
                c.delete(full, None).await
            })
            .await?;
        Ok(r.deleted() > 0)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let full = self.full(prefix);
        let opts = if full.is_empty() {
            GetOptions::new().with_all_keys().with_keys_only()
        } else {
            GetOptions::new().with_prefix().with_keys_only()
        };
        let r = self
            .conn
            .call("config.list", |mut c| async move {
                c.get(full, Some(opts)).await
            })
            .await?;
        let mut keys: Vec<String> = r
            .kvs()
            .iter()
            .map(|kv| self.strip(&String::from_utf8_lossy(kv.key())).to_owned())
            .collect();
        keys.sort();
        Ok(keys)
    }

    async fn compare_and_set(&self, key: &str, value: Bytes, expected_version: u64) -> Result<u64> {
        let full = self.full(key);
        let cmp = if expected_version == 0 {
            Compare::create_revision(full.clone(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(full.clone(), CompareOp::Equal, expected_version as i64)
        };
        let txn = Txn::new()
            .when([cmp])
            .and_then([TxnOp::put(full, value.to_vec(), None)]);
        let r = self
            .conn
            .call("config.cas", |mut c| async move { c.txn(txn).await })
            .await?;
        if !r.succeeded() {
            return Err(im_infra::config::conflict(key, None, expected_version));
        }
        Ok(r.header().map_or(0, |h| h.revision()) as u64)
    }

    async fn watch(&self, key: &str, opts: WatchOptions) -> Result<WatchStream> {
        self.open_watch(WatchTarget::key(key)?, opts).await
    }

    async fn watch_prefix(&self, prefix: &str, opts: WatchOptions) -> Result<WatchStream> {
        self.open_watch(WatchTarget::prefix(prefix)?, opts).await
    }
}

/// Compacts the history up to the current revision (fault injection and
/// maintenance).
pub(crate) async fn compact(conn: &ConnectionManager) -> Result<()> {
    let rev = current_revision(conn).await? as i64;
    conn.call("compact", |mut c| async move { c.compact(rev, None).await })
        .await
        .map(drop)
}
