//! The reply in progress: the text the model has sent so far, fanned out chunk by chunk and
//! checkpointed now and then, and the one way a reply ends.
//!
//! Every ending (the model finished or failed, a client stopped it, the server is stopping, the
//! conversation was deleted) goes through [`ConversationState::end_reply`]: the model's task is
//! aborted, the reply is stored with its final status, the REST caller waiting for it is
//! answered, the members are told, and only then does it count as finished. The bookkeeping that
//! must never be missed (abort the task, count the reply finished, release shutdown) is done by
//! dropping the reply, so no early return and no failing actor can skip it.

use std::sync::Arc;

use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::generation::GenerationEvent;
use super::{Answer, ChatCompleted, ConversationContext, ConversationState, Snapshot};
use crate::actors::events::ChatEvent;
use crate::actors::progress::Progress;
use crate::domain::{Message, MessageStatus, MessageUsage, Role, Timestamp};
use crate::error::ChatError;
use crate::llm::Usage;
use crate::metrics::Metrics;

/// Roughly how many characters make a token, for replies whose model reported no usage.
const CHARS_PER_TOKEN: usize = 4;

/// The tokens `chars` characters of text are estimated to take.
fn estimated_tokens(chars: usize) -> u64 {
    chars.div_ceil(CHARS_PER_TOKEN) as u64
}

/// The text of a reply whose model failed, as the original server sent it.
pub const APOLOGY: &str =
    "I apologize, but I encountered an error while processing your request. Please try again.";

/// The reply in progress.
pub(super) struct Reply {
    /// Which generation task's news belongs to this reply.
    pub(super) generation: u64,
    message_id: String,
    /// The REST caller waiting for a reply generated in one piece; `None` when streamed.
    waiter: Option<Answer<ChatCompleted>>,
    /// How far the streamed reply has gone.
    progress: Progress,
    last_checkpoint: Instant,
    /// What the model said the reply cost, once it has said.
    reported: Option<Usage>,
    in_progress: InProgress,
}

/// What a reply holds while it is in progress, given back when the reply is dropped however it
/// ends: the model's task is aborted, and the reply stops counting in the metrics and in the
/// replies shutdown waits for.
struct InProgress {
    task: AbortHandle,
    metrics: Arc<Metrics>,
    _tracked: TaskTrackerToken,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.task.abort();
        self.metrics.reply_finished();
    }
}

/// How a reply ends.
pub(super) enum Ending {
    /// The model finished; a reply generated in one piece comes with its whole text.
    Completed(String),
    /// The model failed, timed out or broke off.
    Failed,
    /// A client stopped it.
    Stopped,
    /// The server is stopping.
    Interrupted,
    /// The conversation was deleted: nothing is left to store.
    Deleted,
    /// Another node owns the conversation now: nothing may be stored, nobody here is told.
    Lost,
}

impl Reply {
    /// Reply `generation`, stored as `message_id`, that `task` is generating; `waiter` is the REST
    /// caller of a reply generated in one piece.
    pub(super) fn start(
        ctx: &ConversationContext,
        generation: u64,
        message_id: String,
        task: AbortHandle,
        waiter: Option<Answer<ChatCompleted>>,
    ) -> Reply {
        ctx.metrics.reply_started();
        Reply {
            generation,
            progress: Progress::new(message_id.clone()),
            message_id,
            waiter,
            last_checkpoint: Instant::now(),
            reported: None,
            in_progress: InProgress {
                task,
                metrics: ctx.metrics.clone(),
                _tracked: ctx.replies.token(),
            },
        }
    }

    /// How far the reply has gone, if it is streamed: a reply generated in one piece is shown
    /// only once complete.
    pub(super) fn progress(&self) -> Option<&Progress> {
        self.waiter.is_none().then_some(&self.progress)
    }
}

impl ConversationState {
    /// Handles news from the task generating reply `generation`; news of an ended reply is
    /// ignored.
    pub(super) async fn handle_generated(&mut self, generation: u64, event: GenerationEvent) {
        let Some(reply) = self.reply.as_ref().filter(|r| r.generation == generation) else {
            return;
        };
        match event {
            GenerationEvent::Piece(text) => self.append(text).await,
            GenerationEvent::Silent => {
                let event = ChatEvent::StreamHeartbeat {
                    message_id: reply.message_id.clone(),
                    conversation_id: self.key.id.to_string(),
                };
                self.members.broadcast(event);
            }
            GenerationEvent::Finished(Ok(usage)) => {
                self.note_usage(usage);
                self.end_reply(Ending::Completed(String::new())).await
            }
            GenerationEvent::Whole(Ok(completion)) => {
                self.note_usage(completion.usage);
                self.end_reply(Ending::Completed(completion.text)).await
            }
            GenerationEvent::Finished(Err(e)) | GenerationEvent::Whole(Err(e)) => {
                tracing::warn!(conversation = %self.key.id, error = %e, "reply failed");
                self.end_reply(Ending::Failed).await
            }
        }
    }

    /// Keeps what the model said the reply in progress cost.
    fn note_usage(&mut self, usage: Option<Usage>) {
        if let Some(reply) = self.reply.as_mut() {
            reply.reported = usage;
        }
    }

    /// What reply `message_id`, whose text is `text`, cost: as the model reported, or else
    /// estimated from the characters of its prompt (the system prompt and the messages before
    /// it, as far as the context goes) and of its text.
    fn usage_of(&self, reported: Option<Usage>, message_id: &str, text: &str) -> MessageUsage {
        if let Some(usage) = reported {
            return MessageUsage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
            };
        }
        let history: usize = self
            .conversation
            .iter()
            .flat_map(|c| c.messages.iter())
            .take_while(|m| m.id != message_id)
            .map(|m| m.content.chars().count())
            .sum();
        let settings = &self.ctx.settings;
        let prompt =
            settings.system_prompt.chars().count() + history.min(settings.context_max_chars);
        MessageUsage {
            prompt_tokens: estimated_tokens(prompt),
            completion_tokens: estimated_tokens(text.chars().count()),
        }
    }

    /// Adds a reply's tokens to what its owner used today. It borrows nothing, so that it goes
    /// to the store together with the reply's own write, and the two are committed at once.
    fn record_usage(&self, usage: MessageUsage) -> impl Future<Output = ()> + use<> {
        let day = Timestamp::now().utc_day();
        let (store, owner, id) = (
            self.ctx.store.clone(),
            self.key.owner.clone(),
            self.key.id.clone(),
        );
        async move {
            if let Err(e) = store.add_usage(&owner, &day, usage.total()).await {
                tracing::error!(conversation = %id, error = %e, "could not count a reply's tokens");
            }
        }
    }

    /// Appends new text to the streaming reply, fans it out, and checkpoints it now and then.
    async fn append(&mut self, text: String) {
        let (Some(reply), Some(conversation)) = (
            self.reply.as_mut(),
            self.conversation.as_mut().map(Snapshot::edit),
        ) else {
            return;
        };
        let Some(message) = conversation
            .messages
            .iter_mut()
            .rev()
            .find(|m| m.id == reply.message_id)
        else {
            return;
        };
        message.content.push_str(&text);
        let content = message.content.clone();
        let seq = reply.progress.advance(content.len());
        let checkpoint = reply.last_checkpoint.elapsed() >= self.ctx.settings.checkpoint_interval;
        if checkpoint {
            reply.last_checkpoint = Instant::now();
        }
        let message_id = reply.message_id.clone();
        self.ctx.metrics.tokens_streamed(1);
        self.members.broadcast(ChatEvent::StreamChunk {
            message_id: message_id.clone(),
            conversation_id: self.key.id.to_string(),
            content,
            delta: text,
            is_complete: false,
            seq,
        });
        if checkpoint {
            self.save_streamed(&message_id).await;
        }
    }

    /// The streamed reply stored as `message_id`, in the conversation.
    fn streamed_message(&mut self, message_id: &str) -> Option<&mut Message> {
        self.conversation
            .as_mut()
            .map(Snapshot::edit)?
            .messages
            .iter_mut()
            .rev()
            .find(|m| m.id == message_id)
    }

    /// Saves the streamed reply `message_id` as it is now, and moves `updatedAt` with it.
    async fn save_streamed(&mut self, message_id: &str) {
        let store = self.ctx.store.clone();
        let now = Timestamp::now();
        let Some(message) = self.streamed_message(message_id).cloned() else {
            return;
        };
        if let Some(conversation) = self.conversation.as_mut().map(Snapshot::edit) {
            conversation.updated_at = now;
        }
        if let Err(e) = store.save_message(&self.writer, &message, now).await {
            self.note(&e.clone().into());
            tracing::error!(conversation = %self.key.id, error = %e, "could not save reply");
        }
    }

    /// Ends the reply in progress, if any; the one way every reply ends (see the module).
    pub(super) async fn end_reply(&mut self, ending: Ending) {
        let Some(mut reply) = self.reply.take() else {
            return;
        };
        reply.in_progress.task.abort();
        match reply.waiter.take() {
            Some(waiter) => {
                let outcome = self.end_whole(&reply, ending).await;
                self.answer(waiter, outcome);
            }
            None => self.end_streamed(&mut reply, ending).await,
        }
        // Stored and told: now it counts as finished.
        drop(reply);
    }

    /// Stores a streamed reply with its final status and sends the members its last chunk and
    /// `stream_complete`.
    async fn end_streamed(&mut self, reply: &mut Reply, ending: Ending) {
        let status = match ending {
            Ending::Completed(_) => MessageStatus::Complete,
            Ending::Failed | Ending::Interrupted => MessageStatus::Error,
            Ending::Stopped => MessageStatus::Cancelled,
            Ending::Deleted | Ending::Lost => return,
        };
        let complete = ChatEvent::StreamComplete {
            message_id: reply.message_id.clone(),
            conversation_id: self.key.id.to_string(),
        };
        let Some(message) = self.streamed_message(&reply.message_id) else {
            tracing::warn!(conversation = %self.key.id, "a streamed reply's message was gone at its end");
            self.members.broadcast(complete);
            return;
        };
        let tail = match ending {
            Ending::Failed if message.content.is_empty() => APOLOGY.to_owned(),
            Ending::Failed => format!("\n\n{APOLOGY}"),
            _ => String::new(),
        };
        let text = message.content.clone();
        message.content.push_str(&tail);
        message.status = Some(status);
        let content = message.content.clone();
        let usage = self.usage_of(reply.reported, &reply.message_id, &text);
        if let Some(message) = self.streamed_message(&reply.message_id) {
            message.usage = Some(usage);
        }
        let counted = self.record_usage(usage);
        futures::join!(self.save_streamed(&reply.message_id), counted);
        let seq = reply.progress.advance(content.len());
        self.members.broadcast(ChatEvent::StreamChunk {
            message_id: reply.message_id.clone(),
            conversation_id: self.key.id.to_string(),
            content,
            delta: tail,
            is_complete: true,
            seq,
        });
        self.members.broadcast(complete);
    }

    /// The answer to the REST caller of a reply generated in one piece: the stored reply when
    /// the model finished or a client stopped it, an error otherwise (nothing is stored).
    async fn end_whole(
        &mut self,
        reply: &Reply,
        ending: Ending,
    ) -> Result<ChatCompleted, ChatError> {
        let (text, status) = match ending {
            Ending::Completed(text) => (text, MessageStatus::Complete),
            Ending::Stopped => (String::new(), MessageStatus::Cancelled),
            Ending::Failed | Ending::Interrupted => return Err(ChatError::Upstream),
            Ending::Deleted => return Err(ChatError::NotFound),
            Ending::Lost => {
                return Err(ChatError::Unavailable(
                    "the conversation moved to another node".into(),
                ));
            }
        };
        let usage = self.usage_of(reply.reported, &reply.message_id, &text);
        // The tokens were spent whether or not the reply could be stored.
        let counted = self.record_usage(usage);
        let stored = self.store_whole(&reply.message_id, text, status, usage);
        futures::join!(stored, counted).0
    }

    /// Stores a reply generated in one piece and shows it to the members as a one-chunk stream.
    async fn store_whole(
        &mut self,
        message_id: &str,
        text: String,
        status: MessageStatus,
        usage: MessageUsage,
    ) -> Result<ChatCompleted, ChatError> {
        let store = self.ctx.store.clone();
        let writer = self.writer.clone();
        let conversation = self.existing()?;
        let mut message = Message::new(&conversation.id, Role::Assistant, text);
        message.id = message_id.to_owned();
        message.status = Some(status);
        message.usage = Some(usage);
        store
            .save_message(&writer, &message, message.timestamp)
            .await?;
        conversation.updated_at = message.timestamp;
        conversation.messages.push(message.clone());
        let snapshot = conversation.clone();
        let conversation_id = self.key.id.to_string();
        self.members.broadcast(ChatEvent::StreamStart {
            message_id: message.id.clone(),
            conversation_id: conversation_id.clone(),
        });
        self.members.broadcast(ChatEvent::StreamChunk {
            message_id: message.id.clone(),
            conversation_id: conversation_id.clone(),
            content: message.content.clone(),
            delta: message.content.clone(),
            is_complete: true,
            seq: 1,
        });
        self.members.broadcast(ChatEvent::StreamComplete {
            message_id: message.id.clone(),
            conversation_id,
        });
        Ok(ChatCompleted {
            message,
            conversation: snapshot,
        })
    }
}
