//! The running conversation actors by owner and id, read without going through any mailbox.
//!
//! A conversation has at most one registered actor, and only that actor writes the conversation:
//! an actor registers itself as it starts, before it touches the store, and one that finds
//! another already registered stops without writing anything. An actor leaves the registry when
//! it passivates (only while no request is on its way to it) or fails.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use super::conversation::{ConversationMsg, Request};
use super::mailbox::Mailbox;
use crate::domain::UserId;

/// Which conversation an actor runs: its owner's, under an id unique for that owner.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConversationKey {
    pub owner: UserId,
    pub id: Arc<str>,
}

impl ConversationKey {
    /// The conversation `id` of `owner`.
    pub fn new(owner: &UserId, id: &str) -> Self {
        ConversationKey {
            owner: owner.clone(),
            id: id.into(),
        }
    }
}

/// Running conversation actors by owner and id.
#[derive(Clone, Default)]
pub struct Registry {
    actors: Arc<RwLock<HashMap<ConversationKey, Entry>>>,
}

#[derive(Clone)]
struct Entry {
    actor: Mailbox<ConversationMsg>,
    /// Requests sent to the actor and not yet handled.
    pending: Arc<AtomicUsize>,
}

impl Registry {
    /// Sends a request to the running actor of `key`; gives it back when there is none.
    pub(super) fn send(&self, key: &ConversationKey, request: Request) -> Result<(), Request> {
        let (stale, request) = {
            let actors = self.actors.read().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = actors.get(key) else {
                return Err(request);
            };
            entry.pending.fetch_add(1, Ordering::AcqRel);
            match entry.actor.send(ConversationMsg::Request(request)) {
                Ok(()) => return Ok(()),
                Err(ConversationMsg::Request(request)) => {
                    entry.pending.fetch_sub(1, Ordering::AcqRel);
                    (entry.actor.clone(), request)
                }
                Err(_) => unreachable!("send gives back the message it could not send"),
            }
        };
        self.remove(key, &stale);
        Err(request)
    }

    /// Tells the running actor of `key`, if any, something that is not a client's request.
    pub(super) fn tell(&self, key: &ConversationKey, message: ConversationMsg) {
        let actors = self.actors.read().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = actors.get(key) {
            let _ = entry.actor.send(message);
        }
    }

    /// Whether an actor runs for `key`.
    pub(super) fn contains(&self, key: &ConversationKey) -> bool {
        let actors = self.actors.read().unwrap_or_else(|e| e.into_inner());
        actors.contains_key(key)
    }

    /// Registers `actor` for `key` unless another actor already runs it; false when one does.
    /// `pending` counts the requests on their way to it.
    pub(super) fn register(
        &self,
        key: ConversationKey,
        actor: Mailbox<ConversationMsg>,
        pending: Arc<AtomicUsize>,
    ) -> bool {
        let mut actors = self.actors.write().unwrap_or_else(|e| e.into_inner());
        if actors.contains_key(&key) {
            return false;
        }
        actors.insert(key, Entry { actor, pending });
        true
    }

    /// Forgets a failed actor, whichever conversation it ran.
    pub(super) fn remove_actor(&self, actor: &Mailbox<ConversationMsg>) -> Option<ConversationKey> {
        let mut actors = self.actors.write().unwrap_or_else(|e| e.into_inner());
        let key = actors
            .iter()
            .find(|(_, e)| e.actor.is(actor))
            .map(|(key, _)| key.clone())?;
        actors.remove(&key);
        Some(key)
    }

    /// Forgets `actor` as the actor of `key`, if it still is.
    pub(super) fn remove(&self, key: &ConversationKey, actor: &Mailbox<ConversationMsg>) {
        let mut actors = self.actors.write().unwrap_or_else(|e| e.into_inner());
        if actors.get(key).is_some_and(|e| e.actor.is(actor)) {
            actors.remove(key);
        }
    }

    /// Removes the actor of `key` if no request is on its way to it; true when removed.
    pub(super) fn remove_if_unused(
        &self,
        key: &ConversationKey,
        actor: &Mailbox<ConversationMsg>,
    ) -> bool {
        let mut actors = self.actors.write().unwrap_or_else(|e| e.into_inner());
        let unused = actors
            .get(key)
            .is_some_and(|e| e.actor.is(actor) && e.pending.load(Ordering::Acquire) == 0);
        if unused {
            actors.remove(key);
        }
        unused
    }

    /// Stops every running actor once it has handled the message in hand.
    pub(super) fn stop_all(&self) {
        let actors = self.actors.read().unwrap_or_else(|e| e.into_inner());
        for entry in actors.values() {
            entry.actor.stop();
        }
    }

    /// The keys of every running conversation.
    pub(super) fn keys(&self) -> Vec<ConversationKey> {
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
