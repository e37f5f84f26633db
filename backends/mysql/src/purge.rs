//! The background purge: deletes expired rows and trims the config log.
//! Reads never depend on it (every read checks expiry itself); it only
//! keeps the tables small.

use std::sync::Weak;

use im_infra::Result;

use crate::Shared;

/// Rows deleted per statement, so that no purge holds locks for long.
const BATCH: u64 = 5_000;

/// The tables with an `expires_at` column whose expired rows can go.
/// (Lock rows stay: they carry the fencing counter. Worker-id rows stay:
/// they carry the last timestamp the id's holder may have used, which its
/// next holder starts after; there are at most 65,536 per namespace.)
const EXPIRING: &[&str] = &["cache", "once", "limiter"];

/// One purge pass; returns the rows deleted.
pub(crate) async fn purge_once(shared: &Shared) -> Result<u64> {
    let mut total = 0;
    for table in EXPIRING {
        let sql = format!(
            "DELETE FROM {} WHERE expires_at <= NOW(6) LIMIT {BATCH}",
            shared.table(table)
        );
        loop {
            let n = shared.db.exec(&sql, ()).await?;
            total += n;
            if n < BATCH || shared.shutdown.is_closed() {
                break;
            }
        }
    }
    total += crate::config_center::trim_log(shared).await?;
    Ok(total)
}

/// Runs [`purge_once`] every `purge_interval` (with jitter, so that many
/// instances spread out) until the backend closes.
pub(crate) async fn run(shared: Weak<Shared>) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let stop = s.stop().clone();
        let interval = s.settings().purge_interval;
        drop(s);
        let pause = interval.mul_f64(0.75 + fastrand::f64() / 2.0);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        let Some(s) = shared.upgrade() else { return };
        match purge_once(&s).await {
            Ok(n) if n > 0 => tracing::debug!(rows = n, "expired rows purged"),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "purge failed; trying again later"),
        }
        drop(s);
    }
}
