//! What clients ask of a conversation: read it, send a message (answered streamed or whole),
//! stop or regenerate the reply, rename, delete, and the server's own interrupt at shutdown.
//! Every change is stored before anyone is told about it.

use super::generation::{spawn_streamed, spawn_whole};
use super::reply::{Ending, Reply};
use super::{Answer, ChatCompleted, ConversationMsg, ConversationState, Snapshot, StreamStarted};
use crate::actors::events::{ChatEvent, Subscriber};
use crate::actors::mailbox::Mailbox;
use crate::domain::{Conversation, Message, MessageStatus, Role, Timestamp};
use crate::error::ChatError;
use crate::llm::Prompt;

/// The longest title a rename may set, in characters.
const MAX_TITLE_CHARS: usize = 200;

impl ConversationState {
    /// The conversation as it is now.
    pub(super) fn snapshot(&self) -> Result<Snapshot, ChatError> {
        self.conversation.clone().ok_or(ChatError::NotFound)
    }

    /// The conversation, when it exists.
    pub(super) fn existing(&mut self) -> Result<&mut Conversation, ChatError> {
        self.conversation
            .as_mut()
            .map(Snapshot::edit)
            .ok_or(ChatError::NotFound)
    }

    fn maybe_inject_fault(&self, content: &str) {
        if self.ctx.settings.fault_trigger.as_deref() == Some(content) {
            panic!("injected fault in conversation {}", self.key.id);
        }
    }

    /// A new user message, once checked that the conversation can take one.
    fn user_message(&self, content: String, create: bool) -> Result<Message, ChatError> {
        if self.conversation.is_none() && !create {
            return Err(ChatError::NotFound);
        }
        if self.reply.is_some() {
            return Err(ChatError::Busy);
        }
        self.maybe_inject_fault(&content);
        Ok(Message::new(&self.key.id, Role::User, content))
    }

    /// Stores new messages in one write, creating the conversation when it has none yet.
    async fn add_messages(&mut self, added: Vec<Message>) -> Result<(), ChatError> {
        let store = self.ctx.store.clone();
        let updated_at = added.last().map_or_else(Timestamp::now, |m| m.timestamp);
        match self.conversation.as_mut().map(Snapshot::edit) {
            Some(conversation) => {
                store
                    .save_messages(&self.writer, &added, updated_at)
                    .await?;
                conversation.updated_at = updated_at;
                conversation.messages.extend(added);
            }
            None => {
                let title = added.first().map_or("", |m| m.content.as_str());
                let mut conversation = Conversation::new(self.key.id.to_string(), title);
                // Taken as they are (extended into an empty list, they would get room for four).
                conversation.messages = added;
                conversation.updated_at = updated_at;
                store
                    .create_conversation(&self.writer, &conversation)
                    .await?;
                self.conversation = Some(Snapshot::new(conversation));
            }
        }
        Ok(())
    }

    /// Stores `content` and streams the reply to the members, `sender` among them once the reply
    /// has started.
    pub(super) async fn stream_chat(
        &mut self,
        myself: &Mailbox<ConversationMsg>,
        content: String,
        sender: Option<Subscriber>,
    ) -> Result<StreamStarted, ChatError> {
        let question = self.user_message(content, true)?;
        self.start_streamed(myself, vec![question], sender).await
    }

    /// Stores `added` and, after them, an empty assistant message marked `streaming` for the reply,
    /// in one write; then starts the model on the history before it, makes `sender` a member and
    /// announces the reply. Nothing changes when the write fails.
    async fn start_streamed(
        &mut self,
        myself: &Mailbox<ConversationMsg>,
        mut added: Vec<Message>,
        sender: Option<Subscriber>,
    ) -> Result<StreamStarted, ChatError> {
        let mut placeholder = Message::new(&self.key.id, Role::Assistant, String::new());
        placeholder.status = Some(MessageStatus::Streaming);
        let message_id = placeholder.id.clone();
        // Room for just the placeholder: a new conversation keeps this list as its messages.
        added.reserve_exact(1);
        added.push(placeholder);
        self.add_messages(added).await?;
        let prompt = self.prompt(true);
        self.generations += 1;
        let generation = self.generations;
        let task = spawn_streamed(self.ctx.clone(), myself.clone(), generation, prompt);
        self.reply = Some(Box::new(Reply::start(
            &self.ctx,
            generation,
            message_id.clone(),
            task,
            None,
        )));
        if let Some(sender) = sender {
            self.members.add(sender);
        }
        self.members.broadcast(ChatEvent::StreamStart {
            message_id: message_id.clone(),
            conversation_id: self.key.id.to_string(),
        });
        let published = self.members.publication().map(|p| p.position());
        Ok(StreamStarted {
            conversation_id: self.key.id.to_string(),
            message_id,
            published,
        })
    }

    /// The prompt for a reply to the conversation; without its last message, the reply's own
    /// placeholder, when `skip_placeholder`.
    fn prompt(&self, skip_placeholder: bool) -> Prompt {
        let settings = &self.ctx.settings;
        let mut history = self
            .conversation
            .as_ref()
            .map(|c| c.messages.as_slice())
            .unwrap_or_default();
        if skip_placeholder {
            history = history.split_last().map_or(history, |(_, rest)| rest);
        }
        Prompt::build(&settings.system_prompt, history, settings.context_max_chars)
    }

    /// Stores `content` and starts a reply in one piece, answered on `answer` when it ends.
    pub(super) async fn chat(
        &mut self,
        myself: &Mailbox<ConversationMsg>,
        content: String,
        create: bool,
        answer: Answer<ChatCompleted>,
    ) -> Result<(), ChatError> {
        let added = match self.user_message(content, create) {
            Ok(question) => {
                // With room for the reply that follows it.
                let mut added = Vec::with_capacity(2);
                added.push(question);
                self.add_messages(added).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = added {
            let _ = answer.send(Err(e.clone()));
            return Err(e);
        }
        self.generations += 1;
        let generation = self.generations;
        let task = spawn_whole(
            self.ctx.clone(),
            myself.clone(),
            generation,
            self.prompt(false),
        );
        self.reply = Some(Box::new(Reply::start(
            &self.ctx,
            generation,
            crate::domain::new_id(),
            task,
            Some(answer),
        )));
        Ok(())
    }

    /// Stops the reply in progress; success when there is none.
    pub(super) async fn stop(&mut self) -> Result<(), ChatError> {
        self.existing()?;
        if self.reply.is_some() {
            tracing::info!(conversation = %self.key.id, "reply stopped");
            self.end_reply(Ending::Stopped).await;
        }
        Ok(())
    }

    /// Ends the reply in progress as interrupted: the server is stopping.
    pub(super) async fn interrupt(&mut self) {
        self.end_reply(Ending::Interrupted).await;
    }

    /// Replaces the replies after the last user message with a new streamed one; `sender`
    /// becomes a member once it has started.
    pub(super) async fn regenerate(
        &mut self,
        myself: &Mailbox<ConversationMsg>,
        sender: Option<Subscriber>,
    ) -> Result<StreamStarted, ChatError> {
        if self.reply.is_some() {
            return Err(ChatError::Busy);
        }
        let store = self.ctx.store.clone();
        let writer = self.writer.clone();
        let conversation = self.existing()?;
        let last_user = conversation
            .messages
            .iter()
            .rposition(|m| m.role == Role::User)
            .ok_or_else(|| ChatError::Invalid("There is no message to reply to".into()))?;
        let now = Timestamp::now();
        // Each reply leaves memory once it has left the store, so a failed write leaves the two
        // alike.
        while let Some(message) = conversation.messages.get(last_user + 1) {
            store
                .delete_message(&writer, &message.conversation_id, &message.id, now)
                .await?;
            conversation.messages.remove(last_user + 1);
        }
        conversation.updated_at = now;
        self.start_streamed(myself, Vec::new(), sender).await
    }

    /// Changes the title and tells the members.
    pub(super) async fn rename(&mut self, title: String) -> Result<Conversation, ChatError> {
        let title = title.trim().to_owned();
        let length = title.chars().count();
        if length == 0 || length > MAX_TITLE_CHARS {
            return Err(ChatError::Invalid(format!(
                "title must be 1 to {MAX_TITLE_CHARS} characters"
            )));
        }
        let store = self.ctx.store.clone();
        let writer = self.writer.clone();
        let conversation = self.existing()?;
        let now = Timestamp::now();
        store
            .rename_conversation(&writer, &conversation.id, &title, now)
            .await?;
        conversation.title = title.clone();
        conversation.updated_at = now;
        let snapshot = conversation.clone();
        self.members.broadcast(ChatEvent::ConversationUpdated {
            conversation_id: self.key.id.to_string(),
            title,
            updated_at: now,
        });
        Ok(snapshot)
    }

    /// Deletes the conversation; the actor stays as an empty one until it goes idle.
    pub(super) async fn delete(&mut self) -> Result<(), ChatError> {
        self.existing()?;
        self.ctx
            .store
            .delete_conversation(&self.writer, &self.key.id)
            .await?;
        self.end_reply(Ending::Deleted).await;
        self.conversation = None;
        self.members.broadcast(ChatEvent::ConversationDeleted {
            conversation_id: self.key.id.to_string(),
        });
        self.members.remove_all();
        Ok(())
    }
}
