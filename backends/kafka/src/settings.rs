//! The serde configuration of the Kafka backend and its translation into
//! librdkafka properties.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub use im_infra::mq::TopicSpec;
use im_infra::secret::Secret;
use im_infra::settings::Checks;
use im_infra::{Error, Result};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

/// Configuration of a [`KafkaBackend`](crate::KafkaBackend).
///
/// Every field has a safe default: acknowledgement by all in-sync replicas,
/// idempotent production, a bounded producer queue, offsets committed only
/// after the handler succeeded.
///
/// ```
/// use im_infra_kafka::KafkaSettings;
///
/// let cfg: KafkaSettings = serde_json::from_str(r#"{
///     "brokers": ["10.0.0.1:9092", "10.0.0.2:9092"],
///     "client_id": "chat-service",
///     "security": {
///         "protocol": "sasl_ssl",
///         "sasl": { "mechanism": "scram_sha512", "username": "chat", "password": "s3cret" }
///     },
///     "producer": { "linger": "5ms", "queue_max_messages": 50000 },
///     "topics": [{ "name": "chat.events", "partitions": 12, "replication_factor": 3 }]
/// }"#).unwrap();
/// cfg.validate().unwrap();
/// assert!(!format!("{cfg:?}").contains("s3cret"));
/// ```
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// The client id the brokers see.
    pub client_id: String,
    /// Prefix of every topic and consumer group on the brokers (e.g.
    /// `staging.`); applications keep using the names without it. Empty by
    /// default.
    pub namespace: String,
    /// Transport security and authentication.
    pub security: Security,
    /// Producer settings.
    pub producer: ProducerTuning,
    /// Consumer-group settings.
    pub consumer: ConsumerTuning,
    /// Topics created (if missing) through the admin client when the backend
    /// is built.
    pub topics: Vec<TopicSpec>,
    /// Deadline of each admin and metadata request (topic creation, the
    /// read of an existing topic's partitions, health check).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Further librdkafka properties, set last (they override the ones this
    /// configuration derives). For what the typed fields do not cover: the
    /// properties the delivery guarantees rest on (see
    /// [`RESERVED_PROPERTIES`]) are refused. Values of properties whose name
    /// suggests a secret are never printed.
    pub extra: BTreeMap<String, String>,
}

/// librdkafka properties that `extra` may not set, because the consumer's
/// commit-after-handling and the producer's delivery guarantees rest on
/// their values: offsets are stored and committed by the backend after the
/// handler, never by librdkafka on its own; acknowledgements and
/// idempotence have typed fields that are validated together.
pub const RESERVED_PROPERTIES: &[&str] = &[
    "enable.auto.commit",
    "enable.auto.offset.store",
    "acks",
    "request.required.acks",
    "enable.idempotence",
];

/// Whether an `extra` property's value must not be printed.
fn is_secret(property: &str) -> bool {
    [
        "password",
        "secret",
        "token",
        "jaas",
        "key",
        "credential",
        "oauthbearer.config",
    ]
    .iter()
    .any(|s| property.contains(s))
}

/// Prints everything but secrets: the SASL password is a [`Secret`], and the
/// values of secret-looking `extra` properties print as `<redacted>`.
impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let extra: BTreeMap<&str, &str> = self
            .extra
            .iter()
            .map(|(k, v)| {
                let v = if is_secret(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("namespace", &self.namespace)
            .field("security", &self.security)
            .field("producer", &self.producer)
            .field("consumer", &self.consumer)
            .field("topics", &self.topics)
            .field("request_timeout", &self.request_timeout)
            .field("extra", &extra)
            .finish()
    }
}

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            brokers: vec!["127.0.0.1:9092".to_owned()],
            client_id: "im-infra".to_owned(),
            namespace: String::new(),
            security: Security::default(),
            producer: ProducerTuning::default(),
            consumer: ConsumerTuning::default(),
            topics: Vec::new(),
            request_timeout: Duration::from_secs(10),
            extra: BTreeMap::new(),
        }
    }
}

/// How the client talks to the brokers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    #[default]
    Plaintext,
    /// TLS without SASL.
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// A SASL mechanism.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaslMechanism {
    /// `PLAIN`.
    #[default]
    Plain,
    /// `SCRAM-SHA-256`.
    ScramSha256,
    /// `SCRAM-SHA-512`.
    ScramSha512,
}

impl SaslMechanism {
    fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// SASL credentials; the password never appears in `Debug` output or logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sasl {
    /// The mechanism.
    #[serde(default)]
    pub mechanism: SaslMechanism,
    /// The user.
    pub username: String,
    /// The password.
    pub password: Secret,
}

/// TLS files (PEM).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// CA certificates to trust (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// Client certificate, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Client private key, for mutual TLS.
    pub key_file: Option<PathBuf>,
    /// Password of the private key.
    pub key_password: Option<Secret>,
    /// Check that the broker's certificate names the host (default true).
    pub verify_hostname: Option<bool>,
}

/// Transport security and authentication.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Security {
    /// The protocol.
    pub protocol: SecurityProtocol,
    /// SASL credentials (required by the `sasl_*` protocols).
    pub sasl: Option<Sasl>,
    /// TLS files (used by `ssl` and `sasl_ssl`).
    pub tls: Option<Tls>,
}

/// Which replicas acknowledge a produced message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Acks {
    /// Every in-sync replica (safe default).
    #[default]
    All,
    /// The partition leader only.
    Leader,
    /// Nobody: fire and forget (offsets are then unknown, -1).
    None,
}

/// Compression of produced batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// None.
    #[default]
    None,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
}

/// Producer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProducerTuning {
    /// Acknowledgements required.
    pub acks: Acks,
    /// Idempotent production: retries never duplicate or reorder messages.
    /// Needs a broker that grants producer ids (`InitProducerId`); turn it
    /// off for one that does not (then at most one request is in flight per
    /// connection, which keeps per-key order).
    pub idempotence: bool,
    /// How long messages wait to be batched together.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Largest batch, in bytes.
    pub batch_bytes: usize,
    /// Most messages waiting in the client's queue; a produce that finds the
    /// queue full waits up to `enqueue_timeout`, then fails with
    /// `ResourceExhausted`.
    pub queue_max_messages: usize,
    /// Most kilobytes waiting in the client's queue.
    pub queue_max_kbytes: usize,
    /// How long a produce waits for room in a full queue.
    #[serde(with = "humantime_serde")]
    pub enqueue_timeout: Duration,
    /// How long the client retries a message before reporting its failure
    /// (librdkafka's `message.timeout.ms`).
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// Largest message (key, payload and headers), in bytes.
    pub max_message_bytes: usize,
    /// Compression.
    pub compression: Compression,
}

impl Default for ProducerTuning {
    fn default() -> Self {
        ProducerTuning {
            acks: Acks::All,
            idempotence: true,
            linger: Duration::from_millis(5),
            batch_bytes: 1_000_000,
            queue_max_messages: 100_000,
            queue_max_kbytes: 1_048_576,
            enqueue_timeout: Duration::from_secs(1),
            delivery_timeout: Duration::from_secs(30),
            max_message_bytes: 1_000_000,
            compression: Compression::None,
        }
    }
}

/// Consumer-group settings (the group, topics and handler policy are in
/// [`ConsumerSettings`](im_infra::mq::ConsumerSettings)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerTuning {
    /// A member that sends no heartbeat for this long leaves the group.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Interval of heartbeats (well below `session_timeout`).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Longest time one message may spend in the handler (with its retries)
    /// before the member is considered stuck and leaves the group.
    #[serde(with = "humantime_serde")]
    pub max_poll_interval: Duration,
    /// Interval at which the offsets of handled messages are committed
    /// (they are also committed on partition revoke and on shutdown).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Longest time the broker holds a fetch waiting for data.
    #[serde(with = "humantime_serde")]
    pub fetch_wait_max: Duration,
}

impl Default for ConsumerTuning {
    fn default() -> Self {
        ConsumerTuning {
            session_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            max_poll_interval: Duration::from_secs(300),
            commit_interval: Duration::from_secs(1),
            fetch_wait_max: Duration::from_millis(100),
        }
    }
}

const CHECK: Checks = Checks::new(crate::NAME);

fn invalid(msg: impl Into<String>) -> Error {
    CHECK.invalid(msg)
}

fn millis(d: Duration) -> String {
    d.as_millis().min(i32::MAX as u128).to_string()
}

/// Positive, and whole milliseconds that librdkafka's `int` holds.
fn positive(field: &str, d: Duration) -> Result<()> {
    CHECK.positive(field, d)?;
    if d.as_millis() > i32::MAX as u128 {
        return Err(invalid(format!("{field} is too long")));
    }
    Ok(())
}

impl KafkaSettings {
    /// Checks the configuration; the error names the field at fault.
    pub fn validate(&self) -> Result<()> {
        if self.brokers.is_empty() {
            return Err(im_infra::settings::missing_endpoints(
                crate::NAME,
                "brokers",
            ));
        }
        for b in &self.brokers {
            let ok = b
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok || b.contains(',') || b.contains(char::is_whitespace) {
                return Err(invalid(format!("broker {b:?} is not host:port")));
            }
        }
        if self.client_id.is_empty() {
            return Err(invalid("client_id must not be empty"));
        }
        crate::names::Names::new(&self.namespace)?;
        // librdkafka takes every property as a C string.
        let texts = [
            ("client_id", self.client_id.as_str()),
            (
                "security.sasl.username",
                self.security
                    .sasl
                    .as_ref()
                    .map_or("", |s| s.username.as_str()),
            ),
            (
                "security.sasl.password",
                self.security
                    .sasl
                    .as_ref()
                    .map_or("", |s| s.password.expose()),
            ),
        ];
        let extra = self
            .extra
            .iter()
            .flat_map(|(k, v)| [("extra", k.as_str()), ("extra", v.as_str())]);
        if let Some((field, _)) = texts
            .into_iter()
            .chain(extra)
            .find(|(_, t)| t.contains('\0'))
        {
            return Err(invalid(format!("{field} must not contain a NUL character")));
        }
        for (property, value) in &self.extra {
            if RESERVED_PROPERTIES.contains(&property.as_str()) {
                return Err(invalid(format!(
                    "extra property {property:?} would override the delivery guarantees; it is set by the backend"
                )));
            }
            // The consumer commits on revoke under the eager protocol; the
            // incremental (cooperative) one is not handled end to end.
            if property == "partition.assignment.strategy" && value.contains("cooperative") {
                return Err(invalid(format!(
                    "extra property {property:?} = {value:?}: cooperative assignment is not supported"
                )));
            }
        }
        let sec = &self.security;
        if sec.protocol.uses_sasl() {
            match &sec.sasl {
                Some(s) if !s.username.is_empty() => {}
                _ => {
                    return Err(invalid(
                        "security.sasl with a username is required by the sasl protocols",
                    ))
                }
            }
        } else if sec.sasl.is_some() {
            return Err(invalid(
                "security.sasl is set but security.protocol is not sasl_plaintext or sasl_ssl",
            ));
        }
        let p = &self.producer;
        positive("producer.delivery_timeout", p.delivery_timeout)?;
        if p.linger.as_millis() > 900_000 {
            return Err(invalid("producer.linger is at most 15 minutes"));
        }
        if p.enqueue_timeout.as_millis() > i32::MAX as u128 {
            return Err(invalid("producer.enqueue_timeout is too long"));
        }
        const INT: std::ops::RangeInclusive<u64> = 1..=i32::MAX as u64;
        CHECK.within(
            "producer.queue_max_messages",
            p.queue_max_messages as u64,
            INT,
        )?;
        CHECK.within("producer.queue_max_kbytes", p.queue_max_kbytes as u64, INT)?;
        CHECK.within("producer.batch_bytes", p.batch_bytes as u64, INT)?;
        CHECK.within(
            "producer.max_message_bytes",
            p.max_message_bytes as u64,
            1000..=1_000_000_000,
        )?;
        let c = &self.consumer;
        positive("consumer.session_timeout", c.session_timeout)?;
        positive("consumer.heartbeat_interval", c.heartbeat_interval)?;
        positive("consumer.max_poll_interval", c.max_poll_interval)?;
        positive("consumer.commit_interval", c.commit_interval)?;
        positive("consumer.fetch_wait_max", c.fetch_wait_max)?;
        if c.heartbeat_interval >= c.session_timeout {
            return Err(invalid(
                "consumer.heartbeat_interval must be below consumer.session_timeout",
            ));
        }
        if c.max_poll_interval < c.session_timeout {
            return Err(invalid(
                "consumer.max_poll_interval must be at least consumer.session_timeout",
            ));
        }
        positive("request_timeout", self.request_timeout)?;
        for t in &self.topics {
            im_infra::mq::validate_topic(&t.name)
                .map_err(|e| invalid(format!("topics: {}", e.message())))?;
            let field = |name| format!("topic {}: {name}", t.name);
            CHECK.within(
                &field("partitions"),
                t.partitions.into(),
                1..=u64::from(TopicSpec::MAX_PARTITIONS),
            )?;
            CHECK.within(
                &field("replication_factor"),
                t.replication_factor.into(),
                1..=u64::MAX,
            )?;
        }
        Ok(())
    }

    /// The properties every client (producer, consumer, admin) shares.
    pub(crate) fn common(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set_log_level(crate::logging::level());
        c.set("bootstrap.servers", self.brokers.join(","))
            .set("client.id", &self.client_id)
            .set("socket.keepalive.enable", "true")
            .set("reconnect.backoff.ms", "50")
            .set("reconnect.backoff.max.ms", "2000")
            .set(
                "socket.timeout.ms",
                millis(self.request_timeout.max(Duration::from_secs(10))),
            )
            .set("security.protocol", self.security.protocol.as_str());
        if let Some(s) = &self.security.sasl {
            c.set("sasl.mechanism", s.mechanism.as_str())
                .set("sasl.username", &s.username)
                .set("sasl.password", s.password.expose());
        }
        if let Some(t) = &self.security.tls {
            if let Some(p) = &t.ca_file {
                c.set("ssl.ca.location", p.to_string_lossy());
            }
            if let Some(p) = &t.cert_file {
                c.set("ssl.certificate.location", p.to_string_lossy());
            }
            if let Some(p) = &t.key_file {
                c.set("ssl.key.location", p.to_string_lossy());
            }
            if let Some(p) = &t.key_password {
                c.set("ssl.key.password", p.expose());
            }
            if let Some(v) = t.verify_hostname {
                c.set(
                    "ssl.endpoint.identification.algorithm",
                    if v { "https" } else { "none" },
                );
            }
        }
        c
    }

    fn finish(&self, mut c: ClientConfig) -> ClientConfig {
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }

    /// The producer's librdkafka properties (also for a raw `rdkafka`
    /// client with the same settings).
    pub fn producer_properties(&self) -> ClientConfig {
        let p = &self.producer;
        let mut c = self.common();
        c.set(
            "acks",
            match p.acks {
                Acks::All => "all",
                Acks::Leader => "1",
                Acks::None => "0",
            },
        )
        .set("enable.idempotence", p.idempotence.to_string())
        .set("linger.ms", millis(p.linger))
        .set("batch.size", p.batch_bytes.to_string())
        .set(
            "queue.buffering.max.messages",
            p.queue_max_messages.to_string(),
        )
        .set("queue.buffering.max.kbytes", p.queue_max_kbytes.to_string())
        .set("message.timeout.ms", millis(p.delivery_timeout))
        .set(
            "message.max.bytes",
            (p.max_message_bytes + 4096).to_string(),
        )
        .set(
            "compression.codec",
            match p.compression {
                Compression::None => "none",
                Compression::Snappy => "snappy",
                Compression::Lz4 => "lz4",
            },
        )
        .set("retry.backoff.ms", "50")
        .set("retry.backoff.max.ms", "1000");
        if !p.idempotence {
            // Without idempotence a retried request could overtake the one
            // after it: one request in flight keeps per-key order.
            c.set("max.in.flight.requests.per.connection", "1");
        }
        self.finish(c)
    }

    /// The admin client's properties. Its metadata reads never create a
    /// topic on a broker that auto-creates them: a topic deleted between
    /// a create and the read of its partitions is not brought back.
    pub fn admin_properties(&self) -> ClientConfig {
        let mut c = self.common();
        c.set("allow.auto.create.topics", "false");
        self.finish(c)
    }

    /// The properties of one member of `group` (also for a raw `rdkafka`
    /// consumer with the same settings).
    pub fn consumer_properties(
        &self,
        group: &str,
        start: im_infra::mq::StartPosition,
    ) -> ClientConfig {
        let t = &self.consumer;
        let mut c = self.common();
        c.set("group.id", group)
            // Offsets are stored after the handler succeeded and committed
            // in the background, on revoke and on shutdown.
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.commit.interval.ms", millis(t.commit_interval))
            .set(
                "auto.offset.reset",
                match start {
                    im_infra::mq::StartPosition::Earliest => "earliest",
                    im_infra::mq::StartPosition::Latest => "latest",
                },
            )
            .set("session.timeout.ms", millis(t.session_timeout))
            .set("heartbeat.interval.ms", millis(t.heartbeat_interval))
            .set("max.poll.interval.ms", millis(t.max_poll_interval))
            .set("fetch.wait.max.ms", millis(t.fetch_wait_max))
            .set("enable.partition.eof", "false")
            .set("topic.metadata.refresh.interval.ms", "5000");
        self.finish(c)
    }
}

/// Read from the config center at `/config/{APP_ENV}/{service}/kafka`
/// with [`im_infra::settings::from_center`]:
///
/// ```
/// # async fn demo() -> im_infra::Result<()> {
/// use im_infra::backend::Backend;
/// use im_infra::config::ConfigCenterExt;
///
/// let center = im_infra_memory::MemoryBackend::new().config().await?;
/// let path = im_infra::config::config_path("chat", "kafka")?;
/// center.set_json(&path, &serde_json::json!({ "brokers": ["10.0.0.1:9092"], "namespace": "dev." })).await?;
/// let settings: im_infra_kafka::KafkaSettings = im_infra::settings::from_center(&*center, "chat").await?.unwrap();
/// assert_eq!(settings.namespace, "dev.");
/// # Ok(()) }
/// # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
/// ```
impl im_infra::settings::Settings for KafkaSettings {
    const COMPONENT: &'static str = "kafka";

    fn validate(&self) -> Result<()> {
        KafkaSettings::validate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use im_infra::ErrorKind;

    #[test]
    fn defaults_are_valid_and_safe() {
        let cfg = KafkaSettings::default();
        cfg.validate().unwrap();
        let p = cfg.producer_properties();
        assert_eq!(p.get("acks"), Some("all"));
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        let c = cfg.consumer_properties("g", im_infra::mq::StartPosition::Earliest);
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("auto.offset.reset"), Some("earliest"));
    }

    #[test]
    fn without_idempotence_one_request_is_in_flight() {
        let mut cfg = KafkaSettings::default();
        cfg.producer.idempotence = false;
        let p = cfg.producer_properties();
        assert_eq!(p.get("max.in.flight.requests.per.connection"), Some("1"));
    }

    #[test]
    fn bad_values_name_the_field() {
        type Edit = Box<dyn Fn(&mut KafkaSettings)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|c| c.brokers.clear()), "brokers"),
            (Box::new(|c| c.brokers = vec!["nohost".into()]), "host:port"),
            (
                Box::new(|c| c.brokers = vec!["h:99999".into()]),
                "host:port",
            ),
            (Box::new(|c| c.client_id.clear()), "client_id"),
            (Box::new(|c| c.client_id = "a\0b".into()), "client_id"),
            (
                Box::new(|c| {
                    c.extra.insert("debug".into(), "all\0".into());
                }),
                "extra",
            ),
            (
                Box::new(|c| c.security.protocol = SecurityProtocol::SaslSsl),
                "security.sasl",
            ),
            (
                Box::new(|c| c.producer.delivery_timeout = Duration::ZERO),
                "delivery_timeout",
            ),
            (
                Box::new(|c| c.producer.queue_max_messages = 0),
                "queue_max_messages",
            ),
            (
                Box::new(|c| c.consumer.heartbeat_interval = Duration::from_secs(60)),
                "heartbeat_interval",
            ),
            (
                Box::new(|c| c.topics.push(TopicSpec::new("bad topic", 1))),
                "topics",
            ),
        ];
        for (edit, field) in cases {
            let mut cfg = KafkaSettings::default();
            edit(&mut cfg);
            let err = cfg.validate().unwrap_err();
            let kind = if field == "brokers" {
                ErrorKind::MissingEndpoints
            } else {
                ErrorKind::InvalidConfig
            };
            assert_eq!(err.kind(), kind, "{field}");
            assert_eq!(err.backend(), Some(crate::NAME), "{field}");
            assert!(err.message().contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn sasl_password_is_redacted_and_passed_on() {
        let mut cfg = KafkaSettings::default();
        cfg.security.protocol = SecurityProtocol::SaslPlaintext;
        cfg.security.sasl = Some(Sasl {
            mechanism: SaslMechanism::ScramSha256,
            username: "u".into(),
            password: Secret::new("pw-123"),
        });
        cfg.validate().unwrap();
        assert!(!format!("{cfg:?}").contains("pw-123"));
        let c = cfg.common();
        assert_eq!(c.get("sasl.password"), Some("pw-123"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-256"));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<KafkaSettings>(r#"{"brokerz": []}"#).unwrap_err();
        assert!(err.to_string().contains("brokerz"), "{err}");
    }

    #[test]
    fn extra_may_not_override_the_delivery_guarantees() {
        for (property, value) in [
            ("enable.auto.commit", "true"),
            ("enable.auto.offset.store", "true"),
            ("acks", "1"),
            ("enable.idempotence", "false"),
            ("partition.assignment.strategy", "cooperative-sticky"),
        ] {
            let mut cfg = KafkaSettings::default();
            cfg.extra.insert(property.into(), value.into());
            let err = cfg.validate().unwrap_err();
            assert_eq!(err.kind(), im_infra::ErrorKind::InvalidConfig, "{property}");
            assert!(err.to_string().contains(property), "{err}");
        }
        let mut cfg = KafkaSettings::default();
        cfg.extra
            .insert("partition.assignment.strategy".into(), "range".into());
        cfg.validate().unwrap();
    }

    #[test]
    fn secrets_in_extra_are_never_printed() {
        let mut cfg = KafkaSettings::default();
        cfg.extra.insert("sasl.password".into(), "hunter2".into());
        cfg.extra
            .insert("ssl.key.password".into(), "hunter3".into());
        cfg.extra.insert(
            "sasl.oauthbearer.config".into(),
            "principal=x secret=hunter4".into(),
        );
        cfg.extra.insert("linger.ms".into(), "42".into());
        let printed = format!("{cfg:?}");
        for secret in ["hunter2", "hunter3", "hunter4"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        assert!(
            printed.contains("linger.ms") && printed.contains("42"),
            "{printed}"
        );
    }

    #[test]
    fn extra_properties_win() {
        let mut cfg = KafkaSettings::default();
        cfg.extra.insert("linger.ms".into(), "42".into());
        assert_eq!(cfg.producer_properties().get("linger.ms"), Some("42"));
    }
}
