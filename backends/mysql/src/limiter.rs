//! `Limiter`: GCRA state per key, updated atomically by one statement on the
//! server's clock, in one round trip.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use im_infra::ratelimit::{
    gcra, Check, Decision, DecisionSource, DenyReason, Limiter, RuleTable, Rules,
};
use im_infra::{Error, ErrorKind, Result};
use mysql_async::from_row_opt;

use crate::Shared;

/// Microseconds: the unit of the stored arrival times.
const TICK_NS: u64 = 1_000;

/// The largest period × burst (in µs) the statement computes with: the
/// server's clock in µs plus twice this stays within a signed 64-bit
/// `BIGINT`, and a bucket's expiry (now + this) within `DATETIME`'s last
/// year, 9999 (2^57 µs is about 4,500 years).
const MAX_TOLERANCE_US: u64 = 1 << 57;

/// Refuses parameters whose arithmetic would leave `BIGINT` on the server
/// (instead of wrapping into wrong decisions).
fn computable(resource: &str, p: &gcra::Params) -> Result<()> {
    if p.tolerance > MAX_TOLERANCE_US {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            format!(
                "limiter rule {resource:?}: period × burst is {} µs, more than the MySQL limiter computes with ({MAX_TOLERANCE_US} µs, about 4,500 years)",
                p.tolerance
            ),
        ));
    }
    Ok(())
}

/// The distributed limiter of a [`MysqlBackend`](crate::MysqlBackend).
///
/// A bucket is a row `(key, theoretical arrival time in µs)`. A decision is
/// one round trip: a multi-statement query that reads the server's
/// `NOW(6)` and runs one `INSERT ... ON DUPLICATE KEY UPDATE` whose row lock
/// makes the read-modify-write atomic. The backend wraps it in the failure
/// policy of its rules.
pub(crate) struct MysqlLimiter {
    shared: Arc<Shared>,
    table: RuleTable<()>,
}

impl std::fmt::Debug for MysqlLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlLimiter").finish_non_exhaustive()
    }
}

/// `X'..'`: a byte string as a SQL literal, safe for any bytes.
fn hex_literal(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2 + 3);
    s.push_str("X'");
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s.push('\'');
    s
}

fn us(v: i64) -> Duration {
    Duration::from_micros(v.max(0) as u64)
}

impl MysqlLimiter {
    /// `InvalidConfig` for a rule in force now whose period × burst the
    /// statement cannot compute with (a hot-reloaded one is refused at its
    /// first decision).
    pub(crate) fn new(shared: Arc<Shared>, rules: &Rules) -> Result<Self> {
        let settings = rules.current();
        let named = settings
            .rules
            .iter()
            .map(|(name, rule)| (name.as_str(), rule));
        for (name, rule) in named.chain(settings.default_rule.iter().map(|r| ("*", r))) {
            if let Ok(p) = gcra::Params::new(rule, TICK_NS) {
                computable(name, &p)?;
            }
        }
        Ok(MysqlLimiter {
            shared,
            table: RuleTable::new(rules.clone(), TICK_NS, |_| ()),
        })
    }

    fn params_of(&self, resource: &str) -> Result<gcra::Params> {
        let p = self.table.with(resource, |p, _| *p)?;
        computable(resource, &p)?;
        Ok(p)
    }

    fn bucket(&self, resource: &str, key: &str) -> Vec<u8> {
        self.shared
            .key(&format!("{}:{resource}:{key}", resource.len()))
    }

    async fn decide(&self, resource: &str, key: &str, n: u64) -> Result<Decision> {
        let p = self.params_of(resource)?;
        let table = self.shared.table("limiter");
        let k = hex_literal(&self.bucket(resource, key));
        let (em, tol, burst) = (p.emission as i64, p.tolerance as i64, p.burst as i64);
        let now_us = "CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED)";
        if n > p.burst {
            // Never allowed: report the bucket as it is.
            let sql = format!("SELECT {now_us}, (SELECT tat FROM {table} WHERE k = {k})");
            let rows = self.shared.db.text(&sql).await?;
            let (now, tat): (i64, Option<i64>) = rows
                .into_iter()
                .next()
                .and_then(|r| from_row_opt(r).ok())
                .ok_or_else(|| Error::new(ErrorKind::Internal, "no answer to the limiter query"))?;
            let tat = tat.unwrap_or(now).max(now);
            return Ok(Decision {
                allowed: false,
                limit: p.burst,
                remaining: ((now + tol - tat) / em).clamp(0, burst) as u64,
                retry_after: Duration::MAX,
                reset_after: us(tat - now),
                denied: Some(DenyReason::ExceedsBurst),
                source: DecisionSource::Backend,
            });
        }
        let cost = em * n as i64;
        let sql = format!(
            "SET @now = {now_us}, @ok = 1, @t = 0; \
             INSERT INTO {table} (k, tat, expires_at) VALUES ({k}, (@t := @now + {cost}), NOW(6) + INTERVAL {cost} + 1000000 MICROSECOND) \
             ON DUPLICATE KEY UPDATE \
               expires_at = IF((@ok := (GREATEST(tat, @now) + {cost} - {tol} <= @now)), \
                               NOW(6) + INTERVAL GREATEST(tat, @now) + {cost} - @now + 1000000 MICROSECOND, expires_at), \
               tat = IF(@ok, (@t := GREATEST(tat, @now) + {cost}), (@t := GREATEST(tat, @now)) - GREATEST(tat, @now) + tat); \
             SELECT @now, @t, @ok"
        );
        let rows = self.shared.db.text(&sql).await?;
        let (now, t, ok): (i64, i64, i64) = rows
            .into_iter()
            .next()
            .and_then(|r| from_row_opt(r).ok())
            .ok_or_else(|| Error::new(ErrorKind::Internal, "no answer to the limiter query"))?;
        Ok(if ok == 1 {
            Decision {
                allowed: true,
                limit: p.burst,
                remaining: ((now + tol - t) / em).clamp(0, burst) as u64,
                retry_after: Duration::ZERO,
                reset_after: us(t - now),
                denied: None,
                source: DecisionSource::Backend,
            }
        } else {
            Decision {
                allowed: false,
                limit: p.burst,
                remaining: ((now + tol - t) / em).clamp(0, burst) as u64,
                retry_after: us(t + cost - tol - now),
                reset_after: us(t - now),
                denied: Some(DenyReason::RateExceeded),
                source: DecisionSource::Backend,
            }
        })
    }
}

impl Limiter for MysqlLimiter {
    fn check<'a>(&'a self, resource: &'a str, key: &'a str, n: u64) -> Check<'a> {
        Check::boxed(self.decide(resource, key, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_literals_hold_any_bytes() {
        assert_eq!(hex_literal(b"a'\\\0"), "X'61275c00'");
        assert_eq!(hex_literal(b""), "X''");
    }
}
