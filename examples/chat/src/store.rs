//! Where the task service stores delivered messages and logic reads
//! histories: in the process, or in a MySQL table.
//!
//! A store takes a message once: a second message with the same id (the
//! queue delivers at least once, and logic queues a repeated send again),
//! or with the same sender and client message id, is ignored.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use im_infra::{Error, ErrorKind, Result};
use im_infra_mysql::mysql_async::params;
use im_infra_mysql::Db;
use parking_lot::Mutex;

use crate::proto::ChatMessage;

/// The messages of every conversation.
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Stores `message` unless one with its id, or with its sender and
    /// client message id, is stored already; whether it was stored.
    async fn insert(&self, message: &ChatMessage) -> Result<bool>;

    /// The latest `limit` messages of `conversation`, oldest first.
    async fn history(&self, conversation: &str, limit: u32) -> Result<Vec<ChatMessage>>;

    /// How many messages are stored.
    async fn count(&self) -> Result<u64>;
}

/// A store in the process.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> im_infra::Result<()> {
/// use im_infra_examples_chat::{proto::ChatMessage, MemoryStore, MessageStore};
/// let store = MemoryStore::default();
/// let m = ChatMessage { id: 1, seq: 1, conversation: "c".into(), sender: "u".into(),
///                       client_msg_id: "m1".into(), ..Default::default() };
/// assert!(store.insert(&m).await?);
/// assert!(!store.insert(&ChatMessage { id: 2, ..m.clone() }).await?); // same client id
/// assert_eq!(store.history("c", 10).await?, vec![m]);
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    conversations: HashMap<String, Vec<ChatMessage>>,
    ids: HashSet<u64>,
    client_ids: HashSet<(String, String)>,
}

#[async_trait]
impl MessageStore for MemoryStore {
    async fn insert(&self, message: &ChatMessage) -> Result<bool> {
        let mut inner = self.inner.lock();
        let client = (message.sender.clone(), message.client_msg_id.clone());
        if inner.ids.contains(&message.id) || inner.client_ids.contains(&client) {
            return Ok(false);
        }
        inner.ids.insert(message.id);
        inner.client_ids.insert(client);
        let list = inner
            .conversations
            .entry(message.conversation.clone())
            .or_default();
        // Kept in sequence order whatever the delivery order.
        let at = list.partition_point(|m| m.seq <= message.seq);
        list.insert(at, message.clone());
        Ok(true)
    }

    async fn history(&self, conversation: &str, limit: u32) -> Result<Vec<ChatMessage>> {
        let inner = self.inner.lock();
        let list = inner
            .conversations
            .get(conversation)
            .map_or(&[][..], Vec::as_slice);
        Ok(list[list.len().saturating_sub(limit as usize)..].to_vec())
    }

    async fn count(&self) -> Result<u64> {
        Ok(self.inner.lock().ids.len() as u64)
    }
}

/// A store in a MySQL table (created when missing), through [`Db`]. Names
/// compare byte for byte (`utf8mb4_bin`), as everywhere else: `M1` and
/// `m1` are two client message ids.
#[derive(Debug, Clone)]
pub struct MysqlStore {
    db: Arc<Db>,
    table: String,
}

type Row = (u64, u64, String, String, String, String, u64);

impl MysqlStore {
    /// The store in `table` (letters, digits and `_` only, as
    /// [`is_table_name`](crate::settings::is_table_name)), created if
    /// missing; `InvalidConfig` otherwise.
    pub async fn open(db: Arc<Db>, table: &str) -> Result<MysqlStore> {
        if !crate::settings::is_table_name(table) {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!("table name {table:?}: 1 to 64 letters, digits or '_'"),
            ));
        }
        db.exec(
            &format!(
                "CREATE TABLE IF NOT EXISTS `{table}` (
                    id BIGINT UNSIGNED NOT NULL PRIMARY KEY,
                    seq BIGINT UNSIGNED NOT NULL,
                    conversation VARCHAR(128) COLLATE utf8mb4_bin NOT NULL,
                    sender VARCHAR(128) COLLATE utf8mb4_bin NOT NULL,
                    client_msg_id VARCHAR(128) COLLATE utf8mb4_bin NOT NULL,
                    body TEXT NOT NULL,
                    sent_at_ms BIGINT UNSIGNED NOT NULL,
                    UNIQUE KEY by_client (sender, client_msg_id),
                    KEY by_conversation (conversation, seq)
                ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
            ),
            (),
        )
        .await?;
        Ok(MysqlStore {
            db,
            table: table.to_owned(),
        })
    }

    /// Drops the table (tests and benchmarks clean up with it).
    pub async fn drop_table(&self) -> Result<()> {
        self.db
            .exec(&format!("DROP TABLE IF EXISTS `{}`", self.table), ())
            .await
            .map(drop)
    }
}

#[async_trait]
impl MessageStore for MysqlStore {
    async fn insert(&self, m: &ChatMessage) -> Result<bool> {
        let stored = self
            .db
            .exec(
                &format!(
                    "INSERT IGNORE INTO `{}` (id, seq, conversation, sender, client_msg_id, body, sent_at_ms)
                     VALUES (:id, :seq, :conversation, :sender, :client_msg_id, :body, :sent_at_ms)",
                    self.table
                ),
                params! {
                    "id" => m.id,
                    "seq" => m.seq,
                    "conversation" => &m.conversation,
                    "sender" => &m.sender,
                    "client_msg_id" => &m.client_msg_id,
                    "body" => &m.body,
                    "sent_at_ms" => m.sent_at_ms,
                },
            )
            .await?;
        Ok(stored == 1)
    }

    async fn history(&self, conversation: &str, limit: u32) -> Result<Vec<ChatMessage>> {
        let rows: Vec<Row> = self
            .db
            .query(
                &format!(
                    "SELECT id, seq, conversation, sender, client_msg_id, body, sent_at_ms
                     FROM `{}` WHERE conversation = :conversation ORDER BY seq DESC LIMIT :limit",
                    self.table
                ),
                params! { "conversation" => conversation, "limit" => limit },
            )
            .await?;
        Ok(rows
            .into_iter()
            .rev()
            .map(
                |(id, seq, conversation, sender, client_msg_id, body, sent_at_ms)| ChatMessage {
                    id,
                    seq,
                    conversation,
                    sender,
                    client_msg_id,
                    body,
                    sent_at_ms,
                },
            )
            .collect())
    }

    async fn count(&self) -> Result<u64> {
        let n: Option<u64> = self
            .db
            .query_first(&format!("SELECT COUNT(*) FROM `{}`", self.table), ())
            .await?;
        Ok(n.unwrap_or(0))
    }
}
