//! Topic creation and metadata through librdkafka's admin client.

use std::sync::Arc;
use std::time::Duration;

use im_infra::{Error, ErrorKind, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::metadata::Metadata;
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
        topics.iter().try_for_each(TopicSpec::validate)?;
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

    /// Creates `spec`'s topic: `Ok(true)` if created, `Ok(false)` if it
    /// exists with that partition count, `AlreadyExists` if with another.
    pub(crate) async fn create_topic(self: &Arc<Self>, spec: &TopicSpec) -> Result<bool> {
        if self.create_topics(std::slice::from_ref(spec)).await? == [true] {
            return Ok(true);
        }
        spec.exists_with(self.partitions(&spec.name).await?)
    }

    /// The partition count of a topic the broker said exists (the
    /// caller's name). A broker whose metadata does not know it yet (just
    /// created by another client, or being deleted) is `Unavailable`: ask
    /// again.
    pub(crate) async fn partitions(self: &Arc<Self>, topic: &str) -> Result<usize> {
        let real = self.names.topic(topic)?.into_owned();
        let metadata = self.metadata(Some(real.clone())).await?;
        let code = match metadata.topics().iter().find(|t| t.name() == real) {
            Some(t) => match t.error() {
                None => return Ok(t.partitions().len()),
                Some(e) => RDKafkaErrorCode::from(e),
            },
            None => RDKafkaErrorCode::UnknownTopicOrPartition,
        };
        let kind = match code {
            RDKafkaErrorCode::UnknownTopicOrPartition => ErrorKind::Unavailable,
            other => kind_of_code(other),
        };
        Err(Error::new(
            kind,
            format!("topic {topic} exists, but its partitions could not be read: {code}"),
        )
        .with_backend(NAME))
    }

    /// Asks a broker for the cluster metadata (the health check).
    pub(crate) async fn ping(self: &Arc<Self>) -> Result<()> {
        self.metadata(None).await.map(drop)
    }

    /// The metadata of one topic, or of the cluster, within the timeout.
    async fn metadata(self: &Arc<Self>, topic: Option<String>) -> Result<Metadata> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            me.client
                .inner()
                .fetch_metadata(topic.as_deref(), Timeout::After(me.timeout))
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("metadata task failed: {e}")))?
        .map_err(|e| map(e, "fetching metadata"))
    }
}
