//! State shared by every handle of one backend instance.

use im_infra::backend::{HandedOut, Shutdown};
use im_infra::ratelimit::LimiterFallback;
use im_infra::Result;
use tokio_util::sync::CancellationToken;

use crate::db::Db;
use crate::settings::MysqlSettings;

/// The pool, the key namespace, the table names and the shutdown signal.
pub(crate) struct Shared {
    /// The backend's own queries: untimed (each is part of an operation
    /// that the layers count).
    pub(crate) db: Db,
    ns: Vec<u8>,
    prefix: String,
    pub(crate) shutdown: Shutdown,
    /// Nothing is tracked (nothing handed out needs closing first); its
    /// close runs once.
    pub(crate) handed_out: HandedOut,
    /// The limiters' failure policy (one local budget for all of them).
    pub(crate) limiter_fallback: LimiterFallback,
}

impl Shared {
    pub(crate) fn new(db: Db) -> Self {
        let ns = db.settings().namespace.as_bytes().to_vec();
        let prefix = db.settings().table_prefix.clone();
        let shutdown = Shutdown::new(crate::NAME);
        let limiter_fallback = LimiterFallback::new(
            crate::NAME,
            db.settings().limiter_probe_interval,
            db.settings().request_timeout,
            shutdown.token().clone(),
        );
        Shared {
            db,
            ns,
            prefix,
            shutdown,
            handed_out: HandedOut::new(crate::NAME),
            limiter_fallback,
        }
    }

    /// `Closed` once the backend's close began.
    pub(crate) fn check_open(&self) -> Result<()> {
        self.shutdown.check_open()
    }

    /// Cancelled on close: the purge, the config watches and lock waits
    /// stop on it.
    pub(crate) fn stop(&self) -> &CancellationToken {
        self.shutdown.token()
    }

    /// The settings in force.
    pub(crate) fn settings(&self) -> &MysqlSettings {
        self.db.settings()
    }

    /// The namespace bytes.
    pub(crate) fn ns(&self) -> &[u8] {
        &self.ns
    }

    /// The stored form of `key`: the namespace followed by the key.
    pub(crate) fn key(&self, key: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.ns.len() + key.len());
        k.extend_from_slice(&self.ns);
        k.extend_from_slice(key.as_bytes());
        k
    }

    /// The bounds `[low, high)` of the stored keys that start with `prefix`
    /// (no UTF-8 string holds the byte 0xFF, so `high` is above them all).
    pub(crate) fn key_range(&self, prefix: &str) -> (Vec<u8>, Vec<u8>) {
        let low = self.key(prefix);
        let mut high = low.clone();
        high.push(0xFF);
        (low, high)
    }

    /// The user's key of a stored key, `None` when it is not in this
    /// namespace or not UTF-8.
    pub(crate) fn user_key(&self, stored: &[u8]) -> Option<String> {
        let rest = stored.strip_prefix(self.ns.as_slice())?;
        String::from_utf8(rest.to_vec()).ok()
    }

    /// The full name of one of the backend's tables.
    pub(crate) fn table(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

/// The server's clock in microseconds since 1970, as SQL (UTC: no time-zone
/// or daylight-saving conversion can make it go back). Counters that must
/// never go back for clients — config versions, fencing tokens — take
/// `GREATEST(last + 1, NOW_MICROS)`, so that they stay above everything
/// handed out before even after the database is restored from older data
/// (as long as the server's clock does not step back across the restore).
pub(crate) const NOW_MICROS: &str =
    "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))";
