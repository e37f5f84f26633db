//! Topic creation and metadata through librdkafka's admin client.

use std::sync::Arc;
use std::time::Duration;

use im_infra::{Error, ErrorKind, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::util::Timeout;

use crate::error::{kind_of_code, map};
use crate::logging::TracingContext;
use crate::names::Names;
use crate::settings::{KafkaSettings, TopicSpec};
use crate::NAME;

/// The admin client of a backend.
pub(crate) struct Admin {
    client: AdminClient<TracingContext>,
    names: Names,
    timeout: Duration,
}

impl Admin {
    pub(crate) fn new(cfg: &KafkaSettings) -> Result<Self> {
        let client = cfg
            .admin_properties()
            .create_with_context(TracingContext)
            .map_err(|e| map(e, "creating the admin client"))?;
        Ok(Admin {
            client,
            names: Names::new(&cfg.namespace)?,
            timeout: cfg.request_timeout,
        })
    }

    /// Creates the topics that do not exist yet; `Ok(true)` per topic
    /// created, `Ok(false)` per topic that already existed.
    pub(crate) async fn create_topics(&self, topics: &[TopicSpec]) -> Result<Vec<bool>> {
        for t in topics {
            im_infra::mq::validate_topic(&t.name)?;
            if t.partitions == 0 || t.partitions > i32::MAX as u32 {
                return Err(Error::invalid_argument(format!(
                    "topic {}: partitions must be positive",
                    t.name
                )));
            }
            if t.replication_factor == 0 {
                return Err(Error::invalid_argument(format!(
                    "topic {}: replication factor must be positive",
                    t.name
                )));
            }
        }
        let real = topics
            .iter()
            .map(|t| self.names.topic(&t.name))
            .collect::<Result<Vec<_>>>()?;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .zip(&real)
            .map(|(t, name)| {
                NewTopic::new(
                    name,
                    t.partitions as i32,
                    TopicReplication::Fixed(i32::from(t.replication_factor)),
                )
            })
            .collect();
        let opts = AdminOptions::new()
            .request_timeout(Some(Timeout::After(self.timeout)))
            .operation_timeout(Some(Timeout::After(self.timeout)));
        let answer = tokio::time::timeout(
            self.timeout + Duration::from_secs(1),
            self.client.create_topics(new.iter(), &opts),
        )
        .await
        .map_err(|_| {
            Error::new(ErrorKind::Timeout, "creating topics timed out").with_backend(NAME)
        })?
        .map_err(|e| map(e, "creating topics"))?;
        answer
            .into_iter()
            .map(|r| match r {
                Ok(_) => Ok(true),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => Ok(false),
                Err((name, code)) => Err(Error::new(
                    kind_of_code(code),
                    format!("creating topic {name}: {code}"),
                )
                .with_backend(NAME)),
            })
            .collect()
    }

    /// Asks a broker for the cluster metadata (the health check).
    pub(crate) async fn ping(self: &Arc<Self>) -> Result<()> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            me.client
                .inner()
                .fetch_metadata(None, Timeout::After(me.timeout))
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("metadata task failed: {e}")))?
        .map(drop)
        .map_err(|e| map(e, "fetching cluster metadata"))
    }
}
