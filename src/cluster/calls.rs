//! Requests for a conversation owned by another node: sent to that node's inbox channel, carried
//! out there by its own actor, and answered on the asking node's inbox. A node that is not
//! listening (dead, or cut off from Redis) is known at once, since nobody receives the call; an
//! owner that dies while a call waits is noticed at the next heartbeat.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::NodeId;
use crate::actors::progress::Progress;
use crate::actors::{Activation, ChatCompleted, Resume, StreamStarted};
use crate::domain::Conversation;
use crate::error::ChatError;

/// What one node asks of a conversation another node owns.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Call {
    /// The conversation as it is now.
    Snapshot,
    /// The asking node relays the conversation from now on; what it needs to start, and what a
    /// member that saw up to `resume` missed. `seen` is the text its members saw of that reply,
    /// which may be more than an owner that died had stored.
    Relay {
        resume: Option<Resume>,
        seen: Option<String>,
    },
    /// The asking node relays it no more.
    Unrelay,
    /// A user message, its reply streamed to the members.
    StreamChat { content: String },
    /// A user message, its reply answered whole.
    Chat { content: String, create: bool },
    /// Stop the reply in progress.
    Stop,
    /// Replace the last reply.
    Regenerate,
    /// Change the title.
    Rename { title: String },
    /// Delete the conversation.
    Delete,
    /// The events published after `after` in `epoch`.
    Since { epoch: u64, after: u64 },
}

/// What a call is answered with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Answer {
    Conversation(Box<Conversation>),
    Done,
    Started(StreamStarted),
    Completed(Box<ChatCompleted>),
    Relayed(Box<Relayed>),
    /// The events asked for, as published; `None` when they are not all kept any more.
    Events(Option<Vec<String>>),
}

/// What a node that starts relaying a conversation needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Relayed {
    /// The owner's epoch, and the number of the last event it published.
    pub epoch: u64,
    pub seq: u64,
    /// The streamed reply in progress, and its text so far.
    pub reply: Option<(Progress, String)>,
    /// What a member that saw up to the call's `resume` missed, as `/ws` frames.
    pub missed: Vec<String>,
}

/// Why the owner did not carry a call out.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Refusal {
    /// Another node owns the conversation now.
    Elsewhere(String),
    /// The conversation refused, in the domain's words.
    Chat(ChatError),
}

/// Why a call failed, as the asking node sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum CallFailure {
    /// Another node owns the conversation now: ask it.
    Elsewhere(NodeId),
    /// The owner cannot be reached (dead, or Redis is away); the text is for logs.
    Unreachable(String),
    /// The conversation refused.
    Chat(ChatError),
}

impl From<Refusal> for CallFailure {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Elsewhere(node) => CallFailure::Elsewhere(node.into()),
            Refusal::Chat(error) => CallFailure::Chat(error),
        }
    }
}

/// A message on a node's inbox channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Envelope {
    /// The node that sent it.
    pub from: String,
    /// The call's number at the calling node.
    pub id: u64,
    pub body: Body,
}

/// A call, or the answer to one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) enum Body {
    Call {
        owner: String,
        conversation: String,
        activation: Activation,
        call: Call,
    },
    Answer(Result<Answer, Refusal>),
}

/// The calls this node is waiting on.
#[derive(Default)]
pub(super) struct Waiting {
    next: AtomicU64,
    calls: Mutex<HashMap<u64, oneshot::Sender<Result<Answer, Refusal>>>>,
}

/// A call waited on; forgotten when dropped, whether answered or not.
pub(super) struct Pending<'a> {
    waiting: &'a Waiting,
    pub id: u64,
    pub answer: oneshot::Receiver<Result<Answer, Refusal>>,
}

impl Waiting {
    /// Numbers a new call and waits for its answer.
    pub(super) fn start(&self) -> Pending<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (sender, answer) = oneshot::channel();
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, sender);
        Pending {
            waiting: self,
            id,
            answer,
        }
    }

    /// Hands an answer to the call waiting for it, if it still waits.
    pub(super) fn answered(&self, id: u64, answer: Result<Answer, Refusal>) {
        let waiter = self
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(answer);
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.waiting
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// How long a call may wait for its answer: a reply answered whole waits for the model.
pub(super) fn patience(call: &Call, upstream: Duration) -> Duration {
    const CALL_TIMEOUT: Duration = Duration::from_secs(10);
    match call {
        Call::Chat { .. } => upstream + CALL_TIMEOUT,
        _ => CALL_TIMEOUT,
    }
}
