//! [`Consumer`]: one member of a Kafka consumer group, with at-least-once
//! delivery.
//!
//! The member handles one message at a time. After the handler succeeded
//! (or the message was dead-lettered) the offset is *stored*; librdkafka
//! commits stored offsets every `commit_interval`, and this member commits
//! them synchronously when partitions are revoked and when it shuts down.
//! A message whose handler never succeeded is never stored, so it is
//! delivered again, to this member or to the one that takes its partition.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use im_infra::backend::Closable;
use im_infra::mq::{
    Consumer, ConsumerCapabilities, ConsumerSettings, Handled, Handler, HandlerRunner, MemberState,
    Producer, ReceivedMessage,
};
use im_infra::telemetry::with_timeout;
use im_infra::Result;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as RdConsumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::map;
use crate::logging;
use crate::names::Names;
use crate::producer::KafkaProducer;
use crate::NAME;

/// Pause after a consumer error (broker down, unknown topic) before polling
/// again, so an outage does not spin the loop.
const ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Group callbacks: commits before partitions go away, keeps new ones
/// paused while the member is paused.
struct GroupContext {
    group: String,
    paused: watch::Receiver<bool>,
    /// Bumped on every rebalance; a message held back across one is dropped
    /// (its partition was revoked, perhaps given back, and is fetched again
    /// from the committed offset).
    generation: Arc<AtomicU64>,
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        logging::log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        logging::client_error(&error, reason);
    }
}

/// Commits the stored offsets now; "nothing to commit" is success.
fn commit_stored<C: ConsumerContext, K: RdConsumer<C>>(consumer: &K, group: &str, why: &str) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => tracing::warn!(group, error = %e, "committing offsets {why} failed"),
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.generation.fetch_add(1, Ordering::AcqRel);
            // Before another member takes these partitions, it must see
            // everything this one finished: no message handled twice.
            commit_stored(consumer, &self.group, "on revoke");
            tracing::info!(group = %self.group, partitions = tpl.count(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                if *self.paused.borrow() {
                    if let Err(e) = consumer.pause(tpl) {
                        tracing::warn!(group = %self.group, error = %e, "pausing new partitions failed");
                    }
                }
                tracing::info!(group = %self.group, partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(e) => {
                tracing::warn!(group = %self.group, error = %e, "rebalance failed");
            }
            Rebalance::Revoke(_) => {}
        }
    }
}

type GroupConsumer = StreamConsumer<GroupContext>;

/// The librdkafka consumer of one `run`. Dropped without [`leave`], it is
/// closed on a blocking thread (closing waits for the group).
struct Member {
    consumer: Option<Arc<GroupConsumer>>,
    group: String,
}

impl Member {
    fn get(&self) -> &GroupConsumer {
        self.consumer
            .as_deref()
            .unwrap_or_else(|| unreachable!("the consumer is only taken on leave"))
    }

    /// Commits the stored offsets and leaves the group.
    async fn leave(mut self) {
        if let Some(c) = self.consumer.take() {
            let group = self.group.clone();
            let done = tokio::task::spawn_blocking(move || {
                commit_stored(&*c, &group, "on shutdown");
                drop(c);
            })
            .await;
            if let Err(e) = done {
                tracing::warn!(group = %self.group, error = %e, "leaving the group failed");
            }
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(c) = self.consumer.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn_blocking(move || drop(c));
                }
                Err(_) => drop(c),
            }
        }
    }
}

struct State {
    properties: ClientConfig,
    names: Names,
    settings: ConsumerSettings,
    dead_letters: KafkaProducer,
    member: MemberState,
    /// How long closing the backend waits for this member to leave.
    close_timeout: Duration,
    /// Handler attempts, retries and dead letters.
    runner: HandlerRunner,
}

/// One member of a Kafka consumer group, with at-least-once delivery (see
/// the [crate](crate) docs). Build it with
/// [`KafkaBackend::consumer`](im_infra::backend::Backend::consumer), which
/// hands it out inside an [`ObservedConsumer`](im_infra::layer::ObservedConsumer)
/// (`mq.run`, `mq.shutdown`, ...); each handler attempt is one `mq.handle`
/// operation and each dead-lettering one `mq.dead_letter`. Closing the
/// backend shuts it down (it commits and leaves its group) within
/// `consumer.session_timeout`.
pub struct KafkaConsumer {
    state: Arc<State>,
}

impl std::fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("group", &self.state.settings.group)
            .field("topics", &self.state.settings.topics)
            .finish_non_exhaustive()
    }
}

/// A message taken from librdkafka: the topic's name on the brokers (for
/// the offset store) and the message as the handler sees it.
struct Taken {
    real_topic: String,
    message: ReceivedMessage,
}

/// The headers of a message. librdkafka's header names are C strings that
/// rdkafka decodes as UTF-8 with a panic on anything else; a producer in
/// another language may write such a name. Each header is read on its own
/// and one whose name cannot be read is left out (and logged), so that the
/// message still reaches the handler instead of stopping the member on
/// every delivery.
fn headers_of(h: &impl Headers, topic: &str, offset: i64) -> Vec<(String, Bytes)> {
    let mut out = Vec::with_capacity(h.count());
    for i in 0..h.count() {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.try_get(i))) {
            Ok(Some(x)) => out.push((
                x.key.to_owned(),
                x.value.map(Bytes::copy_from_slice).unwrap_or_default(),
            )),
            Ok(None) => {}
            Err(_) => tracing::warn!(
                topic,
                offset,
                header = i,
                "a header whose name is not UTF-8 was left out"
            ),
        }
    }
    out
}

fn received(m: &BorrowedMessage<'_>, names: &Names) -> Taken {
    let headers = m
        .headers()
        .map(|h| headers_of(h, m.topic(), m.offset()))
        .unwrap_or_default();
    let message = ReceivedMessage {
        topic: names.logical(m.topic()).to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(Bytes::copy_from_slice),
        payload: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
        headers,
        timestamp: m
            .timestamp()
            .to_millis()
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
        attempt: 1,
    };
    Taken {
        real_topic: m.topic().to_owned(),
        message,
    }
}

impl KafkaConsumer {
    pub(crate) fn new(
        properties: ClientConfig,
        names: Names,
        settings: ConsumerSettings,
        dead_letters: KafkaProducer,
        stop: CancellationToken,
        close_timeout: Duration,
    ) -> Result<Self> {
        settings.validate()?;
        // A dead-letter topic that cannot be named would make every dead
        // letter fail forever: refused here instead.
        if let Some(topic) = &settings.dead_letter_topic {
            names.topic(topic)?;
        }
        let runner = HandlerRunner::new(NAME, &settings);
        Ok(KafkaConsumer {
            state: Arc::new(State {
                properties,
                names,
                settings,
                dead_letters,
                member: MemberState::with_stop(NAME, stop),
                close_timeout,
                runner,
            }),
        })
    }

    /// Handles one message and stores its offset; `false` when the member
    /// must stop.
    async fn process(&self, member: &Member, handler: &dyn Handler, taken: Taken) -> bool {
        let Taken {
            real_topic: topic,
            message,
        } = taken;
        let (partition, offset) = (message.partition, message.offset);
        let state = &self.state;
        let send = |letter| async move { state.dead_letters.produce(letter).await.map(drop) };
        match state
            .runner
            .run(handler, message, state.member.stop(), send)
            .await
        {
            Handled::Done => {
                // librdkafka's offset store takes the handled message's
                // offset and commits the one after it.
                if let Err(e) = member.get().store_offset(&topic, partition, offset) {
                    // The partition went away (the member overran
                    // max_poll_interval): its new owner handles the message
                    // again, as at-least-once allows.
                    tracing::warn!(topic = %topic, partition, offset, error = %e, "storing the offset failed");
                }
                true
            }
            Handled::Abandoned => false,
        }
    }

    fn apply_pause(member: &Member, paused: bool) {
        let c = member.get();
        let res = c.assignment().and_then(|tpl| {
            if paused {
                c.pause(&tpl)
            } else {
                c.resume(&tpl)
            }
        });
        if let Err(e) = res {
            tracing::warn!(group = %member.group, paused, error = %e, "pause/resume failed");
        }
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    fn capabilities(&self) -> ConsumerCapabilities {
        ConsumerCapabilities::default().with_pause_resume()
    }

    async fn run(&self, handler: Arc<dyn Handler>) -> Result<()> {
        let st = &*self.state;
        let _running = st.member.begin()?;
        let stop = st.member.stop();
        let generation = Arc::new(AtomicU64::new(0));
        let mut paused = st.member.paused();
        let group = st.settings.group.clone();
        let ctx = GroupContext {
            group: group.clone(),
            paused: paused.clone(),
            generation: generation.clone(),
        };
        let consumer: GroupConsumer = st
            .properties
            .create_with_context(ctx)
            .map_err(|e| map(e, "creating the consumer"))?;
        let member = Member {
            consumer: Some(Arc::new(consumer)),
            group,
        };
        let real_topics = st
            .settings
            .topics
            .iter()
            .map(|t| st.names.topic(t))
            .collect::<Result<Vec<_>>>()?;
        let topics: Vec<&str> = real_topics.iter().map(|t| t.as_ref()).collect();
        member
            .get()
            .subscribe(&topics)
            .map_err(|e| map(e, "subscribing"))?;
        tracing::info!(group = %member.group, topics = ?st.settings.topics, "consumer joined");

        let mut applied_pause = false;
        // A message received just as the member was paused: handled first
        // after resume, unless a rebalance came in between.
        let mut held: Option<(u64, Taken)> = None;
        loop {
            let want_pause = *paused.borrow_and_update();
            if want_pause != applied_pause {
                Self::apply_pause(&member, want_pause);
                applied_pause = want_pause;
            }
            if !want_pause {
                if let Some((gen, msg)) = held.take() {
                    if gen == generation.load(Ordering::Acquire)
                        && !self.process(&member, handler.as_ref(), msg).await
                    {
                        break;
                    }
                    continue;
                }
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                changed = paused.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                next = member.get().recv() => match next {
                    Ok(m) => {
                        let msg = received(&m, &st.names);
                        drop(m);
                        if *paused.borrow() {
                            held = Some((generation.load(Ordering::Acquire), msg));
                        } else if !self.process(&member, handler.as_ref(), msg).await {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(group = %member.group, error = %e, "consumer error");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(ERROR_PAUSE) => {}
                        }
                    }
                },
            }
        }
        member.leave().await;
        Ok(())
    }

    async fn shutdown(&self) -> Result<()> {
        self.state.member.shutdown().await;
        Ok(())
    }

    async fn pause(&self) -> Result<()> {
        self.state.member.set_paused(true);
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        self.state.member.set_paused(false);
        Ok(())
    }
}

/// Closed with the backend: shut down (offsets committed, group left)
/// within `consumer.session_timeout`, after which the group would drop the
/// member anyway.
#[async_trait]
impl Closable for KafkaConsumer {
    async fn close(&self) -> Result<()> {
        with_timeout(self.state.close_timeout, "mq.shutdown", self.shutdown())
            .await
            .map_err(|e| e.with_backend(NAME))
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        self.state.member.stop().cancel();
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::message::Header;

    use super::*;

    /// Headers as librdkafka hands them, the second with a name rdkafka
    /// cannot decode (it panics, as its `try_get` does on such a name).
    struct WithUnreadableName;

    impl Headers for WithUnreadableName {
        fn count(&self) -> usize {
            3
        }

        fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
            match idx {
                0 => Some(Header {
                    key: "trace",
                    value: Some(&b"t1"[..]),
                }),
                1 => panic!("expected: a header name that is not UTF-8"),
                2 => Some(Header {
                    key: "empty",
                    value: None,
                }),
                _ => None,
            }
        }
    }

    #[test]
    fn a_header_whose_name_cannot_be_read_is_left_out_and_the_rest_kept() {
        let headers = headers_of(&WithUnreadableName, "orders", 7);
        assert_eq!(
            headers,
            vec![
                ("trace".to_owned(), Bytes::from_static(b"t1")),
                ("empty".to_owned(), Bytes::new()),
            ]
        );
    }
}
