//! The task service: consumes the messages logic accepted and stores them,
//! then drops the conversation's cached history so that the next read
//! loads it again.

use std::sync::Arc;

use im_infra::cache::Cache;
use im_infra::mq::{handler_fn, Handler, ReceivedMessage};
use im_infra::Result;
use prost::Message as _;

use crate::logic::history_key;
use crate::proto::ChatMessage;
use crate::store::MessageStore;

/// The consumer's handler. A message that does not decode is logged and
/// skipped (it can never succeed); a store failure is returned, so the
/// consumer retries it and does not commit past it.
pub fn handler(store: Arc<dyn MessageStore>, cache: Arc<dyn Cache>) -> Arc<dyn Handler> {
    handler_fn(move |received: ReceivedMessage| {
        let (store, cache) = (store.clone(), cache.clone());
        async move {
            let message = match ChatMessage::decode(received.payload) {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(topic = %received.topic, partition = received.partition,
                        offset = received.offset, error = %e, "skipping a message that does not decode");
                    metrics::counter!("chat_stored_total", "outcome" => "undecodable").increment(1);
                    return Ok(());
                }
            };
            let stored = store.insert(&message).await?;
            let outcome = if stored { "stored" } else { "duplicate" };
            metrics::counter!("chat_stored_total", "outcome" => outcome).increment(1);
            if let Err(e) = cache.delete(&[&history_key(&message.conversation)]).await {
                // The history then refreshes when its TTL ends.
                tracing::warn!(error = %e, "dropping a cached history failed");
            }
            Result::Ok(())
        }
    })
}
