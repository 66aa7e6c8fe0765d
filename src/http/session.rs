//! One real-time connection, whatever its transport: turns client events into requests to the
//! conversations and remembers which conversations it joined.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::Shared;
use super::error::ApiError;
use super::limits::ReplyRate;
use super::payload::Payload;
use crate::actors::{Conversations, MembershipChange, Subscriber, SubscriberInbox};
use crate::config::Config;
use crate::domain::UserId;
use crate::metrics::Metrics;

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// Waits until a connection's token expires, `lifetime` from now; forever when it has none.
pub async fn token_expiry(lifetime: Option<std::time::Duration>) {
    match lifetime {
        Some(lifetime) => tokio::time::sleep(lifetime).await,
        None => std::future::pending().await,
    }
}

/// The `error` event a connection gets as its token expires, just before it is closed.
pub fn token_expired() -> std::sync::Arc<crate::actors::EncodedEvent> {
    ApiError::from(crate::auth::AuthError::Expired)
        .event()
        .encode()
}

/// A connected client's state.
pub struct Session {
    conversations: Conversations,
    /// Who is connected: every request of the connection is made as this user.
    user: UserId,
    subscriber: Subscriber,
    /// The conversations this connection is a member of, as their actors see it: joined, or
    /// where a `stream_chat` or `regenerate` of its own started a reply (a refused one joins
    /// nothing).
    joined: HashSet<String>,
    replies: ReplyRate,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    /// Counts the connection as open, for shutdown, until the session is gone.
    _open: TaskTrackerToken,
}

impl Session {
    /// A new session of `user` and the inbox its transport writes out from. Until the session
    /// is closed or dropped, shutdown counts the connection as open.
    pub fn open(shared: &Shared, user: UserId) -> (Session, SubscriberInbox) {
        let id = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
        let config = shared.config.clone();
        let (subscriber, inbox) = Subscriber::new(id, config.subscriber_queue);
        shared.metrics.connection_opened();
        let replies = ReplyRate::new(&shared.reply_limiter, &user);
        let session = Session {
            conversations: shared.conversations.clone(),
            user,
            subscriber,
            joined: HashSet::new(),
            replies,
            config,
            metrics: shared.metrics.clone(),
            _open: shared.connections.token(),
        };
        (session, inbox)
    }

    /// The connection's id.
    pub fn id(&self) -> u64 {
        self.subscriber.id()
    }

    /// Handles one client event; the value is the acknowledgement.
    pub async fn handle(&mut self, event: &str, data: &Value) -> Result<Value, ApiError> {
        match event {
            "join_conversation" => {
                let payload = Payload::new(data)?;
                let id = payload.conversation_id()?;
                let resume = payload.resume()?;
                self.check_join_limit(&id)?;
                let subscriber = self.subscriber.clone();
                self.conversations
                    .join(&self.user, &id, subscriber, resume)
                    .await?;
                self.joined.insert(id.clone());
                Ok(json!({ "conversationId": id }))
            }
            "leave_conversation" => {
                let id = Payload::new(data)?.conversation_id()?;
                if self.joined.remove(&id) {
                    self.conversations.leave(&self.user, &id, self.id()).await;
                }
                Ok(json!({ "conversationId": id }))
            }
            "stream_chat" => {
                let payload = Payload::new(data)?;
                let message = payload.message(self.config.max_message_chars)?;
                let id = payload.optional_conversation_id()?;
                if let Some(id) = &id {
                    self.check_join_limit(id)?;
                } else if self.joined.len() >= self.config.max_joined_conversations {
                    return Err(self.too_many_joined());
                }
                self.replies.check().await?;
                let sender = Some(self.subscriber.clone());
                let started = self
                    .conversations
                    .stream_chat(&self.user, id, message, sender)
                    .await?;
                self.joined.insert(started.conversation_id.clone());
                Ok(json!({
                    "conversationId": started.conversation_id,
                    "messageId": started.message_id,
                }))
            }
            "stop_generation" => {
                let id = Payload::new(data)?.conversation_id()?;
                self.conversations.stop_reply(&self.user, &id).await?;
                Ok(json!({ "conversationId": id }))
            }
            "regenerate" => {
                let id = Payload::new(data)?.conversation_id()?;
                self.check_join_limit(&id)?;
                self.replies.check().await?;
                let sender = Some(self.subscriber.clone());
                let started = self
                    .conversations
                    .regenerate(&self.user, &id, sender)
                    .await?;
                self.joined.insert(id);
                Ok(json!({
                    "conversationId": started.conversation_id,
                    "messageId": started.message_id,
                }))
            }
            other => Err(ApiError::InvalidRequest(format!("Unknown event: {other}"))),
        }
    }

    fn check_join_limit(&self, id: &str) -> Result<(), ApiError> {
        if self.joined.contains(id) || self.joined.len() < self.config.max_joined_conversations {
            Ok(())
        } else {
            Err(self.too_many_joined())
        }
    }

    fn too_many_joined(&self) -> ApiError {
        ApiError::InvalidRequest(format!(
            "A connection may join at most {} conversations",
            self.config.max_joined_conversations
        ))
    }

    /// Follows a membership the conversation changed: joins again a conversation whose actor
    /// lost this connection (it failed, or moved to another node), from where the connection
    /// stood in its reply; forgets one that ended it (deleted).
    pub async fn membership_changed(&mut self, change: MembershipChange) {
        let (id, resume) = match change {
            MembershipChange::Lost(id, resume) => (id, resume),
            MembershipChange::Ended(id) => {
                self.joined.remove(&id);
                return;
            }
        };
        if !self.joined.contains(&id) {
            return;
        }
        let subscriber = self.subscriber.clone();
        if let Err(e) = self
            .conversations
            .join(&self.user, &id, subscriber, resume)
            .await
        {
            tracing::warn!(connection = self.id(), conversation = %id, error = %e, "rejoin failed");
            self.joined.remove(&id);
        }
    }

    /// Leaves every conversation; the connection is gone.
    pub async fn close(self) {
        for id in &self.joined {
            self.conversations
                .leave(&self.user, id, self.subscriber.id())
                .await;
        }
        self.metrics.connection_closed();
    }
}
