//! A test model server speaking OpenAI's chat-completions wire format, streaming (SSE
//! `chat.completion.chunk` events and `data: [DONE]`) and not. It records every request and can
//! fail with 500, cut a stream midway, or hang.

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

struct Behaviour {
    mode: Mode,
    pieces: Vec<String>,
    delay: Duration,
    first_delay: Duration,
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
        tokio::spawn(warp::serve(route).incoming(listener).run());
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
        self.received.lock().unwrap().push(body);
        let (mode, pieces, delay, first_delay) = {
            let b = self.behaviour.lock().unwrap();
            (b.mode.clone(), b.pieces.clone(), b.delay, b.first_delay)
        };
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
            let body = json!({
                "id": "chatcmpl-test", "object": "chat.completion", "created": 1, "model": "test",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": pieces.concat()}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
            });
            return warp::reply::json(&body).into_response();
        }
        let cut = mode == Mode::Cut;
        let body = sse(
            pieces,
            delay,
            first_delay,
            cut,
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

fn chunk(delta: Value, finish: Option<&str>) -> Bytes {
    let event = json!({
        "id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1, "model": "test",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
    });
    Bytes::from(format!("data: {event}\n\n"))
}

/// The SSE body: an empty first delta (as some servers send), the pieces, a finish chunk and
/// `[DONE]`; or, when `cut`, half the pieces and then an error that breaks the connection.
fn sse(
    pieces: Vec<String>,
    delay: Duration,
    first_delay: Duration,
    cut: bool,
    mut guard: StreamGuard,
) -> Feed {
    let keep = if cut { pieces.len() / 2 } else { pieces.len() };
    async_stream(move |tx| async move {
        tokio::time::sleep(first_delay).await;
        if tx
            .send(Ok(chunk(json!({"role": "assistant", "content": ""}), None)))
            .await
            .is_err()
        {
            return;
        }
        for piece in pieces.into_iter().take(keep) {
            tokio::time::sleep(delay).await;
            if tx
                .send(Ok(chunk(json!({"content": piece}), None)))
                .await
                .is_err()
            {
                return;
            }
        }
        if cut {
            let _ = tx.send(Err(std::io::Error::other("cut"))).await;
            return;
        }
        let _ = tx.send(Ok(chunk(json!({}), Some("stop")))).await;
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
