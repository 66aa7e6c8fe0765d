//! What the black-box tests share: a real server on `127.0.0.1:0`, a test model server, HTTP,
//! WebSocket and Socket.IO clients, and what a realtime scenario needs to run over either
//! transport ([`RealtimeClient`], `over_every_transport!`).

pub mod cluster;
pub mod logs;
pub mod model_server;
/// A schema of its own on the test PostgreSQL server (`TEST_DATABASE_URL`), made as the store's
/// own tests make theirs.
#[path = "../../src/store/postgres/test_database.rs"]
#[allow(dead_code, reason = "what only the store's own tests use")]
pub mod postgres;
pub mod process;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use ai_chat_server::App;
use ai_chat_server::config::Config;
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
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
    call_with_token(addr, None, method, path, body).await
}

/// [`call_at`] with `Authorization: Bearer <token>` when there is a token.
pub async fn call_with_token(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = reqwest::Client::new().request(method, format!("http://{addr}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
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

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.app.addr()
    }

    /// The server's URL for `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr(), path)
    }

    /// Sends a request and reads the JSON answer.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        call_at(self.addr(), method, path, body).await
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call("GET", path, None).await
    }

    /// `POST path` with a JSON body.
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
pub trait RealtimeClient: Sized {
    /// Connects to the server at `addr` as a front end would (Socket.IO: its default
    /// transports, polling first, then the upgrade to websocket).
    async fn connect(addr: SocketAddr) -> Self;
    /// Connects with a sign-in token; a refusal is given as text (the status of a refused
    /// `/ws` handshake, the message of a Socket.IO `connect_error`).
    async fn connect_as(addr: SocketAddr, token: &str) -> Result<Self, String>;
    /// Sends one event, asking for no acknowledgement.
    async fn emit(&mut self, event: &str, data: Value);
    /// Sends one event asking for an acknowledgement, and returns it; the events that arrive
    /// meanwhile are kept for [`RealtimeClient::next`].
    async fn emit_with_ack(&mut self, event: &str, data: Value) -> Value;
    /// The next event within `wait`, if any; none once the connection is closed.
    async fn try_next(&mut self, wait: Duration) -> Option<(String, Value)>;
    /// Closes the connection cleanly.
    async fn close(self);
    /// Drops the connection without a goodbye, as a client that dies does.
    async fn kill(self);

    /// The next event, as (name, data); fails after [`WAIT`].
    async fn next(&mut self) -> (String, Value) {
        self.try_next(WAIT).await.expect("an event in time")
    }

    /// Joins a conversation and waits until the server has handled the join.
    async fn join(&mut self, conversation_id: &str) {
        self.join_from(json!({ "conversationId": conversation_id }))
            .await;
    }

    /// Joins with any payload (a resume point, say) and waits until the server has handled it.
    async fn join_from(&mut self, payload: Value) {
        let ack = self
            .emit_with_ack("join_conversation", payload.clone())
            .await;
        assert_eq!(ack, json!({ "conversationId": payload["conversationId"] }));
    }

    /// Events up to and including `stream_complete`.
    async fn until_complete(&mut self) -> Vec<(String, Value)> {
        let mut events = Vec::new();
        loop {
            let event = self.next().await;
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
        self.emit("stream_chat", data).await;
        self.until_complete().await
    }
}

/// Runs each generic scenario `async fn NAME<C: RealtimeClient>()` of the calling module over
/// every transport, as the tests `ws::NAME`, `socketio::NAME` (the client's default: polling,
/// then the upgrade) and `socketio_websocket::NAME` (a websocket from the start).
macro_rules! over_every_transport {
    ($($scenario:ident),* $(,)?) => {
        mod ws {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario::<crate::support::WsClient>().await;
                }
            )*
        }
        mod socketio {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario::<crate::support::socketio::SioClient>().await;
                }
            )*
        }
        mod socketio_websocket {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario::<crate::support::socketio::SioWebsocketClient>().await;
                }
            )*
        }
    };
}
pub(crate) use over_every_transport;

/// A plain WebSocket client speaking `{"event", "data", "id"?}` frames. It answers pings
/// whenever it reads.
pub struct WsClient {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Events read while waiting for an acknowledgement.
    pending: VecDeque<(String, Value)>,
    next_ack: u64,
}

impl RealtimeClient for WsClient {
    async fn connect(addr: SocketAddr) -> WsClient {
        let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .expect("websocket connects");
        WsClient::over(socket)
    }

    /// The token goes in the query, as a browser sends it.
    async fn connect_as(addr: SocketAddr, token: &str) -> Result<WsClient, String> {
        let url = format!("ws://{addr}/ws?token={token}");
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("handshake in time")
        {
            Ok((socket, _)) => Ok(WsClient::over(socket)),
            Err(tungstenite::Error::Http(response)) => Err(response.status().to_string()),
            Err(e) => panic!("handshake failed: {e}"),
        }
    }

    async fn emit(&mut self, event: &str, data: Value) {
        self.send_json(json!({"event": event, "data": data})).await;
    }

    async fn emit_with_ack(&mut self, event: &str, data: Value) -> Value {
        let id = self.next_ack;
        self.next_ack += 1;
        self.send_json(json!({"event": event, "data": data, "id": id}))
            .await;
        loop {
            let mut frame = self.next_frame().await;
            if frame["event"] == "ack" && frame["id"] == id {
                return frame["data"].take();
            }
            self.pending.push_back(event_of(frame));
        }
    }

    async fn try_next(&mut self, wait: Duration) -> Option<(String, Value)> {
        if let Some(event) = self.pending.pop_front() {
            return Some(event);
        }
        self.try_next_frame(wait).await.map(event_of)
    }

    async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }

    async fn kill(self) {
        drop(self.socket);
    }
}

/// A frame's (event, data).
fn event_of(mut frame: Value) -> (String, Value) {
    let name = frame["event"].as_str().expect("frames name their event");
    (name.to_owned(), frame["data"].take())
}

impl WsClient {
    async fn send_json(&mut self, frame: Value) {
        self.send_raw(Message::text(frame.to_string())).await;
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
        WsClient::over(socket)
    }

    /// A client over an open WebSocket.
    fn over(socket: WebSocketStream<MaybeTlsStream<TcpStream>>) -> WsClient {
        WsClient {
            socket,
            pending: VecDeque::new(),
            next_ack: 1,
        }
    }

    /// Sends any frame.
    pub async fn send_raw(&mut self, message: Message) {
        self.socket.send(message).await.expect("frame sent");
    }

    /// The next text frame, whole; fails after [`WAIT`].
    pub async fn next_frame(&mut self) -> Value {
        self.try_next_frame(WAIT).await.expect("a frame in time")
    }

    /// The next text frame within `wait`, whole, if any.
    async fn try_next_frame(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .ok()??;
            match frame.ok()? {
                Message::Text(text) => {
                    return Some(serde_json::from_str(&text).expect("frames are JSON"));
                }
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// How many pings the server sent within `wait` (each answered), and whether the
    /// connection was still open at the end; events on the way are kept.
    pub async fn pings_within(&mut self, wait: Duration) -> (usize, bool) {
        let deadline = tokio::time::Instant::now() + wait;
        let mut pings = 0;
        loop {
            match tokio::time::timeout_at(deadline, self.socket.next()).await {
                Err(_) => return (pings, true),
                Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
                Ok(Some(Ok(Message::Text(text)))) => {
                    let frame = serde_json::from_str(&text).expect("frames are JSON");
                    self.pending.push_back(event_of(frame));
                }
                Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => {
                    return (pings, false);
                }
                Ok(Some(Ok(_))) => continue,
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
}

/// A `/ws` handshake from 127.0.0.1, closed at once: `Ok` when accepted, the refusal's status
/// otherwise.
pub async fn ws_handshake(server: &TestServer) -> Result<(), u16> {
    let url = format!("ws://{}/ws", server.addr());
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake in time")
    {
        Ok(_) => Ok(()),
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// Checks a whole reply's events: start, chunks that add up in order, complete.
pub fn assert_whole_reply(events: &[(String, Value)], conversation_id: &str, text: &str) {
    let order = names(events);
    assert_eq!(order[0], "stream_start");
    assert_eq!(*order.last().unwrap(), "stream_complete");
    let message_id = events[0].1["messageId"].as_str().unwrap();
    assert_eq!(events[0].1["conversationId"], conversation_id);
    let chunks = &events[1..events.len() - 1];
    let mut so_far = String::new();
    for (i, (name, chunk)) in chunks.iter().enumerate() {
        assert_eq!(name, "stream_chunk");
        assert_eq!(chunk["messageId"], message_id);
        assert_eq!(chunk["conversationId"], conversation_id);
        so_far.push_str(chunk["delta"].as_str().unwrap());
        assert_eq!(chunk["content"], so_far.as_str());
        assert_eq!(chunk["seq"], (i + 1) as u64);
        assert_eq!(chunk["isComplete"], i == chunks.len() - 1);
    }
    assert_eq!(final_content(events), text);
    assert_eq!(
        events.last().unwrap().1,
        json!({"messageId": message_id, "conversationId": conversation_id})
    );
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
