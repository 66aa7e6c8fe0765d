//! How far a streamed reply has gone, and what a connection that joins it late, or comes back
//! after losing some of it, missed. The conversation's actor keeps one for its reply in progress;
//! on a node relaying a conversation owned elsewhere, the relay keeps its own from the events.

use serde::{Deserialize, Serialize};

use super::conversation::Resume;
use super::events::ChatEvent;

/// A streamed reply's message and where each of its chunks ended in its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    message_id: String,
    /// Byte length of the text after each chunk: `offsets[seq]`.
    offsets: Vec<usize>,
}

impl Progress {
    /// A reply stored as `message_id` that has sent nothing yet.
    pub fn new(message_id: String) -> Self {
        Progress {
            message_id,
            offsets: vec![0],
        }
    }

    /// The reply's message id.
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// The sequence number of the last chunk sent.
    pub fn seq(&self) -> u64 {
        (self.offsets.len() - 1) as u64
    }

    /// Counts a chunk after which the text is `length` bytes long; its sequence number.
    pub fn advance(&mut self, length: usize) -> u64 {
        self.offsets.push(length);
        self.seq()
    }

    /// Where a connection that saw up to `resume` stands: the sequence number of the last chunk
    /// of this reply it saw, if it saw this reply at all.
    fn seen(&self, resume: Option<&Resume>) -> Option<u64> {
        resume
            .filter(|r| r.message_id == self.message_id)
            .map(|r| r.seq.min(self.seq()))
    }

    /// What a connection joining now missed of this reply, whose text so far is `content`:
    /// `stream_start` unless it resumes this reply, then one chunk with all the text it has not
    /// seen.
    pub fn missed(
        &self,
        conversation_id: &str,
        content: &str,
        resume: Option<&Resume>,
    ) -> Vec<ChatEvent> {
        let seen = self.seen(resume);
        let mut events = Vec::new();
        if seen.is_none() {
            events.push(ChatEvent::StreamStart {
                message_id: self.message_id.clone(),
                conversation_id: conversation_id.to_owned(),
            });
        }
        let from = self
            .offsets
            .get(seen.unwrap_or(0) as usize)
            .copied()
            .unwrap_or(0);
        if let Some(delta) = content.get(from..).filter(|d| !d.is_empty()) {
            events.push(ChatEvent::StreamChunk {
                message_id: self.message_id.clone(),
                conversation_id: conversation_id.to_owned(),
                content: content.to_owned(),
                delta: delta.to_owned(),
                is_complete: false,
                seq: self.seq(),
            });
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress() -> Progress {
        let mut progress = Progress::new("m".into());
        progress.advance("Hel".len());
        progress.advance("Hello wö".len());
        progress
    }

    fn summary(events: Vec<ChatEvent>) -> Vec<(&'static str, String)> {
        events
            .into_iter()
            .map(|event| {
                let delta = match &event {
                    ChatEvent::StreamChunk { delta, seq, .. } => format!("{delta}@{seq}"),
                    _ => String::new(),
                };
                (event.name(), delta)
            })
            .collect()
    }

    #[test]
    fn a_late_joiner_gets_the_start_and_all_the_text() {
        let missed = progress().missed("c", "Hello wö", None);
        assert_eq!(
            summary(missed),
            [
                ("stream_start", String::new()),
                ("stream_chunk", "Hello wö@2".into())
            ]
        );
    }

    #[test]
    fn a_returning_connection_gets_only_what_it_has_not_seen() {
        let resume = |message_id: &str, seq| Resume {
            message_id: message_id.into(),
            seq,
        };
        let p = progress();
        assert_eq!(
            summary(p.missed("c", "Hello wö", Some(&resume("m", 1)))),
            [("stream_chunk", "lo wö@2".into())]
        );
        assert!(p.missed("c", "Hello wö", Some(&resume("m", 2))).is_empty());
        assert!(p.missed("c", "Hello wö", Some(&resume("m", 99))).is_empty());
        assert_eq!(p.missed("c", "Hello wö", Some(&resume("n", 1))).len(), 2);
    }
}
