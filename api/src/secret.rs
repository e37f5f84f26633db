//! Secrets in configuration: kept, serialised, but never printed.
//!
//! ```
//! use im_infra::secret::{redact_url, Secret};
//!
//! let password = Secret::new("hunter2");
//! assert_eq!(format!("{password:?}"), "Secret(***)");
//! assert_eq!(password.expose(), "hunter2");
//! assert_eq!(redact_url("redis://app:hunter2@10.0.0.1:6379/0"), "redis://app:***@10.0.0.1:6379/0");
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// A secret string (password, token). `Debug` and `Display` print `***`;
/// read it with [`expose`](Secret::expose).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret::new(s)
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

/// A URL with the password of its user-info replaced by `***`
/// (`scheme://user:pass@host` → `scheme://user:***@host`).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_without_password_are_unchanged() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("redis://user@host:1"), "redis://user@host:1");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            redact_url("mysql://u:p@ss@h:3306/db"),
            "mysql://u:***@h:3306/db"
        );
    }

    #[test]
    fn secrets_serialise_as_plain_strings() {
        let s: Secret = serde_json::from_str("\"pw\"").unwrap();
        assert_eq!(s.expose(), "pw");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"pw\"");
        assert_eq!(s.to_string(), "***");
    }
}
