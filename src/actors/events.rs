//! What subscribers receive: chat events, encoded once and shared by every connection, and the
//! subscriber handle a conversation actor keeps for each connection that joined it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

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
        })
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
}

/// One connection as a conversation actor sees it: where to put its events, and how to tell it
/// that it is too slow and must go.
#[derive(Debug, Clone)]
pub struct Subscriber {
    id: u64,
    queue: mpsc::Sender<Arc<EncodedEvent>>,
    dropped: CancellationToken,
    lost: mpsc::UnboundedSender<String>,
}

/// Why an event could not be queued for a subscriber.
#[derive(Debug, PartialEq, Eq)]
pub enum Undeliverable {
    /// The connection is gone.
    Closed,
    /// The connection's queue is full: it is not reading fast enough and has been told to close.
    TooSlow,
}

/// The connection's side of a [`Subscriber`].
#[derive(Debug)]
pub struct SubscriberInbox {
    /// Events to write to the connection, in order.
    pub events: mpsc::Receiver<Arc<EncodedEvent>>,
    /// Cancelled when the connection was too slow and must close.
    pub dropped: CancellationToken,
    /// Conversations whose actor lost this subscriber without it asking (the actor failed).
    pub lost: mpsc::UnboundedReceiver<String>,
}

impl Subscriber {
    /// A subscriber with room for `capacity` queued events, and the connection's side of it.
    pub fn new(id: u64, capacity: usize) -> (Subscriber, SubscriberInbox) {
        let (queue, events) = mpsc::channel(capacity);
        let (lost, lost_rx) = mpsc::unbounded_channel();
        let dropped = CancellationToken::new();
        let subscriber = Subscriber {
            id,
            queue,
            dropped: dropped.clone(),
            lost,
        };
        let inbox = SubscriberInbox {
            events,
            dropped,
            lost: lost_rx,
        };
        (subscriber, inbox)
    }

    /// The connection's id, unique in the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Queues an event without waiting; a full queue drops the connection.
    pub fn deliver(&self, event: &Arc<EncodedEvent>) -> Result<(), Undeliverable> {
        match self.queue.try_send(event.clone()) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Undeliverable::Closed),
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(connection = self.id, "subscriber too slow, dropping it");
                self.dropped.cancel();
                Err(Undeliverable::TooSlow)
            }
        }
    }

    /// Whether the connection has gone or been dropped.
    pub fn is_gone(&self) -> bool {
        self.queue.is_closed() || self.dropped.is_cancelled()
    }
}

/// A subscriber's place in one conversation. Dropped without [`Membership::end`] (the actor
/// failed), it tells the connection, which joins again.
#[derive(Debug)]
pub struct Membership {
    subscriber: Subscriber,
    conversation_id: Arc<str>,
    ended: AtomicBool,
}

impl Membership {
    /// `subscriber`'s membership of `conversation_id`.
    pub fn new(subscriber: Subscriber, conversation_id: Arc<str>) -> Self {
        Membership {
            subscriber,
            conversation_id,
            ended: AtomicBool::new(false),
        }
    }

    /// The member.
    pub fn subscriber(&self) -> &Subscriber {
        &self.subscriber
    }

    /// Ends the membership on purpose (leave, disconnect, delete): the connection is not told.
    pub fn end(self) {
        self.ended.store(true, Ordering::Relaxed);
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if !self.ended.load(Ordering::Relaxed) && !self.subscriber.is_gone() {
            let _ = self.subscriber.lost.send(self.conversation_id.to_string());
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
    fn a_full_queue_drops_the_subscriber() {
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
    fn a_membership_lost_without_ending_tells_the_connection() {
        let (sub, mut inbox) = Subscriber::new(1, 4);
        drop(Membership::new(sub.clone(), "kept".into()));
        Membership::new(sub, "left".into()).end();
        assert_eq!(inbox.lost.try_recv().unwrap(), "kept");
        assert!(inbox.lost.try_recv().is_err());
    }
}
