//! The connections that joined a conversation on this node, and the fan-out of every event to
//! them, encoded once; for the conversation's owner in a cluster, also to the other nodes that
//! relay it (one publication per event, whatever their members).
//!
//! A connection is a member after a join, or after a `stream_chat` or `regenerate` of its own
//! that started a reply; a refused request never makes one. Members leave when they ask, when the
//! conversation is deleted, or when a delivery finds them gone or too slow.

use std::collections::HashMap;
use std::sync::Arc;

use super::conversation::Resume;
use super::events::{ChatEvent, EncodedEvent, Membership, Subscriber};
use crate::cluster::Publication;

/// The members of one conversation.
pub struct Members {
    conversation_id: Arc<str>,
    by_id: HashMap<u64, Membership>,
    /// The owner's publication to the relaying nodes, in a cluster.
    publication: Option<Publication>,
}

impl Members {
    /// No members yet; `publication` carries the events to other nodes, in a cluster.
    pub fn new(conversation_id: Arc<str>, publication: Option<Publication>) -> Self {
        Members {
            conversation_id,
            by_id: HashMap::new(),
            publication,
        }
    }

    /// Whether nobody is watching, here or on another node.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty() && self.publication.as_ref().is_none_or(|p| p.is_unrelayed())
    }

    /// Whether nobody on this node is watching.
    pub fn is_empty_here(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The publication to other nodes, in a cluster.
    pub fn publication(&mut self) -> Option<&mut Publication> {
        self.publication.as_mut()
    }

    /// Adds `subscriber`, unless it is a member already.
    pub fn add(&mut self, subscriber: Subscriber) {
        let id = subscriber.id();
        self.by_id
            .entry(id)
            .or_insert_with(|| Membership::new(subscriber, self.conversation_id.clone()));
    }

    /// Ends the membership of the connection `id`, if it has one.
    pub fn remove(&mut self, id: u64) {
        if let Some(membership) = self.by_id.remove(&id) {
            membership.end();
        }
    }

    /// Ends every membership: the conversation is gone, or its actor stops; the connections
    /// forget it, and relaying nodes are not told to look for another owner.
    pub fn remove_all(&mut self) {
        for (_, membership) in self.by_id.drain() {
            membership.close();
        }
        if let Some(publication) = &mut self.publication {
            publication.end();
        }
    }

    /// Loses every member, which stood at `resume` in the reply in progress: the connections
    /// join again, finding the conversation wherever it runs now.
    pub fn lose_all(&mut self, resume: Option<Resume>) {
        for (_, membership) in self.by_id.drain() {
            membership.lose(resume.clone());
        }
    }

    /// Every member's connection, leaving the conversation without being told: they are handed
    /// to another actor.
    pub fn take_all(&mut self) -> Vec<Subscriber> {
        self.by_id
            .drain()
            .map(|(_, membership)| membership.end_quietly())
            .collect()
    }

    /// Sends one event, encoded once, to every member and relaying node.
    pub fn broadcast(&mut self, event: ChatEvent) {
        if self.is_empty() {
            return;
        }
        self.deliver(&event.encode());
    }

    /// Sends one encoded event to every member and relaying node; drops members that are gone
    /// or too slow.
    pub fn deliver(&mut self, encoded: &Arc<EncodedEvent>) {
        if let Some(publication) = &mut self.publication {
            publication.publish(encoded);
        }
        let gone: Vec<u64> = self
            .by_id
            .iter()
            .filter(|(_, membership)| membership.subscriber().deliver(encoded).is_err())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.remove(id);
        }
    }
}
