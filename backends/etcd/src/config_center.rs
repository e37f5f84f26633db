//! `ConfigCenter` on etcd keys: plain JSON values, version = mod revision,
//! CAS by transaction, watches that resume after disconnects and
//! resynchronise after compaction.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, WatchOptions as EtcdWatchOptions,
};
use im_infra::config::watch::{WatchCursor, WatchTarget};
use im_infra::config::{
    ConfigCapabilities, ConfigCenter, ConfigEvent, ConfigEventKind, Versioned, WatchOptions,
    WatchStream,
};
use im_infra::telemetry::OpMetrics;
use im_infra::{validate, Error, ErrorKind, Result};
use tokio::sync::mpsc;

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
/// continues from it.
pub struct EtcdConfigCenter {
    conn: Arc<ConnectionManager>,
    get: OpMetrics,
    set: OpMetrics,
    delete: OpMetrics,
    list: OpMetrics,
    cas: OpMetrics,
    watch: OpMetrics,
}

impl std::fmt::Debug for EtcdConfigCenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfigCenter").finish_non_exhaustive()
    }
}

impl EtcdConfigCenter {
    pub(crate) fn new(conn: Arc<ConnectionManager>) -> Self {
        let m = |op| OpMetrics::new(crate::NAME, "config", op);
        EtcdConfigCenter {
            conn,
            get: m("config.get"),
            set: m("config.set"),
            delete: m("config.delete"),
            list: m("config.list"),
            cas: m("config.compare_and_set"),
            watch: m("config.watch"),
        }
    }

    fn full(&self, key: &str) -> String {
        self.conn.cfg().key(key)
    }

    fn strip<'a>(&self, full: &'a str) -> &'a str {
        full.strip_prefix(self.conn.cfg().namespace.as_str())
            .unwrap_or(full)
    }

    fn check_value(&self, v: &Bytes) -> Result<()> {
        validate::value(v.len(), self.conn.cfg().max_value_bytes)
    }

    async fn open_watch(&self, target: WatchTarget, opts: WatchOptions) -> Result<WatchStream> {
        let mut cursor = WatchCursor::new(target, opts.after_version.unwrap_or(0));
        if opts.after_version.is_none() {
            // "From now": the current revision at this call.
            let probe = self.full("/");
            let r = self
                .conn
                .call("config.revision", |mut c| async move {
                    c.get(probe, Some(GetOptions::new().with_count_only()))
                        .await
                })
                .await?;
            cursor.advance_to(r.header().map_or(0, |h| h.revision()) as u64);
        }
        let (tx, mut rx) = mpsc::channel(256);
        tokio::spawn(watch_task(self.conn.clone(), cursor, tx));
        Ok(Box::pin(futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
        })))
    }
}

/// The current state covered by the cursor's target, with the revision.
async fn snapshot(
    conn: &ConnectionManager,
    target: &WatchTarget,
) -> Result<(u64, Vec<(String, Versioned)>)> {
    let ns = conn.cfg().namespace.clone();
    let (key, opts) = match target {
        WatchTarget::Key(k) => (conn.cfg().key(k), None),
        WatchTarget::Prefix(p) => (conn.cfg().key(p), Some(GetOptions::new().with_prefix())),
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

async fn watch_task(
    conn: Arc<ConnectionManager>,
    mut cursor: WatchCursor,
    tx: mpsc::Sender<Result<ConfigEvent>>,
) {
    let ns = conn.cfg().namespace.clone();
    let mut delays = conn.cfg().retry.delays_forever();
    loop {
        let outcome: Result<bool> = async {
            let (key, opts) = match cursor.target() {
                WatchTarget::Key(k) => (conn.cfg().key(k), EtcdWatchOptions::new()),
                WatchTarget::Prefix(p) => {
                    (conn.cfg().key(p), EtcdWatchOptions::new().with_prefix())
                }
            };
            let opts = opts
                .with_start_revision(cursor.last_version() as i64 + 1)
                .with_progress_notify();
            let mut stream = conn
                .call("config.watch", |mut c| async move {
                    c.watch(key, Some(opts)).await
                })
                .await?;
            delays = conn.cfg().retry.delays_forever();
            loop {
                let msg = tokio::select! {
                    _ = tx.closed() => return Ok(false),
                    _ = conn.shutdown.cancelled() => return Ok(false),
                    m = stream.message() => m,
                };
                let Some(resp) = msg.map_err(crate::error::from_etcd)? else {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        "etcd watch stream ended",
                    ));
                };
                if resp.compact_revision() > 0 {
                    // History before our position is gone: bring the consumer
                    // to the current state, then watch on from there.
                    let target = cursor.target().clone();
                    let (rev, entries) = snapshot(&conn, &target).await?;
                    for e in cursor.resync(entries, rev) {
                        if tx.send(Ok(e)).await.is_err() {
                            return Ok(false);
                        }
                    }
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        "watch resynchronised after compaction",
                    ));
                }
                if resp.canceled() {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!("etcd canceled the watch: {}", resp.cancel_reason()),
                    ));
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let full = String::from_utf8_lossy(kv.key());
                    let key = full.strip_prefix(ns.as_str()).unwrap_or(&full).to_owned();
                    let event = match ev.event_type() {
                        EventType::Put => ConfigEvent {
                            kind: ConfigEventKind::Put,
                            key,
                            value: Some(Bytes::copy_from_slice(kv.value())),
                            version: kv.mod_revision() as u64,
                        },
                        EventType::Delete => ConfigEvent {
                            kind: ConfigEventKind::Delete,
                            key,
                            value: None,
                            version: kv.mod_revision() as u64,
                        },
                    };
                    if let Some(e) = cursor.accept(event) {
                        if tx.send(Ok(e)).await.is_err() {
                            return Ok(false);
                        }
                    }
                }
                if resp.events().is_empty() && !resp.created() {
                    // Progress notification: nothing of ours up to here.
                    if let Some(h) = resp.header() {
                        cursor.advance_to(h.revision() as u64);
                    }
                }
            }
        }
        .await;
        match outcome {
            Ok(_) => return,
            Err(e) if e.kind() == ErrorKind::Closed => return,
            Err(e) => {
                tracing::debug!(error = %e, after = cursor.last_version(), "config watch interrupted; resuming");
                let d = delays.next().unwrap_or(Duration::from_secs(1));
                // A compaction resync resumes at once; a failure backs off.
                let d = if e.message().contains("compaction") {
                    Duration::ZERO
                } else {
                    d
                };
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = conn.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(d) => {}
                }
            }
        }
    }
}

fn conflict(key: &str, expected: u64) -> Error {
    Error::new(
        ErrorKind::Conflict,
        format!("{key:?} is not at version {expected} any more"),
    )
}

#[async_trait]
impl ConfigCenter for EtcdConfigCenter {
    fn capabilities(&self) -> ConfigCapabilities {
        ConfigCapabilities::full(self.conn.cfg().max_value_bytes)
    }

    async fn get_with_version(&self, key: &str) -> Result<Option<Versioned>> {
        self.get
            .run(async {
                validate::key(key)?;
                let full = self.full(key);
                let r = self
                    .conn
                    .call("config.get", |mut c| async move { c.get(full, None).await })
                    .await?;
                Ok(r.kvs().first().map(|kv| Versioned {
                    value: Bytes::copy_from_slice(kv.value()),
                    version: kv.mod_revision() as u64,
                }))
            })
            .await
    }

    async fn set(&self, key: &str, value: Bytes) -> Result<u64> {
        self.set
            .run(async {
                validate::key(key)?;
                self.check_value(&value)?;
                let full = self.full(key);
                let r = self
                    .conn
                    .call("config.set", |mut c| async move {
                        c.put(full, value.to_vec(), None).await
                    })
                    .await?;
                Ok(r.header().map_or(0, |h| h.revision()) as u64)
            })
            .await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        self.delete
            .run(async {
                validate::key(key)?;
                let full = self.full(key);
                let r = self
                    .conn
                    .call("config.delete", |mut c| async move {
                        c.delete(full, None).await
                    })
                    .await?;
                Ok(r.deleted() > 0)
            })
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        self.list
            .run(async {
                validate::prefix(prefix)?;
                let full = self.full(prefix);
                let opts = GetOptions::new().with_prefix().with_keys_only();
                let opts = if full.is_empty() {
                    GetOptions::new().with_all_keys().with_keys_only()
                } else {
                    opts
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
            })
            .await
    }

    async fn compare_and_set(&self, key: &str, value: Bytes, expected_version: u64) -> Result<u64> {
        self.cas
            .run(async {
                validate::key(key)?;
                self.check_value(&value)?;
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
                    return Err(conflict(key, expected_version));
                }
                Ok(r.header().map_or(0, |h| h.revision()) as u64)
            })
            .await
    }

    async fn watch(&self, key: &str, opts: WatchOptions) -> Result<WatchStream> {
        self.watch
            .run(async {
                validate::key(key)?;
                self.open_watch(WatchTarget::Key(key.to_owned()), opts)
                    .await
            })
            .await
    }

    async fn watch_prefix(&self, prefix: &str, opts: WatchOptions) -> Result<WatchStream> {
        self.watch
            .run(async {
                validate::prefix(prefix)?;
                self.open_watch(WatchTarget::Prefix(prefix.to_owned()), opts)
                    .await
            })
            .await
    }
}

/// Compacts the history up to the current revision (fault injection and
/// maintenance).
pub(crate) async fn compact(conn: &ConnectionManager) -> Result<()> {
    let probe = conn.cfg().key("/");
    let r = conn
        .call("config.revision", |mut c| async move {
            c.get(probe, Some(GetOptions::new().with_count_only()))
                .await
        })
        .await?;
    let rev = r.header().map_or(0, |h| h.revision());
    conn.call("compact", |mut c| async move { c.compact(rev, None).await })
        .await
        .map(drop)
}
