//! Persistence behind one async, fallible trait.

mod error;
mod memory;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

pub use error::StoreError;
pub use memory::MemoryStore;
pub use sqlite::{Durability, SqliteStore};

use crate::domain::{Conversation, Message, Timestamp};

/// Which slice of the conversation list to read, most recently updated first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Page {
    /// At most this many; `None` for all.
    pub limit: Option<usize>,
    /// Skip this many first.
    pub offset: usize,
}

/// Where conversations live. Every write returns once it is durable for that store.
#[async_trait]
pub trait ConversationStore: Send + Sync {
    /// Stores a new conversation with the messages it already has, in one write.
    async fn create_conversation(&self, conversation: &Conversation) -> Result<(), StoreError>;
    /// One conversation with its messages in order, if it exists.
    async fn load_conversation(&self, id: &str) -> Result<Option<Conversation>, StoreError>;
    /// Conversations with their messages, most recently updated first.
    async fn list_conversations(&self, page: Page) -> Result<Vec<Conversation>, StoreError>;
    /// Inserts messages of one conversation, or replaces the content and status of those already
    /// stored, and moves the conversation's `updatedAt`, in one write.
    async fn save_messages(
        &self,
        messages: &[Message],
        updated_at: Timestamp,
    ) -> Result<(), StoreError>;
    /// [`ConversationStore::save_messages`] for one message.
    async fn save_message(
        &self,
        message: &Message,
        updated_at: Timestamp,
    ) -> Result<(), StoreError> {
        self.save_messages(std::slice::from_ref(message), updated_at)
            .await
    }
    /// Removes one message and moves the conversation's `updatedAt`.
    async fn delete_message(
        &self,
        conversation_id: &str,
        message_id: &str,
        updated_at: Timestamp,
    ) -> Result<(), StoreError>;
    /// Changes a conversation's title.
    async fn rename_conversation(
        &self,
        id: &str,
        title: &str,
        updated_at: Timestamp,
    ) -> Result<(), StoreError>;
    /// Removes a conversation and its messages; false when there was none.
    async fn delete_conversation(&self, id: &str) -> Result<bool, StoreError>;
    /// Marks every reply still `streaming` as `error` (interrupted); run at start-up.
    async fn mark_interrupted(&self) -> Result<u64, StoreError>;
    /// Marks the replies of one conversation still `streaming` as `error`, and nothing else: no
    /// other field and no reply that has left `streaming` meanwhile.
    async fn mark_interrupted_in(&self, conversation_id: &str) -> Result<u64, StoreError>;
}

/// The store `DATABASE_URL` names: `memory`, or a `sqlite:` URL.
pub async fn open(
    url: &str,
    durability: Durability,
) -> Result<Arc<dyn ConversationStore>, StoreError> {
    if url == "memory" {
        return Ok(Arc::new(MemoryStore::new()));
    }
    if url.starts_with("sqlite:") {
        return Ok(Arc::new(SqliteStore::open(url, durability).await?));
    }
    Err(StoreError::UnsupportedUrl(format!(
        "{url:?}: expected `memory` or a `sqlite:` URL"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{MessageStatus, Role};

    async fn stores() -> (tempfile::TempDir, Vec<Arc<dyn ConversationStore>>) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/chat.db", dir.path().display());
        let sqlite = open(&url, Durability::Normal).await.unwrap();
        (
            dir,
            vec![open("memory", Durability::Normal).await.unwrap(), sqlite],
        )
    }

    fn at(millis: i64) -> Timestamp {
        Timestamp::from_millis(millis)
    }

    #[tokio::test]
    async fn both_stores_keep_the_same_contract() {
        let (_dir, stores) = stores().await;
        for store in stores {
            let mut a = Conversation::new("a".into(), "first");
            a.updated_at = at(1_000);
            store.create_conversation(&a).await.unwrap();
            let mut b = Conversation::new("b".into(), "second");
            b.updated_at = at(2_000);
            store.create_conversation(&b).await.unwrap();

            let question = Message::new("a", Role::User, "question".into());
            store.save_message(&question, at(3_000)).await.unwrap();
            let mut answer = Message::new("a", Role::Assistant, "par".into());
            answer.status = Some(MessageStatus::Streaming);
            store.save_message(&answer, at(3_001)).await.unwrap();
            answer.content = "partial".into();
            store.save_message(&answer, at(3_002)).await.unwrap();

            let loaded = store.load_conversation("a").await.unwrap().unwrap();
            assert_eq!(loaded.messages, vec![question.clone(), answer.clone()]);
            assert_eq!(loaded.updated_at, at(3_002));
            assert_eq!(loaded.title, "first");

            let listed = store.list_conversations(Page::default()).await.unwrap();
            assert_eq!(
                listed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
                ["a", "b"]
            );
            assert_eq!(listed[0], loaded);
            let page = Page {
                limit: Some(1),
                offset: 1,
            };
            assert_eq!(store.list_conversations(page).await.unwrap()[0].id, "b");

            assert_eq!(store.mark_interrupted().await.unwrap(), 1);
            let loaded = store.load_conversation("a").await.unwrap().unwrap();
            assert_eq!(loaded.messages[1].status, Some(MessageStatus::Error));
            assert_eq!(loaded.messages[1].content, "partial");

            store
                .delete_message("a", &answer.id, at(4_000))
                .await
                .unwrap();
            store
                .rename_conversation("a", "renamed", at(4_001))
                .await
                .unwrap();
            let loaded = store.load_conversation("a").await.unwrap().unwrap();
            assert_eq!(loaded.messages, vec![question]);
            assert_eq!(loaded.title, "renamed");
            assert_eq!(loaded.updated_at, at(4_001));

            assert!(store.delete_conversation("a").await.unwrap());
            assert!(!store.delete_conversation("a").await.unwrap());
            assert!(store.load_conversation("a").await.unwrap().is_none());
            let orphan = Message::new("a", Role::User, "late".into());
            assert!(store.save_message(&orphan, at(5_000)).await.is_err());
        }
    }

    #[tokio::test]
    async fn several_messages_are_saved_in_one_write() {
        let (_dir, stores) = stores().await;
        for store in stores {
            store
                .create_conversation(&Conversation::new("a".into(), "first"))
                .await
                .unwrap();
            let question = Message::new("a", Role::User, "question".into());
            let mut answer = Message::new("a", Role::Assistant, String::new());
            answer.status = Some(MessageStatus::Streaming);
            let pair = [question, answer];
            store.save_messages(&pair, at(2_000)).await.unwrap();
            let loaded = store.load_conversation("a").await.unwrap().unwrap();
            assert_eq!(loaded.messages, pair);
            assert_eq!(loaded.updated_at, at(2_000));

            let orphans = [
                Message::new("b", Role::User, "lost".into()),
                Message::new("b", Role::Assistant, String::new()),
            ];
            assert!(store.save_messages(&orphans, at(3_000)).await.is_err());
            assert!(store.load_conversation("b").await.unwrap().is_none());
            let listed = store.list_conversations(Page::default()).await.unwrap();
            assert_eq!(listed.len(), 1);
            assert_eq!(listed[0].messages.len(), 2);
        }
    }

    #[tokio::test]
    async fn marking_one_conversation_interrupted_changes_only_its_streaming_replies() {
        let (_dir, stores) = stores().await;
        for store in stores {
            let mut messages = Vec::new();
            for id in ["a", "b"] {
                store
                    .create_conversation(&Conversation::new(id.into(), id))
                    .await
                    .unwrap();
                let mut streaming = Message::new(id, Role::Assistant, "cut".into());
                streaming.status = Some(MessageStatus::Streaming);
                let mut complete = Message::new(id, Role::Assistant, "done".into());
                complete.status = Some(MessageStatus::Complete);
                let pair = [streaming, complete];
                store.save_messages(&pair, at(1_000)).await.unwrap();
                messages.push(pair);
            }
            assert_eq!(store.mark_interrupted_in("a").await.unwrap(), 1);
            assert_eq!(store.mark_interrupted_in("a").await.unwrap(), 0);
            let (mut a, b) = (messages[0].clone(), &messages[1]);
            a[0].status = Some(MessageStatus::Error);
            assert_eq!(
                store
                    .load_conversation("a")
                    .await
                    .unwrap()
                    .unwrap()
                    .messages,
                a
            );
            assert_eq!(
                store
                    .load_conversation("b")
                    .await
                    .unwrap()
                    .unwrap()
                    .messages,
                b
            );
        }
    }

    #[tokio::test]
    async fn unknown_database_urls_are_refused() {
        assert!(open("postgres://x", Durability::Normal).await.is_err());
    }
}
