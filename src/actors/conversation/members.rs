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
    content: String,
    /// What the ending added to the text its members saw.
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
            .iter_mut()
            .rev()
            .find(|m| m.status == Some(MessageStatus::Streaming))
        else {
            return Ok(None);
        };
        let mut ended = message.clone();
        let tail = if ended.content.is_empty() {
            APOLOGY.to_owned()
        } else {
            format!("\n\n{APOLOGY}")
        };
        ended.content.push_str(&tail);
        ended.status = Some(MessageStatus::Error);
        store
            .save_message(writer, &ended, conversation.updated_at)
            .await?;
        let orphan = Orphan {
            message_id: ended.id.clone(),
            content: ended.content.clone(),
            tail,
        };
        *message = ended;
        Ok(Some(orphan))
    }

    /// The end of the reply, for a member that saw it up to `seen`.
    fn ending(&self, conversation_id: &str, seen: u64) -> Vec<ChatEvent> {
        vec![
            ChatEvent::StreamChunk {
                message_id: self.message_id.clone(),
                conversation_id: conversation_id.to_owned(),
                content: self.content.clone(),
                delta: self.tail.clone(),
                is_complete: true,
                seq: seen + 1,
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

    /// What a connection that saw up to `resume` missed: of the streamed reply in progress
    /// (everything, without a resume point), or the end of a reply an earlier owner left.
    fn missed(&self, resume: Option<&Resume>) -> Vec<ChatEvent> {
        if let (Some(orphan), Some(resume)) = (&self.orphan, resume)
            && orphan.message_id == resume.message_id
        {
            return orphan.ending(&self.key.id, resume.seq);
        }
        match self.streamed_so_far() {
            Some((progress, content)) => progress.missed(&self.key.id, content, resume),
            None => Vec::new(),
        }
    }

    /// Makes `subscriber` a member after sending it what it missed.
    pub(super) fn join(&mut self, subscriber: Subscriber, resume: Option<Resume>) {
        for event in self.missed(resume.as_ref()) {
            let _ = subscriber.deliver(&event.encode());
        }
        self.members.add(subscriber);
    }

    /// Adds `node` to the nodes relaying the conversation: where its events stand, the reply in
    /// progress, and what a member of that node that saw up to `resume` missed.
    pub(super) fn relayed_by(
        &mut self,
        node: NodeId,
        resume: Option<&Resume>,
    ) -> Result<Relayed, ChatError> {
        let missed = self
            .missed(resume)
            .iter()
            .map(|event| event.encode().frame.to_string())
            .collect();
        let reply = self
            .streamed_so_far()
            .map(|(progress, content)| (progress.clone(), content.to_owned()));
        let publication = self
            .members
            .publication()
            .ok_or_else(|| ChatError::Failed("relayed outside a cluster".into()))?;
        publication.add(node);
        let (epoch, seq) = publication.position();
        Ok(Relayed {
            epoch,
            seq,
            reply,
            missed,
        })
    }
}
