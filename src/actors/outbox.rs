//! A connection's outbox: the events waiting to be written to it, in order and bounded.
//!
//! A client that keeps up never sees the outbox fill. One that falls behind needs the latest text
//! of a reply, not every step of it: when its outbox is full, each run of waiting chunks of one
//! reply merges into a single chunk (the first one's starting point, the last one's `content`,
//! `seq` and `isComplete`, and the joined `delta`). Merging is a matter of pointers while the
//! conversation delivers; the merged chunk is encoded once, by the connection, when it takes it.
//! Only chunks merge, only with chunks of the same reply with nothing but other replies' chunks
//! between them, and nothing is reordered within a conversation or dropped; an outbox full of
//! events that cannot merge means the client has stopped reading.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};

use serde::Deserialize;

use super::events::{ChatEvent, EncodedEvent, Undeliverable};

/// Slots an empty outbox keeps; it gives back the memory of a larger backlog once drained.
const KEPT_SLOTS: usize = 64;

/// An outbox for `capacity` events: the conversations' side and the connection's side.
pub fn outbox(capacity: usize) -> (OutboxSender, Outbox) {
    let shared = Arc::new(Shared(Mutex::new(Queue::new(capacity))));
    (OutboxSender(shared.clone()), Outbox(shared))
}

/// The side conversations deliver to.
#[derive(Debug, Clone)]
pub struct OutboxSender(Arc<Shared>);

/// The connection's side: the events to write, in order. Dropping it closes the outbox.
#[derive(Debug)]
pub struct Outbox(Arc<Shared>);

#[derive(Debug)]
struct Shared(Mutex<Queue>);

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl OutboxSender {
    /// Queues an event, merging waiting chunks when the outbox is full, and wakes the connection.
    pub fn push(&self, event: &Arc<EncodedEvent>) -> Result<(), Undeliverable> {
        let reader = {
            let mut queue = self.0.queue();
            queue.push(event)?;
            queue.reader.take()
        };
        if let Some(reader) = reader {
            reader.wake();
        }
        Ok(())
    }

    /// Whether the connection's side is gone.
    pub fn is_closed(&self) -> bool {
        self.0.queue().closed
    }
}

impl Outbox {
    /// The next event, waiting for one; cancelled, it takes none.
    pub fn recv(&mut self) -> impl Future<Output = Arc<EncodedEvent>> + '_ {
        poll_fn(|context| {
            let mut queue = self.0.queue();
            if let Some(waiting) = queue.pop() {
                drop(queue);
                return Poll::Ready(waiting.into_event());
            }
            if !queue
                .reader
                .as_ref()
                .is_some_and(|r| r.will_wake(context.waker()))
            {
                queue.reader = Some(context.waker().clone());
            }
            Poll::Pending
        })
    }

    /// The next event, if one is waiting.
    pub fn try_recv(&mut self) -> Option<Arc<EncodedEvent>> {
        let waiting = self.0.queue().pop()?;
        Some(waiting.into_event())
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let mut queue = self.0.queue();
        queue.closed = true;
        queue.waiting = VecDeque::new();
        queue.reader = None;
    }
}

/// The waiting events, the rules for merging them, and the connection to wake for them.
#[derive(Debug)]
struct Queue {
    waiting: VecDeque<Waiting>,
    capacity: usize,
    closed: bool,
    reader: Option<Waker>,
}

/// A waiting event. Once later chunks have merged into it, `event` is the latest of them and
/// `from` is where the first one's text started.
#[derive(Debug)]
struct Waiting {
    event: Arc<EncodedEvent>,
    from: Option<usize>,
}

impl Queue {
    fn new(capacity: usize) -> Self {
        Queue {
            waiting: VecDeque::new(),
            capacity,
            closed: false,
            reader: None,
        }
    }

    /// Appends an event; when that goes over capacity, merges the waiting chunks, and if none
    /// could merge, takes the event back: the client is too slow.
    fn push(&mut self, event: &Arc<EncodedEvent>) -> Result<(), Undeliverable> {
        if self.closed {
            return Err(Undeliverable::Closed);
        }
        self.waiting.push_back(Waiting {
            event: event.clone(),
            from: None,
        });
        if self.waiting.len() > self.capacity {
            self.merge_chunks();
            if self.waiting.len() > self.capacity {
                self.waiting.pop_back();
                return Err(Undeliverable::TooSlow);
            }
        }
        Ok(())
    }

    /// Merges every chunk into the latest waiting chunk of its reply before it, when its text
    /// continues that one's and only other replies' chunks wait between them.
    fn merge_chunks(&mut self) {
        let mut kept = 0;
        // The kept chunks since the last event that is not a chunk.
        let mut open: Vec<usize> = Vec::new();
        for i in 0..self.waiting.len() {
            let event = &self.waiting[i].event;
            let into = open
                .iter()
                .rev()
                .copied()
                .find(|&slot| self.waiting[slot].event.same_reply(event))
                .filter(|&slot| self.waiting[slot].event.continued_by(event));
            if let Some(slot) = into {
                let event = event.clone();
                self.waiting[slot].absorb(event);
                continue;
            }
            if event.is_chunk() {
                open.push(kept);
            } else {
                open.clear();
            }
            self.waiting.swap(kept, i);
            kept += 1;
        }
        self.waiting.truncate(kept);
    }

    /// Takes the oldest waiting event.
    fn pop(&mut self) -> Option<Waiting> {
        let waiting = self.waiting.pop_front();
        if self.waiting.is_empty() && self.waiting.capacity() > KEPT_SLOTS {
            self.waiting = VecDeque::new();
        }
        waiting
    }
}

impl Waiting {
    /// Takes in a later chunk of the same reply whose text continues this one's.
    fn absorb(&mut self, later: Arc<EncodedEvent>) {
        self.from = self.from.or(self.event.delta_start());
        self.event = later;
    }

    /// The event to write: as it came, or the merged chunk, encoded now.
    fn into_event(self) -> Arc<EncodedEvent> {
        match self.from {
            Some(from) if Some(from) != self.event.delta_start() => {
                merged(&self.event, from).unwrap_or(self.event)
            }
            _ => self.event,
        }
    }
}

/// The parts of a `stream_chunk` payload a merged chunk keeps from the latest chunk.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LatestChunk {
    message_id: String,
    conversation_id: String,
    content: String,
    is_complete: bool,
    seq: u64,
}

/// The latest chunk with the text since `from` as its `delta`.
fn merged(latest: &EncodedEvent, from: usize) -> Option<Arc<EncodedEvent>> {
    let chunk: LatestChunk = serde_json::from_str(latest.data.get()).ok()?;
    let delta = chunk.content.get(from..)?.to_owned();
    let event = ChatEvent::StreamChunk {
        message_id: chunk.message_id,
        conversation_id: chunk.conversation_id,
        content: chunk.content,
        delta,
        is_complete: chunk.is_complete,
        seq: chunk.seq,
    };
    Some(event.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunks of a reply made of `pieces`, numbered from 1.
    fn reply(message_id: &str, pieces: &[&str]) -> Vec<Arc<EncodedEvent>> {
        let mut content = String::new();
        pieces
            .iter()
            .enumerate()
            .map(|(i, piece)| {
                content.push_str(piece);
                ChatEvent::StreamChunk {
                    message_id: message_id.into(),
                    conversation_id: "c".into(),
                    content: content.clone(),
                    delta: (*piece).into(),
                    is_complete: i == pieces.len() - 1,
                    seq: i as u64 + 1,
                }
                .encode()
            })
            .collect()
    }

    fn complete(message_id: &str) -> Arc<EncodedEvent> {
        ChatEvent::StreamComplete {
            message_id: message_id.into(),
            conversation_id: "c".into(),
        }
        .encode()
    }

    /// Everything waiting, as the connection would write it: (name, payload).
    fn drain(outbox: &mut Outbox) -> Vec<(&'static str, serde_json::Value)> {
        std::iter::from_fn(|| outbox.try_recv())
            .map(|event| (event.name, serde_json::from_str(event.data.get()).unwrap()))
            .collect()
    }

    #[test]
    fn events_pass_unchanged_while_there_is_room() {
        let (sender, mut outbox) = super::outbox(8);
        let chunks = reply("m", &["a", "b", "c"]);
        for chunk in &chunks {
            sender.push(chunk).unwrap();
        }
        for chunk in &chunks {
            assert!(Arc::ptr_eq(&outbox.try_recv().unwrap(), chunk));
        }
        assert!(outbox.try_recv().is_none());
    }

    #[test]
    fn a_full_outbox_merges_a_replys_chunks_into_the_latest_text() {
        let (sender, mut outbox) = super::outbox(3);
        for chunk in reply("m", &["Hel", "lo ", "wö", "rld", "!"]) {
            sender.push(&chunk).unwrap();
        }
        sender.push(&complete("m")).unwrap();
        let events = drain(&mut outbox);
        let names: Vec<_> = events.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["stream_chunk", "stream_chunk", "stream_complete"]);
        let deltas: String = events[..2]
            .iter()
            .map(|(_, chunk)| chunk["delta"].as_str().unwrap())
            .collect();
        assert_eq!(deltas, "Hello wörld!");
        let last = &events[1].1;
        assert_eq!(last["content"], "Hello wörld!");
        assert_eq!(last["seq"], 5);
        assert_eq!(last["isComplete"], true);
        assert_eq!(last["messageId"], "m");
        assert_eq!(last["conversationId"], "c");
        assert!(events[0].1["seq"].as_u64() < last["seq"].as_u64());
    }

    #[test]
    fn a_one_slot_outbox_keeps_only_the_latest_text() {
        let (sender, mut outbox) = super::outbox(1);
        for chunk in reply("m", &["a", "b", "c"]) {
            sender.push(&chunk).unwrap();
        }
        let events = drain(&mut outbox);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].1["delta"], "abc");
        assert_eq!(events[0].1["content"], "abc");
        assert_eq!(events[0].1["seq"], 3);
    }

    #[test]
    fn chunks_never_merge_across_other_events() {
        let (sender, mut outbox) = super::outbox(3);
        let first = reply("m", &["a", "b"]);
        let second = reply("n", &["x", "y"]);
        sender.push(&first[0]).unwrap();
        sender.push(&first[1]).unwrap();
        sender.push(&complete("m")).unwrap();
        sender.push(&second[0]).unwrap();
        sender.push(&second[1]).unwrap();
        let events = drain(&mut outbox);
        let summary: Vec<_> = events
            .iter()
            .map(|(name, data)| (*name, data["delta"].as_str().unwrap_or("").to_owned()))
            .collect();
        assert_eq!(
            summary,
            [
                ("stream_chunk", "ab".into()),
                ("stream_complete", String::new()),
                ("stream_chunk", "xy".into()),
            ]
        );
    }

    #[test]
    fn interleaved_replies_merge_each_into_its_own() {
        let (sender, mut outbox) = super::outbox(2);
        let m = reply("m", &["a", "b", "c"]);
        let n = reply("n", &["x", "y", "z"]);
        for (a, b) in m.iter().zip(&n) {
            sender.push(a).unwrap();
            sender.push(b).unwrap();
        }
        let events = drain(&mut outbox);
        let summary: Vec<_> = events
            .iter()
            .map(|(_, data)| (data["messageId"].clone(), data["delta"].clone()))
            .collect();
        assert_eq!(
            summary,
            [
                (serde_json::json!("m"), serde_json::json!("abc")),
                (serde_json::json!("n"), serde_json::json!("xyz")),
            ]
        );
    }

    #[test]
    fn chunks_whose_text_does_not_continue_stay_apart() {
        let (sender, _outbox) = super::outbox(1);
        let chunks = reply("m", &["a", "b"]);
        sender.push(&chunks[1]).unwrap();
        assert_eq!(sender.push(&chunks[0]), Err(Undeliverable::TooSlow));
    }

    #[test]
    fn an_outbox_full_of_other_events_refuses_more() {
        let (sender, mut outbox) = super::outbox(2);
        sender.push(&complete("m")).unwrap();
        sender.push(&complete("n")).unwrap();
        assert_eq!(sender.push(&complete("o")), Err(Undeliverable::TooSlow));
        let events = drain(&mut outbox);
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].1["messageId"], "n");
    }

    #[test]
    fn a_closed_outbox_takes_nothing() {
        let (sender, outbox) = super::outbox(2);
        assert!(!sender.is_closed());
        drop(outbox);
        assert!(sender.is_closed());
        assert_eq!(sender.push(&complete("m")), Err(Undeliverable::Closed));
    }

    #[tokio::test]
    async fn recv_waits_for_an_event() {
        let (sender, mut outbox) = super::outbox(2);
        let event = complete("m");
        let waiting = tokio::spawn(async move { outbox.recv().await });
        tokio::task::yield_now().await;
        sender.push(&event).unwrap();
        assert!(Arc::ptr_eq(&waiting.await.unwrap(), &event));
    }
}
