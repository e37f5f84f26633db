//! The `chat` section: what the platform's services read for themselves,
//! by the runtime's one convention (config center, then the local section,
//! then these defaults).

use std::net::SocketAddr;
use std::time::Duration;

use im_infra::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

/// Where delivered messages are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In the process: only for the one-process platform (`chat all`).
    #[default]
    Memory,
    /// A MySQL table, through the `db` section's connection.
    Mysql,
}

/// The `chat` section.
///
/// ```
/// let s: im_infra_examples_chat::ChatSettings =
///     serde_json::from_value(serde_json::json!({"store": "mysql", "topic": "chat.t1"})).unwrap();
/// assert_eq!(s.store, im_infra_examples_chat::StoreKind::Mysql);
/// assert_eq!(s.history_limit, 50);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatSettings {
    /// The topic from logic to task (keyed by conversation).
    pub topic: String,
    /// The consumer group of the task service.
    pub group: String,
    /// Where task stores messages and logic reads histories.
    pub store: StoreKind,
    /// The table of the MySQL store.
    pub table: String,
    /// Where logic listens (port 0: any free port); the address it
    /// registers is the one it bound.
    pub logic_listen: SocketAddr,
    /// Where the gateway listens.
    pub gateway_listen: SocketAddr,
    /// How many of a conversation's latest messages a history holds.
    pub history_limit: u32,
    /// How long a history stays in the cache (task also drops it when a
    /// message of the conversation is stored).
    #[serde(with = "humantime_serde")]
    pub history_ttl: Duration,
    /// How long a send's outcome is remembered, so that a client's retry
    /// with the same message id is answered instead of sent again.
    #[serde(with = "humantime_serde")]
    pub dedup_ttl: Duration,
    /// How long a crashed logic instance holds a conversation's lock (a
    /// live holder renews it). At most half of `call_timeout`, so that a
    /// send waiting for a crashed holder still answers in time.
    #[serde(with = "humantime_serde")]
    pub lock_ttl: Duration,
    /// How long a crashed logic instance holds a send it had claimed. At
    /// most half of `call_timeout`, for the same reason.
    #[serde(with = "humantime_serde")]
    pub claim_ttl: Duration,
    /// The bound of one call from the gateway to logic.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// How many times the gateway tries a send whose instance could not be
    /// reached or whose connection broke (a send is idempotent, so a retry
    /// is safe); the balanced channel has ejected the failed instance, so
    /// the retry goes to another when there is one.
    pub send_attempts: u32,
}

impl Default for ChatSettings {
    fn default() -> Self {
        ChatSettings {
            topic: "chat.messages".into(),
            group: "im-task".into(),
            store: StoreKind::Memory,
            table: "chat_messages".into(),
            logic_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            gateway_listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            history_limit: 50,
            history_ttl: Duration::from_secs(30),
            dedup_ttl: Duration::from_secs(24 * 3600),
            lock_ttl: Duration::from_secs(2),
            claim_ttl: Duration::from_secs(2),
            call_timeout: Duration::from_secs(5),
            send_attempts: 3,
        }
    }
}

/// Whether `name` can be a MySQL table name written into SQL as it is: 1 to
/// 64 ASCII letters, digits or `_`.
///
/// ```
/// use im_infra_examples_chat::settings::is_table_name;
/// assert!(is_table_name("chat_messages"));
/// assert!(!is_table_name("x`; DROP TABLE y"));
/// assert!(!is_table_name(""));
/// ```
pub fn is_table_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn invalid(field: &str, why: &str) -> Error {
    Error::new(ErrorKind::InvalidConfig, format!("chat.{field}: {why}"))
}

impl im_infra::settings::Settings for ChatSettings {
    const COMPONENT: &'static str = "chat";

    fn validate(&self) -> Result<()> {
        for (field, name) in [("topic", &self.topic), ("group", &self.group)] {
            im_infra::validate::name(field, name).map_err(|e| invalid(field, e.message()))?;
        }
        if !is_table_name(&self.table) {
            return Err(invalid("table", "1 to 64 letters, digits or '_'"));
        }
        // 500 bodies of 4 KiB stay under gRPC's 4 MiB message limit.
        if self.history_limit == 0 || self.history_limit > 500 {
            return Err(invalid("history_limit", "between 1 and 500"));
        }
        for (field, d) in [
            ("history_ttl", self.history_ttl),
            ("dedup_ttl", self.dedup_ttl),
            ("lock_ttl", self.lock_ttl),
            ("claim_ttl", self.claim_ttl),
            ("call_timeout", self.call_timeout),
        ] {
            if d < Duration::from_millis(1) {
                return Err(invalid(field, "at least 1 ms"));
            }
        }
        if self.lock_ttl > self.call_timeout / 2 || self.claim_ttl > self.call_timeout / 2 {
            return Err(invalid(
                "lock_ttl",
                "lock_ttl and claim_ttl must be at most half of call_timeout",
            ));
        }
        if self.send_attempts == 0 || self.send_attempts > 10 {
            return Err(invalid("send_attempts", "between 1 and 10"));
        }
        Ok(())
    }
}
