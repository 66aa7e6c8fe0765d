//! Persistence behind one async, fallible trait.

mod accounts;
#[cfg(test)]
mod contract;
mod error;
mod group_commit;
mod memory;
mod migrations;
mod postgres;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

pub use accounts::{Account, AccountStore, username_key};
pub use error::StoreError;
pub use memory::MemoryStore;
pub use postgres::PostgresStore;
pub use sqlite::{Durability, SqliteStore};

use crate::domain::{Conversation, Message, Timestamp, UserId};

/// Which slice of the conversation list to read, most recently updated first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Page {
    /// At most this many; `None` for all.
    pub limit: Option<usize>,
    /// Skip this many first.
    pub offset: usize,
}

/// Who writes a conversation: its owner, and the fencing token of the writer's claim on it
/// ([`ConversationStore::claim`]). Without a token no claim is checked, as on a single node where
/// one process is the only writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    pub owner: UserId,
    pub fence: Option<u64>,
}

impl Writer {
    /// A writer of `owner`'s conversations that holds no claim.
    pub fn unfenced(owner: &UserId) -> Self {
        Writer {
            owner: owner.clone(),
            fence: None,
        }
    }
}

/// Where conversations live, each under its owner: every read and write names the owner, and a
/// conversation of another owner is not there. Every write returns once it is durable for that
/// store.
///
/// Where several processes may write one conversation (a cluster), each new writer first
/// claims it; a write carrying the token of an older claim is refused with
/// [`StoreError::Fenced`], so a process that lost the conversation without knowing it yet can
/// never overwrite its successor's work.
#[async_trait]
pub trait ConversationStore: Send + Sync {
    /// Claims `owner`'s conversation `id`, stored or not, for a new writer: a fencing token
    /// greater than every token given before, for any conversation. From then on, writes to it
    /// carrying another token are refused.
    async fn claim(&self, owner: &UserId, id: &str) -> Result<u64, StoreError>;
    /// Stores a new conversation with the messages it already has, in one write.
    async fn create_conversation(
        &self,
        writer: &Writer,
        conversation: &Conversation,
    ) -> Result<(), StoreError>;
    /// One conversation of `owner` with its messages in order, if it exists.
    async fn load_conversation(
        &self,
        owner: &UserId,
        id: &str,
    ) -> Result<Option<Conversation>, StoreError>;
    /// The conversations of `owner` with their messages, most recently updated first.
    async fn list_conversations(
        &self,
        owner: &UserId,
        page: Page,
    ) -> Result<Vec<Conversation>, StoreError>;
    /// Inserts messages of one conversation, or replaces the content and status of those
    /// already stored, and moves the conversation's `updatedAt`, in one write.
    async fn save_messages(
        &self,
        writer: &Writer,
        messages: &[Message],
        updated_at: Timestamp,
    ) -> Result<(), StoreError>;
    /// [`ConversationStore::save_messages`] for one message.
    async fn save_message(
        &self,
        writer: &Writer,
        message: &Message,
        updated_at: Timestamp,
    ) -> Result<(), StoreError> {
        self.save_messages(writer, std::slice::from_ref(message), updated_at)
            .await
    }
    /// Removes one message and moves the conversation's `updatedAt`.
    async fn delete_message(
        &self,
        writer: &Writer,
        conversation_id: &str,
        message_id: &str,
        updated_at: Timestamp,
    ) -> Result<(), StoreError>;
    /// Changes a conversation's title.
    async fn rename_conversation(
        &self,
        writer: &Writer,
        id: &str,
        title: &str,
        updated_at: Timestamp,
    ) -> Result<(), StoreError>;
    /// Removes a conversation and its messages; false when there was none.
    async fn delete_conversation(&self, writer: &Writer, id: &str) -> Result<bool, StoreError>;
    /// Adds `tokens` to what `owner`'s replies used on `day` (a UTC date, `2026-11-29`).
    async fn add_usage(&self, owner: &UserId, day: &str, tokens: u64) -> Result<(), StoreError>;
    /// The tokens `owner`'s replies used on `day`.
    async fn usage_on(&self, owner: &UserId, day: &str) -> Result<u64, StoreError>;
    /// Marks every reply still `streaming`, whoever's, as `error` (interrupted); run at start-up.
    async fn mark_interrupted(&self) -> Result<u64, StoreError>;
    /// Marks the replies of one conversation still `streaming` as `error`, and nothing else: no
    /// other field and no reply that has left `streaming` meanwhile.
    async fn mark_interrupted_in(
        &self,
        writer: &Writer,
        conversation_id: &str,
    ) -> Result<u64, StoreError>;
}

/// A store of everything the server keeps: conversations and accounts.
pub trait Store: ConversationStore + AccountStore {}

impl<T: ConversationStore + AccountStore> Store for T {}

/// The store `DATABASE_URL` names: `memory`, a `sqlite:` URL, or a `postgres:` (or
/// `postgresql:`) URL.
pub async fn open(url: &str, durability: Durability) -> Result<Arc<dyn Store>, StoreError> {
    if url == "memory" {
        return Ok(Arc::new(MemoryStore::new()));
    }
    // Only the scheme is named: the rest of a URL may hold a password.
    let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
    match scheme {
        "sqlite" => Ok(Arc::new(SqliteStore::open(url, durability).await?)),
        "postgres" | "postgresql" => Ok(Arc::new(PostgresStore::open(url).await?)),
        _ => Err(StoreError::UnsupportedUrl(format!(
            "scheme {scheme:?}: expected `memory`, a `sqlite:` URL or a `postgres:` URL"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn database_urls_name_a_store_this_server_knows() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/chat.db", dir.path().display());
        assert!(open(&url, Durability::Normal).await.is_ok());
        assert!(open("memory", Durability::Normal).await.is_ok());
        for url in [
            "postgres:x",
            "",
            "sqlite:",
            "sqlite::memory:",
            "sqlite://chat.db?mode=rwc",
        ] {
            assert!(
                matches!(
                    open(url, Durability::Normal).await,
                    Err(StoreError::UnsupportedUrl(_))
                ),
                "{url}"
            );
        }
        let Err(refused) = open("mysql://admin:hunter2@db/chat", Durability::Normal).await else {
            panic!("a mysql URL opened");
        };
        assert!(!refused.to_string().contains("hunter2"), "{refused}");
    }

    #[tokio::test]
    async fn a_postgres_server_that_cannot_be_reached_is_named_without_its_password() {
        for url in [
            "postgres://admin:hunter2@127.0.0.1:1/chat",
            "postgresql://admin:hunter2@127.0.0.1:1/chat?connect_timeout=1",
            "postgres://admin:hunter2@127.0.0.1:port/chat",
            "postgres://admin:hunter2@127.0.0.1/chat?sslmode=hunter2",
        ] {
            let Err(refused) = open(url, Durability::Normal).await else {
                panic!("{url} opened");
            };
            let text = refused.to_string();
            assert!(!text.contains("hunter2"), "{text}");
            assert!(!text.contains('\n'), "{text}");
        }
        let Err(refused) = open(
            "postgres://admin:hunter2@127.0.0.1:1/chat",
            Durability::Normal,
        )
        .await
        else {
            panic!("opened");
        };
        assert!(
            matches!(&refused, StoreError::Storage(text) if text.contains("postgres://127.0.0.1:1/chat")),
            "{refused}"
        );
    }
}
