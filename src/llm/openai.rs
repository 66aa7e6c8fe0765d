//! OpenAI's chat-completions API through `async-openai`, or any server that speaks it.

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    CreateChatCompletionRequest,
};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use super::{ModelProvider, Prompt, ProviderError, TokenStream};
use crate::config::ModelConfig;
use crate::domain::Role;

/// A provider for OpenAI, vLLM, llama.cpp server, Ollama or any other OpenAI-compatible endpoint.
#[derive(Clone)]
pub struct OpenAiProvider {
    client: Client<OpenAIConfig>,
    model: String,
    temperature: f32,
    max_tokens: u32,
}

impl OpenAiProvider {
    /// A provider for the key, base URL and model of `config`; no read from the model waits
    /// longer than `timeout`, so an abandoned request cannot linger.
    pub fn new(config: &ModelConfig, timeout: Duration) -> Self {
        let mut openai =
            OpenAIConfig::new().with_api_key(config.api_key.clone().unwrap_or_default());
        if let Some(base) = &config.base_url {
            openai = openai.with_api_base(base.trim_end_matches('/'));
        }
        OpenAiProvider {
            client: Client::with_config(openai).with_http_client(http_client(timeout)),
            model: config.model.clone(),
            temperature: config.temperature,
            max_tokens: config.max_tokens,
        }
    }

    fn request(&self, prompt: Prompt) -> CreateChatCompletionRequest {
        let messages = prompt
            .messages
            .into_iter()
            .map(|m| match m.role {
                Role::System => ChatCompletionRequestSystemMessage::from(m.content).into(),
                Role::User => ChatCompletionRequestUserMessage::from(m.content).into(),
                Role::Assistant => ChatCompletionRequestAssistantMessage::from(m.content).into(),
            })
            .collect::<Vec<ChatCompletionRequestMessage>>();
        #[allow(deprecated)]
        CreateChatCompletionRequest {
            model: self.model.clone(),
            messages,
            temperature: Some(self.temperature),
            max_tokens: Some(self.max_tokens),
            ..Default::default()
        }
    }
}

fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .read_timeout(timeout)
        .connect_timeout(timeout)
        .build()
        .unwrap_or_default()
}

fn upstream(e: OpenAIError) -> ProviderError {
    ProviderError(e.to_string())
}

#[async_trait]
impl ModelProvider for OpenAiProvider {
    async fn stream(&self, prompt: Prompt) -> Result<TokenStream, ProviderError> {
        let stream = self
            .client
            .chat()
            .create_stream(self.request(prompt))
            .await
            .map_err(upstream)?;
        let pieces = stream.filter_map(|chunk| async move {
            match chunk {
                Ok(chunk) => chunk
                    .choices
                    .into_iter()
                    .next()
                    .and_then(|choice| choice.delta.content)
                    .filter(|text| !text.is_empty())
                    .map(Ok),
                Err(e) => Some(Err(upstream(e))),
            }
        });
        Ok(pieces.boxed())
    }

    async fn complete(&self, prompt: Prompt) -> Result<String, ProviderError> {
        let response = self
            .client
            .chat()
            .create(self.request(prompt))
            .await
            .map_err(upstream)?;
        response
            .choices
            .into_iter()
            .next()
            .and_then(|choice| choice.message.content)
            .ok_or_else(|| ProviderError("the model returned no content".into()))
    }
}
