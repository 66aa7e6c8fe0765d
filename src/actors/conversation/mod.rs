//! The conversation actor: owns one conversation's messages, its members and the reply being
//! generated. Everything that changes a conversation goes through its mailbox.
//!
//! - this file: the actor, its mailbox, activation and passivation;
//! - [`commands`]: what clients ask (chat, stop, regenerate, rename, delete…);
//! - [`reply`]: the reply in progress, and the one way it ends;
//! - [`generation`]: the tasks that ask the model and report back to the mailbox;
//! - [`members`]: the connections that joined, the fan-out and the catch-up of a late joiner.

mod commands;
mod generation;
mod members;
mod reply;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::events::Subscriber;
use super::registry::{ConversationKey, Registry};
use crate::config::ConversationSettings;
use crate::domain::{Conversation, Message, MessageStatus};
use crate::error::ChatError;
use crate::llm::ModelProvider;
use crate::metrics::Metrics;
use crate::store::{ConversationStore, Writer};

pub use generation::GenerationEvent;
use members::Members;
pub use reply::APOLOGY;
use reply::Reply;

/// Where the answer to a request goes.
pub type Answer<T> = oneshot::Sender<Result<T, ChatError>>;

/// What every conversation actor shares.
pub struct ConversationContext {
    pub store: Arc<dyn ConversationStore>,
    pub provider: Arc<dyn ModelProvider>,
    pub settings: ConversationSettings,
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
    /// Every reply in progress holds a token of it until it has ended, stored and told; shutdown
    /// waits for it to empty.
    pub replies: TaskTracker,
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
    /// Store a user message and stream the reply to every member; `sender` becomes a member
    /// if, and only if, the reply starts.
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
    /// Replace the last reply with a new streamed one; `sender` becomes a member if, and only
    /// if, the reply starts.
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

/// Starts a conversation actor.
pub struct ConversationArgs {
    pub key: ConversationKey,
    /// `None`: the conversation does not exist yet; it is created by its first message.
    pub conversation: Option<Conversation>,
    pub ctx: Arc<ConversationContext>,
}

/// Why an actor did not start: another one already runs its conversation. The activation that
/// started it lost a race and the request goes to the winner.
#[derive(Debug, thiserror::Error)]
#[error("the conversation already has an actor")]
pub struct AlreadyRunning;

/// The actor itself; all its data lives in [`ConversationState`].
pub struct ConversationActor;

/// A conversation actor's data.
pub struct ConversationState {
    key: ConversationKey,
    /// Who writes the conversation to the store: its owner, with this actor's claim on it.
    writer: Writer,
    conversation: Option<Conversation>,
    members: Members,
    reply: Option<Reply>,
    generations: u64,
    idle_timer: bool,
    last_activity: Instant,
    ctx: Arc<ConversationContext>,
    /// Requests routed to this actor and not handled yet; it passivates only at zero.
    pending: Arc<AtomicUsize>,
}

impl Actor for ConversationActor {
    type Msg = ConversationMsg;
    type State = ConversationState;
    type Arguments = ConversationArgs;

    /// Registers the actor, then (only if it is the registered one) marks the replies a crash or
    /// a failed actor left `streaming` as interrupted.
    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ConversationArgs,
    ) -> Result<ConversationState, ActorProcessingErr> {
        let ConversationArgs {
            key,
            mut conversation,
            ctx,
        } = args;
        let pending = Arc::new(AtomicUsize::new(0));
        if !ctx
            .registry
            .register(key.clone(), myself.clone(), pending.clone())
        {
            return Err(Box::new(AlreadyRunning));
        }
        let writer = Writer::unfenced(&key.owner);
        if let Some(conversation) = conversation.as_mut()
            && let Err(e) = Box::pin(mark_interrupted(&*ctx.store, &writer, conversation)).await
        {
            ctx.registry.remove(&key, myself.get_id());
            return Err(Box::new(e));
        }
        ctx.metrics.actor_started();
        Ok(ConversationState {
            members: Members::new(key.id.clone()),
            key,
            writer,
            conversation,
            reply: None,
            generations: 0,
            idle_timer: false,
            last_activity: Instant::now(),
            ctx,
            pending,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut ConversationState,
    ) -> Result<(), ActorProcessingErr> {
        // Stopped on purpose (passivation, shutdown): the members are not asked to join again,
        // as they are when the actor fails.
        state.members.remove_all();
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
                    if idle_for < limit {
                        state.arm_idle_timer(&myself, limit - idle_for);
                        return Ok(());
                    }
                    if state
                        .ctx
                        .registry
                        .remove_if_unused(&state.key, myself.get_id())
                    {
                        tracing::debug!(conversation = %state.key.id, "passivating idle conversation");
                        myself.stop(None);
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

/// Marks the replies left `streaming` as `error`, in the store (only those still `streaming`
/// there) and in the loaded copy.
async fn mark_interrupted(
    store: &dyn ConversationStore,
    writer: &Writer,
    conversation: &mut Conversation,
) -> Result<(), ChatError> {
    let streaming = |m: &Message| m.status == Some(MessageStatus::Streaming);
    if !conversation.messages.iter().any(streaming) {
        return Ok(());
    }
    store.mark_interrupted_in(writer, &conversation.id).await?;
    for message in conversation.messages.iter_mut().filter(|m| streaming(m)) {
        message.status = Some(MessageStatus::Error);
    }
    Ok(())
}

impl ConversationState {
    /// No members and no reply: the actor may passivate.
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
                self.join(subscriber, resume);
                let _ = answer.send(Ok(()));
            }
            Request::Leave {
                subscriber_id,
                answer,
            } => {
                self.members.remove(subscriber_id);
                let _ = answer.send(Ok(()));
            }
            Request::StreamChat {
                content,
                sender,
                answer,
            } => {
                let _ = answer.send(self.stream_chat(myself, content, sender).await);
            }
            Request::Chat {
                content,
                create,
                answer,
            } => {
                if let Err(e) = self.chat(myself, content, create, answer).await {
                    tracing::debug!(conversation = %self.key.id, error = %e, "chat refused");
                }
            }
            Request::Stop(answer) => {
                let _ = answer.send(self.stop().await);
            }
            Request::Regenerate { sender, answer } => {
                let _ = answer.send(self.regenerate(myself, sender).await);
            }
            Request::Rename { title, answer } => {
                let _ = answer.send(self.rename(title).await);
            }
            Request::Delete(answer) => {
                let _ = answer.send(self.delete().await);
            }
            Request::Interrupt(answer) => {
                self.interrupt().await;
                let _ = answer.send(Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests;
