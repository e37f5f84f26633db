//! What a topic is created with, the same on every backend that creates
//! topics (`create_topic` on the in-process and Kafka backends; Kafka's
//! start-up topics are specs too).

use serde::{Deserialize, Serialize};

use super::validate_topic;
use crate::error::{Error, ErrorKind, Result};

/// A topic to create: its name, partition count and replication factor.
///
/// `create_topic` answers `Ok(true)` when it was created, `Ok(false)`
/// when it already existed with this partition count, and
/// `AlreadyExists` when it exists with another (a producer keyed for 12
/// partitions must not silently write to 3). The replication factor is
/// the Kafka cluster's business: it is not compared, and the in-process
/// backend, which keeps one copy, takes any.
///
/// ```
/// use im_infra::mq::TopicSpec;
///
/// let spec = TopicSpec::new("orders", 12).with_replication_factor(3);
/// assert_eq!((spec.partitions, spec.replication_factor), (12, 3));
/// assert!(spec.validate().is_ok());
/// assert!(TopicSpec::new("orders", 0).validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// Its name (as the caller writes it: a backend adds its namespace).
    pub name: String,
    /// Its partitions, at least one.
    #[serde(default = "one")]
    pub partitions: u32,
    /// Its replication factor, at least one.
    #[serde(default = "one_u16")]
    pub replication_factor: u16,
}

fn one() -> u32 {
    1
}

fn one_u16() -> u16 {
    1
}

impl TopicSpec {
    /// `name` with `partitions` partitions, replication factor 1.
    pub fn new(name: impl Into<String>, partitions: u32) -> Self {
        TopicSpec {
            name: name.into(),
            partitions,
            replication_factor: 1,
        }
    }

    /// Sets the replication factor.
    #[must_use]
    pub fn with_replication_factor(mut self, replication_factor: u16) -> Self {
        self.replication_factor = replication_factor;
        self
    }

    /// The most partitions a topic is created with: far beyond what a
    /// Kafka cluster carries well, and a bound on what the in-process
    /// backend allocates.
    pub const MAX_PARTITIONS: u32 = 100_000;

    /// `InvalidArgument` unless the name is a valid topic name, the
    /// partition count is 1 to [`MAX_PARTITIONS`](Self::MAX_PARTITIONS)
    /// and the replication factor is positive.
    pub fn validate(&self) -> Result<()> {
        validate_topic(&self.name)?;
        if !(1..=Self::MAX_PARTITIONS).contains(&self.partitions) {
            return Err(Error::invalid_argument(format!(
                "topic {}: partitions must be 1 to {}",
                self.name,
                Self::MAX_PARTITIONS
            )));
        }
        if self.replication_factor == 0 {
            return Err(Error::invalid_argument(format!(
                "topic {}: replication factor must be positive",
                self.name
            )));
        }
        Ok(())
    }

    /// The answer for a topic that already exists with `existing`
    /// partitions: `Ok(false)` if that is this spec's count,
    /// `AlreadyExists` naming both counts otherwise.
    ///
    /// ```
    /// use im_infra::mq::TopicSpec;
    /// use im_infra::ErrorKind;
    ///
    /// let spec = TopicSpec::new("orders", 12);
    /// assert_eq!(spec.exists_with(12).unwrap(), false);
    /// assert_eq!(spec.exists_with(3).unwrap_err().kind(), ErrorKind::AlreadyExists);
    /// ```
    pub fn exists_with(&self, existing: usize) -> Result<bool> {
        if existing == self.partitions as usize {
            return Ok(false);
        }
        Err(Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "topic {:?} exists with {existing} partitions, not {}",
                self.name, self.partitions
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_is_checked_before_any_server_sees_it() {
        let bad = [
            TopicSpec::new("", 1),
            TopicSpec::new("bad topic", 1),
            TopicSpec::new("t", 0),
            TopicSpec::new("t", TopicSpec::MAX_PARTITIONS + 1),
            TopicSpec::new("t", 1).with_replication_factor(0),
        ];
        for spec in bad {
            let e = spec.validate().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{spec:?}");
        }
        assert!(TopicSpec::new("t", TopicSpec::MAX_PARTITIONS)
            .validate()
            .is_ok());
    }

    #[test]
    fn a_settings_file_may_give_only_the_name() {
        let spec: TopicSpec = serde_json::from_str(r#"{"name": "t"}"#).unwrap();
        assert_eq!(spec, TopicSpec::new("t", 1));
        assert!(serde_json::from_str::<TopicSpec>(r#"{"name": "t", "x": 1}"#).is_err());
    }
}
