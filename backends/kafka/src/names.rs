//! The namespace prefix of topics and consumer groups.
//!
//! Applications use logical names (`chat.events`); on the brokers they are
//! `{namespace}chat.events`, so several environments or tenants share one
//! cluster without seeing each other's topics or groups. Received messages
//! and dead-letter headers carry the logical names again.

use std::borrow::Cow;

use im_infra::{Error, ErrorKind, Result};

/// Maps logical topic and group names to broker names and back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Names {
    namespace: String,
}

/// Kafka's limit on topic names.
const TOPIC_MAX: usize = 249;

impl Names {
    /// Checks the namespace: empty, or up to 100 characters of
    /// `[A-Za-z0-9._-]` (it becomes part of topic names).
    pub(crate) fn new(namespace: &str) -> Result<Self> {
        if namespace.len() > 100
            || !namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "namespace {namespace:?} must be at most 100 characters of \
                     ASCII letters, digits, '.', '_' and '-'"
                ),
            )
            .with_backend(crate::NAME));
        }
        Ok(Names {
            namespace: namespace.to_owned(),
        })
    }

    /// The broker's name of a (valid) logical topic.
    pub(crate) fn topic<'a>(&self, logical: &'a str) -> Result<Cow<'a, str>> {
        if self.namespace.is_empty() {
            return Ok(Cow::Borrowed(logical));
        }
        if self.namespace.len() + logical.len() > TOPIC_MAX {
            return Err(Error::invalid_argument(format!(
                "topic {logical:?} with the namespace {:?} is longer than {TOPIC_MAX} characters",
                self.namespace
            )));
        }
        Ok(Cow::Owned(format!("{}{logical}", self.namespace)))
    }

    /// The broker's name of a consumer group.
    pub(crate) fn group(&self, logical: &str) -> String {
        format!("{}{logical}", self.namespace)
    }

    /// The logical name of a topic read from the brokers.
    pub(crate) fn logical<'a>(&self, real: &'a str) -> &'a str {
        real.strip_prefix(self.namespace.as_str()).unwrap_or(real)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_the_namespace() {
        let n = Names::new("staging.").unwrap();
        assert_eq!(n.topic("orders").unwrap(), "staging.orders");
        assert_eq!(n.group("billing"), "staging.billing");
        assert_eq!(n.logical("staging.orders"), "orders");
        let none = Names::new("").unwrap();
        assert_eq!(none.topic("orders").unwrap(), "orders");
        assert_eq!(none.logical("orders"), "orders");
    }

    #[test]
    fn bad_namespaces_and_long_names_are_rejected() {
        assert_eq!(
            Names::new("has/slash").unwrap_err().kind(),
            ErrorKind::InvalidConfig
        );
        assert_eq!(
            Names::new(&"n".repeat(101)).unwrap_err().kind(),
            ErrorKind::InvalidConfig
        );
        let n = Names::new("ns-").unwrap();
        assert_eq!(
            n.topic(&"t".repeat(249)).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
}
