//! [`HandlerRunner`]: what a consumer does with one message, the same on
//! every backend: handler attempts with the settings' backoff, a panic
//! counted as a failed attempt, then the dead-letter topic, each attempt
//! and each dead letter one span and counted (`mq.handle`,
//! `mq.dead_letter`).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use super::{ConsumerSettings, Handler, Message, ReceivedMessage};
use crate::error::{Error, ErrorKind, Result};
use crate::telemetry::OpMetrics;

/// What became of a message a [`HandlerRunner`] ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Handled, or dead-lettered: its offset may be committed.
    Done,
    /// A stop came first: leave it uncommitted, to be delivered again.
    Abandoned,
}

/// Runs a consumer's handler on its messages. A failed attempt is retried
/// after the next delay of `handler_retry`; when those run out the message
/// goes to `dead_letter_topic`, whose sends are retried until one succeeds;
/// without a dead-letter topic the handler is retried until it succeeds
/// (at most `max_interval` apart). A message is never dropped.
///
/// ```
/// use std::time::Duration;
///
/// use im_infra::mq::{handler_fn, ConsumerSettings, Handled, HandlerRunner, ReceivedMessage};
/// use tokio_util::sync::CancellationToken;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let settings = ConsumerSettings::new("billing", ["orders"]).dead_letter("orders.dlq");
/// let runner = HandlerRunner::new("memory", &settings);
/// let failing = handler_fn(|_| async { Err(im_infra::Error::invalid_argument("bad order")) });
/// let message = ReceivedMessage {
///     topic: "orders".into(), partition: 0, offset: 7, key: None, payload: "{}".into(),
///     headers: vec![], timestamp: None, attempt: 1,
/// };
/// let stop = CancellationToken::new();
/// tokio::time::pause(); // the retries' backoff, without waiting for it
/// let handled = runner
///     .run(&*failing, message, &stop, |letter| async move {
///         assert_eq!(letter.topic, "orders.dlq");
///         Ok(()) // appended to the dead-letter topic
///     })
///     .await;
/// assert_eq!(handled, Handled::Done);
/// # }
/// ```
#[derive(Debug)]
pub struct HandlerRunner {
    settings: ConsumerSettings,
    handle_op: OpMetrics,
    dead_letter_op: OpMetrics,
}

impl HandlerRunner {
    /// The runner of a consumer of `backend` under `settings`.
    pub fn new(backend: &'static str, settings: &ConsumerSettings) -> Self {
        HandlerRunner {
            settings: settings.clone(),
            handle_op: OpMetrics::new(backend, "mq", "mq.handle"),
            dead_letter_op: OpMetrics::new(backend, "mq", "mq.dead_letter"),
        }
    }

    /// Runs `handler` on `msg` until it succeeds, or `msg` is sent to the
    /// dead-letter topic with `send` (which appends one message to its
    /// topic), or `stop` is cancelled.
    pub async fn run<F, Fut>(
        &self,
        handler: &dyn Handler,
        mut msg: ReceivedMessage,
        stop: &CancellationToken,
        send: F,
    ) -> Handled
    where
        F: Fn(Message) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let retry = &self.settings.handler_retry;
        let mut finite = retry.delays();
        let mut forever = retry.delays_forever();
        loop {
            let err = match self.attempt(handler, &msg).await {
                Ok(()) => return Handled::Done,
                Err(e) => e,
            };
            let delay = match &self.settings.dead_letter_topic {
                Some(_) => finite.next(),
                None => Some(forever.next().unwrap_or(retry.max_interval)),
            };
            let Some(delay) = delay else {
                return self.dead_letter(&msg, &err, stop, send).await;
            };
            tracing::warn!(topic = %msg.topic, partition = msg.partition, offset = msg.offset, attempt = msg.attempt, error = %err, "handler failed; retrying");
            if !pause(stop, delay).await {
                return Handled::Abandoned;
            }
            msg.attempt = msg.attempt.saturating_add(1);
        }
    }

    /// One handler attempt; a panicking handler counts as a failed attempt.
    async fn attempt(&self, handler: &dyn Handler, msg: &ReceivedMessage) -> Result<()> {
        self.handle_op
            .run(async {
                match AssertUnwindSafe(handler.handle(msg)).catch_unwind().await {
                    Ok(res) => res,
                    Err(_) => Err(Error::new(ErrorKind::Internal, "the handler panicked")),
                }
            })
            .await
    }

    /// Sends the message to the dead-letter topic, retrying until a send
    /// succeeds or a stop comes.
    async fn dead_letter<F, Fut>(
        &self,
        msg: &ReceivedMessage,
        err: &Error,
        stop: &CancellationToken,
        send: F,
    ) -> Handled
    where
        F: Fn(Message) -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let Some(topic) = &self.settings.dead_letter_topic else {
            return Handled::Abandoned;
        };
        let letter = msg.dead_letter(topic, err);
        let mut delays = self.settings.handler_retry.delays_forever();
        loop {
            match self.dead_letter_op.run(send(letter.clone())).await {
                Ok(()) => {
                    tracing::warn!(topic = %msg.topic, partition = msg.partition, offset = msg.offset, dead_letter_topic = %topic, error = %err, "message dead-lettered");
                    return Handled::Done;
                }
                Err(e) => {
                    tracing::error!(topic = %msg.topic, offset = msg.offset, dead_letter_topic = %topic, error = %e, "dead-lettering failed; retrying");
                    let delay = delays.next().unwrap_or(Duration::from_secs(1));
                    if !pause(stop, delay).await {
                        return Handled::Abandoned;
                    }
                }
            }
        }
    }
}

/// Waits `delay`; `false` if `stop` came first.
async fn pause(stop: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::mq::handler_fn;

    fn message() -> ReceivedMessage {
        ReceivedMessage {
            topic: "orders".into(),
            partition: 1,
            offset: 9,
            key: None,
            payload: "p".into(),
            headers: vec![],
            timestamp: None,
            attempt: 1,
        }
    }

    /// A handler that fails (or panics) its first `failures` attempts.
    fn flaky(failures: usize, panics: bool) -> (Arc<dyn Handler>, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = calls.clone();
        let handler = handler_fn(move |_| {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < failures {
                    assert!(!panics, "handler panicked on attempt {}", n + 1);
                    return Err(Error::new(ErrorKind::Unavailable, "down"));
                }
                Ok(())
            }
        });
        (handler, calls)
    }

    fn no_dead_letters(_: Message) -> std::future::Ready<Result<()>> {
        panic!("nothing must be dead-lettered")
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_handler_is_retried_until_it_succeeds() {
        let settings = ConsumerSettings::new("g", ["orders"]);
        let runner = HandlerRunner::new("test", &settings);
        // More failures than max_retries: without a dead-letter topic the
        // retries go on.
        let (handler, calls) = flaky(6, false);
        let stop = CancellationToken::new();
        let handled = runner
            .run(&*handler, message(), &stop, no_dead_letters)
            .await;
        assert_eq!(handled, Handled::Done);
        assert_eq!(calls.load(Ordering::SeqCst), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_handler_is_a_failed_attempt() {
        let settings = ConsumerSettings::new("g", ["orders"]);
        let runner = HandlerRunner::new("test", &settings);
        let (handler, calls) = flaky(2, true);
        let stop = CancellationToken::new();
        let handled = runner
            .run(&*handler, message(), &stop, no_dead_letters)
            .await;
        assert_eq!(handled, Handled::Done);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_retries_the_message_is_dead_lettered_until_a_send_succeeds() {
        let settings = ConsumerSettings::new("g", ["orders"]).dead_letter("orders.dlq");
        let retries = settings.handler_retry.max_retries as usize;
        let runner = HandlerRunner::new("test", &settings);
        let (handler, calls) = flaky(usize::MAX, false);
        let sends = AtomicUsize::new(0);
        let stop = CancellationToken::new();
        let handled = runner
            .run(&*handler, message(), &stop, |letter| {
                let n = sends.fetch_add(1, Ordering::SeqCst);
                async move {
                    assert_eq!(letter.topic, "orders.dlq");
                    if n < 2 {
                        Err(Error::new(ErrorKind::Unavailable, "broker down"))
                    } else {
                        Ok(())
                    }
                }
            })
            .await;
        assert_eq!(handled, Handled::Done);
        assert_eq!(calls.load(Ordering::SeqCst), retries + 1);
        assert_eq!(sends.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_during_the_retries_leaves_the_message_uncommitted() {
        let settings = ConsumerSettings::new("g", ["orders"]);
        let runner = HandlerRunner::new("test", &settings);
        let (handler, _) = flaky(usize::MAX, false);
        let stop = CancellationToken::new();
        stop.cancel();
        // Bounded in (paused) time: a runner that ignored the stop would
        // retry for ever.
        let run = runner.run(&*handler, message(), &stop, no_dead_letters);
        let handled = tokio::time::timeout(Duration::from_secs(3600), run)
            .await
            .expect("the runner stops when asked");
        assert_eq!(handled, Handled::Abandoned);
    }
}
