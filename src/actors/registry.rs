//! The running conversation actors by id, read without going through any mailbox.
//!
//! A conversation has at most one registered actor, and only that actor writes the conversation:
//! an actor registers itself as it starts, before it touches the store, and one that finds
//! another already registered stops without writing anything. An actor leaves the registry when
//! it passivates (only while no request is on its way to it) or fails.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use ractor::{ActorId, ActorRef};

use super::conversation::{ConversationMsg, Request};

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
    pub(super) fn send(&self, id: &str, request: Request) -> Result<(), Request> {
        let (stale, request) = {
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
        self.remove(id, stale);
        Err(request)
    }

    /// Whether an actor runs for `id`.
    pub(super) fn contains(&self, id: &str) -> bool {
        let actors = self.actors.read().unwrap_or_else(|e| e.into_inner());
        actors.contains_key(id)
    }

    /// Registers `actor` for `id` unless another actor already runs it; false when one does.
    /// `pending` counts the requests on their way to it.
    pub(super) fn register(
        &self,
        id: Arc<str>,
        actor: ActorRef<ConversationMsg>,
        pending: Arc<AtomicUsize>,
    ) -> bool {
        let mut actors = self.actors.write().unwrap_or_else(|e| e.into_inner());
        if actors.contains_key(&id) {
            return false;
        }
        actors.insert(id, Entry { actor, pending });
        true
    }

    /// Forgets a failed actor, whichever conversation it ran.
    pub(super) fn remove_actor(&self, actor: ActorId) -> Option<Arc<str>> {
        let mut actors = self.actors.write().unwrap_or_else(|e| e.into_inner());
        let id = actors
            .iter()
            .find(|(_, e)| e.actor.get_id() == actor)
            .map(|(id, _)| id.clone())?;
        actors.remove(&id);
        Some(id)
    }

    /// Forgets `actor` as the actor of `id`, if it still is.
    pub(super) fn remove(&self, id: &str, actor: ActorId) {
        let mut actors = self.actors.write().unwrap_or_else(|e| e.into_inner());
        if actors.get(id).is_some_and(|e| e.actor.get_id() == actor) {
            actors.remove(id);
        }
    }

    /// Removes the actor of `id` if no request is on its way to it; true when removed.
    pub(super) fn remove_if_unused(&self, id: &str, actor: ActorId) -> bool {
        let mut actors = self.actors.write().unwrap_or_else(|e| e.into_inner());
        let unused = actors
            .get(id)
            .is_some_and(|e| e.actor.get_id() == actor && e.pending.load(Ordering::Acquire) == 0);
        if unused {
            actors.remove(id);
        }
        unused
    }

    /// The ids of every running conversation.
    pub(super) fn ids(&self) -> Vec<Arc<str>> {
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
