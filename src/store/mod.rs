//! Persistence behind one async, fallible trait.

mod memory;

use async_trait::async_trait;

pub use memory::MemoryStore;

use crate::domain::{Conversation, Message, Timestamp};
use crate::error::ApiError;

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
    /// Stores a new conversation (its messages are saved one by one afterwards).
    async fn create_conversation(&self, conversation: &Conversation) -> Result<(), ApiError>;
    /// One conversation with its messages in order, if it exists.
    async fn load_conversation(&self, id: &str) -> Result<Option<Conversation>, ApiError>;
    /// Conversations with their messages, most recently updated first.
    async fn list_conversations(&self, page: Page) -> Result<Vec<Conversation>, ApiError>;
    /// Inserts a message, or replaces the content and status of one already stored, and moves the
    /// conversation's `updatedAt`.
    async fn save_message(&self, message: &Message, updated_at: Timestamp) -> Result<(), ApiError>;
    /// Removes one message and moves the conversation's `updatedAt`.
    async fn delete_message(
        &self,
        conversation_id: &str,
        message_id: &str,
        updated_at: Timestamp,
    ) -> Result<(), ApiError>;
    /// Changes a conversation's title.
    async fn rename_conversation(
        &self,
        id: &str,
        title: &str,
        updated_at: Timestamp,
    ) -> Result<(), ApiError>;
    /// Removes a conversation and its messages; false when there was none.
    async fn delete_conversation(&self, id: &str) -> Result<bool, ApiError>;
    /// Marks every reply still `streaming` as `error` (interrupted); run at start-up.
    async fn mark_interrupted(&self) -> Result<u64, ApiError>;
}
