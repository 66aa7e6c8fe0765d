//! What the black-box tests share: a real server on `127.0.0.1:0`, a test model server, and
//! HTTP and WebSocket clients.
#![allow(dead_code, unused_imports)]

pub mod model_server;
pub mod process;

use std::net::SocketAddr;
use std::time::Duration;

use ai_chat_server::App;
use ai_chat_server::config::Config;
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use model_server::{Mode, ModelServer, pieces_of};

/// Node's socket.io-client package, installed on first use.
pub mod npm;
/// The real Socket.IO client (Node's socket.io-client) the Socket.IO tests drive.
pub mod socketio;

/// How long a test waits for any one thing before it fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// A configuration for tests: any free port, no rate or connection limits, quick timings.
pub fn test_config() -> Config {
    let mut config = Config {
        port: 0,
        database_url: "memory".into(),
        rate_limit_max_requests: 0,
        rt_messages_per_minute: 0,
        max_connections_per_ip: 0,
        ..Config::default()
    };
    config.model.demo_token_delay = Duration::from_millis(1);
    config.conversations.upstream_timeout = Duration::from_secs(10);
    config
}

/// A configuration whose model is `model`.
pub fn config_for(model: &ModelServer) -> Config {
    let mut config = test_config();
    config.model.api_key = Some("test-key".into());
    config.model.base_url = Some(model.base_url());
    config.model.model = "test-model".into();
    config
}

/// An HTTP client for a server at `addr`, as (status, JSON) pairs.
pub async fn call_at(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = reqwest::Client::new().request(method, format!("http://{addr}{path}"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = tokio::time::timeout(WAIT, request.send())
        .await
        .expect("answer in time")
        .expect("request sent");
    let status = response.status();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// A running chat server and an HTTP client for it.
pub struct TestServer {
    pub app: App,
    pub http: reqwest::Client,
}

impl TestServer {
    /// Starts the server with `config`.
    pub async fn start(config: Config) -> TestServer {
        let app = App::start(config).await.expect("server starts");
        TestServer {
            app,
            http: reqwest::Client::new(),
        }
    }

    /// Starts a test model server and a chat server that uses it.
    pub async fn with_model() -> (TestServer, ModelServer) {
        let model = ModelServer::start().await;
        (TestServer::start(config_for(&model)).await, model)
    }

    pub fn addr(&self) -> SocketAddr {
        self.app.addr()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    /// Sends a request and reads the JSON answer.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        call_at(self.addr(), method, path, body).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call("POST", path, Some(body)).await
    }

    /// Opens a WebSocket to `/ws`.
    pub async fn ws(&self) -> WsClient {
        WsClient::connect(self.addr()).await
    }

    /// The last stored message of a conversation.
    pub async fn stored_reply(&self, id: &str) -> Value {
        let (status, conversation) = self.get(&format!("/api/conversations/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{conversation}");
        conversation["messages"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone()
    }

    /// The last stored message of a conversation once it has left `streaming`.
    pub async fn settled_reply(&self, id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let reply = self.stored_reply(id).await;
            if reply["status"] != "streaming" {
                return reply;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the reply never finished: {reply}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls the health route until `check` holds for it.
    pub async fn wait_for_health(&self, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (_, health) = self.get("/api/health").await;
            if check(&health) {
                return health;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "health never matched: {health}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What the tests do the same way over either real-time transport.
#[allow(async_fn_in_trait)]
pub trait RealtimeClient {
    /// The next event, as (name, data); fails after [`WAIT`].
    async fn next_event(&mut self) -> (String, Value);
    /// Sends one event.
    async fn send_event(&mut self, event: &str, data: Value);

    /// Events up to and including `stream_complete`.
    async fn until_complete(&mut self) -> Vec<(String, Value)> {
        let mut events = Vec::new();
        loop {
            let event = self.next_event().await;
            let done = event.0 == "stream_complete";
            events.push(event);
            if done {
                return events;
            }
        }
    }

    /// Sends `stream_chat` and returns every event up to `stream_complete`.
    async fn chat(&mut self, conversation_id: &str, message: &str) -> Vec<(String, Value)> {
        let data = json!({"conversationId": conversation_id, "message": message});
        self.send_event("stream_chat", data).await;
        self.until_complete().await
    }
}

impl RealtimeClient for WsClient {
    async fn next_event(&mut self) -> (String, Value) {
        self.next().await
    }

    async fn send_event(&mut self, event: &str, data: Value) {
        self.send(event, data).await;
    }
}

/// A plain WebSocket client speaking `{"event", "data"}` frames.
pub struct WsClient {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    pub async fn connect(addr: SocketAddr) -> WsClient {
        let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .expect("websocket connects");
        WsClient { socket }
    }

    /// Connects with a receive buffer of `bytes`, which the kernel then does not grow: once that
    /// much is unread, the server's writes back up.
    pub async fn connect_with_receive_buffer(addr: SocketAddr, bytes: u32) -> WsClient {
        let tcp = tokio::net::TcpSocket::new_v4().expect("tcp socket");
        tcp.set_recv_buffer_size(bytes).expect("receive buffer set");
        let stream = tcp.connect(addr).await.expect("tcp connects");
        let url = format!("ws://{addr}/ws");
        let (socket, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .expect("websocket connects");
        WsClient { socket }
    }

    /// Sends one event.
    pub async fn send(&mut self, event: &str, data: Value) {
        self.send_raw(Message::text(
            json!({"event": event, "data": data}).to_string(),
        ))
        .await;
    }

    /// Sends any frame.
    pub async fn send_raw(&mut self, message: Message) {
        self.socket.send(message).await.expect("frame sent");
    }

    /// The next event, as (name, data); fails after [`WAIT`].
    pub async fn next(&mut self) -> (String, Value) {
        self.try_next(WAIT).await.expect("an event in time")
    }

    /// The next event within `wait`, if any.
    pub async fn try_next(&mut self, wait: Duration) -> Option<(String, Value)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .ok()??;
            match frame.ok()? {
                Message::Text(text) => {
                    let value: Value = serde_json::from_str(&text).expect("frames are JSON");
                    let name = value["event"].as_str().expect("frames name their event");
                    return Some((name.to_owned(), value["data"].clone()));
                }
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Whether the server closed the connection (or it ended) within `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.socket.next()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return true,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The code of the close frame the server sends within `wait`, skipping other frames;
    /// `None` when the connection ends without one or stays open.
    pub async fn close_code_within(&mut self, wait: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.socket.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code.into()),
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// The final chunk's content of a reply's events.
pub fn final_content(events: &[(String, Value)]) -> String {
    events
        .iter()
        .rev()
        .find(|(name, data)| name == "stream_chunk" && data["isComplete"] == true)
        .map(|(_, data)| data["content"].as_str().unwrap().to_owned())
        .expect("a final chunk")
}

/// The `stream_chunk` payloads of `events`, in order.
pub fn chunks(events: &[(String, Value)]) -> Vec<&Value> {
    events
        .iter()
        .filter(|(name, _)| name == "stream_chunk")
        .map(|(_, data)| data)
        .collect()
}

/// The chunks' deltas, joined.
pub fn deltas(events: &[(String, Value)]) -> String {
    chunks(events)
        .iter()
        .map(|chunk| chunk["delta"].as_str().unwrap())
        .collect()
}

/// The chunks' sequence numbers, in order.
pub fn seqs(events: &[(String, Value)]) -> Vec<u64> {
    chunks(events)
        .iter()
        .map(|chunk| chunk["seq"].as_u64().unwrap())
        .collect()
}

/// `count` distinct word pieces, for replies of a chosen length.
pub fn words(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("w{i} ")).collect()
}

/// Waits until `check` holds; fails after about five seconds.
pub async fn eventually(check: impl Fn() -> bool) {
    for _ in 0..250 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition never held");
}

/// The names of the events, in order.
pub fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(name, _)| name.as_str()).collect()
}
