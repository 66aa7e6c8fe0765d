//! Routing to conversation actors: a registry read without any mailbox on the hot path, and a
//! supervisor actor that activates conversations from the store and cleans up after failures.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::oneshot;

use super::conversation::{
    Answer, ChatCompleted, ConversationActor, ConversationArgs, ConversationContext,
    ConversationMsg, Request, Resume, StreamStarted,
};
use super::events::Subscriber;
use crate::domain::{Conversation, new_id, validate_conversation_id};
use crate::error::ApiError;
use crate::store::Page;

/// How many times a request follows a conversation whose actor has just stopped.
const ROUTE_ATTEMPTS: usize = 4;

/// Running conversation actors by id.
#[derive(Clone, Default)]
pub struct Registry {
    actors: Arc<RwLock<HashMap<Arc<str>, Entry>>>,
}

#[derive(Clone)]
struct Entry {
    actor: ActorRef<ConversationMsg>,
    /// Requests sent to the actor and not yet handled.
    pending: Arc<AtomicUsize>,
}

impl Registry {
    /// Sends a request to the running actor of `id`; gives it back when there is none.
    fn send(&self, id: &str, request: Request) -> Result<(), Request> {
        let stale = {
            let actors = self.actors.read().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = actors.get(id) else {
                return Err(request);
            };
            entry.pending.fetch_add(1, Ordering::AcqRel);
            match entry.actor.send_message(ConversationMsg::Request(request)) {
                Ok(()) => return Ok(()),
                Err(ractor::MessagingErr::SendErr(ConversationMsg::Request(request))) => {
                    entry.pending.fetch_sub(1, Ordering::AcqRel);
                    (entry.actor.get_id(), request)
                }
                Err(_) => unreachable!("send_message returns the message it could not send"),
            }
        };
        self.remove(id, stale.0);
        Err(stale.1)
    }

    fn contains(&self, id: &str) -> bool {
        let actors = self.actors.read().unwrap_or_else(|e| e.into_inner());
        actors.contains_key(id)
    }

    fn insert(&self, id: Arc<str>, entry: Entry) {
        let mut actors = self.actors.write().unwrap_or_else(|e| e.into_inner());
        actors.insert(id, entry);
    }

    fn remove(&self, id: &str, actor: ActorId) {
        let mut actors = self.actors.write().unwrap_or_else(|e| e.into_inner());
        if actors.get(id).is_some_and(|e| e.actor.get_id() == actor) {
            actors.remove(id);
        }
    }

    /// Removes the actor of `id` if no request is waiting for it; true when removed.
    pub fn remove_if_unused(&self, id: &str, actor: ActorId) -> bool {
        let mut actors = self.actors.write().unwrap_or_else(|e| e.into_inner());
        let unused = actors
            .get(id)
            .is_some_and(|e| e.actor.get_id() == actor && e.pending.load(Ordering::Acquire) == 0);
        if unused {
            actors.remove(id);
        }
        unused
    }

    fn ids(&self) -> Vec<Arc<str>> {
        let actors = self.actors.read().unwrap_or_else(|e| e.into_inner());
        actors.keys().cloned().collect()
    }

    /// How many conversation actors are running.
    pub fn len(&self) -> usize {
        self.actors.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no conversation actor is running.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether a request may bring a conversation that is not stored yet into being.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Only a stored conversation.
    Existing,
    /// A stored one, or a new empty one that its first message creates.
    OrNew,
}

/// The supervisor's mailbox.
pub enum SupervisorMsg {
    /// Make sure the actor of `id` runs.
    Activate {
        id: Arc<str>,
        activation: Activation,
        answer: Answer<()>,
    },
}

/// Starts conversation actors and hears when they stop or fail.
pub struct ConversationSupervisor;

/// The supervisor's data.
pub struct SupervisorState {
    ctx: Arc<ConversationContext>,
    children: HashMap<ActorId, Arc<str>>,
}

impl Actor for ConversationSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = Arc<ConversationContext>;

    async fn pre_start(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        ctx: Arc<ConversationContext>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState {
            ctx,
            children: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        message: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::Activate {
                id,
                activation,
                answer,
            } => {
                let result = state.activate(&myself, id, activation).await;
                let _ = answer.send(result);
            }
        }
        Ok(())
    }

    /// Children stopping, normally or not, never stop the supervisor.
    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.children.remove(&cell.get_id());
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                if let Some(id) = state.children.remove(&cell.get_id()) {
                    tracing::error!(conversation = %id, %error, "conversation actor failed; it restarts from the store on next use");
                    state.ctx.registry.remove(&id, cell.get_id());
                    state.ctx.metrics.actor_stopped();
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl SupervisorState {
    async fn activate(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        id: Arc<str>,
        activation: Activation,
    ) -> Result<(), ApiError> {
        if self.ctx.registry.contains(&id) {
            return Ok(());
        }
        let conversation = self.ctx.store.load_conversation(&id).await?;
        if conversation.is_none() && activation == Activation::Existing {
            return Err(ApiError::ConversationNotFound);
        }
        let pending = Arc::new(AtomicUsize::new(0));
        let args = ConversationArgs {
            id: id.clone(),
            conversation,
            ctx: self.ctx.clone(),
            pending: pending.clone(),
        };
        let (actor, _) = Actor::spawn_linked(None, ConversationActor, args, myself.get_cell())
            .await
            .map_err(ApiError::internal)?;
        self.children.insert(actor.get_id(), id.clone());
        self.ctx.registry.insert(id, Entry { actor, pending });
        Ok(())
    }
}

/// The front door to all conversations, used by every transport.
#[derive(Clone)]
pub struct Conversations {
    ctx: Arc<ConversationContext>,
    supervisor: ActorRef<SupervisorMsg>,
}

impl Conversations {
    /// Starts the supervisor.
    pub async fn start(ctx: ConversationContext) -> Result<Conversations, ApiError> {
        let ctx = Arc::new(ctx);
        let (supervisor, _) = Actor::spawn(None, ConversationSupervisor, ctx.clone())
            .await
            .map_err(ApiError::internal)?;
        Ok(Conversations { ctx, supervisor })
    }

    /// Lets replies in progress finish for up to `grace`, then ends the rest as interrupted
    /// (stored with status `error`, members told), and stops every actor.
    pub async fn shutdown(&self, grace: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        while self.ctx.metrics.snapshot().replies_in_progress > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        for id in self.ctx.registry.ids() {
            if self.ctx.registry.contains(&id) {
                let _ = self
                    .request(&id, Activation::Existing, Request::Interrupt)
                    .await;
            }
        }
        self.supervisor.stop(None);
    }

    /// How many conversation actors are running.
    pub fn active(&self) -> usize {
        self.ctx.registry.len()
    }

    /// Sends a request to the conversation's actor, activating it first when needed, and waits
    /// for the answer.
    async fn request<T>(
        &self,
        id: &str,
        activation: Activation,
        build: impl FnOnce(Answer<T>) -> Request,
    ) -> Result<T, ApiError> {
        let (answer, receiver) = oneshot::channel();
        let mut request = build(answer);
        for _ in 0..ROUTE_ATTEMPTS {
            match self.ctx.registry.send(id, request) {
                Ok(()) => {
                    return receiver.await.unwrap_or_else(|_| {
                        Err(ApiError::internal(format!("conversation {id} failed")))
                    });
                }
                Err(returned) => {
                    request = returned;
                    self.activate(id, activation).await?;
                }
            }
        }
        Err(ApiError::internal(format!(
            "conversation {id} kept stopping"
        )))
    }

    async fn activate(&self, id: &str, activation: Activation) -> Result<(), ApiError> {
        let (answer, receiver) = oneshot::channel();
        self.supervisor
            .send_message(SupervisorMsg::Activate {
                id: id.into(),
                activation,
                answer,
            })
            .map_err(|_| ApiError::internal("conversation supervisor is gone"))?;
        receiver
            .await
            .unwrap_or_else(|_| Err(ApiError::internal("conversation supervisor failed")))
    }

    /// A conversation with its messages; read from its actor when it runs, else from the store.
    pub async fn get(&self, id: &str) -> Result<Conversation, ApiError> {
        if self.ctx.registry.contains(id) {
            return self
                .request(id, Activation::Existing, Request::Snapshot)
                .await;
        }
        self.ctx
            .store
            .load_conversation(id)
            .await?
            .ok_or(ApiError::ConversationNotFound)
    }

    /// Conversations, most recently updated first, from the store.
    pub async fn list(&self, page: Page) -> Result<Vec<Conversation>, ApiError> {
        self.ctx.store.list_conversations(page).await
    }

    /// Stores `content` and answers with the whole reply (REST). Without an id, a new
    /// conversation; an unknown id is not found.
    pub async fn chat(
        &self,
        conversation_id: Option<String>,
        content: String,
    ) -> Result<ChatCompleted, ApiError> {
        let (id, activation) = match conversation_id {
            Some(id) => (id, Activation::Existing),
            None => (new_id(), Activation::OrNew),
        };
        let create = activation == Activation::OrNew;
        self.request(&id, activation, |answer| Request::Chat {
            content,
            create,
            answer,
        })
        .await
    }

    /// Stores `content` and streams the reply to the conversation's members, `sender` among
    /// them. An unknown or missing id creates the conversation.
    pub async fn stream_chat(
        &self,
        conversation_id: Option<String>,
        content: String,
        sender: Option<Subscriber>,
    ) -> Result<StreamStarted, ApiError> {
        let id = match conversation_id {
            Some(id) => {
                validate_conversation_id(&id)?;
                id
            }
            None => new_id(),
        };
        self.request(&id, Activation::OrNew, |answer| Request::StreamChat {
            content,
            sender,
            answer,
        })
        .await
    }

    /// Makes `subscriber` a member of the conversation (which may not exist yet).
    pub async fn join(
        &self,
        id: &str,
        subscriber: Subscriber,
        resume: Option<Resume>,
    ) -> Result<(), ApiError> {
        validate_conversation_id(id)?;
        self.request(id, Activation::OrNew, |answer| Request::Join {
            subscriber,
            resume,
            answer,
        })
        .await
    }

    /// Ends `subscriber_id`'s membership; nothing to do when the actor is not running.
    pub async fn leave(&self, id: &str, subscriber_id: u64) {
        if !self.ctx.registry.contains(id) {
            return;
        }
        let _ = self
            .request(id, Activation::Existing, |answer| Request::Leave {
                subscriber_id,
                answer,
            })
            .await;
    }

    /// Stops the reply in progress; success when there is none.
    pub async fn stop_reply(&self, id: &str) -> Result<(), ApiError> {
        validate_conversation_id(id)?;
        self.request(id, Activation::Existing, Request::Stop).await
    }

    /// Replaces the last reply with a new streamed one.
    pub async fn regenerate(
        &self,
        id: &str,
        sender: Option<Subscriber>,
    ) -> Result<StreamStarted, ApiError> {
        validate_conversation_id(id)?;
        self.request(id, Activation::Existing, |answer| Request::Regenerate {
            sender,
            answer,
        })
        .await
    }

    /// Changes the conversation's title.
    pub async fn rename(&self, id: &str, title: String) -> Result<Conversation, ApiError> {
        self.request(id, Activation::Existing, |answer| Request::Rename {
            title,
            answer,
        })
        .await
    }

    /// Deletes the conversation and tells its members.
    pub async fn delete(&self, id: &str) -> Result<(), ApiError> {
        self.request(id, Activation::Existing, Request::Delete)
            .await
    }
}
