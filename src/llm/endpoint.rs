//! One OpenAI-compatible chat-completions endpoint over HTTP: a request sent as JSON with the
//! key as a bearer token, retried as OpenAI advises (rate limits, server errors, refused
//! connections), its answer read whole or as server-sent events in the caller's own task.

use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use futures::stream::BoxStream;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Response, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Retries after the first attempt when the endpoint is rate-limited, fails or refuses the
/// connection.
const RETRIES: u32 = 3;
/// The pause before the first retry when the endpoint names none; it doubles for each next.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest pause chosen by doubling.
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// The error type of a 429 that waiting does not cure.
const INSUFFICIENT_QUOTA: &str = "insufficient_quota";

/// A chat-completions endpoint and the pooled client that calls it.
pub struct Endpoint {
    http: reqwest::Client,
    url: Url,
    /// `Bearer <key>`, marked sensitive; none for a server that takes no key.
    authorization: Option<HeaderValue>,
}

/// How a call failed.
#[derive(Debug)]
pub enum CallError {
    /// The endpoint answered an error status, with its error object's fields where it sent one.
    Answered { status: StatusCode, error: ApiError },
    /// No answer could be had or read: the connection, the body or its JSON failed.
    Exchange(String),
}

/// An OpenAI-style error object (`{"error": {...}}`), read leniently.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub struct ApiError {
    pub message: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub param: Option<String>,
    /// A string at OpenAI, a number at some servers.
    pub code: Option<Value>,
}

#[derive(serde::Deserialize)]
struct Wrapped {
    error: ApiError,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Answered { status, error } => {
                write!(f, "the model answered {status}")?;
                match &error.message {
                    Some(message) => write!(f, ": {message}"),
                    None => Ok(()),
                }
            }
            CallError::Exchange(text) => f.write_str(text),
        }
    }
}

impl ApiError {
    /// The error's code as text, whether the server sent a string or a number.
    pub fn code(&self) -> Option<String> {
        match self.code.as_ref()? {
            Value::String(code) => Some(code.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    }
}

impl Endpoint {
    /// The chat-completions endpoint under `base` (OpenAI's when unset), called with `key`;
    /// no connection attempt and no read waits longer than `timeout`.
    pub fn new(base: Option<&str>, key: &str, timeout: Duration) -> Result<Self, String> {
        let base = base
            .unwrap_or("https://api.openai.com/v1")
            .trim_end_matches('/');
        let url = Url::parse(&format!("{base}/chat/completions"))
            .map_err(|e| format!("the model's base URL {base:?} is not a URL: {e}"))?;
        let authorization = (!key.is_empty())
            .then(|| HeaderValue::try_from(format!("Bearer {key}")))
            .transpose()
            .map_err(|_| "the model's API key is not a valid header value".to_owned())?
            .map(|mut value| {
                value.set_sensitive(true);
                value
            });
        let http = reqwest::Client::builder()
            .read_timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| {
                format!(
                    "cannot build the HTTP client for the model: {}",
                    with_causes(&e)
                )
            })?;
        Ok(Endpoint {
            http,
            url,
            authorization,
        })
    }

    /// Sends `request` and reads the whole answer as `T`.
    pub async fn complete<T: DeserializeOwned>(
        &self,
        request: &impl Serialize,
    ) -> Result<T, CallError> {
        let answer = self.send(request).await?;
        let body = answer.bytes().await.map_err(exchange)?;
        serde_json::from_slice(&body)
            .map_err(|e| CallError::Exchange(format!("the model's answer is not understood: {e}")))
    }

    /// Sends `request` and reads the answer's server-sent events as `T`s, up to `[DONE]` or
    /// the end of the answer; an event that cannot be read is an error in its place.
    pub async fn stream<T: DeserializeOwned + Send + 'static>(
        &self,
        request: &impl Serialize,
    ) -> Result<BoxStream<'static, Result<T, CallError>>, CallError> {
        let answer = self.send(request).await?;
        let events = answer.bytes_stream().eventsource();
        Ok(events
            .take_while(|event| {
                let done = matches!(event, Ok(event) if event.data == "[DONE]");
                std::future::ready(!done)
            })
            .filter(|event| {
                let keepalive = matches!(event, Ok(event) if event.event == "keepalive");
                std::future::ready(!keepalive)
            })
            .map(|event| {
                let event = event.map_err(|e| {
                    CallError::Exchange(format!("the model's stream broke: {}", with_causes(&e)))
                })?;
                serde_json::from_str(&event.data).map_err(|e| {
                    CallError::Exchange(format!(
                        "a chunk of the model's stream is not understood: {e}"
                    ))
                })
            })
            .boxed())
    }

    /// Posts `request`, again after a pause while the endpoint is rate-limited (but not out of
    /// quota), fails with a server error or refuses the connection, at most `RETRIES` times.
    /// A success status gives the answer; any other is an error.
    async fn send(&self, request: &impl Serialize) -> Result<Response, CallError> {
        let body = Bytes::from(serde_json::to_vec(request).map_err(|e| {
            CallError::Exchange(format!("cannot write the request to the model: {e}"))
        })?);
        let mut attempt = 0;
        loop {
            let mut post = self
                .http
                .post(self.url.clone())
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .body(body.clone());
            if let Some(authorization) = &self.authorization {
                post = post.header(AUTHORIZATION, authorization.clone());
            }
            let (failure, pause) = match post.send().await {
                Ok(answer) if answer.status().is_success() => return Ok(answer),
                Ok(answer) => {
                    let status = answer.status();
                    let pause = retry_after(answer.headers());
                    let failure = refusal(answer).await;
                    let out_of_quota = matches!(&failure, CallError::Answered { error, .. }
                        if error.kind.as_deref() == Some(INSUFFICIENT_QUOTA));
                    let retryable = (status == 429 && !out_of_quota) || status.is_server_error();
                    if !retryable {
                        return Err(failure);
                    }
                    (failure, pause)
                }
                Err(e) if e.is_connect() => (exchange(e), None),
                Err(e) => return Err(exchange(e)),
            };
            if attempt == RETRIES {
                return Err(failure);
            }
            let doubled = FIRST_BACKOFF.saturating_mul(1 << attempt).min(MAX_BACKOFF);
            tracing::debug!(%failure, attempt, "the model's endpoint failed; trying again");
            tokio::time::sleep(pause.unwrap_or(doubled)).await;
            attempt += 1;
        }
    }
}

/// The error an error status came with: the error object when the body holds one, else the
/// body's text as its message.
async fn refusal(answer: Response) -> CallError {
    let status = answer.status();
    let body = match answer.bytes().await {
        Ok(body) => body,
        Err(e) => return exchange(e),
    };
    let error = serde_json::from_slice::<Wrapped>(&body)
        .map(|wrapped| wrapped.error)
        .unwrap_or_else(|_| ApiError {
            message: Some(String::from_utf8_lossy(&body).into_owned()),
            ..ApiError::default()
        });
    CallError::Answered { status, error }
}

/// The pause a `Retry-After` header asks for, in whole seconds.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds))
}

fn exchange(error: reqwest::Error) -> CallError {
    CallError::Exchange(with_causes(&error))
}

/// An error's message followed by those of its causes (each once, where a wrapper repeats it).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let more = inner.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Failure {
        text: &'static str,
        #[source]
        cause: Option<Box<Failure>>,
    }

    #[test]
    fn an_error_names_its_causes_once() {
        let refused = Failure {
            text: "connection refused",
            cause: None,
        };
        let sending = Failure {
            text: "error sending request",
            cause: Some(Box::new(refused)),
        };
        let wrapper = Failure {
            text: "http error: error sending request",
            cause: Some(Box::new(sending)),
        };
        assert_eq!(
            with_causes(&wrapper),
            "http error: error sending request: connection refused"
        );
    }

    use std::sync::{Arc, Mutex};

    use serde_json::json;
    use warp::Filter;
    use warp::http::Response as HttpResponse;

    /// One answer of the scripted server: status, `Retry-After`, content type, body.
    type Scripted = (u16, Option<&'static str>, &'static str, String);

    /// A server on loopback that answers each request with the next of `script` (the last one
    /// again once it runs out), and records each request's `Authorization` and body.
    async fn scripted(script: Vec<Scripted>) -> (String, Arc<Mutex<Vec<(Option<String>, Value)>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let script = Arc::new(script);
        let route = warp::post()
            .and(warp::path!("v1" / "chat" / "completions"))
            .and(warp::header::optional::<String>("authorization"))
            .and(warp::body::json())
            .map(move |authorization, body| {
                let mut seen = log.lock().unwrap();
                seen.push((authorization, body));
                let (status, retry_after, kind, body) =
                    &script[(seen.len() - 1).min(script.len() - 1)];
                let mut answer = HttpResponse::builder()
                    .status(*status)
                    .header("content-type", *kind);
                if let Some(seconds) = retry_after {
                    answer = answer.header("retry-after", *seconds);
                }
                answer.body(body.clone()).unwrap()
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        (format!("http://{addr}/v1"), seen)
    }

    fn ok(answer: Value) -> Scripted {
        (200, None, "application/json", answer.to_string())
    }

    fn failed(status: u16, retry_after: Option<&'static str>, error: Value) -> Scripted {
        let body = json!({"error": error}).to_string();
        (status, retry_after, "application/json", body)
    }

    async fn complete(base: &str, key: &str) -> Result<Value, CallError> {
        let endpoint = Endpoint::new(Some(base), key, Duration::from_secs(5)).unwrap();
        endpoint.complete(&json!({"model": "m"})).await
    }

    #[tokio::test]
    async fn a_request_carries_the_key_and_the_body() {
        let (base, seen) = scripted(vec![ok(json!({"x": 1}))]).await;
        assert_eq!(complete(&base, "sk-1").await.unwrap(), json!({"x": 1}));
        assert_eq!(
            complete(&format!("{base}/"), "").await.unwrap(),
            json!({"x": 1})
        );
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0], (Some("Bearer sk-1".into()), json!({"model": "m"})));
        assert_eq!(seen[1].0, None, "no key, no Authorization");
    }

    #[tokio::test]
    async fn rate_limits_and_server_errors_are_retried_then_answered() {
        let rate_limited = json!({"message": "slow down", "type": "requests"});
        let (base, seen) = scripted(vec![
            failed(429, Some("0"), rate_limited),
            (502, None, "text/html", "<h1>bad gateway</h1>".into()),
            ok(json!({"x": 2})),
        ])
        .await;
        assert_eq!(complete(&base, "k").await.unwrap(), json!({"x": 2}));
        assert_eq!(seen.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn retries_end_after_three_with_the_last_error() {
        let (base, seen) = scripted(vec![(500, Some("0"), "text/plain", "down".into())]).await;
        let error = complete(&base, "k").await.unwrap_err();
        assert_eq!(seen.lock().unwrap().len(), 1 + RETRIES as usize);
        assert_eq!(
            error.to_string(),
            "the model answered 500 Internal Server Error: down"
        );
    }

    #[tokio::test]
    async fn a_refusal_or_an_exhausted_quota_is_not_retried() {
        let quota = json!({"message": "no quota", "type": INSUFFICIENT_QUOTA});
        let (base, seen) = scripted(vec![failed(429, None, quota)]).await;
        assert!(complete(&base, "k").await.is_err());
        assert_eq!(seen.lock().unwrap().len(), 1);

        let refusal = json!({"message": "bad", "param": "temperature", "code": 400});
        let (base, seen) = scripted(vec![failed(400, None, refusal)]).await;
        let Err(CallError::Answered { status, error }) = complete(&base, "k").await else {
            panic!("a 400 is an answered error");
        };
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert_eq!(status, 400);
        assert_eq!(error.param.as_deref(), Some("temperature"));
        assert_eq!(
            error.code().as_deref(),
            Some("400"),
            "a numeric code is read"
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_retried_then_reported() {
        let unused = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/v1", unused.local_addr().unwrap());
        drop(unused);
        let started = std::time::Instant::now();
        let error = complete(&base, "k").await.unwrap_err();
        assert!(matches!(error, CallError::Exchange(_)), "{error}");
        assert!(
            started.elapsed() >= FIRST_BACKOFF * 7,
            "three pauses, doubling"
        );
    }

    #[tokio::test]
    async fn a_stream_skips_keepalives_and_ends_at_done() {
        let events = "event: keepalive\ndata: {}\n\ndata: {\"n\":1}\n\ndata: {\"n\":2}\n\n\
                      data: [DONE]\n\ndata: {\"n\":3}\n\n";
        let (base, _) = scripted(vec![(200, None, "text/event-stream", events.into())]).await;
        let endpoint = Endpoint::new(Some(&base), "k", Duration::from_secs(5)).unwrap();
        let stream = endpoint
            .stream::<Value>(&json!({"stream": true}))
            .await
            .unwrap();
        let items: Vec<Value> = stream.map(Result::unwrap).collect().await;
        assert_eq!(items, [json!({"n": 1}), json!({"n": 2})]);

        let (base, _) = scripted(vec![(
            200,
            None,
            "text/event-stream",
            "data: {\"n\":\n\n".into(),
        )])
        .await;
        let endpoint = Endpoint::new(Some(&base), "k", Duration::from_secs(5)).unwrap();
        let mut stream = endpoint.stream::<Value>(&json!({})).await.unwrap();
        assert!(
            stream.next().await.unwrap().is_err(),
            "an unreadable chunk is an error"
        );
    }

    #[test]
    fn a_base_that_is_not_a_url_or_a_key_that_is_not_a_header_is_refused() {
        assert!(Endpoint::new(Some("not a url"), "k", Duration::from_secs(1)).is_err());
        assert!(Endpoint::new(None, "bad\nkey", Duration::from_secs(1)).is_err());
    }
}
