//! A real Socket.IO client: Node's `socket.io-client` 4.x running `node/client.mjs`, driven over
//! stdin/stdout with JSON lines; [`super::npm`] installs it on first use.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use super::npm::{ensure_installed, node_dir};
use super::{RealtimeClient, WAIT};

/// One Socket.IO client in its own Node process.
pub struct SioClient {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<Value>,
    events: VecDeque<(String, Value)>,
    acks: HashMap<u64, Value>,
    next_ack: u64,
    /// The transport the client started with.
    pub first_transport: Option<String>,
    /// The transport it upgraded to, if it did.
    pub upgraded_to: Option<String>,
    /// Why it disconnected, once it did.
    pub disconnect_reason: Option<String>,
}

impl SioClient {
    /// Connects to `addr` with the client's default options plus `options` (reconnection off
    /// unless `options` says otherwise), and waits for the `connect` event.
    pub async fn connect_with(addr: SocketAddr, options: Value) -> SioClient {
        match SioClient::try_connect_with(addr, options).await {
            Ok(client) => client,
            Err(message) => panic!("connect_error: {message}"),
        }
    }

    /// [`SioClient::connect_with`], or the message of the `connect_error` the server answered.
    pub async fn try_connect_with(addr: SocketAddr, options: Value) -> Result<SioClient, String> {
        ensure_installed();
        let mut child = Command::new("node")
            .arg(node_dir().join("client.mjs"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs (install Node.js)");
        let stdin = child.stdin.take().expect("client stdin");
        let stdout = child.stdout.take().expect("client stdout");
        let (sender, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let value = serde_json::from_str(&line).expect("client lines are JSON");
                if sender.send(value).is_err() {
                    break;
                }
            }
        });
        let mut client = SioClient {
            child,
            stdin,
            lines,
            events: VecDeque::new(),
            acks: HashMap::new(),
            next_ack: 1,
            first_transport: None,
            upgraded_to: None,
            disconnect_reason: None,
        };
        client
            .command(json!({"cmd": "connect", "url": format!("http://{addr}"), "options": options}))
            .await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let line = client.read_line(deadline).await.expect("connected in time");
            match line["type"].as_str() {
                Some("connect") => return Ok(client),
                Some("connect_error") => {
                    return Err(line["message"].as_str().unwrap_or_default().to_owned());
                }
                _ => client.keep(line),
            }
        }
    }

    async fn command(&mut self, command: Value) {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("client takes commands");
    }

    async fn read_line(&mut self, deadline: tokio::time::Instant) -> Option<Value> {
        tokio::time::timeout_at(deadline, self.lines.recv())
            .await
            .ok()
            .flatten()
    }

    /// Files one line from the client where it belongs.
    fn keep(&mut self, line: Value) {
        let first = |args: &Value| args.get(0).cloned().unwrap_or(Value::Null);
        match line["type"].as_str() {
            Some("event") => {
                let name = line["event"].as_str().expect("events are named").to_owned();
                self.events.push_back((name, first(&line["args"])));
            }
            Some("ack") => {
                let id = line["id"].as_u64().expect("acks carry their id");
                self.acks.insert(id, first(&line["args"]));
            }
            Some("open") => self.first_transport = line["transport"].as_str().map(Into::into),
            Some("upgrade") => self.upgraded_to = line["transport"].as_str().map(Into::into),
            Some("disconnect") => self.disconnect_reason = line["reason"].as_str().map(Into::into),
            Some("connect") => {}
            _ => panic!("unexpected client line: {line}"),
        }
    }

    /// Reads and files one line; false when none came before `deadline`.
    async fn pump(&mut self, deadline: tokio::time::Instant) -> bool {
        match self.read_line(deadline).await {
            Some(line) => {
                self.keep(line);
                true
            }
            None => false,
        }
    }

    /// Emits `event` with any arguments (none at all, several), without an acknowledgement.
    pub async fn emit_args(&mut self, event: &str, args: Vec<Value>) {
        self.command(json!({"cmd": "emit", "event": event, "args": args}))
            .await;
    }

    /// Waits until the client has moved to another transport, and names it.
    pub async fn upgraded(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.upgraded_to.is_none() {
            assert!(self.pump(deadline).await, "no upgrade in time");
        }
        self.upgraded_to.clone().unwrap()
    }

    /// Why the client was disconnected, if it was within `wait`; events received before are kept.
    pub async fn disconnected_within(&mut self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        while self.disconnect_reason.is_none() {
            if !self.pump(deadline).await {
                break;
            }
        }
        self.disconnect_reason.clone()
    }

    /// Keeps the client's event loop busy for `time`: it neither reads nor polls meanwhile.
    pub async fn stall(&mut self, time: Duration) {
        self.command(json!({"cmd": "block", "ms": time.as_millis() as u64}))
            .await;
    }
}

impl RealtimeClient for SioClient {
    async fn connect(addr: SocketAddr) -> SioClient {
        SioClient::connect_with(addr, json!({})).await
    }

    /// The token goes in the handshake's `auth` payload.
    async fn connect_as(addr: SocketAddr, token: &str) -> Result<SioClient, String> {
        SioClient::try_connect_with(addr, json!({"auth": {"token": token}})).await
    }

    async fn emit(&mut self, event: &str, data: Value) {
        self.emit_args(event, vec![data]).await;
    }

    async fn emit_with_ack(&mut self, event: &str, data: Value) -> Value {
        let id = self.next_ack;
        self.next_ack += 1;
        self.command(json!({"cmd": "emit", "event": event, "args": [data], "ack": id}))
            .await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(ack) = self.acks.remove(&id) {
                return ack;
            }
            assert!(self.pump(deadline).await, "no acknowledgement for {event}");
        }
    }

    /// Fails with the disconnect's reason, if there was one.
    async fn next(&mut self) -> (String, Value) {
        match self.try_next(WAIT).await {
            Some(event) => event,
            None => panic!(
                "no event in time; disconnected: {:?}",
                self.disconnect_reason
            ),
        }
    }

    /// None once the client is disconnected and has read every event it got.
    async fn try_next(&mut self, wait: Duration) -> Option<(String, Value)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(event) = self.events.pop_front() {
                return Some(event);
            }
            if self.disconnect_reason.is_some() || !self.pump(deadline).await {
                return None;
            }
        }
    }

    /// Disconnects as `socket.disconnect()` does.
    async fn close(mut self) {
        self.command(json!({"cmd": "disconnect"})).await;
        let reason = self.disconnected_within(WAIT).await;
        assert_eq!(reason.as_deref(), Some("io client disconnect"));
    }

    /// Kills the client process. A client that started on polling is let upgrade first: the
    /// server sees a websocket drop at once, a poll that never comes only after the heartbeat's
    /// timeout.
    async fn kill(mut self) {
        if self.first_transport.as_deref() == Some("polling") {
            self.upgraded().await;
        }
        self.child.kill().await.expect("client killed");
    }
}

/// A Socket.IO client that opens a websocket straight away (`transports: ["websocket"]`), as
/// many mobile and production front ends do; the server serves these without socketioxide.
pub struct SioWebsocketClient(SioClient);

impl SioWebsocketClient {
    fn options(more: Value) -> Value {
        let mut options = json!({"transports": ["websocket"]});
        options
            .as_object_mut()
            .unwrap()
            .extend(more.as_object().unwrap().clone());
        options
    }
}

impl RealtimeClient for SioWebsocketClient {
    async fn connect(addr: SocketAddr) -> SioWebsocketClient {
        SioWebsocketClient(SioClient::connect_with(addr, Self::options(json!({}))).await)
    }

    async fn connect_as(addr: SocketAddr, token: &str) -> Result<SioWebsocketClient, String> {
        let options = Self::options(json!({"auth": {"token": token}}));
        SioClient::try_connect_with(addr, options)
            .await
            .map(SioWebsocketClient)
    }

    async fn emit(&mut self, event: &str, data: Value) {
        self.0.emit(event, data).await
    }

    async fn emit_with_ack(&mut self, event: &str, data: Value) -> Value {
        self.0.emit_with_ack(event, data).await
    }

    async fn next(&mut self) -> (String, Value) {
        self.0.next().await
    }

    async fn try_next(&mut self, wait: Duration) -> Option<(String, Value)> {
        self.0.try_next(wait).await
    }

    async fn close(self) {
        self.0.close().await
    }

    async fn kill(self) {
        self.0.kill().await
    }
}
