//! The conversation actor: owns one conversation's messages, its members and the reply being
//! generated. Everything that changes a conversation goes through its mailbox.
//!
//! - this file: the actor, its mailbox, activation and passivation;
//! - [`commands`]: what clients ask (chat, stop, regenerate, rename, delete…);
//! - [`reply`]: the reply in progress, and the one way it ends;
//! - [`generation`]: the tasks that ask the model and report back to the mailbox;
//! - [`members`]: what a connection joining late missed, and the nodes relaying the
//!   conversation in a cluster.
//!
//! In a cluster, an actor runs only on the node that holds the conversation's lease. It claims
//! the conversation in the store before it reads it, so that a node that lost the lease without
//! knowing it cannot write any more; a reply left streaming by an earlier owner that died is
//! ended as failed, and members that saw part of it get its end when they join again.

mod commands;
mod generation;
mod members;
mod reply;
mod snapshot;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use serde::{Deserialize, Serialize};

pub use snapshot::Snapshot;

use super::alarms::Alarms;
use super::events::Subscriber;
use super::mailbox::{Actor, Mailbox};
use super::members::Members;
use super::registry::{ConversationKey, Registry};
use super::supervisor::Activation;
use crate::cluster::{Cluster, NodeId, Relayed};
use crate::config::ConversationSettings;
use crate::domain::{Conversation, Message, MessageStatus};
use crate::error::ChatError;
use crate::llm::ModelProvider;
use crate::metrics::Metrics;
use crate::store::{ConversationStore, Writer};

pub use generation::GenerationEvent;
use members::Orphan;
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
    /// The other nodes, in cluster mode.
    pub cluster: Option<Arc<Cluster>>,
    /// Rings each actor's idle timer.
    pub idle_timers: Alarms<ConversationMsg>,
}

/// The alarms that ring the conversations' idle timers, on the current runtime.
pub fn idle_timers() -> Alarms<ConversationMsg> {
    Alarms::start(|| ConversationMsg::IdleCheck)
}

/// The last chunk a reconnecting client saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resume {
    pub message_id: String,
    pub seq: u64,
}

/// A reply that has started streaming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamStarted {
    pub conversation_id: String,
    pub message_id: String,
    /// In a cluster, the owner's epoch and the number its `stream_start` was published under,
    /// from which a relaying node's sender gets the reply's events.
    #[serde(default)]
    pub published: Option<(u64, u64)>,
}

/// A reply generated in one piece, with the whole conversation after it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChatCompleted {
    pub message: Message,
    pub conversation: Conversation,
}

/// What clients ask of a conversation.
pub enum Request {
    /// The conversation as it is now.
    Snapshot(Answer<Snapshot>),
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
    /// A relay's members come to the conversation: what the relay needs to start, and what a
    /// member that saw up to `resume` (and `seen` of its text) missed. `node` relays the
    /// conversation from now on; `None` is this node's relay, whose members join here.
    Relay {
        node: Option<NodeId>,
        resume: Option<Resume>,
        seen: Option<String>,
        answer: Answer<Relayed>,
    },
    /// A node relays it no more.
    Unrelay { node: NodeId, answer: Answer<()> },
    /// The events published after `after` in `epoch`, for a relaying node that missed some.
    Since {
        epoch: u64,
        after: u64,
        answer: Answer<Option<Vec<String>>>,
    },
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
    /// Another node holds the conversation's lease now: stop, without writing.
    LeaseLost,
}

/// Why a conversation actor did not start.
#[derive(Debug)]
pub enum NotOpened {
    /// Another actor already runs the conversation: the activation that started this one lost
    /// a race, and the request goes to the winner.
    AlreadyRunning,
    /// The conversation could not be claimed or loaded.
    Failed(ChatError),
}

/// A conversation actor's data.
pub struct ConversationState {
    key: ConversationKey,
    /// Who writes the conversation to the store: its owner, with this actor's claim on it.
    writer: Writer,
    /// Changed only through [`Snapshot::edit`], so that readers never see a stale JSON.
    conversation: Option<Snapshot>,
    members: Members,
    /// Boxed, as is the orphan: an actor's state lives in its task for its whole life, and most
    /// of that life no reply runs.
    reply: Option<Box<Reply>>,
    /// A reply an earlier owner left unfinished, ended by this actor.
    orphan: Option<Box<Orphan>>,
    /// The store refused a write because another node claimed the conversation since.
    fenced: bool,
    generations: u64,
    idle_timer: bool,
    last_activity: Instant,
    ctx: Arc<ConversationContext>,
    /// Requests routed to this actor and not handled yet; it passivates only at zero.
    pending: Arc<AtomicUsize>,
}

impl Actor for ConversationState {
    type Msg = ConversationMsg;

    async fn handle(&mut self, myself: &Mailbox<ConversationMsg>, message: ConversationMsg) {
        // The work is boxed: the actor's loop is one future, as large as the largest handler,
        // for the actor's whole life.
        match message {
            ConversationMsg::Request(request) => {
                self.last_activity = Instant::now();
                Box::pin(self.handle_request(myself, request)).await;
                self.pending.fetch_sub(1, Ordering::AcqRel);
            }
            ConversationMsg::Generated { generation, event } => {
                Box::pin(self.handle_generated(generation, event)).await;
            }
            ConversationMsg::LeaseLost => {
                Box::pin(self.lose(myself)).await;
                return;
            }
            ConversationMsg::IdleCheck => {
                self.idle_timer = false;
                if let Some(publication) = self.members.publication() {
                    publication.forget_dead_relays();
                }
                if self.is_idle() {
                    let idle_for = self.last_activity.elapsed();
                    let limit = self.idle_limit();
                    if idle_for < limit {
                        self.arm_idle_timer(myself, limit - idle_for);
                        return;
                    }
                    if self.ctx.registry.remove_if_unused(&self.key, myself) {
                        tracing::debug!(conversation = %self.key.id, "passivating idle conversation");
                        myself.stop();
                        return;
                    }
                }
            }
        }
        if self.fenced {
            Box::pin(self.lose(myself)).await;
            return;
        }
        if self.is_quiet() && !self.idle_timer {
            let after = self.idle_limit();
            self.arm_idle_timer(myself, after);
        }
    }

    /// Stopped on purpose (passivation, shutdown): the members are not asked to join again, as
    /// they are when the actor fails.
    fn stopped(&mut self) {
        self.members.remove_all();
        self.ctx.metrics.actor_stopped();
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
    /// Registers the actor `myself`; then, only if it is the registered one, claims the
    /// conversation (in a cluster), loads it, and ends the replies a crash, a failed actor or a
    /// dead node left `streaming`.
    pub(super) async fn open(
        myself: Mailbox<ConversationMsg>,
        key: ConversationKey,
        activation: Activation,
        ctx: Arc<ConversationContext>,
    ) -> Result<ConversationState, NotOpened> {
        let pending = Arc::new(AtomicUsize::new(0));
        if !ctx
            .registry
            .register(key.clone(), myself.clone(), pending.clone())
        {
            return Err(NotOpened::AlreadyRunning);
        }
        match Box::pin(Self::load(key.clone(), activation, ctx.clone(), pending)).await {
            Ok(state) => {
                ctx.metrics.actor_started();
                Ok(state)
            }
            Err(error) => {
                ctx.registry.remove(&key, &myself);
                Err(NotOpened::Failed(error))
            }
        }
    }

    /// The state of a registered actor: the conversation claimed (in a cluster) and loaded, as
    /// `activation` allows.
    async fn load(
        key: ConversationKey,
        activation: Activation,
        ctx: Arc<ConversationContext>,
        pending: Arc<AtomicUsize>,
    ) -> Result<ConversationState, ChatError> {
        let store = &ctx.store;
        let fence = match &ctx.cluster {
            Some(_) => Some(store.claim(&key.owner, &key.id).await?),
            None => None,
        };
        let writer = Writer {
            owner: key.owner.clone(),
            fence,
        };
        let mut conversation = match activation {
            Activation::New => None,
            _ => store.load_conversation(&key.owner, &key.id).await?,
        };
        if conversation.is_none() && activation == Activation::Existing {
            return Err(ChatError::NotFound);
        }
        let mut orphan = None;
        if let Some(conversation) = conversation.as_mut() {
            match fence {
                Some(_) => {
                    orphan = Orphan::end(&**store, &writer, conversation)
                        .await?
                        .map(Box::new)
                }
                None => mark_interrupted(&**store, &writer, conversation).await?,
            }
        }
        let publication = ctx
            .cluster
            .as_ref()
            .zip(fence)
            .map(|(cluster, epoch)| cluster.publication(&key, epoch));
        Ok(ConversationState {
            members: Members::new(key.id.clone(), publication),
            key,
            writer,
            conversation: conversation.map(Snapshot::new),
            reply: None,
            orphan,
            fenced: false,
            generations: 0,
            idle_timer: false,
            last_activity: Instant::now(),
            ctx,
            pending,
        })
    }

    /// No members and no reply: the actor may passivate.
    fn is_idle(&self) -> bool {
        self.members.is_empty() && self.reply.is_none()
    }

    /// No member on this node and no reply: the actor may passivate once the nodes relaying
    /// it are gone, which the idle timer checks.
    fn is_quiet(&self) -> bool {
        self.members.is_empty_here() && self.reply.is_none()
    }

    /// How long the actor stays without members or reply: a conversation that does not exist
    /// (yet, or any more) goes after a second at most; with relaying nodes, it looks again
    /// whether they are alive after a lease.
    fn idle_limit(&self) -> Duration {
        let mut limit = self.ctx.settings.idle_timeout;
        if self.conversation.is_none() {
            limit = limit.min(Duration::from_secs(1));
        }
        if !self.is_idle()
            && let Some(cluster) = &self.ctx.cluster
        {
            limit = limit.min(cluster.lease());
        }
        limit
    }

    /// Stops after another node took the conversation's lease: the reply in progress is dropped
    /// unwritten (the store would refuse it), and the members join again wherever it runs now,
    /// from where they stood in that reply.
    async fn lose(&mut self, myself: &Mailbox<ConversationMsg>) {
        tracing::warn!(conversation = %self.key.id, "another node owns the conversation now; stopping here");
        self.ctx.registry.remove(&self.key, myself);
        let resume = self.position();
        self.end_reply(reply::Ending::Lost).await;
        self.members.lose_all(resume);
        myself.stop();
    }

    fn arm_idle_timer(&mut self, myself: &Mailbox<ConversationMsg>, after: Duration) {
        self.idle_timer = true;
        self.ctx.idle_timers.set(myself, after);
    }

    /// Answers a request, noting a write the store refused.
    fn answer<T>(&mut self, answer: Answer<T>, result: Result<T, ChatError>) {
        if let Err(error) = &result {
            self.note(error);
        }
        let _ = answer.send(result);
    }

    /// Notes a failure: a write refused because another node claimed the conversation means
    /// this actor is not its owner any more.
    pub(super) fn note(&mut self, error: &ChatError) {
        if matches!(error, ChatError::Unavailable(_)) {
            self.fenced = true;
        }
    }

    async fn handle_request(&mut self, myself: &Mailbox<ConversationMsg>, request: Request) {
        match request {
            Request::Snapshot(answer) => {
                let result = self.snapshot();
                self.answer(answer, result);
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
                let result = self.stream_chat(myself, content, sender).await;
                self.answer(answer, result);
            }
            Request::Chat {
                content,
                create,
                answer,
            } => {
                if let Err(e) = self.chat(myself, content, create, answer).await {
                    self.note(&e);
                    tracing::debug!(conversation = %self.key.id, error = %e, "chat refused");
                }
            }
            Request::Stop(answer) => {
                let result = self.stop().await;
                self.answer(answer, result);
            }
            Request::Regenerate { sender, answer } => {
                let result = self.regenerate(myself, sender).await;
                self.answer(answer, result);
            }
            Request::Rename { title, answer } => {
                let result = self.rename(title).await;
                self.answer(answer, result);
            }
            Request::Delete(answer) => {
                let result = self.delete().await;
                self.answer(answer, result);
            }
            Request::Interrupt(answer) => {
                self.interrupt().await;
                let _ = answer.send(Ok(()));
            }
            Request::Relay {
                node,
                resume,
                seen,
                answer,
            } => {
                let relayed = self.relayed_by(node, resume.as_ref(), seen).await;
                self.answer(answer, relayed);
            }
            Request::Unrelay { node, answer } => {
                if let Some(publication) = self.members.publication() {
                    publication.remove(&node);
                }
                let _ = answer.send(Ok(()));
            }
            Request::Since {
                epoch,
                after,
                answer,
            } => {
                let events = self
                    .members
                    .publication()
                    .and_then(|p| p.since(epoch, after));
                let _ = answer.send(Ok(events));
            }
        }
    }
}

#[cfg(test)]
mod tests;
