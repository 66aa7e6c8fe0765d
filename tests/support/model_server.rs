//! A test model server speaking OpenAI's chat-completions wire format, streaming (SSE
//! `chat.completion.chunk` events and `data: [DONE]`) and not. It records every request and can
//! fail with 500, cut a stream midway, or hang; refuse request parameters the way OpenAI's
//! reasoning models or older servers do; and answer with minimal chunks, as some
//! OpenAI-compatible servers and proxies send. It reports usage when a stream asks for it
//! (`stream_options.include_usage`) and in every whole answer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use serde_json::{Value, json};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

/// How the server answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Stream (or return) the reply.
    Reply,
    /// Answer 500 with an OpenAI-style error body.
    Fail,
    /// Stream half the reply, then break the connection.
    Cut,
    /// Accept the request and never answer.
    Hang,
}

/// A request parameter the server refuses with 400, and how it says so.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    /// As OpenAI's reasoning models do: `param` names it, `code` is `unsupported_parameter`
    /// (`unsupported_value` for `temperature`).
    Unsupported(&'static str),
    /// As an older server that does not know it does: only the message names it.
    Unrecognized(&'static str),
}

/// What OpenAI's reasoning models refuse.
pub const REASONING_MODEL: [Refusal; 2] = [
    Refusal::Unsupported("max_tokens"),
    Refusal::Unsupported("temperature"),
];

/// What an older, strict server refuses: everything newer than `max_tokens`.
pub const OLDER_SERVER: [Refusal; 2] = [
    Refusal::Unrecognized("max_completion_tokens"),
    Refusal::Unrecognized("stream_options"),
];

impl Refusal {
    fn parameter(self) -> &'static str {
        match self {
            Refusal::Unsupported(name) | Refusal::Unrecognized(name) => name,
        }
    }

    /// The error body, as the server it imitates words it.
    fn body(self) -> Value {
        let error = match self {
            Refusal::Unsupported("temperature") => json!({
                "message": "Unsupported value: 'temperature' does not support 0.7 with this model. Only the default (1) value is supported.",
                "type": "invalid_request_error", "param": "temperature", "code": "unsupported_value"
            }),
            Refusal::Unsupported(name) => json!({
                "message": format!("Unsupported parameter: '{name}' is not supported with this model. Use 'max_completion_tokens' instead."),
                "type": "invalid_request_error", "param": name, "code": "unsupported_parameter"
            }),
            Refusal::Unrecognized(name) => json!({
                "message": format!("Unrecognized request argument supplied: {name}"),
                "type": "invalid_request_error", "param": null, "code": null
            }),
        };
        json!({ "error": error })
    }
}

struct Behaviour {
    mode: Mode,
    pieces: Vec<String>,
    delay: Duration,
    first_delay: Duration,
    refusals: Vec<Refusal>,
    minimal: bool,
}

/// Serves each connection `listener` accepts with `service`, writes not held back (as model
/// servers answer: uvicorn and Node set `TCP_NODELAY` too).
async fn serve<S>(listener: tokio::net::TcpListener, service: S)
where
    S: tower::Service<
            warp::http::Request<hyper::body::Incoming>,
            Response = Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A running test model server.
#[derive(Clone)]
pub struct ModelServer {
    addr: SocketAddr,
    behaviour: Arc<Mutex<Behaviour>>,
    received: Arc<Mutex<Vec<Value>>>,
    dropped: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
}

/// Counts a stream as dropped unless it reached its end.
struct StreamGuard {
    done: bool,
    dropped: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.done {
            self.finished.fetch_add(1, Ordering::SeqCst);
        } else {
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl ModelServer {
    /// Starts on `127.0.0.1:0`, answering "Hello from the test model." in four pieces.
    pub async fn start() -> ModelServer {
        let behaviour = Arc::new(Mutex::new(Behaviour {
            mode: Mode::Reply,
            pieces: pieces_of("Hello from the test model."),
            delay: Duration::from_millis(5),
            first_delay: Duration::ZERO,
            refusals: Vec::new(),
            minimal: false,
        }));
        let received = Arc::new(Mutex::new(Vec::new()));
        let dropped = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(AtomicUsize::new(0));
        let server = ModelServer {
            addr: "127.0.0.1:0".parse().unwrap(),
            behaviour,
            received,
            dropped,
            finished,
        };
        let state = server.clone();
        let route = warp::path!("v1" / "chat" / "completions")
            .and(warp::post())
            .and(warp::body::json())
            .then(move |body: Value| {
                let state = state.clone();
                async move { state.answer(body).await }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, warp::service(route)));
        ModelServer { addr, ..server }
    }

    /// The base URL to give the chat server as `OPENAI_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Sets how the next requests are answered.
    pub fn set_mode(&self, mode: Mode) {
        self.behaviour.lock().unwrap().mode = mode;
    }

    /// Sets the reply, as the pieces it streams in, and the pause before each piece.
    pub fn set_reply(&self, pieces: Vec<String>, delay: Duration) {
        let mut behaviour = self.behaviour.lock().unwrap();
        behaviour.pieces = pieces;
        behaviour.delay = delay;
    }

    /// Sets a pause before the first piece (after the response headers).
    pub fn set_first_delay(&self, delay: Duration) {
        self.behaviour.lock().unwrap().first_delay = delay;
    }

    /// Sets the request parameters answered with a 400.
    pub fn set_refusals(&self, refusals: &[Refusal]) {
        self.behaviour.lock().unwrap().refusals = refusals.to_vec();
    }

    /// Answers with only `choices` (and `usage`): chunks without `id`, `object`, `created`,
    /// `model` or `index`, whole answers with only `message.content` and `finish_reason`.
    pub fn set_minimal(&self, minimal: bool) {
        self.behaviour.lock().unwrap().minimal = minimal;
    }

    /// The usage it reports for a reply of `pieces` to a request with `messages` messages.
    pub fn usage(messages: usize, pieces: usize) -> Value {
        json!({"prompt_tokens": messages, "completion_tokens": pieces, "total_tokens": messages + pieces})
    }

    /// The reply as one text.
    pub fn reply_text(&self) -> String {
        self.behaviour.lock().unwrap().pieces.concat()
    }

    /// Every request body received so far.
    pub fn received(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }

    /// Streams that the client dropped before their end.
    pub fn dropped_streams(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }

    /// Streams sent to their end.
    pub fn finished_streams(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }

    async fn answer(&self, body: Value) -> Response {
        let stream = body["stream"].as_bool().unwrap_or(false);
        let with_usage = body["stream_options"]["include_usage"] == true;
        let messages = body["messages"].as_array().map_or(0, Vec::len);
        let (mode, pieces, delay, first_delay, refusals, minimal) = {
            let b = self.behaviour.lock().unwrap();
            let (mode, pieces) = (b.mode.clone(), b.pieces.clone());
            (
                mode,
                pieces,
                b.delay,
                b.first_delay,
                b.refusals.clone(),
                b.minimal,
            )
        };
        let refused = refusals
            .into_iter()
            .find(|r| body.get(r.parameter()).is_some_and(|v| !v.is_null()));
        self.received.lock().unwrap().push(body);
        if let Some(refusal) = refused {
            return warp::reply::with_status(
                warp::reply::json(&refusal.body()),
                StatusCode::BAD_REQUEST,
            )
            .into_response();
        }
        let usage = ModelServer::usage(messages, pieces.len());
        match mode {
            Mode::Fail => {
                let error = json!({"error": {"message": "test failure", "type": "server_error", "param": null, "code": null}});
                return warp::reply::with_status(
                    warp::reply::json(&error),
                    StatusCode::INTERNAL_SERVER_ERROR,
                )
                .into_response();
            }
            Mode::Hang => {
                let guard = StreamGuard {
                    done: false,
                    dropped: self.dropped.clone(),
                    finished: self.finished.clone(),
                };
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(guard);
            }
            Mode::Reply | Mode::Cut => {}
        }
        if !stream {
            tokio::time::sleep(delay).await;
            let content = pieces.concat();
            let body = if minimal {
                json!({
                    "choices": [{"message": {"content": content}, "finish_reason": "stop"}],
                    "usage": usage
                })
            } else {
                json!({
                    "id": "chatcmpl-test", "object": "chat.completion", "created": 1, "model": "test",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": usage
                })
            };
            return warp::reply::json(&body).into_response();
        }
        let body = sse(
            pieces,
            Timing { delay, first_delay },
            Format {
                minimal,
                usage: with_usage.then_some(usage),
                cut: mode == Mode::Cut,
            },
            StreamGuard {
                done: false,
                dropped: self.dropped.clone(),
                finished: self.finished.clone(),
            },
        );
        warp::reply::with_header(
            warp::reply::stream(body),
            "content-type",
            "text/event-stream",
        )
        .into_response()
    }
}

/// The pauses of a stream: before the first piece and before each.
struct Timing {
    delay: Duration,
    first_delay: Duration,
}

/// How a stream's chunks look and end.
struct Format {
    /// Only `choices` (and `usage`) in each chunk.
    minimal: bool,
    /// The usage chunk sent before `[DONE]`, when asked for.
    usage: Option<Value>,
    /// Half the pieces, then a broken connection.
    cut: bool,
}

impl Format {
    /// One SSE event: a chunk with `choices` (`delta` and, at the end, `finish_reason`), or
    /// with no choices and the usage.
    fn chunk(&self, choices: Value, usage: Option<Value>) -> Bytes {
        let mut event = if self.minimal {
            json!({"choices": choices})
        } else {
            json!({"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1, "model": "test", "choices": choices})
        };
        if let Some(usage) = usage {
            event["usage"] = usage;
        }
        Bytes::from(format!("data: {event}\n\n"))
    }

    fn delta(&self, delta: Value, finish: Option<&str>) -> Bytes {
        let choice = if self.minimal {
            match finish {
                Some(reason) => json!({"delta": delta, "finish_reason": reason}),
                None => json!({"delta": delta}),
            }
        } else {
            json!({"index": 0, "delta": delta, "finish_reason": finish})
        };
        self.chunk(json!([choice]), None)
    }
}

/// The SSE body: an empty first delta (as some servers send), the pieces, a finish chunk, the
/// usage chunk when asked for, and `[DONE]`; or, when cut, half the pieces and then an error
/// that breaks the connection.
fn sse(pieces: Vec<String>, timing: Timing, format: Format, mut guard: StreamGuard) -> Feed {
    let keep = if format.cut {
        pieces.len() / 2
    } else {
        pieces.len()
    };
    async_stream(move |tx| async move {
        tokio::time::sleep(timing.first_delay).await;
        let first = format.delta(json!({"role": "assistant", "content": ""}), None);
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        for piece in pieces.into_iter().take(keep) {
            tokio::time::sleep(timing.delay).await;
            let next = format.delta(json!({"content": piece}), None);
            if tx.send(Ok(next)).await.is_err() {
                return;
            }
        }
        if format.cut {
            let _ = tx.send(Err(std::io::Error::other("cut"))).await;
            return;
        }
        let _ = tx.send(Ok(format.delta(json!({}), Some("stop")))).await;
        if let Some(usage) = &format.usage {
            let _ = tx
                .send(Ok(format.chunk(json!([]), Some(usage.clone()))))
                .await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
        guard.done = true;
        drop(guard);
    })
}

/// A stream fed by a task; dropping the stream stops the task.
fn async_stream<F, Fut>(body: F) -> Feed
where
    F: FnOnce(mpsc::Sender<Result<Bytes, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(1);
    let task = tokio::spawn(body(tx)).abort_handle();
    Feed { rx, task }
}

/// The receiving end of [`async_stream`].
struct Feed {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    task: tokio::task::AbortHandle,
}

impl Stream for Feed {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Splits a text into word pieces that keep their trailing spaces.
pub fn pieces_of(text: &str) -> Vec<String> {
    text.split_inclusive(' ').map(str::to_owned).collect()
}
