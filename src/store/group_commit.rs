//! What the SQL stores share: every write goes, as a [`Write`], to one writer that commits the
//! writes waiting at one moment in one transaction (group commit) and answers each once it is
//! committed. A store of this kind says only how it reads; its writes, and so most of the store
//! traits, are the same whatever the engine.

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::{Account, AccountStore, ConversationStore, Page, StoreError, Writer};
use crate::domain::{Conversation, Message, Timestamp, UserId};

/// Writes committed together at most.
pub(super) const MAX_BATCH: usize = 256;

/// One change to the database; those made by a [`Writer`] touch one conversation, once the
/// writer's claim on it is checked.
#[derive(Debug)]
pub(super) enum Write {
    Claim(UserId, String),
    Create(Writer, Conversation),
    Save(Writer, Vec<Message>, Timestamp),
    DeleteMessage {
        writer: Writer,
        conversation_id: String,
        message_id: String,
        updated_at: Timestamp,
    },
    Rename {
        writer: Writer,
        id: String,
        title: String,
        updated_at: Timestamp,
    },
    DeleteConversation(Writer, String),
    MarkInterrupted,
    MarkInterruptedIn(Writer, String),
    CreateAccount(Account),
    AddUsage(UserId, String, u64),
}

impl Write {
    /// Whether the write runs several statements that must stand or fall together.
    pub(super) fn is_several_rows(&self) -> bool {
        match self {
            Write::Claim(..) | Write::Create(..) => true,
            Write::Save(_, messages, _) => messages.len() > 1,
            _ => false,
        }
    }

    /// The writer and the conversation a fenced write touches.
    pub(super) fn fenced(&self) -> Option<(&Writer, &str)> {
        match self {
            Write::Create(writer, conversation) => Some((writer, &conversation.id)),
            Write::Save(writer, messages, _) => Some((writer, &messages[0].conversation_id)),
            Write::DeleteMessage {
                writer,
                conversation_id: id,
                ..
            }
            | Write::Rename { writer, id, .. }
            | Write::DeleteConversation(writer, id)
            | Write::MarkInterruptedIn(writer, id) => Some((writer, id)),
            _ => None,
        }
    }
}

/// A write and where its outcome (rows changed) goes once committed.
#[derive(Debug)]
pub(super) struct WriteJob {
    pub(super) write: Write,
    pub(super) done: oneshot::Sender<Result<u64, StoreError>>,
}

/// The way to a store's writer.
#[derive(Debug, Clone)]
pub(super) struct Writes {
    queue: mpsc::Sender<WriteJob>,
    /// The engine, as its failures are worded.
    engine: &'static str,
}

impl Writes {
    /// A way to a writer of `engine`, and the writer's end of it.
    pub(super) fn new(engine: &'static str) -> (Writes, mpsc::Receiver<WriteJob>) {
        let (queue, jobs) = mpsc::channel(MAX_BATCH * 4);
        (Writes { queue, engine }, jobs)
    }

    /// Hands a write to the writer and waits until it is committed; the rows it changed.
    pub(super) async fn write(&self, write: Write) -> Result<u64, StoreError> {
        let stopped = || StoreError::storage(format!("{}: the writer has stopped", self.engine));
        let (done, outcome) = oneshot::channel();
        self.queue
            .send(WriteJob { write, done })
            .await
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

/// A store whose writes are group-committed by its writer; only its reads are its own.
#[async_trait]
pub(super) trait GroupCommitted: Send + Sync {
    /// The way to its writer.
    fn writes(&self) -> &Writes;
    /// [`ConversationStore::load_conversation`].
    async fn load(&self, owner: &UserId, id: &str) -> Result<Option<Conversation>, StoreError>;
    /// [`ConversationStore::list_conversations`].
    async fn list(&self, owner: &UserId, page: Page) -> Result<Vec<Conversation>, StoreError>;
    /// [`ConversationStore::usage_on`].
    async fn usage(&self, owner: &UserId, day: &str) -> Result<u64, StoreError>;
    /// [`AccountStore::find_account`].
    async fn account(&self, username: &str) -> Result<Option<Account>, StoreError>;
}

#[async_trait]
impl<T: GroupCommitted> ConversationStore for T {
    async fn claim(&self, owner: &UserId, id: &str) -> Result<u64, StoreError> {
        self.writes()
            .write(Write::Claim(owner.clone(), id.to_owned()))
            .await
    }

    async fn create_conversation(
        &self,
        writer: &Writer,
        conversation: &Conversation,
    ) -> Result<(), StoreError> {
        let create = Write::Create(writer.clone(), conversation.clone());
        self.writes().write(create).await.map(drop)
    }

    async fn load_conversation(
        &self,
        owner: &UserId,
        id: &str,
    ) -> Result<Option<Conversation>, StoreError> {
        self.load(owner, id).await
    }

    async fn list_conversations(
        &self,
        owner: &UserId,
        page: Page,
    ) -> Result<Vec<Conversation>, StoreError> {
        self.list(owner, page).await
    }

    async fn save_messages(
        &self,
        writer: &Writer,
        messages: &[Message],
        updated_at: Timestamp,
    ) -> Result<(), StoreError> {
        if messages.is_empty() {
            return Ok(());
        }
        let save = Write::Save(writer.clone(), messages.to_vec(), updated_at);
        self.writes().write(save).await.map(drop)
    }

    async fn delete_message(
        &self,
        writer: &Writer,
        conversation_id: &str,
        message_id: &str,
        updated_at: Timestamp,
    ) -> Result<(), StoreError> {
        let delete = Write::DeleteMessage {
            writer: writer.clone(),
            conversation_id: conversation_id.to_owned(),
            message_id: message_id.to_owned(),
            updated_at,
        };
        self.writes().write(delete).await.map(drop)
    }

    async fn rename_conversation(
        &self,
        writer: &Writer,
        id: &str,
        title: &str,
        updated_at: Timestamp,
    ) -> Result<(), StoreError> {
        let rename = Write::Rename {
            writer: writer.clone(),
            id: id.to_owned(),
            title: title.to_owned(),
            updated_at,
        };
        self.writes().write(rename).await.map(drop)
    }

    async fn delete_conversation(&self, writer: &Writer, id: &str) -> Result<bool, StoreError> {
        let delete = Write::DeleteConversation(writer.clone(), id.to_owned());
        Ok(self.writes().write(delete).await? > 0)
    }

    async fn add_usage(&self, owner: &UserId, day: &str, tokens: u64) -> Result<(), StoreError> {
        let add = Write::AddUsage(owner.clone(), day.to_owned(), tokens);
        self.writes().write(add).await.map(drop)
    }

    async fn usage_on(&self, owner: &UserId, day: &str) -> Result<u64, StoreError> {
        self.usage(owner, day).await
    }

    async fn mark_interrupted(&self) -> Result<u64, StoreError> {
        self.writes().write(Write::MarkInterrupted).await
    }

    async fn mark_interrupted_in(
        &self,
        writer: &Writer,
        conversation_id: &str,
    ) -> Result<u64, StoreError> {
        let mark = Write::MarkInterruptedIn(writer.clone(), conversation_id.to_owned());
        self.writes().write(mark).await
    }
}

#[async_trait]
impl<T: GroupCommitted> AccountStore for T {
    async fn create_account(&self, account: &Account) -> Result<(), StoreError> {
        let create = Write::CreateAccount(account.clone());
        self.writes().write(create).await.map(drop)
    }

    async fn find_account(&self, username: &str) -> Result<Option<Account>, StoreError> {
        self.account(username).await
    }
}
