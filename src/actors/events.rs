//! What subscribers receive: chat events, encoded once and shared by every connection, and the
//! subscriber handle a conversation actor keeps for each connection that joined it.

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use super::conversation::Resume;
use super::outbox::{self, Outbox, OutboxSender};
use crate::domain::Timestamp;

/// An event the server sends to the members of a conversation (or to one connection).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum ChatEvent {
    /// `stream_start`: a reply has begun.
    #[serde(rename_all = "camelCase")]
    StreamStart {
        message_id: String,
        conversation_id: String,
    },
    /// `stream_chunk`: the reply so far (`content`), the new text (`delta`) and its sequence number.
    #[serde(rename_all = "camelCase")]
    StreamChunk {
        message_id: String,
        conversation_id: String,
        content: String,
        delta: String,
        is_complete: bool,
        seq: u64,
    },
    /// `stream_complete`: the reply is over and stored.
    #[serde(rename_all = "camelCase")]
    StreamComplete {
        message_id: String,
        conversation_id: String,
    },
    /// `stream_heartbeat`: a reply is in progress but the model has been silent for a while.
    #[serde(rename_all = "camelCase")]
    StreamHeartbeat {
        message_id: String,
        conversation_id: String,
    },
    /// `conversation_updated`: the conversation was renamed.
    #[serde(rename_all = "camelCase")]
    ConversationUpdated {
        conversation_id: String,
        title: String,
        updated_at: Timestamp,
    },
    /// `conversation_deleted`: the conversation is gone.
    #[serde(rename_all = "camelCase")]
    ConversationDeleted { conversation_id: String },
    /// `error`, to one connection only.
    Error { message: String, code: &'static str },
}

impl ChatEvent {
    /// Every event's name on the wire.
    const NAMES: [&'static str; 7] = [
        "stream_start",
        "stream_chunk",
        "stream_complete",
        "stream_heartbeat",
        "conversation_updated",
        "conversation_deleted",
        "error",
    ];

    /// The event's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            ChatEvent::StreamStart { .. } => "stream_start",
            ChatEvent::StreamChunk { .. } => "stream_chunk",
            ChatEvent::StreamComplete { .. } => "stream_complete",
            ChatEvent::StreamHeartbeat { .. } => "stream_heartbeat",
            ChatEvent::ConversationUpdated { .. } => "conversation_updated",
            ChatEvent::ConversationDeleted { .. } => "conversation_deleted",
            ChatEvent::Error { .. } => "error",
        }
    }

    /// Encodes the event once, for every transport.
    pub fn encode(&self) -> Arc<EncodedEvent> {
        let data = serde_json::to_string(self).unwrap_or_else(|_| "null".into());
        let frame = format!(r#"{{"event":"{}","data":{}}}"#, self.name(), data).into();
        Arc::new(EncodedEvent {
            name: self.name(),
            data: RawValue::from_string(data).unwrap_or_else(|_| null_value()),
            frame,
            socketio: OnceLock::new(),
            chunk: self.chunk_span(),
        })
    }

    /// Where a chunk's `delta` sits in its reply; none for other events, and for a chunk whose
    /// `delta` does not end its `content`, which therefore never merges.
    fn chunk_span(&self) -> Option<ChunkSpan> {
        match self {
            ChatEvent::StreamChunk {
                message_id,
                content,
                delta,
                ..
            } => ChunkSpan::of(message_id, content, delta),
            _ => None,
        }
    }
}

fn null_value() -> Box<RawValue> {
    RawValue::from_string("null".into()).expect("null is JSON")
}

/// An event serialized once: its name, its payload as JSON, and the `/ws` text frame.
#[derive(Debug)]
pub struct EncodedEvent {
    /// The event's name.
    pub name: &'static str,
    /// The payload, already JSON.
    pub data: Box<RawValue>,
    /// `{"event": name, "data": payload}`, the plain WebSocket frame, shared by every connection.
    pub frame: Utf8Bytes,
    /// `42["name",payload]`, the Socket.IO websocket frame, made at first use and then shared.
    socketio: OnceLock<Utf8Bytes>,
    /// For a `stream_chunk`, where its text sits in the reply, so that waiting chunks can merge.
    chunk: Option<ChunkSpan>,
}

/// Where a chunk's new text sits in its reply: `content[start..end]` is its `delta`.
#[derive(Debug)]
struct ChunkSpan {
    message_id: Box<str>,
    start: usize,
    end: usize,
}

impl ChunkSpan {
    /// The span of a chunk, unless its `delta` does not end its `content` (it never merges).
    fn of(message_id: &str, content: &str, delta: &str) -> Option<ChunkSpan> {
        content.ends_with(delta).then(|| ChunkSpan {
            message_id: message_id.into(),
            start: content.len() - delta.len(),
            end: content.len(),
        })
    }
}

/// The fields of a reply's events that a relay follows it by.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ReplyFields {
    message_id: Option<String>,
    content: Option<String>,
    delta: Option<String>,
}

impl EncodedEvent {
    /// An event as another node encoded it: its `/ws` frame. `None` when the frame is not one
    /// of the server's events.
    pub fn decode(frame: String) -> Option<Arc<EncodedEvent>> {
        #[derive(Deserialize)]
        struct Frame<'a> {
            #[serde(borrow)]
            event: &'a str,
            #[serde(borrow)]
            data: &'a RawValue,
        }
        let parsed: Frame = serde_json::from_str(&frame).ok()?;
        let name = ChatEvent::NAMES.into_iter().find(|n| *n == parsed.event)?;
        let data = parsed.data.to_owned();
        let chunk = if name == "stream_chunk" {
            let fields: ReplyFields = serde_json::from_str(data.get()).ok()?;
            ChunkSpan::of(
                fields.message_id.as_deref()?,
                fields.content.as_deref()?,
                fields.delta.as_deref()?,
            )
        } else {
            None
        };
        Some(Arc::new(EncodedEvent {
            name,
            data,
            frame: frame.into(),
            socketio: OnceLock::new(),
            chunk,
        }))
    }

    /// The event as a Socket.IO websocket frame (an Engine.IO message holding a Socket.IO event
    /// of the main namespace), encoded once for every socket.
    pub fn socketio_frame(&self) -> Utf8Bytes {
        self.socketio
            .get_or_init(|| format!(r#"42["{}",{}]"#, self.name, self.data.get()).into())
            .clone()
    }

    fn reply_fields(&self) -> ReplyFields {
        serde_json::from_str(self.data.get()).unwrap_or_default()
    }

    /// The reply's message id, for the events of a reply.
    pub fn message_id(&self) -> Option<String> {
        self.reply_fields().message_id
    }

    /// A chunk's `content`: its reply's whole text so far.
    pub fn chunk_content(&self) -> Option<String> {
        self.reply_fields().content
    }

    /// Whether `next` is a chunk of the same reply as this chunk, and its text starts where
    /// this one's ends: then one chunk can stand for both.
    pub(super) fn continued_by(&self, next: &EncodedEvent) -> bool {
        match (&self.chunk, &next.chunk) {
            (Some(this), Some(next)) => {
                this.message_id == next.message_id && this.end == next.start
            }
            _ => false,
        }
    }

    /// Whether this is a chunk of the same reply as `other`.
    pub(super) fn same_reply(&self, other: &EncodedEvent) -> bool {
        match (&self.chunk, &other.chunk) {
            (Some(this), Some(other)) => this.message_id == other.message_id,
            _ => false,
        }
    }

    /// Whether this is a `stream_chunk` that may merge with others.
    pub(super) fn is_chunk(&self) -> bool {
        self.chunk.is_some()
    }

    /// For a chunk, where its `delta` starts in its `content`.
    pub(super) fn delta_start(&self) -> Option<usize> {
        self.chunk.as_ref().map(|span| span.start)
    }
}

/// One connection as a conversation actor sees it: where to put its events, and how to tell it
/// that it is too slow and must go.
#[derive(Debug, Clone)]
pub struct Subscriber {
    id: u64,
    outbox: OutboxSender,
    dropped: CancellationToken,
    memberships: mpsc::UnboundedSender<Box<MembershipChange>>,
}

/// Why an event could not be queued for a subscriber.
#[derive(Debug, PartialEq, Eq)]
pub enum Undeliverable {
    /// The connection is gone.
    Closed,
    /// The connection's outbox is full of events that cannot merge: it has stopped reading and
    /// has been told to close.
    TooSlow,
}

/// The connection's side of a [`Subscriber`].
#[derive(Debug)]
pub struct SubscriberInbox {
    /// Events to write to the connection, in order; a reply's chunks merge while it is behind.
    pub events: Outbox,
    /// Cancelled when the connection was too slow and must close.
    pub dropped: CancellationToken,
    /// Memberships that changed without the connection asking.
    pub memberships: MembershipChanges,
}

/// The memberships of a connection that changed without it asking. They are rare, so they travel
/// boxed: a channel allocates a block of slots up front, for every connection, idle or not.
#[derive(Debug)]
pub struct MembershipChanges(mpsc::UnboundedReceiver<Box<MembershipChange>>);

impl MembershipChanges {
    /// The next change, waiting for one.
    pub async fn recv(&mut self) -> Option<MembershipChange> {
        self.0.recv().await.map(|change| *change)
    }

    /// The next change, if one is waiting.
    pub fn try_recv(&mut self) -> Option<MembershipChange> {
        self.0.try_recv().ok().map(|change| *change)
    }
}

impl Subscriber {
    /// A subscriber whose outbox holds `capacity` events, and the connection's side of it.
    pub fn new(id: u64, capacity: usize) -> (Subscriber, SubscriberInbox) {
        let (outbox, events) = outbox::outbox(capacity);
        let (memberships, changes) = mpsc::unbounded_channel();
        let dropped = CancellationToken::new();
        let subscriber = Subscriber {
            id,
            outbox,
            dropped: dropped.clone(),
            memberships,
        };
        let inbox = SubscriberInbox {
            events,
            dropped,
            memberships: MembershipChanges(changes),
        };
        (subscriber, inbox)
    }

    /// The connection's id, unique in the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Queues an event without waiting, merging waiting chunks when the outbox is full; an
    /// outbox full of events that cannot merge drops the connection.
    pub fn deliver(&self, event: &Arc<EncodedEvent>) -> Result<(), Undeliverable> {
        let queued = self.outbox.push(event);
        if queued == Err(Undeliverable::TooSlow) {
            tracing::warn!(connection = self.id, "subscriber too slow, dropping it");
            self.dropped.cancel();
        }
        queued
    }

    /// Whether the connection has gone or been dropped.
    pub fn is_gone(&self) -> bool {
        self.outbox.is_closed() || self.dropped.is_cancelled()
    }
}

/// A membership that changed without the connection asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    /// The conversation's actor failed or moved and lost the member: the connection joins
    /// again, from where it stood in the reply in progress when that is known.
    Lost(String, Option<Resume>),
    /// The conversation ended the membership (it was deleted, or its actor stopped): the
    /// connection forgets it.
    Ended(String),
}

/// A subscriber's place in one conversation. Dropped without [`Membership::end`] or
/// [`Membership::close`] (the actor failed), it tells the connection, which joins again.
#[derive(Debug)]
pub struct Membership {
    subscriber: Subscriber,
    conversation_id: Arc<str>,
    ended: bool,
}

impl Membership {
    /// `subscriber`'s membership of `conversation_id`.
    pub fn new(subscriber: Subscriber, conversation_id: Arc<str>) -> Self {
        Membership {
            subscriber,
            conversation_id,
            ended: false,
        }
    }

    /// The member.
    pub fn subscriber(&self) -> &Subscriber {
        &self.subscriber
    }

    /// Ends the membership as the connection asked (leave, disconnect): it is not told.
    pub fn end(mut self) {
        self.ended = true;
    }

    /// Ends the membership without telling the connection, which is handed to another actor of
    /// the same conversation: its subscriber.
    pub fn end_quietly(mut self) -> Subscriber {
        self.ended = true;
        self.subscriber.clone()
    }

    /// Ends the membership from the conversation's side (delete, stop): the connection is told,
    /// and forgets it.
    pub fn close(self) {
        self.tell(MembershipChange::Ended(self.conversation_id.to_string()));
        self.end();
    }

    fn tell(&self, change: MembershipChange) {
        if !self.subscriber.is_gone() {
            let _ = self.subscriber.memberships.send(Box::new(change));
        }
    }
}

impl Membership {
    /// Loses the member, which stood at `resume` in the reply in progress: the connection joins
    /// again, wherever the conversation runs now.
    pub fn lose(mut self, resume: Option<Resume>) {
        self.tell(MembershipChange::Lost(
            self.conversation_id.to_string(),
            resume,
        ));
        self.ended = true;
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if !self.ended {
            self.tell(MembershipChange::Lost(
                self.conversation_id.to_string(),
                None,
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_payload_matches_the_contract() {
        let event = ChatEvent::StreamChunk {
            message_id: "m".into(),
            conversation_id: "c".into(),
            content: "Hello wor".into(),
            delta: "wor".into(),
            is_complete: false,
            seq: 3,
        }
        .encode();
        let frame: serde_json::Value = serde_json::from_str(event.frame.as_str()).unwrap();
        assert_eq!(frame["event"], "stream_chunk");
        assert_eq!(frame["data"]["messageId"], "m");
        assert_eq!(frame["data"]["content"], "Hello wor");
        assert_eq!(frame["data"]["isComplete"], false);
        assert_eq!(frame["data"]["seq"], 3);
        let data: serde_json::Value = serde_json::from_str(event.data.get()).unwrap();
        assert_eq!(data, frame["data"]);
    }

    #[test]
    fn an_outbox_full_of_events_that_cannot_merge_drops_the_subscriber() {
        let (sub, inbox) = Subscriber::new(1, 1);
        let event = ChatEvent::ConversationDeleted {
            conversation_id: "c".into(),
        }
        .encode();
        assert_eq!(sub.deliver(&event), Ok(()));
        assert_eq!(sub.deliver(&event), Err(Undeliverable::TooSlow));
        assert!(inbox.dropped.is_cancelled());
    }

    #[test]
    fn a_gone_connection_is_undeliverable() {
        let (sub, inbox) = Subscriber::new(1, 4);
        drop(inbox);
        let event = ChatEvent::ConversationDeleted {
            conversation_id: "c".into(),
        }
        .encode();
        assert_eq!(sub.deliver(&event), Err(Undeliverable::Closed));
        assert!(sub.is_gone());
    }

    #[test]
    fn chunks_know_where_their_text_sits() {
        let chunk = |message_id: &str, content: &str, delta: &str| {
            ChatEvent::StreamChunk {
                message_id: message_id.into(),
                conversation_id: "c".into(),
                content: content.into(),
                delta: delta.into(),
                is_complete: false,
                seq: 1,
            }
            .encode()
        };
        let first = chunk("m", "Hello ", "Hello ");
        let next = chunk("m", "Hello wörld", "wörld");
        assert_eq!(next.delta_start(), Some(6));
        assert!(first.continued_by(&next) && first.same_reply(&next));
        assert!(!next.continued_by(&first));
        let other = chunk("n", "Hello wörld", "wörld");
        assert!(!first.continued_by(&other) && !first.same_reply(&other));
        assert!(!chunk("m", "Hello", "other").is_chunk());
        let start = ChatEvent::StreamStart {
            message_id: "m".into(),
            conversation_id: "c".into(),
        }
        .encode();
        assert!(!start.is_chunk() && !start.same_reply(&first));
    }

    #[test]
    fn an_event_encoded_on_another_node_decodes_as_it_was() {
        let chunk = ChatEvent::StreamChunk {
            message_id: "m".into(),
            conversation_id: "c".into(),
            content: "Hello wörld".into(),
            delta: "wörld".into(),
            is_complete: false,
            seq: 2,
        }
        .encode();
        let decoded = EncodedEvent::decode(chunk.frame.to_string()).unwrap();
        assert_eq!(decoded.name, "stream_chunk");
        assert_eq!(decoded.data.get(), chunk.data.get());
        assert_eq!(decoded.frame, chunk.frame);
        assert_eq!(decoded.delta_start(), Some(6));
        assert_eq!(decoded.message_id().as_deref(), Some("m"));
        assert_eq!(decoded.chunk_content().as_deref(), Some("Hello wörld"));
        let start = ChatEvent::StreamStart {
            message_id: "m".into(),
            conversation_id: "c".into(),
        }
        .encode();
        let decoded = EncodedEvent::decode(start.frame.to_string()).unwrap();
        assert!(!decoded.is_chunk() && decoded.message_id().as_deref() == Some("m"));
        for bad in [
            "",
            "{}",
            r#"{"event":"nope","data":{}}"#,
            r#"{"event":"error"}"#,
        ] {
            assert!(EncodedEvent::decode(bad.into()).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_membership_lost_without_ending_tells_the_connection() {
        let (sub, mut inbox) = Subscriber::new(1, 4);
        drop(Membership::new(sub.clone(), "kept".into()));
        Membership::new(sub.clone(), "left".into()).end();
        Membership::new(sub, "deleted".into()).close();
        let lost = MembershipChange::Lost("kept".into(), None);
        assert_eq!(inbox.memberships.try_recv(), Some(lost));
        let ended = MembershipChange::Ended("deleted".into());
        assert_eq!(inbox.memberships.try_recv(), Some(ended));
        assert_eq!(inbox.memberships.try_recv(), None);
    }
}
