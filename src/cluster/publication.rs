//! An owner's events for the other nodes. While another node relays a conversation, each of its
//! events is published once on the conversation's channel (not once per member), numbered in
//! order within the owner's epoch (its claim's fencing token), so that a relay sees a gap and
//! fetches what it missed from [`Publication::since`]. When the owner stops without the
//! conversation ending, the relays are told, so that they find it a new owner.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use super::{Cluster, NodeId};
use crate::actors::EncodedEvent;

/// Published events kept for relays that missed some, at most.
const HISTORY_EVENTS: usize = 1024;
/// And at most this many bytes of them (a chunk holds its reply's whole text so far).
const HISTORY_BYTES: usize = 4 << 20;

/// What a relay hears on a conversation's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published<'a> {
    /// Event number `seq` of `epoch`, as its `/ws` frame.
    Event {
        epoch: u64,
        seq: u64,
        frame: &'a str,
    },
    /// The owner of `epoch` stopped without the conversation ending.
    Lost { epoch: u64 },
}

impl<'a> Published<'a> {
    /// Reads a message of a conversation's channel.
    pub fn parse(payload: &'a str) -> Option<Self> {
        let (epoch, rest) = payload.split_once(' ')?;
        let epoch = epoch.parse().ok()?;
        if rest == "lost" {
            return Some(Published::Lost { epoch });
        }
        let (seq, frame) = rest.split_once(' ')?;
        Some(Published::Event {
            epoch,
            seq: seq.parse().ok()?,
            frame,
        })
    }

    fn event(epoch: u64, seq: u64, frame: &str) -> String {
        format!("{epoch} {seq} {frame}")
    }

    fn lost(epoch: u64) -> String {
        format!("{epoch} lost")
    }
}

/// The events an owner publishes, and the nodes relaying them.
pub struct Publication {
    cluster: Arc<Cluster>,
    channel: Arc<str>,
    epoch: u64,
    seq: u64,
    relays: BTreeSet<NodeId>,
    history: VecDeque<(u64, Arc<str>)>,
    history_bytes: usize,
}

impl Publication {
    pub(super) fn new(cluster: Arc<Cluster>, channel: String, epoch: u64) -> Self {
        Publication {
            cluster,
            channel: channel.into(),
            epoch,
            seq: 0,
            relays: BTreeSet::new(),
            history: VecDeque::new(),
            history_bytes: 0,
        }
    }

    /// The owner's epoch and the number of the last event published.
    pub fn position(&self) -> (u64, u64) {
        (self.epoch, self.seq)
    }

    /// Whether no other node relays the conversation.
    pub fn is_unrelayed(&self) -> bool {
        self.relays.is_empty()
    }

    /// `node` relays the conversation from now on.
    pub fn add(&mut self, node: NodeId) {
        self.relays.insert(node);
    }

    /// `node` relays it no more.
    pub fn remove(&mut self, node: &str) {
        self.relays.remove(node);
        if self.relays.is_empty() {
            self.history.clear();
            self.history_bytes = 0;
        }
    }

    /// Forgets the relaying nodes that are no longer alive.
    pub fn forget_dead_relays(&mut self) {
        let dead: Vec<NodeId> = self
            .relays
            .iter()
            .filter(|node| !self.cluster.nodes.is_live(node))
            .cloned()
            .collect();
        for node in dead {
            self.remove(&node);
        }
    }

    /// Publishes one event for the relaying nodes, if any.
    pub fn publish(&mut self, event: &EncodedEvent) {
        if self.relays.is_empty() {
            return;
        }
        self.seq += 1;
        let payload: Arc<str> = Published::event(self.epoch, self.seq, &event.frame).into();
        self.history_bytes += payload.len();
        self.history.push_back((self.seq, payload.clone()));
        while self.history.len() > HISTORY_EVENTS || self.history_bytes > HISTORY_BYTES {
            if let Some((_, dropped)) = self.history.pop_front() {
                self.history_bytes -= dropped.len();
            }
        }
        self.cluster.metrics.event_published();
        self.cluster
            .bus
            .publish(self.channel.clone(), payload.to_string());
    }

    /// The events published after `after` in `epoch`, as published; `None` when they are not
    /// all kept any more (or the epoch is another).
    pub fn since(&self, epoch: u64, after: u64) -> Option<Vec<String>> {
        if epoch != self.epoch || after > self.seq {
            return None;
        }
        let first = self.history.front().map_or(self.seq + 1, |(seq, _)| *seq);
        if after + 1 < first {
            return None;
        }
        Some(
            self.history
                .iter()
                .filter(|(seq, _)| *seq > after)
                .map(|(_, payload)| payload.to_string())
                .collect(),
        )
    }

    /// Ends the publication because the conversation is gone: the relays learn it from its last
    /// event, and are not told to look for a new owner.
    pub fn end(&mut self) {
        self.relays.clear();
        self.history.clear();
    }
}

impl Drop for Publication {
    /// The owner stops while nodes still relay the conversation: they find it a new owner.
    fn drop(&mut self) {
        if !self.relays.is_empty() {
            self.cluster
                .bus
                .publish(self.channel.clone(), Published::lost(self.epoch));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_messages_read_back() {
        let event = Published::event(7, 42, r#"{"event":"x","data":{"a":"b c"}}"#);
        assert_eq!(
            Published::parse(&event),
            Some(Published::Event {
                epoch: 7,
                seq: 42,
                frame: r#"{"event":"x","data":{"a":"b c"}}"#
            })
        );
        assert_eq!(
            Published::parse(&Published::lost(7)),
            Some(Published::Lost { epoch: 7 })
        );
        for bad in ["", "7", "x 1 {}", "7 x {}", "7 1"] {
            assert_eq!(Published::parse(bad), None, "{bad}");
        }
    }
}
