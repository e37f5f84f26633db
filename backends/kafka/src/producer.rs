//! [`Producer`] on librdkafka's `FutureProducer`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use im_infra::mq::{Delivery, Message, Producer};
use im_infra::{Error, ErrorKind, Result};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;

use crate::error::map;
use crate::logging::TracingContext;
use crate::names::Names;
use crate::settings::KafkaSettings;
use crate::NAME;

/// How long a produce that found the queue full sleeps before trying again.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(2);

struct Inner {
    client: FutureProducer<TracingContext>,
    names: Names,
    closed: AtomicBool,
    max_message_bytes: usize,
    queue_max_messages: usize,
    enqueue_timeout: Duration,
    delivery_timeout: Duration,
}

/// The Kafka [`Producer`]: messages are batched by librdkafka (`linger`),
/// acknowledged by every in-sync replica by default, and kept in order per
/// key. The client's queue is bounded: a produce that finds it full waits
/// up to `enqueue_timeout`, then fails with `ResourceExhausted`.
///
/// Every producer of one [`KafkaBackend`](crate::KafkaBackend) shares one
/// librdkafka client (one connection per broker); `close` flushes and
/// closes this handle, [`KafkaBackend::close`](crate::KafkaBackend) the
/// client (after its consumers, which dead-letter through it, left their
/// groups). Each message is checked against `producer.max_message_bytes`
/// and the namespace's topic-name limit. The backend hands it out inside an
/// [`ObservedProducer`](im_infra::layer::ObservedProducer), which does the
/// telemetry (`mq.produce`, ...).
#[derive(Clone)]
pub struct KafkaProducer {
    inner: Arc<Inner>,
    /// This handle was closed.
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn record<'a>(m: &'a Message, topic: &'a str) -> FutureRecord<'a, [u8], [u8]> {
    let mut r = FutureRecord::<[u8], [u8]>::to(topic).payload(m.payload.as_ref());
    if let Some(k) = &m.key {
        r = r.key(k.as_ref());
    }
    if !m.headers.is_empty() {
        let mut h = OwnedHeaders::new_with_capacity(m.headers.len());
        for (k, v) in &m.headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_ref()),
            });
        }
        r = r.headers(h);
    }
    r
}

impl KafkaProducer {
    pub(crate) fn new(cfg: &KafkaSettings) -> Result<Self> {
        let client: FutureProducer<TracingContext> = cfg
            .producer_properties()
            .create_with_context(TracingContext)
            .map_err(|e| map(e, "creating the producer"))?;
        Ok(KafkaProducer {
            inner: Arc::new(Inner {
                client,
                names: Names::new(&cfg.namespace)?,
                closed: AtomicBool::new(false),
                max_message_bytes: cfg.producer.max_message_bytes,
                queue_max_messages: cfg.producer.queue_max_messages,
                enqueue_timeout: cfg.producer.enqueue_timeout,
                delivery_timeout: cfg.producer.delivery_timeout,
            }),
            closed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A new handle on the same client, with its own `close`.
    pub(crate) fn handle(&self) -> KafkaProducer {
        KafkaProducer {
            inner: self.inner.clone(),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Closes the shared client: every handle answers `Closed` from now on.
    pub(crate) async fn close_client(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.flush_within(self.inner.delivery_timeout).await
    }

    /// The librdkafka client, for what the trait does not cover
    /// (transactions, metadata).
    pub fn client(&self) -> &FutureProducer<impl rdkafka::client::ClientContext> {
        &self.inner.client
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) || self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::new(ErrorKind::Closed, "the producer was closed").with_backend(NAME));
        }
        Ok(())
    }

    /// Hands one message to the client's queue, waiting for room until
    /// `deadline`.
    async fn enqueue(&self, m: &Message, deadline: Instant) -> Result<DeliveryFuture> {
        m.validate(self.inner.max_message_bytes)?;
        let topic = self.inner.names.topic(&m.topic)?;
        let mut rec = record(m, &topic);
        loop {
            match self.inner.client.send_result(rec) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    if Instant::now() >= deadline {
                        return Err(Error::new(
                            ErrorKind::ResourceExhausted,
                            format!(
                                "the producer queue is full ({} messages or queue_max_kbytes): \
                                 retry later or raise producer.queue_max_*",
                                self.inner.queue_max_messages
                            ),
                        )
                        .with_backend(NAME));
                    }
                    rec = back;
                    tokio::time::sleep(QUEUE_FULL_PAUSE).await;
                }
                Err((e, _)) => return Err(map(e, "enqueueing a message")),
            }
        }
    }

    async fn delivered(f: DeliveryFuture) -> Result<Delivery> {
        match f.await {
            Ok(Ok(d)) => Ok(Delivery {
                partition: d.partition,
                offset: d.offset,
            }),
            Ok(Err((e, _))) => Err(map(e, "producing a message")),
            Err(_) => Err(Error::new(
                ErrorKind::Closed,
                "the producer was dropped before the delivery report",
            )
            .with_backend(NAME)),
        }
    }

    async fn flush_within(&self, timeout: Duration) -> Result<()> {
        let client = self.inner.client.clone();
        tokio::task::spawn_blocking(move || client.flush(Timeout::After(timeout)))
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("flush task failed: {e}")))?
            .map_err(|e| map(e, "flushing the producer"))
    }
}

#[async_trait]
impl Producer for KafkaProducer {
    async fn produce(&self, message: Message) -> Result<Delivery> {
        self.check_open()?;
        let deadline = Instant::now() + self.inner.enqueue_timeout;
        let f = self.enqueue(&message, deadline).await?;
        Self::delivered(f).await
    }

    async fn produce_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<Delivery>>> {
        self.check_open()?;
        // Everything is queued first, so librdkafka batches it into as few
        // requests as the partitions allow; then the reports are awaited in
        // order. The whole batch waits for room in the queue once, up to
        // `enqueue_timeout`; after a message found no room, the later ones
        // are not queued either (one of them queued after it would overtake
        // it when the caller sends it again: same key, out of order).
        let deadline = Instant::now() + self.inner.enqueue_timeout;
        let mut pending = Vec::with_capacity(messages.len());
        let mut no_room: Option<Error> = None;
        for m in &messages {
            let queued = match &no_room {
                Some(full) => Err(full.clone()),
                None => self.enqueue(m, deadline).await,
            };
            if let Err(e) = &queued {
                if e.kind() == ErrorKind::ResourceExhausted {
                    no_room = Some(e.clone());
                }
            }
            pending.push(queued);
        }
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(match p {
                Ok(f) => Self::delivered(f).await,
                Err(e) => Err(e),
            });
        }
        Ok(out)
    }

    async fn flush(&self, timeout: Duration) -> Result<()> {
        self.check_open()?;
        self.flush_within(timeout).await
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) || self.inner.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.flush_within(self.inner.delivery_timeout).await
    }
}
