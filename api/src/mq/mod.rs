//! Messaging: producers, and consumer groups with at-least-once delivery.
//!
//! A [`Producer`] appends [`Message`]s to partitioned topics; messages with
//! the same key go to the same partition, in order. A [`Consumer`] is one
//! member of a consumer group: the group splits the partitions of its topics
//! among its members, and each message is handed to the [`Handler`]; its
//! offset is committed only after the handler succeeded. A failed handler is
//! retried with backoff and then sent to the dead-letter topic if one is
//! configured, otherwise retried until it succeeds: a message is never
//! silently dropped.
//!
//! ```
//! use std::sync::Arc;
//! use im_infra::mq::{handler_fn, Consumer, Message, Producer};
//!
//! async fn demo(producer: Arc<dyn Producer>, consumer: Arc<dyn Consumer>) -> im_infra::Result<()> {
//!     let d = producer
//!         .produce(Message::new("chat.events", "hello").with_key("room-1").with_header("trace", "abc"))
//!         .await?;
//!     println!("stored at partition {} offset {}", d.partition, d.offset);
//!     let worker = tokio::spawn({
//!         let consumer = consumer.clone();
//!         async move {
//!             consumer
//!                 .run(handler_fn(|msg| async move {
//!                     println!("got {:?}", msg.payload);
//!                     Ok(())
//!                 }))
//!                 .await
//!         }
//!     });
//!     consumer.shutdown().await?; // finishes in-flight messages, commits, leaves the group
//!     worker.await.ok();
//!     Ok(())
//! }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::retry::RetrySettings;

mod member;
mod runner;
mod topic;

pub use member::{MemberState, Running};
pub use runner::{Handled, HandlerRunner};
pub use topic::TopicSpec;

/// A message to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Destination topic.
    pub topic: String,
    /// Partitioning key: messages with equal keys keep their order.
    pub key: Option<Bytes>,
    /// The body.
    pub payload: Bytes,
    /// Headers, in order (names may repeat).
    pub headers: Vec<(String, Bytes)>,
}

impl Message {
    /// A message without key or headers.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Message {
            topic: topic.into(),
            key: None,
            payload: payload.into(),
            headers: Vec::new(),
        }
    }

    /// Sets the key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Checks the topic name and that the payload fits `max_bytes`.
    pub fn validate(&self, max_bytes: usize) -> Result<()> {
        validate_topic(&self.topic)?;
        let size = self.payload.len()
            + self.key.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        crate::validate::value(size, max_bytes)
    }
}

/// Where a produced message was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The partition.
    pub partition: i32,
    /// The offset within the partition.
    pub offset: i64,
}

/// A consumed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The topic it came from.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: Option<Bytes>,
    /// Its body.
    pub payload: Bytes,
    /// Its headers.
    pub headers: Vec<(String, Bytes)>,
    /// When it was produced, when known.
    pub timestamp: Option<SystemTime>,
    /// 1 for the first delivery to this consumer, 2 for the first retry, ...
    pub attempt: u32,
}

impl ReceivedMessage {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// The message to produce to the dead-letter topic `topic` after its
    /// handler kept failing with `error`: the same key, payload and headers,
    /// plus the [`dead_letter_headers`] naming where it came from and why.
    ///
    /// ```
    /// use im_infra::mq::{dead_letter_headers as dlh, ReceivedMessage};
    /// use im_infra::{Error, ErrorKind};
    ///
    /// let m = ReceivedMessage {
    ///     topic: "orders".into(), partition: 2, offset: 41, key: Some("k".into()),
    ///     payload: "{bad json".into(), headers: vec![("trace".into(), "t1".into())],
    ///     timestamp: None, attempt: 4,
    /// };
    /// let letter = m.dead_letter("orders.dlq", &Error::new(ErrorKind::Serialization, "bad json"));
    /// assert_eq!(letter.topic, "orders.dlq");
    /// assert_eq!(letter.key, m.key);
    /// assert_eq!(letter.headers[0].0, "trace");
    /// assert!(letter.headers.iter().any(|(k, v)| k == dlh::ORIGINAL_OFFSET && v == "41"));
    /// ```
    pub fn dead_letter(&self, topic: &str, error: &Error) -> Message {
        let mut headers = self.headers.clone();
        headers.extend([
            (
                dead_letter_headers::ORIGINAL_TOPIC.to_owned(),
                Bytes::from(self.topic.clone()),
            ),
            (
                dead_letter_headers::ORIGINAL_PARTITION.to_owned(),
                Bytes::from(self.partition.to_string()),
            ),
            (
                dead_letter_headers::ORIGINAL_OFFSET.to_owned(),
                Bytes::from(self.offset.to_string()),
            ),
            (
                dead_letter_headers::ERROR.to_owned(),
                Bytes::from(error_text(error)),
            ),
        ]);
        Message {
            topic: topic.to_owned(),
            key: self.key.clone(),
            payload: self.payload.clone(),
            headers,
        }
    }
}

/// Appends messages to topics.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Producer: Send + Sync + 'static {
    /// Stores one message; returns where, once the backend acknowledged it.
    async fn produce(&self, message: Message) -> Result<Delivery>;

    /// Stores several messages (batched where the backend can); the results
    /// are in the order of `messages`.
    async fn produce_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<Delivery>>>;

    /// Waits until every message handed over so far is acknowledged.
    async fn flush(&self, timeout: Duration) -> Result<()>;

    /// Flushes and disconnects; later calls fail with `Closed`.
    async fn close(&self) -> Result<()>;
}

/// Processes consumed messages.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles one message; an error leaves it uncommitted (it is retried,
    /// then dead-lettered when configured).
    async fn handle(&self, message: &ReceivedMessage) -> Result<()>;
}

struct FnHandler<F>(F);

#[async_trait]
impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(ReceivedMessage) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    async fn handle(&self, message: &ReceivedMessage) -> Result<()> {
        (self.0)(message.clone()).await
    }
}

/// A handler from an async closure.
pub fn handler_fn<F, Fut>(f: F) -> Arc<dyn Handler>
where
    F: Fn(ReceivedMessage) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    Arc::new(FnHandler(f))
}

/// Where a consumer group without committed offsets starts reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartPosition {
    /// From the oldest retained message.
    #[default]
    Earliest,
    /// Only messages produced after the group first joined.
    Latest,
}

/// Configuration of one consumer-group member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSettings {
    /// The consumer group.
    pub group: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Start position of a group without committed offsets.
    #[serde(default)]
    pub start: StartPosition,
    /// Backoff between handler attempts. After `max_retries` retries the
    /// message goes to `dead_letter_topic`; without one it is retried until
    /// the handler succeeds.
    #[serde(default = "default_handler_retry")]
    pub handler_retry: RetrySettings,
    /// Where messages go whose handler kept failing (headers added:
    /// `x-original-topic`, `x-original-partition`, `x-original-offset`,
    /// `x-error`).
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
}

fn default_handler_retry() -> RetrySettings {
    RetrySettings {
        max_retries: 3,
        initial_interval: Duration::from_millis(100),
        max_interval: Duration::from_secs(5),
        multiplier: 2.0,
        jitter: true,
    }
}

impl ConsumerSettings {
    /// A member of `group` reading `topics` from the earliest message.
    pub fn new<S: Into<String>>(
        group: impl Into<String>,
        topics: impl IntoIterator<Item = S>,
    ) -> Self {
        ConsumerSettings {
            group: group.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            start: StartPosition::Earliest,
            handler_retry: default_handler_retry(),
            dead_letter_topic: None,
        }
    }

    /// Sets the start position.
    #[must_use]
    pub fn start(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }

    /// Sets the dead-letter topic.
    #[must_use]
    pub fn dead_letter(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// Sets the handler retry policy.
    #[must_use]
    pub fn handler_retry(mut self, retry: RetrySettings) -> Self {
        self.handler_retry = retry;
        self
    }

    /// Checks names and the retry policy.
    pub fn validate(&self) -> Result<()> {
        crate::validate::name("consumer group", &self.group)?;
        if self.topics.is_empty() {
            return Err(Error::invalid_argument(
                "a consumer needs at least one topic",
            ));
        }
        self.topics.iter().try_for_each(|t| validate_topic(t))?;
        if let Some(dlq) = &self.dead_letter_topic {
            validate_topic(dlq)?;
            if self.topics.contains(dlq) {
                return Err(Error::invalid_argument(
                    "the dead-letter topic must not be consumed by the same consumer",
                ));
            }
        }
        self.handler_retry.validate()
    }
}

/// Checks a topic name: 1–249 characters of `[A-Za-z0-9._-]` (Kafka's rule).
pub fn validate_topic(topic: &str) -> Result<()> {
    if topic.is_empty() || topic.len() > 249 {
        return Err(Error::invalid_argument(
            "topic name must be 1 to 249 characters",
        ));
    }
    if topic == "." || topic == ".." {
        return Err(Error::invalid_argument(
            "topic name must not be '.' or '..'",
        ));
    }
    if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err(Error::invalid_argument(format!(
            "topic name {topic:?} may only contain ASCII letters, digits, '.', '_' and '-'"
        )));
    }
    Ok(())
}

/// What a consumer backend offers beyond the required operations.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerCapabilities {
    /// `pause` and `resume` are supported.
    pub pause_resume: bool,
}

/// Nothing beyond the required operations.
impl Default for ConsumerCapabilities {
    fn default() -> Self {
        ConsumerCapabilities {
            pause_resume: false,
        }
    }
}

impl ConsumerCapabilities {
    /// `pause` and `resume` are supported.
    ///
    /// ```
    /// use im_infra::mq::ConsumerCapabilities;
    /// assert!(ConsumerCapabilities::default().with_pause_resume().pause_resume);
    /// ```
    #[must_use]
    pub fn with_pause_resume(mut self) -> Self {
        self.pause_resume = true;
        self
    }
}

/// A shared producer is a producer.
#[async_trait]
impl<P: Producer + ?Sized> Producer for Arc<P> {
    async fn produce(&self, message: Message) -> Result<Delivery> {
        (**self).produce(message).await
    }
    async fn produce_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<Delivery>>> {
        (**self).produce_batch(messages).await
    }
    async fn flush(&self, timeout: Duration) -> Result<()> {
        (**self).flush(timeout).await
    }
    async fn close(&self) -> Result<()> {
        (**self).close().await
    }
}

/// One member of a consumer group.
#[cfg_attr(feature = "mock", mockall::automock)]
#[async_trait]
pub trait Consumer: Send + Sync + 'static {
    /// What this backend offers.
    fn capabilities(&self) -> ConsumerCapabilities;

    /// Joins the group and hands every message of the assigned partitions to
    /// `handler` until [`shutdown`](Self::shutdown). Fails with
    /// `InvalidState` if already running, `Closed` after shutdown.
    async fn run(&self, handler: Arc<dyn Handler>) -> Result<()>;

    /// Stops fetching, lets in-flight messages finish, commits their
    /// offsets, leaves the group; `run` then returns `Ok`. Idempotent.
    async fn shutdown(&self) -> Result<()>;

    /// Stops fetching new messages (in-flight ones finish).
    async fn pause(&self) -> Result<()>;

    /// Resumes fetching.
    async fn resume(&self) -> Result<()>;
}

/// A shared consumer is a consumer.
#[async_trait]
impl<C: Consumer + ?Sized> Consumer for Arc<C> {
    fn capabilities(&self) -> ConsumerCapabilities {
        (**self).capabilities()
    }
    async fn run(&self, handler: Arc<dyn Handler>) -> Result<()> {
        (**self).run(handler).await
    }
    async fn shutdown(&self) -> Result<()> {
        (**self).shutdown().await
    }
    async fn pause(&self) -> Result<()> {
        (**self).pause().await
    }
    async fn resume(&self) -> Result<()> {
        (**self).resume().await
    }
}

/// The text of `error` for a dead letter's [`ERROR`](dead_letter_headers::ERROR)
/// header, cut to [`MAX_ERROR_BYTES`](dead_letter_headers::MAX_ERROR_BYTES)
/// (at a character boundary): a long error must not make the letter too
/// large to send.
fn error_text(error: &Error) -> String {
    let mut text = error.to_string();
    let max = dead_letter_headers::MAX_ERROR_BYTES;
    if text.len() > max {
        let mut end = max - "…".len();
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Names of the headers added to a dead-lettered message.
pub mod dead_letter_headers {
    /// Topic the message was consumed from.
    pub const ORIGINAL_TOPIC: &str = "x-original-topic";
    /// Its partition.
    pub const ORIGINAL_PARTITION: &str = "x-original-partition";
    /// Its offset.
    pub const ORIGINAL_OFFSET: &str = "x-original-offset";
    /// The last handler error, at most [`MAX_ERROR_BYTES`] long.
    pub const ERROR: &str = "x-error";
    /// The longest [`ERROR`] header value; a longer error text is cut and
    /// ends with `…`.
    pub const MAX_ERROR_BYTES: usize = 1024;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn message() -> ReceivedMessage {
        ReceivedMessage {
            topic: "orders".into(),
            partition: 0,
            offset: 7,
            key: None,
            payload: Bytes::from_static(b"x"),
            headers: Vec::new(),
            timestamp: None,
            attempt: 1,
        }
    }

    fn error_header(letter: &Message) -> &Bytes {
        &letter
            .headers
            .iter()
            .find(|(k, _)| k == dead_letter_headers::ERROR)
            .expect("the error header")
            .1
    }

    #[test]
    fn a_long_error_is_cut_at_a_character_boundary_in_the_dead_letter() {
        let long = Error::new(ErrorKind::Internal, "é".repeat(5000));
        let letter = message().dead_letter("dlq", &long);
        let text = std::str::from_utf8(error_header(&letter)).expect("valid UTF-8");
        assert!(
            text.len() <= dead_letter_headers::MAX_ERROR_BYTES,
            "{}",
            text.len()
        );
        assert!(
            text.len() > dead_letter_headers::MAX_ERROR_BYTES - 8,
            "{}",
            text.len()
        );
        assert!(text.ends_with('…'));

        let short = Error::new(ErrorKind::Internal, "bad json");
        let letter = message().dead_letter("dlq", &short);
        assert_eq!(error_header(&letter), &Bytes::from(short.to_string()));
    }
}
