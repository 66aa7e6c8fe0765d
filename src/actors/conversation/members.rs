//! The connections that joined a conversation: who they are, the fan-out of every event to them,
//! and what a connection joining mid-reply is sent first.
//!
//! A connection is a member after a join, or after a `stream_chat` or `regenerate` of its own
//! that started a reply; a refused request never makes one. Members leave when they ask, when the
//! conversation is deleted, or when a broadcast finds them gone or too slow.

use std::collections::HashMap;
use std::sync::Arc;

use super::{ConversationState, Resume};
use crate::actors::events::{ChatEvent, Membership, Subscriber};

/// The members of one conversation.
pub(super) struct Members {
    conversation_id: Arc<str>,
    by_id: HashMap<u64, Membership>,
}

impl Members {
    /// No members yet.
    pub(super) fn new(conversation_id: Arc<str>) -> Self {
        Members {
            conversation_id,
            by_id: HashMap::new(),
        }
    }

    /// Whether nobody is watching.
    pub(super) fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Adds `subscriber`, unless it is a member already.
    pub(super) fn add(&mut self, subscriber: Subscriber) {
        let id = subscriber.id();
        self.by_id
            .entry(id)
            .or_insert_with(|| Membership::new(subscriber, self.conversation_id.clone()));
    }

    /// Ends the membership of the connection `id`, if it has one.
    pub(super) fn remove(&mut self, id: u64) {
        if let Some(membership) = self.by_id.remove(&id) {
            membership.end();
        }
    }

    /// Ends every membership: the conversation is gone, or its actor stops.
    pub(super) fn remove_all(&mut self) {
        for (_, membership) in self.by_id.drain() {
            membership.close();
        }
    }

    /// Sends one event, encoded once, to every member; drops members that are gone or too slow.
    pub(super) fn broadcast(&mut self, event: ChatEvent) {
        if self.by_id.is_empty() {
            return;
        }
        let encoded = event.encode();
        let gone: Vec<u64> = self
            .by_id
            .iter()
            .filter(|(_, membership)| membership.subscriber().deliver(&encoded).is_err())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.remove(id);
        }
    }
}

impl ConversationState {
    /// Makes `subscriber` a member after sending it what it missed of the streamed reply in
    /// progress: everything without a resume point, or since `resume` with one.
    pub(super) fn join(&mut self, subscriber: Subscriber, resume: Option<Resume>) {
        if let (Some(reply), Some(conversation)) = (&self.reply, &self.conversation)
            && let Some(message) = conversation.messages.iter().find(|m| reply.is(&m.id))
        {
            for event in reply.missed(&self.key.id, &message.content, resume) {
                let _ = subscriber.deliver(&event.encode());
            }
        }
        self.members.add(subscriber);
    }
}
