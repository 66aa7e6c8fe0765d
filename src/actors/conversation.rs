//! The conversation actor: owns one conversation's messages, its members and the reply being
//! generated. Everything that changes a conversation goes through its mailbox.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{FutureExt, StreamExt, TryFutureExt, TryStreamExt};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::events::{ChatEvent, Membership, Subscriber};
use super::supervisor::Registry;
use crate::config::ConversationSettings;
use crate::domain::{Conversation, Message, MessageStatus, Role, Timestamp};
use crate::error::ChatError;
use crate::llm::{ModelProvider, Prompt, ProviderError};
use crate::metrics::Metrics;
use crate::store::ConversationStore;

/// The text of a reply whose model failed, as the original server sent it.
pub const APOLOGY: &str =
    "I apologize, but I encountered an error while processing your request. Please try again.";

/// The longest title a rename may set, in characters.
const MAX_TITLE_CHARS: usize = 200;

/// Where the answer to a request goes.
pub type Answer<T> = oneshot::Sender<Result<T, ChatError>>;

/// What every conversation actor shares.
pub struct ConversationContext {
    pub store: Arc<dyn ConversationStore>,
    pub provider: Arc<dyn ModelProvider>,
    pub settings: ConversationSettings,
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
}

/// The last chunk a reconnecting client saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub message_id: String,
    pub seq: u64,
}

/// A reply that has started streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStarted {
    pub conversation_id: String,
    pub message_id: String,
}

/// A reply generated in one piece, with the whole conversation after it.
#[derive(Debug, Clone)]
pub struct ChatCompleted {
    pub message: Message,
    pub conversation: Conversation,
}

/// What clients ask of a conversation.
pub enum Request {
    /// The conversation as it is now.
    Snapshot(Answer<Conversation>),
    /// Add a member; it first gets what it missed of a reply in progress.
    Join {
        subscriber: Subscriber,
        resume: Option<Resume>,
        answer: Answer<()>,
    },
    /// Remove a member.
    Leave {
        subscriber_id: u64,
        answer: Answer<()>,
    },
    /// Store a user message and stream the reply to every member.
    StreamChat {
        content: String,
        sender: Option<Subscriber>,
        answer: Answer<StreamStarted>,
    },
    /// Store a user message and answer with the whole reply; `create` allows a conversation
    /// that does not exist yet.
    Chat {
        content: String,
        create: bool,
        answer: Answer<ChatCompleted>,
    },
    /// Cancel the reply in progress, if any.
    Stop(Answer<()>),
    /// Replace the last reply with a new streamed one.
    Regenerate {
        sender: Option<Subscriber>,
        answer: Answer<StreamStarted>,
    },
    /// Change the title.
    Rename {
        title: String,
        answer: Answer<Conversation>,
    },
    /// Delete the conversation and its messages.
    Delete(Answer<()>),
    /// The server is stopping: end the reply in progress as interrupted.
    Interrupt(Answer<()>),
}

/// The conversation actor's mailbox.
pub enum ConversationMsg {
    /// A client's request, routed through the registry.
    Request(Request),
    /// News from the task generating reply number `generation`.
    Generated {
        generation: u64,
        event: GenerationEvent,
    },
    /// The idle timer fired.
    IdleCheck,
}

/// What a generation task reports.
pub enum GenerationEvent {
    /// New text of a streamed reply.
    Piece(String),
    /// The model has been silent for the heartbeat interval.
    Silent,
    /// The streamed reply ended.
    Finished(Result<(), ProviderError>),
    /// A reply generated in one piece.
    Whole(Result<String, ProviderError>),
}

/// Starts a conversation actor.
pub struct ConversationArgs {
    pub id: Arc<str>,
    /// `None`: the conversation does not exist yet; it is created by its first message.
    pub conversation: Option<Conversation>,
    pub ctx: Arc<ConversationContext>,
    pub pending: Arc<AtomicUsize>,
}

/// The actor itself; all its data lives in [`ConversationState`].
pub struct ConversationActor;

/// A conversation actor's data.
pub struct ConversationState {
    id: Arc<str>,
    conversation: Option<Conversation>,
    members: HashMap<u64, Membership>,
    reply: Option<Reply>,
    generations: u64,
    idle_timer: bool,
    last_activity: Instant,
    ctx: Arc<ConversationContext>,
    pending: Arc<AtomicUsize>,
}

/// The reply in progress.
struct Reply {
    generation: u64,
    message_id: String,
    task: AbortHandle,
    /// The REST caller waiting for a reply generated in one piece; `None` when streamed.
    waiter: Option<Answer<ChatCompleted>>,
    /// Byte length of the content after each chunk; `offsets[seq]`.
    offsets: Vec<usize>,
    last_checkpoint: Instant,
}

impl Reply {
    fn seq(&self) -> u64 {
        (self.offsets.len() - 1) as u64
    }
}

impl Actor for ConversationActor {
    type Msg = ConversationMsg;
    type State = ConversationState;
    type Arguments = ConversationArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: ConversationArgs,
    ) -> Result<ConversationState, ActorProcessingErr> {
        let mut conversation = args.conversation;
        if let Some(conversation) = conversation.as_mut() {
            Box::pin(mark_interrupted(&*args.ctx.store, conversation)).await?;
        }
        args.ctx.metrics.actor_started();
        Ok(ConversationState {
            id: args.id,
            conversation,
            members: HashMap::new(),
            reply: None,
            generations: 0,
            idle_timer: false,
            last_activity: Instant::now(),
            ctx: args.ctx,
            pending: args.pending,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut ConversationState,
    ) -> Result<(), ActorProcessingErr> {
        state.ctx.metrics.actor_stopped();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: ConversationMsg,
        state: &mut ConversationState,
    ) -> Result<(), ActorProcessingErr> {
        // The work is boxed: ractor keeps each actor's loop as one future, as large as the largest
        // handler, for the actor's whole life.
        match message {
            ConversationMsg::Request(request) => {
                state.last_activity = Instant::now();
                Box::pin(state.handle_request(&myself, request)).await;
                state.pending.fetch_sub(1, Ordering::AcqRel);
            }
            ConversationMsg::Generated { generation, event } => {
                Box::pin(state.handle_generated(generation, event)).await;
            }
            ConversationMsg::IdleCheck => {
                state.idle_timer = false;
                if state.is_idle() {
                    let idle_for = state.last_activity.elapsed();
                    let limit = state.idle_limit();
                    if idle_for >= limit {
                        if state
                            .ctx
                            .registry
                            .remove_if_unused(&state.id, myself.get_id())
                        {
                            tracing::debug!(conversation = %state.id, "passivating idle conversation");
                            myself.stop(None);
                            return Ok(());
                        }
                    } else {
                        state.arm_idle_timer(&myself, limit - idle_for);
                        return Ok(());
                    }
                }
            }
        }
        if state.is_idle() && !state.idle_timer {
            let after = state.idle_limit();
            state.arm_idle_timer(&myself, after);
        }
        Ok(())
    }
}

/// Marks replies left `streaming` by a crash or a failed actor as interrupted.
async fn mark_interrupted(
    store: &dyn ConversationStore,
    conversation: &mut Conversation,
) -> Result<(), ChatError> {
    for message in conversation.messages.iter_mut() {
        if message.status == Some(MessageStatus::Streaming) {
            message.status = Some(MessageStatus::Error);
            store.save_message(message, conversation.updated_at).await?;
        }
    }
    Ok(())
}

impl ConversationState {
    fn is_idle(&self) -> bool {
        self.members.is_empty() && self.reply.is_none()
    }

    /// How long the actor stays without members or reply: a conversation that does not exist
    /// (yet, or any more) goes after a second at most.
    fn idle_limit(&self) -> Duration {
        let limit = self.ctx.settings.idle_timeout;
        match self.conversation {
            Some(_) => limit,
            None => limit.min(Duration::from_secs(1)),
        }
    }

    fn arm_idle_timer(&mut self, myself: &ActorRef<ConversationMsg>, after: Duration) {
        self.idle_timer = true;
        let actor = myself.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = actor.send_message(ConversationMsg::IdleCheck);
        });
    }

    async fn handle_request(&mut self, myself: &ActorRef<ConversationMsg>, request: Request) {
        match request {
            Request::Snapshot(answer) => {
                let _ = answer.send(self.snapshot());
            }
            Request::Join {
                subscriber,
                resume,
                answer,
            } => {
                self.catch_up(&subscriber, resume);
                self.add_member(subscriber);
                let _ = answer.send(Ok(()));
            }
            Request::Leave {
                subscriber_id,
                answer,
            } => {
                if let Some(membership) = self.members.remove(&subscriber_id) {
                    membership.end();
                }
                let _ = answer.send(Ok(()));
            }
            Request::StreamChat {
                content,
                sender,
                answer,
            } => {
                if let Some(sender) = sender {
                    self.add_member(sender);
                }
                let result = self.stream_chat(myself, content).await;
                let _ = answer.send(result);
            }
            Request::Chat {
                content,
                create,
                answer,
            } => {
                if let Err(e) = self.chat(myself, content, create, answer).await {
                    tracing::debug!(conversation = %self.id, error = %e, "chat refused");
                }
            }
            Request::Stop(answer) => {
                let result = self.stop().await;
                let _ = answer.send(result);
            }
            Request::Regenerate { sender, answer } => {
                if let Some(sender) = sender {
                    self.add_member(sender);
                }
                let result = self.regenerate(myself).await;
                let _ = answer.send(result);
            }
            Request::Rename { title, answer } => {
                let _ = answer.send(self.rename(title).await);
            }
            Request::Delete(answer) => {
                let _ = answer.send(self.delete().await);
            }
            Request::Interrupt(answer) => {
                if let Some(reply) = self.reply.as_mut() {
                    reply.task.abort();
                    if let Some(waiter) = reply.waiter.take() {
                        let _ = waiter.send(Err(ChatError::Upstream));
                        self.reply = None;
                        self.ctx.metrics.reply_finished();
                    } else {
                        self.finish(MessageStatus::Error, String::new()).await;
                    }
                }
                let _ = answer.send(Ok(()));
            }
        }
    }

    fn snapshot(&self) -> Result<Conversation, ChatError> {
        self.conversation.clone().ok_or(ChatError::NotFound)
    }

    fn existing(&mut self) -> Result<&mut Conversation, ChatError> {
        self.conversation.as_mut().ok_or(ChatError::NotFound)
    }

    fn add_member(&mut self, subscriber: Subscriber) {
        let id = subscriber.id();
        if !self.members.contains_key(&id) {
            let membership = Membership::new(subscriber, self.id.clone());
            self.members.insert(id, membership);
        }
    }

    /// Sends one event, encoded once, to every member; drops members that are gone or too slow.
    fn broadcast(&mut self, event: ChatEvent) {
        if self.members.is_empty() {
            return;
        }
        let encoded = event.encode();
        let mut gone = Vec::new();
        for (id, membership) in &self.members {
            if membership.subscriber().deliver(&encoded).is_err() {
                gone.push(*id);
            }
        }
        for id in gone {
            if let Some(membership) = self.members.remove(&id) {
                membership.end();
            }
        }
    }

    /// Sends a joining client what it missed of the reply in progress.
    fn catch_up(&self, subscriber: &Subscriber, resume: Option<Resume>) {
        let (Some(reply), Some(conversation)) = (&self.reply, &self.conversation) else {
            return;
        };
        if reply.waiter.is_some() {
            return;
        }
        let Some(message) = conversation
            .messages
            .iter()
            .find(|m| m.id == reply.message_id)
        else {
            return;
        };
        let seen = resume
            .filter(|r| r.message_id == reply.message_id)
            .map(|r| r.seq.min(reply.seq()) as usize);
        if seen.is_none() {
            let start = ChatEvent::StreamStart {
                message_id: reply.message_id.clone(),
                conversation_id: self.id.to_string(),
            };
            let _ = subscriber.deliver(&start.encode());
        }
        let from = reply.offsets[seen.unwrap_or(0)];
        if reply.seq() == 0 || from == message.content.len() {
            return;
        }
        let chunk = ChatEvent::StreamChunk {
            message_id: reply.message_id.clone(),
            conversation_id: self.id.to_string(),
            content: message.content.clone(),
            delta: message.content[from..].to_owned(),
            is_complete: false,
            seq: reply.seq(),
        };
        let _ = subscriber.deliver(&chunk.encode());
    }

    fn maybe_inject_fault(&self, content: &str) {
        if self.ctx.settings.fault_trigger.as_deref() == Some(content) {
            panic!("injected fault in conversation {}", self.id);
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
        Ok(Message::new(&self.id, Role::User, content))
    }

    /// Stores new messages in one write, creating the conversation when it has none yet.
    async fn add_messages(&mut self, added: Vec<Message>) -> Result<(), ChatError> {
        let store = self.ctx.store.clone();
        let updated_at = added.last().map_or_else(Timestamp::now, |m| m.timestamp);
        match self.conversation.as_mut() {
            Some(conversation) => {
                store.save_messages(&added, updated_at).await?;
                conversation.updated_at = updated_at;
                conversation.messages.extend(added);
            }
            None => {
                let title = added.first().map_or("", |m| m.content.as_str());
                let mut conversation = Conversation::new(self.id.to_string(), title);
                conversation.messages.extend(added);
                conversation.updated_at = updated_at;
                store.create_conversation(&conversation).await?;
                self.conversation = Some(conversation);
            }
        }
        Ok(())
    }

    async fn stream_chat(
        &mut self,
        myself: &ActorRef<ConversationMsg>,
        content: String,
    ) -> Result<StreamStarted, ChatError> {
        let question = self.user_message(content, true)?;
        self.stream_reply(myself, vec![question]).await
    }

    /// Stores `added` and, after them, an empty assistant message marked `streaming` for the reply,
    /// in one write; then starts the model on the history before it and announces the reply.
    async fn stream_reply(
        &mut self,
        myself: &ActorRef<ConversationMsg>,
        mut added: Vec<Message>,
    ) -> Result<StreamStarted, ChatError> {
        let mut placeholder = Message::new(&self.id, Role::Assistant, String::new());
        placeholder.status = Some(MessageStatus::Streaming);
        let message_id = placeholder.id.clone();
        added.push(placeholder);
        self.add_messages(added).await?;
        let prompt = self.prompt(true);
        self.generations += 1;
        let generation = self.generations;
        let task = spawn_streamed(self.ctx.clone(), myself.clone(), generation, prompt);
        self.ctx.metrics.reply_started();
        self.reply = Some(Reply {
            generation,
            message_id: message_id.clone(),
            task,
            waiter: None,
            offsets: vec![0],
            last_checkpoint: Instant::now(),
        });
        self.broadcast(ChatEvent::StreamStart {
            message_id: message_id.clone(),
            conversation_id: self.id.to_string(),
        });
        Ok(StreamStarted {
            conversation_id: self.id.to_string(),
            message_id,
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

    async fn chat(
        &mut self,
        myself: &ActorRef<ConversationMsg>,
        content: String,
        create: bool,
        answer: Answer<ChatCompleted>,
    ) -> Result<(), ChatError> {
        let added = match self.user_message(content, create) {
            Ok(question) => self.add_messages(vec![question]).await,
            Err(e) => Err(e),
        };
        if let Err(e) = added {
            let _ = answer.send(Err(e.clone()));
            return Err(e);
        }
        self.generations += 1;
        let generation = self.generations;
        let ctx = self.ctx.clone();
        let actor = myself.clone();
        let prompt = self.prompt(false);
        let task = tokio::spawn(async move {
            let started = std::time::Instant::now();
            let whole = ctx.provider.complete(prompt).map_ok(|reply| reply.text);
            let result = within(ctx.settings.upstream_timeout, whole).await;
            ctx.metrics
                .upstream_finished(started.elapsed(), result.is_err());
            let event = GenerationEvent::Whole(result);
            let _ = actor.send_message(ConversationMsg::Generated { generation, event });
        })
        .abort_handle();
        self.ctx.metrics.reply_started();
        self.reply = Some(Reply {
            generation,
            message_id: crate::domain::new_id(),
            task,
            waiter: Some(answer),
            offsets: vec![0],
            last_checkpoint: Instant::now(),
        });
        Ok(())
    }

    async fn handle_generated(&mut self, generation: u64, event: GenerationEvent) {
        if self.reply.as_ref().map(|r| r.generation) != Some(generation) {
            return;
        }
        match event {
            GenerationEvent::Piece(text) => self.append(text).await,
            GenerationEvent::Silent => {
                if let Some(reply) = &self.reply {
                    let event = ChatEvent::StreamHeartbeat {
                        message_id: reply.message_id.clone(),
                        conversation_id: self.id.to_string(),
                    };
                    self.broadcast(event);
                }
            }
            GenerationEvent::Finished(Ok(())) => {
                self.finish(MessageStatus::Complete, String::new()).await
            }
            GenerationEvent::Finished(Err(e)) => {
                tracing::warn!(conversation = %self.id, error = %e, "streamed reply failed");
                let partial = self.streaming_message().map(|m| !m.content.is_empty());
                let apology = if partial == Some(true) {
                    format!("\n\n{APOLOGY}")
                } else {
                    APOLOGY.to_owned()
                };
                self.finish(MessageStatus::Error, apology).await
            }
            GenerationEvent::Whole(result) => self.finish_whole(result).await,
        }
    }

    fn streaming_message(&mut self) -> Option<&mut Message> {
        let id = &self.reply.as_ref()?.message_id;
        self.conversation
            .as_mut()?
            .messages
            .iter_mut()
            .rev()
            .find(|m| &m.id == id)
    }

    /// Appends new text to the streaming reply, fans it out, and checkpoints it now and then.
    async fn append(&mut self, text: String) {
        let checkpoint_every = self.ctx.settings.checkpoint_interval;
        let Some(message) = self.streaming_message() else {
            return;
        };
        message.content.push_str(&text);
        let content = message.content.clone();
        let length = content.len();
        let Some(reply) = self.reply.as_mut() else {
            return;
        };
        reply.offsets.push(length);
        let seq = reply.seq();
        let checkpoint = reply.last_checkpoint.elapsed() >= checkpoint_every;
        if checkpoint {
            reply.last_checkpoint = Instant::now();
        }
        self.ctx.metrics.tokens_streamed(1);
        let event = ChatEvent::StreamChunk {
            message_id: reply.message_id.clone(),
            conversation_id: self.id.to_string(),
            content,
            delta: text,
            is_complete: false,
            seq,
        };
        self.broadcast(event);
        if checkpoint {
            self.save_streaming_message().await;
        }
    }

    /// Saves the streaming reply as it is now, and moves `updatedAt` with it.
    async fn save_streaming_message(&mut self) {
        let store = self.ctx.store.clone();
        let now = Timestamp::now();
        let Some(message) = self.streaming_message().cloned() else {
            return;
        };
        if let Some(conversation) = self.conversation.as_mut() {
            conversation.updated_at = now;
        }
        if let Err(e) = store.save_message(&message, now).await {
            tracing::error!(conversation = %self.id, error = %e, "could not save reply");
        }
    }

    /// Ends the streamed reply: stores it with its status, then sends the final chunk and
    /// `stream_complete`.
    async fn finish(&mut self, status: MessageStatus, tail: String) {
        let Some(message) = self.streaming_message() else {
            self.reply = None;
            return;
        };
        message.content.push_str(&tail);
        message.status = Some(status);
        let content = message.content.clone();
        let length = content.len();
        self.save_streaming_message().await;
        let Some(mut reply) = self.reply.take() else {
            return;
        };
        reply.task.abort();
        reply.offsets.push(length);
        self.ctx.metrics.reply_finished();
        self.broadcast(ChatEvent::StreamChunk {
            message_id: reply.message_id.clone(),
            conversation_id: self.id.to_string(),
            content,
            delta: tail,
            is_complete: true,
            seq: reply.seq(),
        });
        self.broadcast(ChatEvent::StreamComplete {
            message_id: reply.message_id,
            conversation_id: self.id.to_string(),
        });
    }

    /// Ends a reply generated in one piece: stores it (never a failure), answers the REST
    /// caller, and shows it to the members as a one-chunk stream.
    async fn finish_whole(&mut self, result: Result<String, ProviderError>) {
        let Some(reply) = self.reply.take() else {
            return;
        };
        self.ctx.metrics.reply_finished();
        let Some(waiter) = reply.waiter else {
            return;
        };
        let text = match result {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(conversation = %self.id, error = %e, "reply failed");
                let _ = waiter.send(Err(ChatError::Upstream));
                return;
            }
        };
        let outcome = self
            .store_whole_reply(reply.message_id, text, MessageStatus::Complete)
            .await;
        let _ = waiter.send(outcome);
    }

    async fn store_whole_reply(
        &mut self,
        message_id: String,
        text: String,
        status: MessageStatus,
    ) -> Result<ChatCompleted, ChatError> {
        let store = self.ctx.store.clone();
        let conversation = self.existing()?;
        let mut message = Message::new(&conversation.id, Role::Assistant, text);
        message.id = message_id;
        message.status = Some(status);
        store.save_message(&message, message.timestamp).await?;
        conversation.updated_at = message.timestamp;
        conversation.messages.push(message.clone());
        let snapshot = conversation.clone();
        let (id, conversation_id) = (message.id.clone(), self.id.to_string());
        self.broadcast(ChatEvent::StreamStart {
            message_id: id.clone(),
            conversation_id: conversation_id.clone(),
        });
        self.broadcast(ChatEvent::StreamChunk {
            message_id: id.clone(),
            conversation_id: conversation_id.clone(),
            content: message.content.clone(),
            delta: message.content.clone(),
            is_complete: true,
            seq: 1,
        });
        self.broadcast(ChatEvent::StreamComplete {
            message_id: id,
            conversation_id,
        });
        Ok(ChatCompleted {
            message,
            conversation: snapshot,
        })
    }

    async fn stop(&mut self) -> Result<(), ChatError> {
        self.existing()?;
        let Some(reply) = self.reply.as_mut() else {
            return Ok(());
        };
        reply.task.abort();
        tracing::info!(conversation = %self.id, "reply stopped");
        if let Some(waiter) = reply.waiter.take() {
            let message_id = reply.message_id.clone();
            self.reply = None;
            self.ctx.metrics.reply_finished();
            let outcome = self
                .store_whole_reply(message_id, String::new(), MessageStatus::Cancelled)
                .await;
            let _ = waiter.send(outcome);
            return Ok(());
        }
        self.finish(MessageStatus::Cancelled, String::new()).await;
        Ok(())
    }

    async fn regenerate(
        &mut self,
        myself: &ActorRef<ConversationMsg>,
    ) -> Result<StreamStarted, ChatError> {
        if self.reply.is_some() {
            return Err(ChatError::Busy);
        }
        let store = self.ctx.store.clone();
        let conversation = self.existing()?;
        let last_user = conversation
            .messages
            .iter()
            .rposition(|m| m.role == Role::User)
            .ok_or_else(|| ChatError::Invalid("There is no message to reply to".into()))?;
        let now = Timestamp::now();
        for message in conversation.messages.drain(last_user + 1..) {
            store
                .delete_message(&message.conversation_id, &message.id, now)
                .await?;
        }
        conversation.updated_at = now;
        self.stream_reply(myself, Vec::new()).await
    }

    async fn rename(&mut self, title: String) -> Result<Conversation, ChatError> {
        let title = title.trim().to_owned();
        let length = title.chars().count();
        if length == 0 || length > MAX_TITLE_CHARS {
            return Err(ChatError::Invalid(format!(
                "title must be 1 to {MAX_TITLE_CHARS} characters"
            )));
        }
        let store = self.ctx.store.clone();
        let conversation = self.existing()?;
        let now = Timestamp::now();
        store
            .rename_conversation(&conversation.id, &title, now)
            .await?;
        conversation.title = title.clone();
        conversation.updated_at = now;
        let snapshot = conversation.clone();
        self.broadcast(ChatEvent::ConversationUpdated {
            conversation_id: self.id.to_string(),
            title,
            updated_at: now,
        });
        Ok(snapshot)
    }

    /// Deletes the conversation; the actor stays as an empty one until it goes idle.
    async fn delete(&mut self) -> Result<(), ChatError> {
        self.existing()?;
        self.ctx.store.delete_conversation(&self.id).await?;
        if let Some(reply) = self.reply.take() {
            reply.task.abort();
            self.ctx.metrics.reply_finished();
            if let Some(waiter) = reply.waiter {
                let _ = waiter.send(Err(ChatError::NotFound));
            }
        }
        self.conversation = None;
        self.broadcast(ChatEvent::ConversationDeleted {
            conversation_id: self.id.to_string(),
        });
        for (_, membership) in self.members.drain() {
            membership.end();
        }
        Ok(())
    }
}

/// Runs `work` for at most `limit`; running out of time is a provider failure.
async fn within<T>(
    limit: Duration,
    work: impl Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(ProviderError("the model did not finish in time".into())))
}

/// Starts the task that streams reply `generation` from the model into the actor's mailbox.
fn spawn_streamed(
    ctx: Arc<ConversationContext>,
    actor: ActorRef<ConversationMsg>,
    generation: u64,
    prompt: Prompt,
) -> AbortHandle {
    tokio::spawn(async move {
        let report = |event| {
            actor
                .send_message(ConversationMsg::Generated { generation, event })
                .is_ok()
        };
        let started = std::time::Instant::now();
        let result = within(
            ctx.settings.upstream_timeout,
            stream_reply(
                &*ctx.provider,
                prompt,
                ctx.settings.heartbeat_interval,
                &report,
            ),
        )
        .await;
        ctx.metrics
            .upstream_finished(started.elapsed(), result.is_err());
        report(GenerationEvent::Finished(result));
    })
    .abort_handle()
}

/// Reads the model's stream, merging pieces that are already waiting into one, and reports
/// silence longer than `heartbeat`. Returns early when the actor is gone.
async fn stream_reply(
    provider: &dyn ModelProvider,
    prompt: Prompt,
    heartbeat: Duration,
    report: &impl Fn(GenerationEvent) -> bool,
) -> Result<(), ProviderError> {
    let mut stream = with_heartbeat(provider.stream(prompt), heartbeat, report)
        .await?
        .try_filter_map(|item| futures::future::ok(item.into_text()));
    loop {
        let Some(piece) = with_heartbeat(stream.next(), heartbeat, report).await else {
            return Ok(());
        };
        let mut text = piece?;
        let mut end = None;
        while let Some(next) = stream.next().now_or_never() {
            match next {
                Some(Ok(more)) => text.push_str(&more),
                Some(Err(e)) => {
                    end = Some(Err(e));
                    break;
                }
                None => {
                    end = Some(Ok(()));
                    break;
                }
            }
        }
        if !report(GenerationEvent::Piece(text)) {
            return Ok(());
        }
        if let Some(end) = end {
            return end;
        }
    }
}

/// Awaits `work`, reporting `Silent` every `interval` it takes.
async fn with_heartbeat<T>(
    work: impl Future<Output = T>,
    interval: Duration,
    report: &impl Fn(GenerationEvent) -> bool,
) -> T {
    let mut work = std::pin::pin!(work);
    loop {
        match tokio::time::timeout(interval, &mut work).await {
            Ok(value) => return value,
            Err(_) => {
                report(GenerationEvent::Silent);
            }
        }
    }
}
