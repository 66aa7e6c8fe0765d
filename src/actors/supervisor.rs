//! Routing to conversation actors: requests go straight to a running actor through the
//! [`Registry`]; the supervisor actor is the parent of every conversation actor, and the
//! [`Conversations`] front door activates conversations from the store when they are not running.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};
use tokio::sync::oneshot;

use super::conversation::{
    AlreadyRunning, Answer, ChatCompleted, ConversationActor, ConversationArgs,
    ConversationContext, Request, Resume, StreamStarted,
};
use super::events::Subscriber;
use crate::domain::{Conversation, new_id, validate_conversation_id};
use crate::error::ChatError;
use crate::store::Page;

/// How many times a request follows a conversation whose actor has just stopped.
const ROUTE_ATTEMPTS: usize = 4;

/// Whether a request may bring a conversation that is not stored yet into being.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Only a stored conversation.
    Existing,
    /// A stored one, or a new empty one that its first message creates.
    OrNew,
    /// A new conversation under an id just made: nothing to load.
    New,
}

/// Parent of every conversation actor: hears when one fails and forgets it, so that the next
/// request starts it again from the store. It never stops because a child did.
pub struct ConversationSupervisor;

impl Actor for ConversationSupervisor {
    type Msg = ();
    type State = Arc<ConversationContext>;
    type Arguments = Arc<ConversationContext>;

    async fn pre_start(
        &self,
        _myself: ActorRef<()>,
        ctx: Arc<ConversationContext>,
    ) -> Result<Arc<ConversationContext>, ActorProcessingErr> {
        Ok(ctx)
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<()>,
        event: SupervisionEvent,
        ctx: &mut Arc<ConversationContext>,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, error) = event {
            ctx.metrics.actor_stopped();
            if let Some(id) = ctx.registry.remove_actor(cell.get_id()) {
                tracing::error!(conversation = %id, %error, "conversation actor failed; it restarts from the store on next use");
            }
        }
        Ok(())
    }
}

/// The front door to all conversations, used by every transport.
#[derive(Clone)]
pub struct Conversations {
    ctx: Arc<ConversationContext>,
    supervisor: ActorRef<()>,
}

impl Conversations {
    /// Starts the supervisor.
    pub async fn start(ctx: ConversationContext) -> Result<Conversations, ChatError> {
        let ctx = Arc::new(ctx);
        let (supervisor, _) = Actor::spawn(None, ConversationSupervisor, ctx.clone())
            .await
            .map_err(|e| ChatError::Failed(e.to_string()))?;
        Ok(Conversations { ctx, supervisor })
    }

    /// Lets replies in progress finish for up to `grace`, then ends the rest as interrupted
    /// (stored with status `error`, members told), and stops every actor.
    pub async fn shutdown(&self, grace: std::time::Duration) {
        let replies = &self.ctx.replies;
        replies.close();
        if tokio::time::timeout(grace, replies.wait()).await.is_err() {
            tracing::warn!(
                replies = replies.len(),
                "replies still in progress after the grace period; interrupting them"
            );
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
    ) -> Result<T, ChatError> {
        let (answer, receiver) = oneshot::channel();
        let mut request = build(answer);
        for _ in 0..ROUTE_ATTEMPTS {
            match self.ctx.registry.send(id, request) {
                Ok(()) => {
                    return receiver.await.unwrap_or_else(|_| {
                        Err(ChatError::Failed(format!("conversation {id} failed")))
                    });
                }
                Err(returned) => {
                    request = returned;
                    self.activate(id, activation).await?;
                }
            }
        }
        Err(ChatError::Failed(format!(
            "conversation {id} kept stopping"
        )))
    }

    /// Starts the actor of `id`, loaded from the store, unless one runs already. Activations of
    /// different conversations run in parallel; of the same one, the first to register wins and
    /// the others stop before writing anything.
    async fn activate(&self, id: &str, activation: Activation) -> Result<(), ChatError> {
        if self.ctx.registry.contains(id) {
            return Ok(());
        }
        let conversation = match activation {
            Activation::New => None,
            _ => self.ctx.store.load_conversation(id).await?,
        };
        if conversation.is_none() && activation == Activation::Existing {
            return Err(ChatError::NotFound);
        }
        let args = ConversationArgs {
            id: id.into(),
            conversation,
            ctx: self.ctx.clone(),
        };
        let supervisor = self.supervisor.get_cell();
        match Actor::spawn_linked(None, ConversationActor, args, supervisor).await {
            Ok(_) => Ok(()),
            Err(SpawnErr::StartupFailed(error)) => match error.downcast::<ChatError>() {
                Ok(error) => Err(*error),
                Err(error) if error.is::<AlreadyRunning>() => Ok(()),
                Err(error) => Err(ChatError::Failed(error.to_string())),
            },
            Err(error) => Err(ChatError::Failed(error.to_string())),
        }
    }

    /// A conversation with its messages; read from its actor when it runs, else from the store.
    pub async fn get(&self, id: &str) -> Result<Conversation, ChatError> {
        if self.ctx.registry.contains(id) {
            return self
                .request(id, Activation::Existing, Request::Snapshot)
                .await;
        }
        self.ctx
            .store
            .load_conversation(id)
            .await?
            .ok_or(ChatError::NotFound)
    }

    /// Conversations, most recently updated first, from the store.
    pub async fn list(&self, page: Page) -> Result<Vec<Conversation>, ChatError> {
        Ok(self.ctx.store.list_conversations(page).await?)
    }

    /// Stores `content` and answers with the whole reply (REST). Without an id, a new
    /// conversation; an unknown id is not found.
    pub async fn chat(
        &self,
        conversation_id: Option<String>,
        content: String,
    ) -> Result<ChatCompleted, ChatError> {
        let (id, activation) = match conversation_id {
            Some(id) => (id, Activation::Existing),
            None => (new_id(), Activation::New),
        };
        let create = activation == Activation::New;
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
    ) -> Result<StreamStarted, ChatError> {
        let (id, activation) = match conversation_id {
            Some(id) => {
                validate_conversation_id(&id)?;
                (id, Activation::OrNew)
            }
            None => (new_id(), Activation::New),
        };
        self.request(&id, activation, |answer| Request::StreamChat {
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
    ) -> Result<(), ChatError> {
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
    pub async fn stop_reply(&self, id: &str) -> Result<(), ChatError> {
        validate_conversation_id(id)?;
        self.request(id, Activation::Existing, Request::Stop).await
    }

    /// Replaces the last reply with a new streamed one.
    pub async fn regenerate(
        &self,
        id: &str,
        sender: Option<Subscriber>,
    ) -> Result<StreamStarted, ChatError> {
        validate_conversation_id(id)?;
        self.request(id, Activation::Existing, |answer| Request::Regenerate {
            sender,
            answer,
        })
        .await
    }

    /// Changes the conversation's title.
    pub async fn rename(&self, id: &str, title: String) -> Result<Conversation, ChatError> {
        self.request(id, Activation::Existing, |answer| Request::Rename {
            title,
            answer,
        })
        .await
    }

    /// Deletes the conversation and tells its members.
    pub async fn delete(&self, id: &str) -> Result<(), ChatError> {
        self.request(id, Activation::Existing, Request::Delete)
            .await
    }
}
