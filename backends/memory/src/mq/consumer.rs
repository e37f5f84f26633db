//! The in-process consumer-group member.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_infra::backend::Closable;
use im_infra::mq::{Consumer, ConsumerCapabilities, ConsumerSettings, Handler, ReceivedMessage};
use im_infra::telemetry::{with_timeout, OpMetrics};
use im_infra::{Error, ErrorKind, Result};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Shared;

/// How long [`Backend::close`](im_infra::backend::Backend::close) waits for
/// a running consumer to finish its in-flight message and leave the group.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// One member of a consumer group on a [`MemoryBackend`](crate::MemoryBackend).
/// Each handler attempt is one `mq.handle` operation and each dead-lettered
/// message one `mq.dead_letter` operation (span and metrics); the backend
/// hands it out inside an [`ObservedConsumer`](im_infra::layer::ObservedConsumer)
/// (`mq.run`, `mq.shutdown`, ...) and shuts it down when it closes.
pub(crate) struct MemoryConsumer {
    shared: Arc<Shared>,
    settings: ConsumerSettings,
    member: u64,
    paused: watch::Sender<bool>,
    stop: CancellationToken,
    running: AtomicBool,
    /// `true` while `run` is active.
    active: watch::Sender<bool>,
    handle_op: OpMetrics,
    dead_letter_op: OpMetrics,
}

impl std::fmt::Debug for MemoryConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryConsumer")
            .field("group", &self.settings.group)
            .field("topics", &self.settings.topics)
            .field("member", &self.member)
            .finish()
    }
}

/// Leaves the group when `run` ends in any way, including cancellation
/// (then the in-flight message stays uncommitted and is delivered again).
struct Membership<'a> {
    consumer: &'a MemoryConsumer,
}

impl Drop for Membership<'_> {
    fn drop(&mut self) {
        let c = self.consumer;
        c.shared.mq.leave(&c.settings.group, c.member);
        c.running.store(false, Ordering::Release);
        c.active.send_replace(false);
    }
}

enum Handled {
    /// Commit the offset (handled, or dead-lettered).
    Commit,
    /// Stop requested before the handler succeeded: leave uncommitted.
    Abandon,
}

impl MemoryConsumer {
    pub(crate) fn new(shared: Arc<Shared>, settings: ConsumerSettings) -> Result<Self> {
        settings.validate()?;
        let member = shared.mq.member_ids.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(MemoryConsumer {
            shared,
            settings,
            member,
            paused: watch::channel(false).0,
            stop: CancellationToken::new(),
            running: AtomicBool::new(false),
            active: watch::channel(false).0,
            handle_op: OpMetrics::new(crate::NAME, "mq", "mq.handle"),
            dead_letter_op: OpMetrics::new(crate::NAME, "mq", "mq.dead_letter"),
        })
    }

    async fn handle(&self, handler: &dyn Handler, mut msg: ReceivedMessage) -> Handled {
        let retry = &self.settings.handler_retry;
        let mut finite = retry.delays();
        let mut forever = retry.delays_forever();
        loop {
            let err = match self.handle_op.run(handler.handle(&msg)).await {
                Ok(()) => return Handled::Commit,
                Err(e) => e,
            };
            let delay = if self.settings.dead_letter_topic.is_some() {
                finite.next()
            } else {
                Some(forever.next().unwrap_or(retry.max_interval))
            };
            let Some(delay) = delay else {
                return match self
                    .dead_letter_op
                    .run_sync(|| self.dead_letter(&msg, &err))
                {
                    Ok(()) => Handled::Commit,
                    Err(e) => {
                        tracing::error!(error = %e, "dead-lettering failed; the message stays uncommitted");
                        Handled::Abandon
                    }
                };
            };
            tracing::warn!(topic = %msg.topic, partition = msg.partition, offset = msg.offset, attempt = msg.attempt, error = %err, "handler failed; retrying");
            tokio::select! {
                _ = self.stop.cancelled() => return Handled::Abandon,
                _ = tokio::time::sleep(delay) => {}
            }
            msg.attempt += 1;
        }
    }

    fn dead_letter(&self, msg: &ReceivedMessage, err: &Error) -> Result<()> {
        let Some(dlq) = &self.settings.dead_letter_topic else {
            return Err(Error::new(ErrorKind::Internal, "no dead-letter topic"));
        };
        let m = msg.dead_letter(dlq, err);
        self.shared
            .mq
            .append(m, self.shared.settings.default_partitions);
        tracing::warn!(topic = %msg.topic, offset = msg.offset, dead_letter_topic = %dlq, "message dead-lettered");
        Ok(())
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    fn capabilities(&self) -> ConsumerCapabilities {
        ConsumerCapabilities::default().with_pause_resume()
    }

    async fn run(&self, handler: Arc<dyn Handler>) -> Result<()> {
        self.shared.check_open()?;
        if self.stop.is_cancelled() {
            return Err(Error::new(ErrorKind::Closed, "the consumer was shut down"));
        }
        if self.running.swap(true, Ordering::AcqRel) {
            return Err(Error::new(
                ErrorKind::InvalidState,
                "the consumer is already running",
            ));
        }
        self.active.send_replace(true);
        let store = &self.shared.mq;
        let cfg = &self.settings;
        store.join(
            &cfg.group,
            self.member,
            &cfg.topics,
            cfg.start,
            self.shared.settings.default_partitions,
        );
        let _membership = Membership { consumer: self };
        let mut cursor = 0usize;
        let mut paused = self.paused.subscribe();
        while !self.stop.is_cancelled() && !self.shared.is_closed() {
            let changed = store.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if *paused.borrow_and_update() {
                tokio::select! {
                    _ = self.stop.cancelled() => break,
                    _ = paused.changed() => continue,
                }
            }
            match store.next_for(&cfg.group, self.member, &mut cursor) {
                Some(picked) => {
                    let msg = picked.message;
                    let (topic, partition, offset) = (msg.topic.clone(), msg.partition, msg.offset);
                    if let Handled::Commit = self.handle(handler.as_ref(), msg).await {
                        store.commit(&cfg.group, self.member, &topic, partition, offset);
                    }
                }
                None => {
                    tokio::select! {
                        _ = &mut changed => {}
                        _ = self.stop.cancelled() => {}
                        _ = self.shared.shutdown.cancelled() => {}
                        _ = paused.changed() => {}
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
        Ok(())
    }

    async fn shutdown(&self) -> Result<()> {
        self.stop.cancel();
        let mut active = self.active.subscribe();
        while *active.borrow_and_update() {
            if active.changed().await.is_err() {
                break;
            }
        }
        Ok(())
    }

    async fn pause(&self) -> Result<()> {
        self.paused.send_replace(true);
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        self.paused.send_replace(false);
        Ok(())
    }
}

/// Closed with the backend: shut down, within 10 s.
#[async_trait]
impl Closable for MemoryConsumer {
    async fn close(&self) -> Result<()> {
        with_timeout(CLOSE_TIMEOUT, "mq.shutdown", self.shutdown())
            .await
            .map_err(|e| e.with_backend(crate::NAME))
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
