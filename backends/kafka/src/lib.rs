//! # im-infra-kafka
//!
//! The Kafka backend of im-infra: [`Producer`] and consumer-group
//! [`Consumer`]s with at-least-once delivery, on `rdkafka` (librdkafka,
//! built from source with the crate; nothing to install).
//!
//! | capability | how |
//! |---|---|
//! | `Producer` | one shared librdkafka client; acks from all in-sync replicas and idempotence by default; batching (`linger`); per-key order; a bounded queue that answers `ResourceExhausted` when full |
//! | `Consumer` | a group member handling one message at a time; the offset is stored after the handler succeeded and committed in the background, on partition revoke and on shutdown; failed handlers retried with backoff, then dead-lettered; pause/resume |
//!
//! Every topic and consumer group on the brokers carries the configured
//! [`namespace`](KafkaSettings::namespace) as a prefix; handlers see the
//! names without it. [`im_infra::settings::from_center`] reads the settings from the
//! config center (`/config/{env}/{service}/kafka`).
//!
//! Every other capability answers `Unsupported`. Topics listed in
//! [`KafkaSettings::topics`] are created at start-up through the admin
//! client; [`KafkaBackend::create_topic`] creates one later.
//!
//! ```no_run
//! use std::sync::Arc;
//! use im_infra::prelude::*;
//! use im_infra::mq::{handler_fn, ConsumerSettings, Message};
//! use im_infra_kafka::KafkaBackend;
//!
//! # async fn demo() -> im_infra::Result<()> {
//! let backend = KafkaBackend::builder()
//!     .brokers(["127.0.0.1:9092"])
//!     .client_id("chat-service")
//!     .topic("chat.events", 6)
//!     .build()
//!     .await?;
//! let producer = backend.producer().await?;
//! let d = producer
//!     .produce(Message::new("chat.events", "hello").with_key("room-1"))
//!     .await?;
//! println!("partition {} offset {}", d.partition, d.offset);
//!
//! let consumer = backend
//!     .consumer(ConsumerSettings::new("chat-indexer", ["chat.events"]).dead_letter("chat.events.dlq"))
//!     .await?;
//! let worker = tokio::spawn({
//!     let consumer = consumer.clone();
//!     async move {
//!         consumer
//!             .run(handler_fn(|m| async move {
//!                 println!("{} bytes from partition {}", m.payload.len(), m.partition);
//!                 Ok(())
//!             }))
//!             .await
//!     }
//! });
//! // ... later: finish in-flight messages, commit, leave the group.
//! consumer.shutdown().await?;
//! worker.await.ok();
//! backend.close().await
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod admin;
mod consumer;
mod error;
mod logging;
mod names;
mod producer;
mod settings;
#[cfg(feature = "testing")]
pub mod testing;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_infra::backend::{Backend, Capability, HandedOut, Shutdown};
use im_infra::layer::{ObservedConsumer, ObservedProducer};
use im_infra::mq::{Consumer, ConsumerSettings, Producer};
use im_infra::telemetry::OpMetrics;
use im_infra::Result;

/// The client library, for what the traits do not cover.
pub use rdkafka;

pub use consumer::KafkaConsumer;
pub use producer::KafkaProducer;
pub use settings::{
    Acks, Compression, ConsumerTuning, KafkaSettings, ProducerTuning, Sasl, SaslMechanism,
    Security, SecurityProtocol, Tls, TopicSpec, RESERVED_PROPERTIES,
};

/// The backend's name.
pub const NAME: &str = "kafka";

/// The capabilities of the Kafka backend.
pub const CAPABILITIES: &[Capability] = &[Capability::Messaging];

/// Builds a [`KafkaBackend`].
#[derive(Debug, Clone, Default)]
pub struct KafkaBackendBuilder {
    settings: KafkaSettings,
}

impl KafkaBackendBuilder {
    /// Replaces the whole settings.
    #[must_use]
    pub fn settings(mut self, settings: KafkaSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The bootstrap brokers (`host:port`).
    #[must_use]
    pub fn brokers<S: Into<String>>(mut self, brokers: impl IntoIterator<Item = S>) -> Self {
        self.settings.brokers = brokers.into_iter().map(Into::into).collect();
        self
    }

    /// The client id.
    #[must_use]
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.settings.client_id = id.into();
        self
    }

    /// The namespace: a prefix of every topic and group on the brokers.
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.settings.namespace = namespace.into();
        self
    }

    /// A topic to create at start-up if it does not exist (replication
    /// factor 1; use [`settings`](Self::settings) for more). A topic that
    /// exists is left as it is, whatever its partition count;
    /// [`KafkaBackend::create_topic`] is the call that checks it.
    #[must_use]
    pub fn topic(mut self, name: impl Into<String>, partitions: u32) -> Self {
        self.settings.topics.push(TopicSpec::new(name, partitions));
        self
    }

    /// Producer settings.
    #[must_use]
    pub fn producer(mut self, tuning: ProducerTuning) -> Self {
        self.settings.producer = tuning;
        self
    }

    /// Consumer-group settings.
    #[must_use]
    pub fn consumer(mut self, tuning: ConsumerTuning) -> Self {
        self.settings.consumer = tuning;
        self
    }

    /// Transport security and authentication.
    #[must_use]
    pub fn security(mut self, security: Security) -> Self {
        self.settings.security = security;
        self
    }

    /// Deadline of admin and metadata requests.
    #[must_use]
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.settings.request_timeout = d;
        self
    }

    /// Sets a raw librdkafka property (applied last).
    #[must_use]
    pub fn property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.extra.insert(key.into(), value.into());
        self
    }

    /// Checks the configuration, creates the clients and the configured
    /// topics. The brokers need not be reachable for the clients to be
    /// created; topic creation, when asked, needs them.
    pub async fn build(self) -> Result<KafkaBackend> {
        self.settings.validate()?;
        let admin = Arc::new(admin::Admin::new(&self.settings)?);
        if !self.settings.topics.is_empty() {
            admin.create_topics(&self.settings.topics).await?;
        }
        let producer = KafkaProducer::new(&self.settings)?;
        Ok(KafkaBackend {
            shared: Arc::new(Shared {
                settings: self.settings,
                admin,
                producer,
                shutdown: Shutdown::new(NAME),
                handed_out: HandedOut::new(NAME),
                health_check: OpMetrics::new(NAME, "backend", "backend.health_check"),
            }),
        })
    }
}

struct Shared {
    settings: KafkaSettings,
    admin: Arc<admin::Admin>,
    /// The shared client; every producer handle and the consumers'
    /// dead-letter producers are handles on it.
    producer: KafkaProducer,
    /// Closed on close: refuses new work and stops every consumer.
    shutdown: Shutdown,
    /// The consumers handed out, shut down on close.
    handed_out: HandedOut,
    health_check: OpMetrics,
}

/// The Kafka backend: messaging on a Kafka-protocol cluster.
///
/// Cheap to clone; clones share the clients.
#[derive(Clone)]
pub struct KafkaBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KafkaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBackend")
            .field("settings", &self.shared.settings)
            .finish()
    }
}

impl KafkaBackend {
    /// A builder with the default settings.
    pub fn builder() -> KafkaBackendBuilder {
        KafkaBackendBuilder::default()
    }

    /// The settings in use.
    pub fn settings(&self) -> &KafkaSettings {
        &self.shared.settings
    }

    fn check_open(&self) -> Result<()> {
        self.shared.shutdown.check_open()
    }

    /// Creates a topic (see [`TopicSpec`] for the answers): `Ok(true)` if
    /// created, `Ok(false)` if it exists with that partition count,
    /// `AlreadyExists` if it exists with another.
    ///
    /// ```no_run
    /// # async fn demo(backend: im_infra_kafka::KafkaBackend) -> im_infra::Result<()> {
    /// use im_infra::mq::TopicSpec;
    /// let spec = TopicSpec::new("orders", 12).with_replication_factor(3);
    /// let created = backend.create_topic(&spec).await?;
    /// # Ok(()) }
    /// ```
    pub async fn create_topic(&self, spec: &TopicSpec) -> Result<bool> {
        self.check_open()?;
        self.shared.admin.create_topic(spec).await
    }

    /// A producer as [`Backend::producer`] hands it out (observed), without
    /// the `Arc<dyn Producer>`; [`ObservedProducer::inner`] is the concrete
    /// [`KafkaProducer`] (for [`KafkaProducer::client`]).
    pub fn kafka_producer(&self) -> Result<ObservedProducer<KafkaProducer>> {
        self.check_open()?;
        Ok(ObservedProducer::new(NAME, self.shared.producer.handle()))
    }
}

#[async_trait]
impl Backend for KafkaBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> &'static [Capability] {
        CAPABILITIES
    }

    /// A handle on the shared producer client. Not tracked: it holds only
    /// the backend's client, which [`close`](Backend::close) flushes and
    /// closes once its consumers are gone.
    async fn producer(&self) -> Result<Arc<dyn Producer>> {
        Ok(Arc::new(self.kafka_producer()?))
    }

    async fn consumer(&self, settings: ConsumerSettings) -> Result<Arc<dyn Consumer>> {
        self.check_open()?;
        let names = names::Names::new(&self.shared.settings.namespace)?;
        let properties = self
            .shared
            .settings
            .consumer_properties(&names.group(&settings.group), settings.start);
        // KafkaConsumer::new validates `settings`.
        let consumer = Arc::new(KafkaConsumer::new(
            properties,
            names,
            settings,
            self.shared.producer.handle(),
            self.shared.shutdown.token().child_token(),
            self.shared.settings.consumer.session_timeout,
        )?);
        self.shared
            .handed_out
            .track(&consumer)
            .map_err(|e| e.with_backend(NAME))?;
        Ok(Arc::new(ObservedConsumer::new(NAME, consumer)))
    }

    async fn health_check(&self) -> Result<()> {
        self.shared
            .health_check
            .run(async {
                self.check_open()?;
                self.shared.admin.ping().await
            })
            .await
    }

    /// Refuses new work and stops every consumer; waits for each to commit
    /// its offsets and leave its group (each within
    /// `consumer.session_timeout`); then flushes the shared producer client
    /// (within `producer.delivery_timeout`) and closes it.
    /// Concurrent and later calls wait for the first and answer what it
    /// answered.
    async fn close(&self) -> Result<()> {
        let shared = &self.shared;
        shared
            .handed_out
            .close_once(async {
                // Every consumer's stop is a child of this token: they all
                // start leaving now, and the handles below wait for each.
                shared.shutdown.close();
                let handed_out = shared.handed_out.close_all().await;
                let client = shared.producer.close_client().await;
                handed_out.and(client)
            })
            .await
    }
}
