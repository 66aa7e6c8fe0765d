//! OpenAI's chat-completions API, or any server that speaks it.
//!
//! Requests use async-openai's types, sent through our own [`Endpoint`]; answers are read with
//! lenient types of our own, so a server that leaves out `id`, `object`, `created` or `model`,
//! or adds fields of its own, is understood. What a model refuses (the token cap's
//! field, a temperature, usage in streams) is learned from its first refusal: the request is
//! sent again without it, and so are all later ones.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionStreamOptions, CreateChatCompletionRequest,
};
use async_trait::async_trait;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::Value;

use super::dialect::{CapField, Dialect, refused_parameter};
use super::endpoint::{CallError, Endpoint};
use super::{Completion, ModelProvider, Prompt, ProviderError, Streamed, TokenStream, Usage};
use crate::config::ModelConfig;
use crate::domain::Role;

/// A provider for OpenAI, vLLM, llama.cpp server, Ollama or any other OpenAI-compatible endpoint.
pub struct OpenAiProvider {
    endpoint: Endpoint,
    model: String,
    temperature: Option<f32>,
    max_tokens: Option<u32>,
    /// What the model takes, as learned so far.
    dialect: Mutex<Dialect>,
}

impl OpenAiProvider {
    /// A provider for the key, base URL and model of `config`; no read from the model waits
    /// longer than `timeout`, so an abandoned request cannot linger. Fails when the HTTP client
    /// cannot be built (for instance when the system has no CA certificates).
    pub fn new(config: &ModelConfig, timeout: Duration) -> Result<Self, ProviderError> {
        let key = config.api_key.as_deref().unwrap_or_default();
        let endpoint =
            Endpoint::new(config.base_url.as_deref(), key, timeout).map_err(ProviderError)?;
        Ok(OpenAiProvider {
            endpoint,
            model: config.model.clone(),
            temperature: config.temperature,
            max_tokens: config.max_tokens,
            dialect: Mutex::new(Dialect::guess(config.base_url.as_deref(), &config.model)),
        })
    }

    fn request(&self, prompt: Prompt, stream: bool) -> CreateChatCompletionRequest {
        let messages = prompt
            .messages
            .into_iter()
            .map(|m| match m.role {
                Role::System => ChatCompletionRequestSystemMessage::from(m.content).into(),
                Role::User => ChatCompletionRequestUserMessage::from(m.content).into(),
                Role::Assistant => ChatCompletionRequestAssistantMessage::from(m.content).into(),
            })
            .collect::<Vec<ChatCompletionRequestMessage>>();
        CreateChatCompletionRequest {
            model: self.model.clone(),
            messages,
            stream: stream.then_some(true),
            ..Default::default()
        }
    }

    /// Sets the optional parameters of `request` as `dialect` says.
    fn shape(&self, request: &mut CreateChatCompletionRequest, dialect: Dialect) {
        let cap_in = |field| self.max_tokens.filter(|_| dialect.cap_field == field);
        #[allow(deprecated)]
        {
            request.max_tokens = cap_in(CapField::MaxTokens);
        }
        request.max_completion_tokens = cap_in(CapField::MaxCompletionTokens);
        request.temperature = self.temperature.filter(|_| dialect.temperature);
        request.stream_options =
            (request.stream == Some(true) && dialect.stream_usage).then(|| {
                ChatCompletionStreamOptions {
                    include_usage: Some(true),
                    ..Default::default()
                }
            });
    }

    /// Sends `request` through `call` (which hands it back with the answer); when the model
    /// refuses one of the optional parameters, sends it again without that one (at most once
    /// per parameter) and remembers the lesson.
    async fn send<T, F, Fut>(
        &self,
        mut request: CreateChatCompletionRequest,
        call: F,
    ) -> Result<T, ProviderError>
    where
        F: Fn(CreateChatCompletionRequest) -> Fut,
        Fut: Future<Output = (CreateChatCompletionRequest, Result<T, CallError>)>,
    {
        let mut dialect = *self.dialect.lock().unwrap_or_else(|e| e.into_inner());
        let mut adjusted = Vec::new();
        loop {
            self.shape(&mut request, dialect);
            let (sent, answer) = call(request).await;
            let error = match answer {
                Ok(answer) => return Ok(answer),
                Err(error) => error,
            };
            request = sent;
            let Some(parameter) = refused(&error).filter(|p| !adjusted.contains(p)) else {
                return Err(upstream(&error));
            };
            let Some(next) = dialect.without(parameter) else {
                return Err(upstream(&error));
            };
            tracing::warn!(
                model = %self.model,
                parameter,
                "the model refuses a request parameter; this and later requests do without it"
            );
            {
                let mut learned = self.dialect.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(better) = learned.without(parameter) {
                    *learned = better;
                }
            }
            adjusted.push(parameter);
            dialect = next;
        }
    }
}

fn upstream(e: &CallError) -> ProviderError {
    ProviderError(e.to_string())
}

/// The optional parameter a failed request was refused for, if that is why it failed.
fn refused(error: &CallError) -> Option<&'static str> {
    match error {
        CallError::Answered { status, error } => refused_parameter(
            status.as_u16(),
            error.param.as_deref(),
            error.code().as_deref(),
            error.message.as_deref().unwrap_or_default(),
        ),
        CallError::Exchange(_) => None,
    }
}

/// A whole answer or one stream chunk, reduced to what is read; anything else may be missing.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Answer {
    choices: Vec<Choice>,
    usage: Option<Usage>,
    /// An error reported in place of an answer, as some servers do midway through a stream.
    error: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Choice {
    /// A stream chunk's new text.
    delta: Option<Content>,
    /// A whole answer's text.
    message: Option<Content>,
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Content {
    content: Option<String>,
}

impl Answer {
    /// The first choice's text, if it has any; fails when the answer is an error.
    fn text(self, model: &str) -> Result<Option<String>, ProviderError> {
        if let Some(error) = self.error {
            return Err(ProviderError(format!(
                "the model reported an error: {error}"
            )));
        }
        let Some(choice) = self.choices.into_iter().next() else {
            return Ok(None);
        };
        if let Some(reason @ ("length" | "content_filter")) = choice.finish_reason.as_deref() {
            tracing::warn!(model, reason, "the model cut its reply short");
        }
        Ok(choice
            .delta
            .or(choice.message)
            .and_then(|c| c.content)
            .filter(|text| !text.is_empty()))
    }
}

/// The pieces of a stream of chunks, then the last usage any chunk reported. The stream ends
/// at its first error.
fn pieces(
    chunks: impl futures::Stream<Item = Result<Answer, CallError>> + Send + Unpin + 'static,
    model: String,
) -> TokenStream {
    let state = Some((chunks, None::<Usage>, model));
    futures::stream::unfold(state, |state| async move {
        let (mut chunks, mut usage, model) = state?;
        loop {
            let chunk = match chunks.next().await {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => return Some((Err(upstream(&e)), None)),
                None => return usage.map(|usage| (Ok(Streamed::Usage(usage)), None)),
            };
            usage = chunk.usage.or(usage);
            match chunk.text(&model) {
                Ok(Some(text)) => {
                    return Some((Ok(Streamed::Text(text)), Some((chunks, usage, model))));
                }
                Ok(None) => continue,
                Err(e) => return Some((Err(e), None)),
            }
        }
    })
    .boxed()
}

#[async_trait]
impl ModelProvider for OpenAiProvider {
    async fn stream(&self, prompt: Prompt) -> Result<TokenStream, ProviderError> {
        let chunks = self
            .send(self.request(prompt, true), |request| async move {
                let answer = self.endpoint.stream::<Answer>(&request).await;
                (request, answer)
            })
            .await?;
        Ok(pieces(chunks, self.model.clone()))
    }

    async fn complete(&self, prompt: Prompt) -> Result<Completion, ProviderError> {
        let answer: Answer = self
            .send(self.request(prompt, false), |request| async move {
                let answer = self.endpoint.complete(&request).await;
                (request, answer)
            })
            .await?;
        let usage = answer.usage;
        let text = answer
            .text(&self.model)?
            .ok_or_else(|| ProviderError("the model returned no content".into()))?;
        Ok(Completion { text, usage })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(json: &str) -> Answer {
        serde_json::from_str(json).unwrap()
    }

    async fn streamed(chunks: &[&str]) -> Vec<Result<Streamed, ProviderError>> {
        let chunks: Vec<_> = chunks.iter().map(|c| Ok(answer(c))).collect();
        pieces(futures::stream::iter(chunks), "m".into())
            .collect()
            .await
    }

    #[test]
    fn a_chunk_with_only_a_delta_is_read() {
        let chunk = answer(r#"{"choices":[{"delta":{"content":"Hi"}}]}"#);
        assert_eq!(chunk.text("m").unwrap().as_deref(), Some("Hi"));
        let full = answer(
            r#"{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":null,
                "choices":[{"index":0,"delta":{"role":"assistant","content":"Hi","extra":1},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        );
        assert_eq!(full.text("m").unwrap().as_deref(), Some("Hi"));
        for empty in [
            r#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"choices":[]}"#,
            r#"{}"#,
        ] {
            assert_eq!(answer(empty).text("m").unwrap(), None, "{empty}");
        }
    }

    #[test]
    fn a_whole_answer_with_only_a_message_is_read() {
        let whole = answer(
            r#"{"choices":[{"message":{"content":"Hello"}}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#,
        );
        assert_eq!(
            whole.usage,
            Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 1,
                total_tokens: 4
            })
        );
        assert_eq!(whole.text("m").unwrap().as_deref(), Some("Hello"));
    }

    #[test]
    fn an_error_in_place_of_an_answer_fails() {
        let failed = answer(r#"{"error":{"message":"overloaded"}}"#);
        let error = failed.text("m").unwrap_err();
        assert!(error.0.contains("overloaded"), "{error}");
    }

    #[tokio::test]
    async fn a_stream_ends_with_the_last_usage_reported() {
        let items = streamed(&[
            r#"{"choices":[{"delta":{"content":"a"}}],"usage":null}"#,
            r#"{"choices":[{"delta":{"content":"b"}}],"usage":{"completion_tokens":1}}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#,
        ])
        .await;
        let items: Vec<_> = items.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            items,
            [
                Streamed::Text("a".into()),
                Streamed::Text("b".into()),
                Streamed::Usage(Usage {
                    prompt_tokens: 5,
                    completion_tokens: 2,
                    total_tokens: 7
                })
            ]
        );
        let without = streamed(&[r#"{"choices":[{"delta":{"content":"a"}}]}"#]).await;
        assert_eq!(without.len(), 1);
    }

    #[tokio::test]
    async fn a_stream_ends_at_an_error() {
        let items = streamed(&[
            r#"{"choices":[{"delta":{"content":"a"}}]}"#,
            r#"{"error":{"message":"overloaded"}}"#,
            r#"{"choices":[{"delta":{"content":"b"}}]}"#,
        ])
        .await;
        assert_eq!(items.len(), 2);
        assert!(items[1].is_err());
    }

    #[test]
    fn a_shape_sets_only_what_the_dialect_takes() {
        let config = crate::config::Config::default().model;
        let provider = OpenAiProvider::new(&config, Duration::from_secs(1)).unwrap();
        let mut request = provider.request(Prompt { messages: vec![] }, true);
        let mut dialect = Dialect::guess(Some("http://127.0.0.1/v1"), "m");
        provider.shape(&mut request, dialect);
        let json = serde_json::to_value(&request).unwrap();
        assert_eq!(json["max_tokens"], 2000);
        assert_eq!(json.get("max_completion_tokens"), None);
        assert_eq!(json["temperature"].as_f64().map(|t| t as f32), Some(0.7));
        assert_eq!(json["stream_options"]["include_usage"], true);
        dialect = dialect.without("max_tokens").unwrap();
        dialect = dialect.without("temperature").unwrap();
        dialect = dialect.without("stream_options").unwrap();
        provider.shape(&mut request, dialect);
        let json = serde_json::to_value(&request).unwrap();
        assert_eq!(json.get("max_tokens"), None);
        assert_eq!(json["max_completion_tokens"], 2000);
        assert_eq!(json.get("temperature"), None);
        assert_eq!(json.get("stream_options"), None);
    }
}
