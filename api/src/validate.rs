//! Input checks shared by every backend, so that bad input gets the same
//! [`ErrorKind::InvalidArgument`](crate::ErrorKind::InvalidArgument) everywhere.
//!
//! ```
//! use std::time::Duration;
//! use im_infra::validate;
//!
//! assert!(validate::key("user:42").is_ok());
//! assert!(validate::key("").is_err());
//! assert!(validate::ttl(Duration::ZERO).is_err());
//! assert_eq!(validate::ttl_millis(Duration::from_micros(1500)), 2);
//! ```

use std::time::Duration;

use crate::error::{Error, Result};

/// Longest key accepted, in bytes (before the backend's namespace prefix).
pub const MAX_KEY_BYTES: usize = 1024;

/// Longest TTL accepted: ten years.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Checks a key: not empty, at most [`MAX_KEY_BYTES`] bytes, no NUL byte.
#[inline]
pub fn key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES || crate::short_bytes::has_nul(key.as_bytes()) {
        return Err(bad_key(key));
    }
    Ok(())
}

#[cold]
fn bad_key(key: &str) -> Error {
    if key.is_empty() {
        Error::invalid_argument("key must not be empty")
    } else if key.len() > MAX_KEY_BYTES {
        Error::invalid_argument(format!(
            "key is {} bytes, longer than the limit of {MAX_KEY_BYTES}",
            key.len()
        ))
    } else {
        Error::invalid_argument("key must not contain a NUL byte")
    }
}

/// Checks every key of a batch (and that the batch is not empty).
pub fn keys<S: AsRef<str>>(keys: &[S]) -> Result<()> {
    if keys.is_empty() {
        return Err(Error::invalid_argument("at least one key is required"));
    }
    keys.iter().try_for_each(|k| key(k.as_ref()))
}

/// Checks a prefix used for listing or watching: may be empty (everything in
/// the namespace), otherwise like a key.
pub fn prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        Ok(())
    } else {
        key(prefix)
    }
}

/// Checks a TTL: positive and at most [`MAX_TTL`].
pub fn ttl(ttl: Duration) -> Result<()> {
    if ttl.is_zero() {
        return Err(Error::invalid_argument("ttl must be positive"));
    }
    if ttl > MAX_TTL {
        return Err(Error::invalid_argument(format!(
            "ttl {ttl:?} exceeds the maximum of ten years"
        )));
    }
    Ok(())
}

/// Checks an optional TTL (`None` means no expiry).
pub fn opt_ttl(t: Option<Duration>) -> Result<()> {
    t.map_or(Ok(()), ttl)
}

/// A TTL in whole milliseconds, rounded up so that a sub-millisecond TTL
/// still expires after (not before) it.
pub fn ttl_millis(ttl: Duration) -> u64 {
    let ms = ttl.as_millis();
    let ms = if Duration::from_millis(ms as u64) < ttl {
        ms + 1
    } else {
        ms
    };
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

/// A TTL in whole microseconds, as [`ttl_millis`] rounds it (a backend
/// that stores microseconds expires a key no sooner than one that stores
/// milliseconds); saturates instead of overflowing.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(im_infra::validate::ttl_micros(Duration::from_micros(1_500)), 2_000);
/// assert_eq!(im_infra::validate::ttl_micros(Duration::MAX), u64::MAX);
/// ```
pub fn ttl_micros(ttl: Duration) -> u64 {
    ttl_millis(ttl).saturating_mul(1000)
}

/// Checks a value length against a backend's limit.
pub fn value(len: usize, max: usize) -> Result<()> {
    if len > max {
        return Err(Error::invalid_argument(format!(
            "value is {len} bytes, larger than the backend limit of {max}"
        )));
    }
    Ok(())
}

/// Checks a name (service name, instance id, topic, group): not empty, at most
/// 255 bytes, no `/`, whitespace or control characters.
pub fn name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid_argument(format!("{what} must not be empty")));
    }
    if name.len() > 255 {
        return Err(Error::invalid_argument(format!(
            "{what} is longer than 255 bytes"
        )));
    }
    if name
        .chars()
        .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(Error::invalid_argument(format!(
            "{what} {name:?} must not contain '/', whitespace or control characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn keys_are_checked() {
        assert!(key("a").is_ok());
        assert_eq!(key("").unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert!(key(&"x".repeat(MAX_KEY_BYTES)).is_ok());
        assert!(key(&"x".repeat(MAX_KEY_BYTES + 1)).is_err());
        assert!(key("a\0b").is_err());
        assert!(keys::<&str>(&[]).is_err());
        assert!(keys(&["a", ""]).is_err());
    }

    #[test]
    fn ttls_are_checked_and_rounded_up() {
        assert!(ttl(Duration::from_millis(1)).is_ok());
        assert!(ttl(Duration::ZERO).is_err());
        assert!(ttl(MAX_TTL + Duration::from_secs(1)).is_err());
        assert_eq!(ttl_millis(Duration::from_nanos(1)), 1);
        assert_eq!(ttl_millis(Duration::from_millis(7)), 7);
    }

    #[test]
    fn names_are_checked() {
        assert!(name("service", "im-logic").is_ok());
        assert!(name("service", "a/b").is_err());
        assert!(name("service", "a b").is_err());
        assert!(name("service", "").is_err());
    }
}
