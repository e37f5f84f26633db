//! The in-process consumer-group member.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_infra::backend::Closable;
use im_infra::mq::{
    Consumer, ConsumerCapabilities, ConsumerSettings, Handled, Handler, HandlerRunner, MemberState,
};
use im_infra::telemetry::with_timeout;
use im_infra::Result;

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
    state: MemberState,
    runner: HandlerRunner,
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
    }
}

impl MemoryConsumer {
    pub(crate) fn new(shared: Arc<Shared>, settings: ConsumerSettings) -> Result<Self> {
        settings.validate()?;
        let member = shared.mq.member_ids.fetch_add(1, Ordering::Relaxed) + 1;
        let runner = HandlerRunner::new(crate::NAME, &settings);
        Ok(MemoryConsumer {
            shared,
            settings,
            member,
            state: MemberState::new(crate::NAME),
            runner,
        })
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    fn capabilities(&self) -> ConsumerCapabilities {
        ConsumerCapabilities::default().with_pause_resume()
    }

    async fn run(&self, handler: Arc<dyn Handler>) -> Result<()> {
        self.shared.check_open()?;
        let _running = self.state.begin()?;
        let stop = self.state.stop();
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
        let mut paused = self.state.paused();
        while !stop.is_cancelled() && !self.shared.is_closed() {
            let changed = store.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if *paused.borrow_and_update() {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = paused.changed() => continue,
                }
            }
            match store.next_for(&cfg.group, self.member, &mut cursor) {
                Some(picked) => {
                    let msg = picked.message;
                    let (topic, partition, offset) = (msg.topic.clone(), msg.partition, msg.offset);
                    let partitions = self.shared.settings.default_partitions;
                    let send = |letter| async move {
                        store.append(letter, partitions);
                        Ok(())
                    };
                    let handled = self.runner.run(&*handler, msg, stop, send).await;
                    if handled == Handled::Done {
                        store.commit(&cfg.group, self.member, &topic, partition, offset);
                    }
                }
                None => {
                    tokio::select! {
                        _ = &mut changed => {}
                        _ = stop.cancelled() => {}
                        _ = self.shared.stop().cancelled() => {}
                        _ = paused.changed() => {}
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
        Ok(())
    }

    async fn shutdown(&self) -> Result<()> {
        self.state.shutdown().await;
        Ok(())
    }

    async fn pause(&self) -> Result<()> {
        self.state.set_paused(true);
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        self.state.set_paused(false);
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
