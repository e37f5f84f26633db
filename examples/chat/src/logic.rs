//! The logic service: accepts a send once per client message id, gives it a
//! Snowflake id and the conversation's next sequence number, and hands it
//! to the queue; serves histories through the cache.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use im_infra::cache::{Cache, CacheExt, LoadOptions};
use im_infra::lock::{DistributedLock, LockOptions};
use im_infra::mq::{Message, Producer};
use im_infra::once::{Once, OnceExt, OnceOptions, Outcome, RunError};
use im_infra::uid::{IdGenerator, Snowflake};
use im_infra::{Error, ErrorKind, Result};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::proto::logic_server;
use crate::proto::{ChatMessage, HistoryReply, HistoryRequest, SendReply, SendRequest};
use crate::settings::ChatSettings;
use crate::store::MessageStore;

/// The gRPC path of `Logic.Send`: the one route the rate limit applies to.
pub const SEND_PATH: &str = "/chat.v1.Logic/Send";

/// The metadata key carrying the sender, set by the gateway; the rate
/// limit's key.
pub const USER_HEADER: &str = "x-user-id";

/// The longest user, conversation or client message id, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// The longest message body, in bytes.
pub const MAX_BODY_BYTES: usize = 4096;

/// The cache key of a conversation's history.
pub fn history_key(conversation: &str) -> String {
    format!("chat:history:{conversation}")
}

/// What a send's first run produced, remembered under its client message
/// id.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Accepted {
    id: u64,
    seq: u64,
    sent_at_ms: u64,
    /// What was sent: a repeat must send the same, and is queued as the
    /// first send was.
    conversation: String,
    body: String,
}

/// What the logic service uses.
pub struct LogicDeps {
    /// This instance's name, returned in each reply.
    pub instance: String,
    /// The platform's settings.
    pub settings: ChatSettings,
    /// Sequence numbers and cached histories.
    pub cache: Arc<dyn Cache>,
    /// The per-conversation critical section.
    pub lock: Arc<dyn DistributedLock>,
    /// One run per client message id.
    pub once: Arc<dyn Once>,
    /// The queue to the task service.
    pub producer: Arc<dyn Producer>,
    /// Message ids, on a leased worker id.
    pub ids: Arc<Snowflake>,
    /// Where histories are read.
    pub store: Arc<dyn MessageStore>,
}

/// The `Logic` gRPC service.
#[derive(Clone)]
pub struct LogicService {
    deps: Arc<LogicDeps>,
}

fn check_name(what: &str, value: &str) -> std::result::Result<(), Status> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES || value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "{what} must be 1 to {MAX_NAME_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl LogicService {
    /// The service over `deps`.
    pub fn new(deps: LogicDeps) -> LogicService {
        LogicService {
            deps: Arc::new(deps),
        }
    }

    /// The generated server around it.
    pub fn into_server(self) -> logic_server::LogicServer<LogicService> {
        logic_server::LogicServer::new(self)
    }

    /// A send, under the conversation's lock (so that the queue holds a
    /// conversation's messages in sequence order):
    ///
    /// 1. once per client message id, an id and the conversation's next
    ///    sequence number are taken, and remembered;
    /// 2. the message, with the remembered id and number, is queued; also
    ///    when the send repeats an earlier one.
    ///
    /// The outcome is remembered before the message is queued, and every
    /// answer queues it again, so a crash at any point loses nothing (the
    /// client's retry queues it), stores nothing twice (the store keeps one
    /// message per id), and the stored id is always the one the client was
    /// answered with. A repeated send costs one more message on the queue.
    async fn send_once(&self, req: &SendRequest) -> Result<(Accepted, bool)> {
        let d = &self.deps;
        let guard = d
            .lock
            .acquire(
                &format!("chat:conversation:{}", req.conversation),
                // Half the call's deadline for the lock, half for a claim
                // of a crashed instance to lapse: the errors reach the
                // caller before its deadline does.
                LockOptions::new(d.settings.lock_ttl).wait(d.settings.call_timeout / 2),
            )
            .await?;
        let work = async {
            // A retry of a send whose instance died holding it waits for
            // the claim to lapse (`claim_ttl`), then takes it.
            let mut opts = OnceOptions::new(d.settings.dedup_ttl).wait(d.settings.call_timeout / 2);
            opts.claim_ttl = d.settings.claim_ttl;
            // The user's length keeps ("a:b", "c") and ("a", "b:c") apart.
            let key = format!(
                "chat:send:{}:{}:{}",
                req.user.len(),
                req.user,
                req.client_msg_id
            );
            let outcome = d
                .once
                .run_with(&key, opts, || async {
                    let id = d.ids.next_id()? as u64;
                    let seq = d
                        .cache
                        .incr_by(&format!("chat:seq:{}", req.conversation), 1)
                        .await? as u64;
                    Ok::<_, Error>(Accepted {
                        id,
                        seq,
                        sent_at_ms: now_ms(),
                        conversation: req.conversation.clone(),
                        body: req.body.clone(),
                    })
                })
                .await;
            let (accepted, duplicate) = match outcome {
                Ok(Outcome::Executed(a)) => (a, false),
                Ok(Outcome::AlreadyDone(a)) => (a, true),
                Err(RunError::Infra(e) | RunError::Task(e)) => return Err(e),
            };
            if accepted.conversation != req.conversation || accepted.body != req.body {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "client message id {:?} was used for another message",
                        req.client_msg_id
                    ),
                ));
            }
            let message = ChatMessage {
                id: accepted.id,
                seq: accepted.seq,
                conversation: accepted.conversation.clone(),
                sender: req.user.clone(),
                client_msg_id: req.client_msg_id.clone(),
                body: accepted.body.clone(),
                sent_at_ms: accepted.sent_at_ms,
            };
            d.producer
                .produce(
                    Message::new(d.settings.topic.clone(), message.encode_to_vec())
                        .with_key(req.conversation.clone()),
                )
                .await?;
            Ok((accepted, duplicate))
        }
        .await;
        if let Err(e) = guard.release().await {
            tracing::warn!(error = %e, "releasing a conversation's lock failed; it expires");
        }
        work
    }
}

#[tonic::async_trait]
impl logic_server::Logic for LogicService {
    async fn send(
        &self,
        request: Request<SendRequest>,
    ) -> std::result::Result<Response<SendReply>, Status> {
        let req = request.into_inner();
        check_name("user", &req.user)?;
        check_name("conversation", &req.conversation)?;
        check_name("client_msg_id", &req.client_msg_id)?;
        if req.body.len() > MAX_BODY_BYTES {
            return Err(Status::invalid_argument(format!(
                "body is longer than {MAX_BODY_BYTES} bytes"
            )));
        }
        let (accepted, duplicate) = match self.send_once(&req).await {
            Ok(answer) => answer,
            Err(e) => {
                metrics::counter!("chat_sends_total", "outcome" => "failed").increment(1);
                return Err(crate::status::of(&e));
            }
        };
        let outcome = if duplicate { "duplicate" } else { "accepted" };
        metrics::counter!("chat_sends_total", "outcome" => outcome).increment(1);
        Ok(Response::new(SendReply {
            id: accepted.id,
            seq: accepted.seq,
            duplicate,
            served_by: self.deps.instance.clone(),
        }))
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> std::result::Result<Response<HistoryReply>, Status> {
        let req = request.into_inner();
        check_name("conversation", &req.conversation)?;
        let d = &self.deps;
        let full = d.settings.history_limit;
        let store = d.store.clone();
        let conversation = req.conversation.clone();
        let cached = d
            .cache
            .get_or_load(
                &history_key(&req.conversation),
                LoadOptions::ttl(d.settings.history_ttl),
                || async move {
                    let messages = store.history(&conversation, full).await?;
                    Ok(Some(Bytes::from(HistoryReply { messages }.encode_to_vec())))
                },
            )
            .await
            .map_err(|e| crate::status::of(&e))?
            .unwrap_or_default();
        let mut reply = HistoryReply::decode(cached)
            .map_err(|e| Status::internal(format!("a cached history does not decode: {e}")))?;
        let limit = match req.limit {
            0 => full,
            n => n.min(full),
        } as usize;
        let skip = reply.messages.len().saturating_sub(limit);
        reply.messages.drain(..skip);
        Ok(Response::new(reply))
    }
}
