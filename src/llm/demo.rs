//! The built-in offline demo model: streams a real reply word by word, no network needed.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use super::{Completion, ModelProvider, Prompt, ProviderError, Streamed, TokenStream};

/// Answers every prompt with an explanation that it is the offline demo and how to configure a
/// real model, streamed a word at a time with a pause between pieces.
#[derive(Debug, Clone)]
pub struct DemoProvider {
    delay: Duration,
}

impl DemoProvider {
    /// A demo model that pauses `delay` between pieces.
    pub fn new(delay: Duration) -> Self {
        DemoProvider { delay }
    }

    fn reply(prompt: &Prompt) -> String {
        let asked = prompt.last_user_message().unwrap_or_default();
        let quoted: String = asked.chars().take(80).collect();
        let ellipsis = if asked.chars().count() > 80 {
            "..."
        } else {
            ""
        };
        let turns = prompt.messages.len().saturating_sub(1);
        format!(
            "Hello! I am the offline demo model of this chat server, so I can't really think about \
             \"{quoted}{ellipsis}\" yet. This conversation has {turns} message(s) so far, and all of \
             them reach the model on every turn. To talk to a real model, set OPENAI_API_KEY, and \
             optionally OPENAI_BASE_URL and OPENAI_MODEL to use any OpenAI-compatible server such \
             as vLLM, llama.cpp or Ollama. Until then, every feature of the server works with me: \
             streaming, several clients watching one conversation, and stored history."
        )
    }
}

/// Splits a text into word pieces, each keeping the whitespace that follows it.
fn pieces(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_space = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            in_space = true;
        } else if in_space {
            out.push(text[start..i].to_owned());
            start = i;
            in_space = false;
        }
    }
    if start < text.len() {
        out.push(text[start..].to_owned());
    }
    out
}

#[async_trait]
impl ModelProvider for DemoProvider {
    async fn stream(&self, prompt: Prompt) -> Result<TokenStream, ProviderError> {
        let delay = self.delay;
        let words = pieces(&Self::reply(&prompt));
        let stream = futures::stream::iter(words).then(move |word| async move {
            tokio::time::sleep(delay).await;
            Ok(Streamed::Text(word))
        });
        Ok(stream.boxed())
    }

    async fn complete(&self, prompt: Prompt) -> Result<Completion, ProviderError> {
        tokio::time::sleep(self.delay).await;
        Ok(Completion {
            text: Self::reply(&prompt),
            usage: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Message, Role};

    #[test]
    fn pieces_rejoin_to_the_text() {
        let text = "Hello  there, world.\nNext line ";
        assert_eq!(pieces(text).concat(), text);
        assert_eq!(pieces("a b"), ["a ", "b"]);
    }

    #[tokio::test]
    async fn streams_the_same_text_it_completes() {
        let demo = DemoProvider::new(Duration::ZERO);
        let prompt = Prompt::build("s", &[Message::new("c", Role::User, "hi".into())], 100);
        let streamed: Vec<String> = demo
            .stream(prompt.clone())
            .await
            .unwrap()
            .map(|p| p.unwrap().into_text().unwrap())
            .collect()
            .await;
        assert!(streamed.len() > 20);
        let whole = demo.complete(prompt).await.unwrap().text;
        assert_eq!(streamed.concat(), whole);
        assert!(whole.contains("OPENAI_API_KEY"));
        assert!(whole.contains("\"hi\""));
    }
}
