//! The layers of [`Producer`] and [`Consumer`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::mq::{Consumer, ConsumerCapabilities, Delivery, Handler, Message, Producer};

ops!(ProducerOps, "mq" {
    produce => "mq.produce",
    produce_batch => "mq.produce_batch",
    flush => "mq.flush",
    close => "mq.close",
});

ops!(ConsumerOps, "mq" {
    run => "mq.run",
    shutdown => "mq.shutdown",
    pause => "mq.pause",
    resume => "mq.resume",
});

/// Telemetry (`mq.*`) around a producer. A message is checked by the
/// backend against its own size limit ([`Message::validate`]), once per
/// message so that a batch reports per-message errors.
///
/// ```
/// use std::sync::Arc;
/// use im_infra::layer::ObservedProducer;
/// use im_infra::mq::Producer;
///
/// fn hand_out<P: Producer>(raw: P) -> Arc<dyn Producer> {
///     Arc::new(ObservedProducer::new("kafka", raw))
/// }
/// ```
pub struct ObservedProducer<P> {
    inner: P,
    ops: ProducerOps,
}

impl<P: Producer> ObservedProducer<P> {
    /// `inner`, observed as the producer of `backend`.
    pub fn new(backend: &'static str, inner: P) -> Self {
        ObservedProducer {
            inner,
            ops: ProducerOps::new(backend),
        }
    }

    /// The inner producer.
    pub fn inner(&self) -> &P {
        &self.inner
    }
}

impl<P> std::fmt::Debug for ObservedProducer<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedProducer").finish_non_exhaustive()
    }
}

#[async_trait]
impl<P: Producer> Producer for ObservedProducer<P> {
    async fn produce(&self, message: Message) -> Result<Delivery> {
        self.ops.produce.run(self.inner.produce(message)).await
    }

    async fn produce_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<Delivery>>> {
        self.ops
            .produce_batch
            .run(self.inner.produce_batch(messages))
            .await
    }

    async fn flush(&self, timeout: Duration) -> Result<()> {
        self.ops.flush.run(self.inner.flush(timeout)).await
    }

    async fn close(&self) -> Result<()> {
        self.ops.close.run(self.inner.close()).await
    }
}

/// Telemetry (`mq.*`: `mq.run` spans the whole consumption) around a
/// consumer. The backend times each message's handling (`mq.handle`).
///
/// ```
/// use std::sync::Arc;
/// use im_infra::layer::ObservedConsumer;
/// use im_infra::mq::Consumer;
///
/// fn hand_out<C: Consumer>(raw: C) -> Arc<dyn Consumer> {
///     Arc::new(ObservedConsumer::new("kafka", raw))
/// }
/// ```
pub struct ObservedConsumer<C> {
    inner: C,
    ops: ConsumerOps,
}

impl<C: Consumer> ObservedConsumer<C> {
    /// `inner`, observed as a consumer of `backend`.
    pub fn new(backend: &'static str, inner: C) -> Self {
        ObservedConsumer {
            inner,
            ops: ConsumerOps::new(backend),
        }
    }

    /// The inner consumer.
    pub fn inner(&self) -> &C {
        &self.inner
    }
}

impl<C> std::fmt::Debug for ObservedConsumer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedConsumer").finish_non_exhaustive()
    }
}

#[async_trait]
impl<C: Consumer> Consumer for ObservedConsumer<C> {
    fn capabilities(&self) -> ConsumerCapabilities {
        self.inner.capabilities()
    }

    async fn run(&self, handler: Arc<dyn Handler>) -> Result<()> {
        self.ops.run.run(self.inner.run(handler)).await
    }

    async fn shutdown(&self) -> Result<()> {
        self.ops.shutdown.run(self.inner.shutdown()).await
    }

    async fn pause(&self) -> Result<()> {
        self.ops.pause.run(self.inner.pause()).await
    }

    async fn resume(&self) -> Result<()> {
        self.ops.resume.run(self.inner.resume()).await
    }
}
