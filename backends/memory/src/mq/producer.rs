//! The in-process producer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_infra::mq::{Delivery, Message, Producer};
use im_infra::{Error, ErrorKind, Result};

use crate::Shared;

/// A producer on a [`MemoryBackend`](crate::MemoryBackend). Topics are
/// created on first use with the backend's default partition count. Each
/// message is checked against the backend's `max_message_bytes`. The
/// backend hands it out inside an
/// [`ObservedProducer`](im_infra::layer::ObservedProducer), which does the
/// telemetry.
pub(crate) struct MemoryProducer {
    shared: Arc<Shared>,
    closed: AtomicBool,
}

impl MemoryProducer {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MemoryProducer {
            shared,
            closed: AtomicBool::new(false),
        }
    }

    /// `Closed` once the backend or this producer was closed.
    fn check_open(&self) -> Result<()> {
        self.shared.check_open()?;
        if self.closed.load(Ordering::Acquire) {
            return Err(
                Error::new(ErrorKind::Closed, "the producer was closed").with_backend(crate::NAME)
            );
        }
        Ok(())
    }

    fn send(&self, message: Message) -> Result<Delivery> {
        self.check_open()?;
        message.validate(self.shared.settings.max_message_bytes)?;
        Ok(self
            .shared
            .mq
            .append(message, self.shared.settings.default_partitions))
    }
}

#[async_trait]
impl Producer for MemoryProducer {
    async fn produce(&self, message: Message) -> Result<Delivery> {
        self.send(message)
    }

    async fn produce_batch(&self, messages: Vec<Message>) -> Result<Vec<Result<Delivery>>> {
        self.check_open()?;
        Ok(messages.into_iter().map(|m| self.send(m)).collect())
    }

    async fn flush(&self, _timeout: Duration) -> Result<()> {
        self.check_open()
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}
