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

use serde::{de, Deserialize, Deserializer, Serialize};

/// A secret string (password, token). `Debug` and `Display` print `***`;
/// read it with [`expose`](Secret::expose). It is read from a string only:
/// a number or a boolean (an unquoted `123456` in a file or the
/// environment) is refused with an error that does not show it (decoding
/// errors are logged and returned; turning the number back into text could
/// also change it, `00123` into `123`).
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;

        fn not_text<E: de::Error>(what: &str) -> E {
            E::custom(format!(
                "a secret must be a string, not {what}; quote it (its value is not shown)"
            ))
        }

        impl de::Visitor<'_> for Text {
            type Value = Secret;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a secret string")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<Secret, E> {
                Ok(Secret(v))
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Secret, E> {
                Err(not_text("a boolean"))
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Secret, E> {
                Err(not_text("a number"))
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Secret, E> {
                Err(not_text("a number"))
            }

            fn visit_i128<E: de::Error>(self, _: i128) -> Result<Secret, E> {
                Err(not_text("a number"))
            }

            fn visit_u128<E: de::Error>(self, _: u128) -> Result<Secret, E> {
                Err(not_text("a number"))
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Secret, E> {
                Err(not_text("a number"))
            }

            fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Secret, E> {
                Err(not_text("bytes"))
            }
        }

        d.deserialize_any(Text)
    }
}

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
    fn a_secret_that_is_not_a_string_is_refused_without_showing_it() {
        for raw in ["123456", "-123456", "3.25", "true", "184467440737095516150"] {
            let err = serde_json::from_str::<Secret>(raw).unwrap_err().to_string();
            assert!(err.contains("quote it"), "{raw}: {err}");
            assert!(
                !err.contains(raw.trim_start_matches('-')),
                "{raw} shown: {err}"
            );
        }
    }

    #[test]
    fn secrets_serialise_as_plain_strings() {
        let s: Secret = serde_json::from_str("\"pw\"").unwrap();
        assert_eq!(s.expose(), "pw");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"pw\"");
        assert_eq!(s.to_string(), "***");
    }
}
