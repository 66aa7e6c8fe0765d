//! Routing to conversation actors: requests go straight to a running actor through the
//! [`Registry`]; the [`Conversations`] front door activates conversations from the store when
//! they are not running, and supervises the actors it starts: it hears when one fails and
//! forgets it, so that the next request starts it again from the store.
//!
//! Every request names the user asking, and reaches only that user's conversations: a
//! conversation is keyed by (owner, id), so another user's is simply not found.
//!
//! In a cluster, a conversation is activated only on the node that holds its lease; a request
//! for one another node owns goes there (see [`super::remote`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::conversation::{
    Answer, ChatCompleted, ConversationContext, ConversationMsg, ConversationState, NotOpened,
    Request, Resume, Snapshot, StreamStarted,
};
use super::events::Subscriber;
use super::mailbox::{self, Mailbox, NotStarted};
use super::registry::ConversationKey;
use crate::cluster::{Cluster, NodeId};
use crate::domain::{Conversation, Timestamp, UserId, new_id, validate_conversation_id};
use crate::error::ChatError;
use crate::store::Page;

/// How many times a request follows a conversation whose actor has just stopped.
pub(super) const ROUTE_ATTEMPTS: usize = 4;

/// Whether a request may bring a conversation that is not stored yet into being.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Activation {
    /// Only a stored conversation.
    Existing,
    /// A stored one, or a new empty one that its first message creates.
    OrNew,
    /// A new conversation under an id just made: nothing to load.
    New,
}

/// A conversation actor failed: it is forgotten, so that the next request starts it again from
/// the store, and its members are asked to join again.
fn failed(ctx: &ConversationContext, actor: &Mailbox<ConversationMsg>, error: String) {
    ctx.metrics.actor_stopped();
    if let Some(key) = ctx.registry.remove_actor(actor) {
        tracing::error!(conversation = %key.id, owner = %key.owner, %error, "conversation actor failed; it restarts from the store on next use");
    }
}

/// Where a conversation's actor runs.
pub(super) enum Placement {
    /// On this node.
    Here,
    /// On another node of the cluster.
    There(NodeId),
}

/// The front door to all conversations, used by every transport.
#[derive(Clone)]
pub struct Conversations {
    pub(super) ctx: Arc<ConversationContext>,
}

impl Conversations {
    /// The front door to the conversations `ctx` holds.
    pub fn new(ctx: ConversationContext) -> Conversations {
        Conversations { ctx: Arc::new(ctx) }
    }

    /// Lets replies in progress finish for up to `grace`, then ends the rest as interrupted
    /// (stored with status `error`, members told), leaves the cluster, and stops every actor.
    pub async fn shutdown(&self, grace: std::time::Duration) {
        let replies = &self.ctx.replies;
        replies.close();
        if tokio::time::timeout(grace, replies.wait()).await.is_err() {
            tracing::warn!(
                replies = replies.len(),
                "replies still in progress after the grace period; interrupting them"
            );
        }
        for key in self.ctx.registry.keys() {
            if self.ctx.registry.contains(&key) {
                let _ = self
                    .request(&key, Activation::Existing, Request::Interrupt)
                    .await;
            }
        }
        if let Some(cluster) = &self.ctx.cluster {
            cluster.leave().await;
        }
        self.ctx.registry.stop_all();
    }

    /// How many conversation actors are running.
    pub fn active(&self) -> usize {
        self.ctx.registry.len()
    }

    /// The cluster this node belongs to, if any.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.ctx.cluster.as_ref()
    }

    /// The conversations whose actors run on this node.
    pub(crate) fn running(&self) -> Vec<ConversationKey> {
        self.ctx.registry.keys()
    }

    /// Another node holds the lease of `key` now: its actor here stops.
    pub(crate) fn lease_lost(&self, key: &ConversationKey) {
        self.ctx.registry.tell(key, ConversationMsg::LeaseLost);
    }

    /// Sends a request to the conversation's actor, wherever it runs, activating it first when
    /// needed, and waits for the answer.
    async fn request<T>(
        &self,
        key: &ConversationKey,
        activation: Activation,
        build: impl FnOnce(Answer<T>) -> Request,
    ) -> Result<T, ChatError> {
        let (answer, receiver) = oneshot::channel();
        if let Err((request, owner)) = self.deliver(key, activation, build(answer)).await? {
            self.forward(owner, key, request).await;
        }
        receiver
            .await
            .unwrap_or_else(|_| Err(ChatError::Failed(format!("conversation {} failed", key.id))))
    }

    /// Hands a request to the conversation's actor on this node, activating it first when
    /// needed; gives the request back, with the owner, when another node owns the
    /// conversation.
    pub(super) async fn deliver(
        &self,
        key: &ConversationKey,
        activation: Activation,
        mut request: Request,
    ) -> Result<Result<(), (Request, NodeId)>, ChatError> {
        for _ in 0..ROUTE_ATTEMPTS {
            match self.ctx.registry.send(key, request) {
                Ok(()) => return Ok(Ok(())),
                Err(returned) => request = returned,
            }
            if let Placement::There(owner) = self.activate(key, activation).await? {
                return Ok(Err((request, owner)));
            }
        }
        Err(ChatError::Failed(format!(
            "conversation {} kept stopping",
            key.id
        )))
    }

    /// Starts the actor of `key` on this node unless one runs already, or, in a cluster, finds
    /// the node that owns it. Activations of different conversations run in parallel; of the
    /// same one, the first to register wins and the others stop before writing anything.
    pub(super) async fn activate(
        &self,
        key: &ConversationKey,
        activation: Activation,
    ) -> Result<Placement, ChatError> {
        if self.ctx.registry.contains(key) {
            return Ok(Placement::Here);
        }
        if let Some(cluster) = &self.ctx.cluster
            && let Some(owner) = cluster.acquire(key).await?
        {
            return Ok(Placement::There(owner));
        }
        let (opened, ctx) = (key.clone(), self.ctx.clone());
        let supervisor = ctx.clone();
        let open = move |myself| ConversationState::open(myself, opened, activation, ctx);
        let failed = move |actor: &Mailbox<_>, error| failed(&supervisor, actor, error);
        match mailbox::spawn(open, failed).await {
            Ok(_) | Err(NotStarted::Refused(NotOpened::AlreadyRunning)) => Ok(Placement::Here),
            Err(NotStarted::Refused(NotOpened::Failed(error))) => Err(error),
            Err(NotStarted::Panicked) => Err(ChatError::Failed(format!(
                "conversation {} failed to start",
                key.id
            ))),
        }
    }

    /// One of `user`'s conversations with its messages; read from its actor when it runs, else
    /// from the store.
    pub async fn get(&self, user: &UserId, id: &str) -> Result<Snapshot, ChatError> {
        let key = ConversationKey::new(user, id);
        if self.ctx.registry.contains(&key) {
            return self
                .request(&key, Activation::Existing, Request::Snapshot)
                .await;
        }
        if let Some(owner) = self.owner_elsewhere(&key).await {
            match self.snapshot_from(owner, &key).await {
                // The owner is out of reach: the store has what it last saved.
                Err(ChatError::Unavailable(_)) => {}
                answered => return answered.map(Snapshot::new),
            }
        }
        self.ctx
            .store
            .load_conversation(user, id)
            .await?
            .map(Snapshot::new)
            .ok_or(ChatError::NotFound)
    }

    /// The tokens `user`'s replies have used today (UTC).
    pub async fn tokens_today(&self, user: &UserId) -> Result<u64, ChatError> {
        let day = Timestamp::now().utc_day();
        Ok(self.ctx.store.usage_on(user, &day).await?)
    }

    /// The tokens one user's replies may use per UTC day; 0 is no limit.
    pub fn daily_token_limit(&self) -> u64 {
        self.ctx.settings.daily_tokens
    }

    /// Refuses a new reply, before any model call, once `user` has used the day's tokens. A reply
    /// already running finishes, whatever it costs.
    async fn check_budget(&self, user: &UserId) -> Result<(), ChatError> {
        let limit = self.daily_token_limit();
        if limit > 0 && self.tokens_today(user).await? >= limit {
            return Err(ChatError::QuotaExceeded);
        }
        Ok(())
    }

    /// `user`'s conversations, most recently updated first, from the store.
    pub async fn list(&self, user: &UserId, page: Page) -> Result<Vec<Conversation>, ChatError> {
        Ok(self.ctx.store.list_conversations(user, page).await?)
    }

    /// Stores `content` and answers with the whole reply (REST). Without an id, a new
    /// conversation of `user`; an unknown id is not found.
    pub async fn chat(
        &self,
        user: &UserId,
        conversation_id: Option<String>,
        content: String,
    ) -> Result<ChatCompleted, ChatError> {
        let (id, activation) = match conversation_id {
            Some(id) => (id, Activation::Existing),
            None => (new_id(), Activation::New),
        };
        let create = activation == Activation::New;
        self.check_budget(user).await?;
        let key = ConversationKey::new(user, &id);
        self.request(&key, activation, |answer| Request::Chat {
            content,
            create,
            answer,
        })
        .await
    }

    /// Stores `content` and streams the reply to the conversation's members, `sender` among
    /// them. An unknown or missing id creates a conversation of `user`.
    pub async fn stream_chat(
        &self,
        user: &UserId,
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
        self.check_budget(user).await?;
        let key = ConversationKey::new(user, &id);
        self.request(&key, activation, |answer| Request::StreamChat {
            content,
            sender,
            answer,
        })
        .await
    }

    /// Makes `subscriber` a member of `user`'s conversation (which may not exist yet).
    pub async fn join(
        &self,
        user: &UserId,
        id: &str,
        subscriber: Subscriber,
        resume: Option<Resume>,
    ) -> Result<(), ChatError> {
        validate_conversation_id(id)?;
        let key = ConversationKey::new(user, id);
        self.request(&key, Activation::OrNew, |answer| Request::Join {
            subscriber,
            resume,
            answer,
        })
        .await
    }

    /// Ends `subscriber_id`'s membership; nothing to do when the actor is not running.
    pub async fn leave(&self, user: &UserId, id: &str, subscriber_id: u64) {
        let key = ConversationKey::new(user, id);
        self.leave_relay(&key, subscriber_id);
        if !self.ctx.registry.contains(&key) {
            return;
        }
        let _ = self
            .request(&key, Activation::Existing, |answer| Request::Leave {
                subscriber_id,
                answer,
            })
            .await;
    }

    /// Stops the reply in progress; success when there is none.
    pub async fn stop_reply(&self, user: &UserId, id: &str) -> Result<(), ChatError> {
        validate_conversation_id(id)?;
        let key = ConversationKey::new(user, id);
        self.request(&key, Activation::Existing, Request::Stop)
            .await
    }

    /// Replaces the last reply with a new streamed one.
    pub async fn regenerate(
        &self,
        user: &UserId,
        id: &str,
        sender: Option<Subscriber>,
    ) -> Result<StreamStarted, ChatError> {
        validate_conversation_id(id)?;
        self.check_budget(user).await?;
        let key = ConversationKey::new(user, id);
        self.request(&key, Activation::Existing, |answer| Request::Regenerate {
            sender,
            answer,
        })
        .await
    }

    /// Changes the conversation's title.
    pub async fn rename(
        &self,
        user: &UserId,
        id: &str,
        title: String,
    ) -> Result<Conversation, ChatError> {
        let key = ConversationKey::new(user, id);
        self.request(&key, Activation::Existing, |answer| Request::Rename {
            title,
            answer,
        })
        .await
    }

    /// Deletes the conversation and tells its members.
    pub async fn delete(&self, user: &UserId, id: &str) -> Result<(), ChatError> {
        let key = ConversationKey::new(user, id);
        self.request(&key, Activation::Existing, Request::Delete)
            .await
    }
}
