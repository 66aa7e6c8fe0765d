//! What a connection joining a conversation late missed, and what a node that starts relaying it
//! needs; and the end of a reply that an earlier owner left unfinished.

use super::reply::APOLOGY;
use super::{ConversationState, Resume};
use crate::actors::events::{ChatEvent, Subscriber};
use crate::cluster::{NodeId, Relayed};
use crate::domain::{Conversation, MessageStatus};
use crate::error::ChatError;
use crate::store::{ConversationStore, Writer};

/// A reply an earlier owner left streaming (it died, or lost the conversation), which this actor
/// ended as failed: its text so far and the apology.
pub(super) struct Orphan {
    message_id: String,
    /// The reply's text before the apology: as stored, or as a relay's members saw more of it.
    text: String,
    /// The apology, as it follows the text.
    tail: String,
}

impl Orphan {
    /// Ends as failed the reply `conversation` has left streaming, if any, in the store (as
    /// `writer`) and in the loaded copy.
    pub(super) async fn end(
        store: &dyn ConversationStore,
        writer: &Writer,
        conversation: &mut Conversation,
    ) -> Result<Option<Orphan>, ChatError> {
        let Some(message) = conversation
            .messages
            .iter()
            .rev()
            .find(|m| m.status == Some(MessageStatus::Streaming))
        else {
            return Ok(None);
        };
        let orphan = Orphan {
            message_id: message.id.clone(),
            tail: if message.content.is_empty() {
                APOLOGY.to_owned()
            } else {
                format!("\n\n{APOLOGY}")
            },
            text: message.content.clone(),
        };
        orphan.store(store, writer, conversation).await?;
        Ok(Some(orphan))
    }

    /// Takes `seen`, the text members saw of the reply, when it is more than the text kept: an
    /// owner that died had not stored all it sent.
    async fn adopt(
        &mut self,
        seen: &str,
        store: &dyn ConversationStore,
        writer: &Writer,
        conversation: &mut Conversation,
    ) -> Result<(), ChatError> {
        if seen.len() <= self.text.len() || !seen.starts_with(&self.text) {
            return Ok(());
        }
        let text = std::mem::replace(&mut self.text, seen.to_owned());
        if self.tail == APOLOGY {
            self.tail = format!("\n\n{APOLOGY}");
        }
        let stored = self.store(store, writer, conversation).await;
        if stored.is_err() {
            self.text = text;
        }
        stored
    }

    /// The reply's whole text.
    fn content(&self) -> String {
        format!("{}{}", self.text, self.tail)
    }

    /// Stores the reply ended with its text and the apology, and puts it in `conversation`.
    async fn store(
        &self,
        store: &dyn ConversationStore,
        writer: &Writer,
        conversation: &mut Conversation,
    ) -> Result<(), ChatError> {
        let Some(message) = conversation
            .messages
            .iter_mut()
            .find(|m| m.id == self.message_id)
        else {
            return Ok(());
        };
        let mut ended = message.clone();
        ended.content = self.content();
        ended.status = Some(MessageStatus::Error);
        store
            .save_message(writer, &ended, conversation.updated_at)
            .await?;
        *message = ended;
        Ok(())
    }

    /// The end of the reply, for a member that saw it up to `seen_seq`, and `seen` of its text
    /// when known.
    fn ending(&self, conversation_id: &str, seen_seq: u64, seen: Option<&str>) -> Vec<ChatEvent> {
        let content = self.content();
        let delta = seen
            .and_then(|seen| content.strip_prefix(seen))
            .unwrap_or(&self.tail)
            .to_owned();
        vec![
            ChatEvent::StreamChunk {
                message_id: self.message_id.clone(),
                conversation_id: conversation_id.to_owned(),
                content,
                delta,
                is_complete: true,
                seq: seen_seq + 1,
            },
            ChatEvent::StreamComplete {
                message_id: self.message_id.clone(),
                conversation_id: conversation_id.to_owned(),
            },
        ]
    }
}

impl ConversationState {
    /// Where the members stand in the streamed reply in progress: its last chunk.
    pub(super) fn position(&self) -> Option<Resume> {
        let progress = self.reply.as_ref()?.progress()?;
        Some(Resume {
            message_id: progress.message_id().to_owned(),
            seq: progress.seq(),
        })
    }

    /// The streamed reply in progress, with its text so far.
    fn streamed_so_far(&self) -> Option<(&crate::actors::progress::Progress, &str)> {
        let progress = self.reply.as_ref()?.progress()?;
        let message = self
            .conversation
            .as_ref()?
            .messages
            .iter()
            .rev()
            .find(|m| m.id == progress.message_id())?;
        Some((progress, &message.content))
    }

    /// What a connection that saw up to `resume` (and `seen` of its text) missed: of the
    /// streamed reply in progress (everything, without a resume point), or the end of a reply
    /// an earlier owner left.
    fn missed(&self, resume: Option<&Resume>, seen: Option<&str>) -> Vec<ChatEvent> {
        if let (Some(orphan), Some(resume)) = (&self.orphan, resume)
            && orphan.message_id == resume.message_id
        {
            return orphan.ending(&self.key.id, resume.seq, seen);
        }
        match self.streamed_so_far() {
            Some((progress, content)) => progress.missed(&self.key.id, content, resume),
            None => Vec::new(),
        }
    }

    /// Makes `subscriber` a member after sending it what it missed.
    pub(super) fn join(&mut self, subscriber: Subscriber, resume: Option<Resume>) {
        for event in self.missed(resume.as_ref(), None) {
            let _ = subscriber.deliver(&event.encode());
        }
        self.members.add(subscriber);
    }

    /// A relay's members come: `node` relays the conversation from now on (`None`: this node's
    /// relay hands its members over). What the relay needs to start, and what its members, who
    /// saw up to `resume` and `seen` of its text, missed; text they saw of a reply an earlier
    /// owner left unfinished, beyond what it had stored, is kept.
    pub(super) async fn relayed_by(
        &mut self,
        node: Option<NodeId>,
        resume: Option<&Resume>,
        seen: Option<String>,
    ) -> Result<Relayed, ChatError> {
        if let (Some(orphan), Some(resume), Some(seen), Some(conversation)) = (
            self.orphan.as_mut(),
            resume,
            seen.as_deref(),
            self.conversation.as_mut(),
        ) && orphan.message_id == resume.message_id
        {
            let store = self.ctx.store.clone();
            orphan
                .adopt(seen, &*store, &self.writer, conversation.edit())
                .await?;
        }
        let missed = self
            .missed(resume, seen.as_deref())
            .iter()
            .map(|event| event.encode().frame.to_string())
            .collect();
        let reply = self
            .streamed_so_far()
            .map(|(progress, content)| (progress.clone(), content.to_owned()));
        let publication = self.members.publication();
        let (epoch, seq) = match (publication, node) {
            (Some(publication), Some(node)) => {
                publication.add(node);
                publication.position()
            }
            (Some(publication), None) => publication.position(),
            (None, _) => (0, 0),
        };
        Ok(Relayed {
            epoch,
            seq,
            reply,
            missed,
        })
    }
}
