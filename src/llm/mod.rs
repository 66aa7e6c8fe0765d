//! Model providers: one trait, the offline demo model and any OpenAI-compatible server.

mod demo;
mod dialect;
mod endpoint;
mod openai;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::Deserialize;

pub use demo::DemoProvider;
pub use openai::OpenAiProvider;

use crate::config::ModelConfig;
use crate::domain::{Message, MessageStatus, Role};

/// What the model is asked: the system prompt, then the conversation's history, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub messages: Vec<PromptMessage>,
}

/// One message of a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptMessage {
    pub role: Role,
    pub content: String,
}

/// A model that failed to answer; the text is for logs only.
#[derive(Debug, Clone, thiserror::Error)]
#[error("model provider failed: {0}")]
pub struct ProviderError(pub String);

/// The tokens a reply took, as the model reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: u64,
    /// Tokens of the reply.
    pub completion_tokens: u64,
    /// Both together.
    pub total_tokens: u64,
}

/// One item of a streamed reply: a piece of its text or, after the last piece, its usage when
/// the model reported it.
#[derive(Debug, Clone, PartialEq)]
pub enum Streamed {
    /// The next piece of the reply's text.
    Text(String),
    /// What the whole reply took; nothing follows it.
    Usage(Usage),
}

impl Streamed {
    /// The piece of text, if this is one.
    pub fn into_text(self) -> Option<String> {
        match self {
            Streamed::Text(text) => Some(text),
            Streamed::Usage(_) => None,
        }
    }
}

/// A streamed reply, in order.
pub type TokenStream = BoxStream<'static, Result<Streamed, ProviderError>>;

/// A reply answered all at once.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The reply's text.
    pub text: String,
    /// The tokens it took, when the model reported them.
    pub usage: Option<Usage>,
}

/// A language model that answers a prompt, streamed piece by piece or all at once.
#[async_trait]
pub trait ModelProvider: Send + Sync {
    /// Starts a streamed reply.
    async fn stream(&self, prompt: Prompt) -> Result<TokenStream, ProviderError>;
    /// Answers with the whole reply at once.
    async fn complete(&self, prompt: Prompt) -> Result<Completion, ProviderError>;
}

/// The provider the configuration asks for: OpenAI-compatible with a key, the demo model without.
/// Fails when the OpenAI-compatible provider cannot be set up (its HTTP client cannot be built).
pub fn from_config(
    config: &ModelConfig,
    timeout: Duration,
) -> Result<Arc<dyn ModelProvider>, ProviderError> {
    Ok(match &config.api_key {
        Some(_) => Arc::new(OpenAiProvider::new(config, timeout)?),
        None => Arc::new(DemoProvider::new(config.demo_token_delay)),
    })
}

impl Prompt {
    /// The system prompt and as much of the history as fits in `max_chars`, dropping the oldest
    /// messages first. The newest message is always kept. Failed and empty replies are left out.
    pub fn build(system_prompt: &str, history: &[Message], max_chars: usize) -> Prompt {
        let mut kept = Vec::new();
        let mut used = 0usize;
        let usable = history.iter().rev().filter(|m| {
            !m.content.is_empty()
                && m.status != Some(MessageStatus::Error)
                && m.role != Role::System
        });
        for message in usable {
            let size = message.content.chars().count();
            if !kept.is_empty() && used + size > max_chars {
                break;
            }
            used += size;
            kept.push(PromptMessage {
                role: message.role,
                content: message.content.clone(),
            });
        }
        kept.push(PromptMessage {
            role: Role::System,
            content: system_prompt.to_owned(),
        });
        kept.reverse();
        Prompt { messages: kept }
    }

    /// The last user message, if any.
    pub fn last_user_message(&self) -> Option<&str> {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| m.content.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, text: &str) -> Message {
        Message::new("c", role, text.into())
    }

    #[test]
    fn prompt_starts_with_the_system_prompt_and_keeps_order() {
        let history = vec![
            msg(Role::User, "one"),
            msg(Role::Assistant, "two"),
            msg(Role::User, "three"),
        ];
        let p = Prompt::build("sys", &history, 1000);
        let texts: Vec<_> = p.messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["sys", "one", "two", "three"]);
        assert_eq!(p.messages[0].role, Role::System);
        assert_eq!(p.last_user_message(), Some("three"));
    }

    #[test]
    fn prompt_drops_oldest_first_but_keeps_the_newest() {
        let history = vec![
            msg(Role::User, "aaaa"),
            msg(Role::Assistant, "bbbb"),
            msg(Role::User, "cccc"),
        ];
        let p = Prompt::build("s", &history, 8);
        let texts: Vec<_> = p.messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["s", "bbbb", "cccc"]);
        let p = Prompt::build("s", &history, 1);
        assert_eq!(p.messages.len(), 2);
        assert_eq!(p.messages[1].content, "cccc");
    }

    #[test]
    fn failed_replies_are_not_sent_back() {
        let mut failed = msg(Role::Assistant, "sorry");
        failed.status = Some(MessageStatus::Error);
        let history = vec![msg(Role::User, "q"), failed, msg(Role::User, "again")];
        let p = Prompt::build("s", &history, 1000);
        assert_eq!(p.messages.len(), 3);
    }
}
