//! Null producer and consumer.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_infra::mq::{Consumer, ConsumerCapabilities, Delivery, Handler, Message, Producer};
use im_infra::Result;
use tokio_util::sync::CancellationToken;

/// A producer that drops every message (offset -1).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopProducer;

const DROPPED: Delivery = Delivery {
    partition: 0,
    offset: -1,
};

#[async_trait]
impl Producer for NoopProducer {
    async fn produce(&self, _message: Message) -> Result<Delivery> {
        Ok(DROPPED)
    }

    async fn produce_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<Delivery>>> {
        Ok(messages.iter().map(|_| Ok(DROPPED)).collect())
    }

    async fn flush(&self, _timeout: Duration) -> Result<()> {
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// A consumer that never delivers; `run` returns when shut down.
#[derive(Debug, Default)]
pub struct NoopConsumer {
    stop: CancellationToken,
}

#[async_trait]
impl Consumer for NoopConsumer {
    fn capabilities(&self) -> ConsumerCapabilities {
        ConsumerCapabilities::default().with_pause_resume()
    }

    async fn run(&self, _handler: Arc<dyn Handler>) -> Result<()> {
        self.stop.cancelled().await;
        Ok(())
    }

    async fn shutdown(&self) -> Result<()> {
        self.stop.cancel();
        Ok(())
    }

    async fn pause(&self) -> Result<()> {
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        Ok(())
    }
}
