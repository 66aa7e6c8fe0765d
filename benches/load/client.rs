//! The client side of the load benchmarks, run in a child process so that its sockets and memory
//! are not counted against the server's.

use std::io::BufRead;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// What the child process is asked to do. The Socket.IO client (`tests/support/node/bench.mjs`)
/// takes the same spec for `fanout` and `idle`. `unacknowledged_joins` says that the server does
/// not acknowledge joins (the original Node.js server), so the client waits a moment after
/// sending them instead.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "scenario", rename_all = "snake_case")]
pub enum Spec {
    /// Closed-loop `POST /api/chat`, each a new conversation, for `seconds` or until `requests`
    /// have been answered.
    RestPost {
        addr: SocketAddr,
        connections: usize,
        seconds: f64,
        #[serde(default)]
        requests: Option<usize>,
    },
    /// Closed-loop `GET /api/conversations/:id` over `conversations` stored ones.
    RestGet {
        addr: SocketAddr,
        connections: usize,
        seconds: f64,
        conversations: usize,
    },
    /// `subscribers` members of one conversation, connected to the nodes at `addrs` in turn,
    /// receive one reply asked for on the first.
    Fanout {
        addrs: Vec<SocketAddr>,
        subscribers: usize,
        expected: String,
        #[serde(default)]
        unacknowledged_joins: bool,
        #[serde(default)]
        dialect: Dialect,
    },
    /// `conversations` replies streaming at once, one per connection, the connections made to
    /// the nodes at `addrs` in turn.
    Streams {
        addrs: Vec<SocketAddr>,
        conversations: usize,
        #[serde(default)]
        dialect: Dialect,
    },
    /// `connections` idle connections, each joined to one of 100 conversations.
    Idle {
        addr: SocketAddr,
        connections: usize,
        #[serde(default)]
        unacknowledged_joins: bool,
        #[serde(default)]
        dialect: Dialect,
        /// Socket.IO (Node's client) only: polling first, then the upgrade.
        #[serde(default)]
        polling_first: bool,
    },
}

/// How this client's websockets speak: `/ws` frames, or Socket.IO (Engine.IO v4) packets of the
/// main namespace, so that one client can load either server's Socket.IO without being the
/// bottleneck itself (Node's socket.io-client parses every packet, on one core).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dialect {
    #[default]
    Ws,
    SocketIo,
}

impl Dialect {
    /// Opens a websocket with a small read buffer (tungstenite zeroes its whole read buffer, 128
    /// KiB by default, on every read, which would make the client the bottleneck); a Socket.IO
    /// one is connected to the main namespace.
    async fn connect(self, addr: SocketAddr) -> tokio_tungstenite::tungstenite::Result<Socket> {
        let config = WebSocketConfig::default().read_buffer_size(4096);
        let url = match self {
            Dialect::Ws => format!("ws://{addr}/ws"),
            Dialect::SocketIo => format!("ws://{addr}/socket.io/?EIO=4&transport=websocket"),
        };
        let (mut socket, _) =
            tokio_tungstenite::connect_async_with_config(url, Some(config), false).await?;
        if let Dialect::SocketIo = self {
            socket.send(Message::text("40")).await?;
            while let Some(message) = socket.next().await {
                if matches!(message?, Message::Text(text) if text.starts_with("40")) {
                    break;
                }
            }
        }
        Ok(socket)
    }

    /// A client event, with an acknowledgement id or none.
    fn frame(self, event: &str, data: Value, ack: Option<u64>) -> Message {
        match self {
            Dialect::Ws => {
                Message::text(json!({"event": event, "data": data, "id": ack}).to_string())
            }
            Dialect::SocketIo => {
                let id = ack.map(|id| id.to_string()).unwrap_or_default();
                Message::text(format!("42{id}{}", json!([event, data])))
            }
        }
    }

    /// Whether a frame is the server's event `name`.
    fn is(self, text: &str, name: &str) -> bool {
        let rest = match self {
            Dialect::Ws => text.strip_prefix(r#"{"event":""#),
            Dialect::SocketIo => text.strip_prefix(r#"42[""#),
        };
        rest.and_then(|rest| rest.strip_prefix(name))
            .is_some_and(|rest| rest.starts_with('"'))
    }

    /// Whether a frame acknowledges a client event.
    fn is_ack(self, text: &str) -> bool {
        match self {
            Dialect::Ws => serde_json::from_str::<Value>(text).is_ok_and(|v| v["event"] == "ack"),
            Dialect::SocketIo => text.starts_with("43"),
        }
    }

    /// An event frame's payload.
    fn data(self, text: &str) -> Value {
        match self {
            Dialect::Ws => serde_json::from_str::<Value>(text).unwrap()["data"].take(),
            Dialect::SocketIo => serde_json::from_str::<Value>(&text[2..]).unwrap()[1].take(),
        }
    }

    /// Answers the server's Engine.IO ping, which a Socket.IO client must do to stay connected.
    async fn pong(self, socket: &mut Socket, text: &str) {
        if let (Dialect::SocketIo, "2") = (self, text) {
            let _ = socket.send(Message::text("3")).await;
        }
    }
}

/// Latency figures in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(mut samples: Vec<Duration>) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort();
        let at = |q: f64| {
            samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1]
        };
        Latency {
            count: samples.len(),
            p50_ms: at(0.50).as_secs_f64() * 1e3,
            p99_ms: at(0.99).as_secs_f64() * 1e3,
            max_ms: samples[samples.len() - 1].as_secs_f64() * 1e3,
        }
    }
}

/// What the child reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    pub seconds: f64,
    pub ok: usize,
    pub errors: usize,
    pub latency: Latency,
    /// Streams: time to the first chunk.
    pub first_chunk: Latency,
    /// Fan-out: chunks delivered in all.
    pub chunks: u64,
    /// Fan-out: chunks a subscriber never got (sequence gaps, missing ends, wrong text).
    pub missing: u64,
}

/// Entry point of the child process: reads the spec, prepares, says `ready`, waits for `go`,
/// runs, prints the outcome, and holds its connections until `stop` (or end of input).
pub fn run(spec_json: &str) {
    let spec: Spec = serde_json::from_str(spec_json).expect("a valid spec");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let prepared = prepare(&spec).await;
        say(&json!({"ready": true}));
        wait_for_line("go");
        let outcome = execute(&spec, prepared).await;
        say(&serde_json::to_value(&outcome.0).unwrap());
        let held = outcome.1;
        tokio::task::spawn_blocking(|| wait_for_line("stop"))
            .await
            .unwrap();
        drop(held);
    });
}

fn say(value: &Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}").unwrap();
    out.flush().unwrap();
}

fn wait_for_line(expected: &str) {
    for line in std::io::stdin().lock().lines() {
        if line.map(|l| l.trim() == expected).unwrap_or(true) {
            return;
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long joins that are not acknowledged are given to be handled.
const UNACKNOWLEDGED_JOIN: Duration = Duration::from_secs(2);

/// Connections opened before `go`.
enum Prepared {
    None,
    Sockets(Vec<Socket>),
    Ids(Vec<String>),
}

/// `count` connections, made to the servers at `addrs` in turn.
async fn connect_many(addrs: &[SocketAddr], count: usize, dialect: Dialect) -> Vec<Socket> {
    let gate = Arc::new(Semaphore::new(200));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let gate = gate.clone();
        let addr = addrs[i % addrs.len()];
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            for attempt in 0..20 {
                match dialect.connect(addr).await {
                    Ok(socket) => return socket,
                    Err(e) if attempt == 19 => panic!("cannot connect: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            unreachable!()
        }));
    }
    let mut sockets = Vec::with_capacity(count);
    for task in tasks {
        sockets.push(task.await.unwrap());
    }
    sockets
}

/// Joins each socket to the conversation `id(i)` and returns once the server has handled every
/// join: by its acknowledgement, or, where joins are not acknowledged, after a pause.
async fn join_all(
    sockets: Vec<Socket>,
    id: impl Fn(usize) -> String,
    dialect: Dialect,
    unacknowledged: bool,
) -> Vec<Socket> {
    let tasks: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, mut socket)| {
            let ack = (!unacknowledged).then_some(1);
            let join = dialect.frame("join_conversation", json!({"conversationId": id(i)}), ack);
            tokio::spawn(async move {
                socket.send(join).await.unwrap();
                if unacknowledged {
                    return socket;
                }
                while let Some(Ok(message)) = socket.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    dialect.pong(&mut socket, &text).await;
                    if dialect.is_ack(&text) {
                        return socket;
                    }
                }
                panic!("the connection closed while joining");
            })
        })
        .collect();
    let mut joined = Vec::with_capacity(tasks.len());
    for task in tasks {
        joined.push(task.await.unwrap());
    }
    if unacknowledged {
        tokio::time::sleep(UNACKNOWLEDGED_JOIN).await;
    }
    joined
}

async fn prepare(spec: &Spec) -> Prepared {
    match spec {
        Spec::RestPost { .. } => Prepared::None,
        Spec::RestGet {
            addr,
            conversations,
            ..
        } => {
            let http = reqwest::Client::new();
            let mut ids = Vec::new();
            for _ in 0..*conversations {
                let body: Value = http
                    .post(format!("http://{addr}/api/chat"))
                    .json(&json!({"message": "a stored conversation"}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                ids.push(body["conversation"]["id"].as_str().unwrap().to_owned());
            }
            Prepared::Ids(ids)
        }
        Spec::Fanout {
            addrs,
            subscribers,
            unacknowledged_joins,
            dialect,
            ..
        } => {
            let sockets = connect_many(addrs, *subscribers, *dialect).await;
            let fanout = |_| "fanout".to_owned();
            Prepared::Sockets(join_all(sockets, fanout, *dialect, *unacknowledged_joins).await)
        }
        Spec::Streams {
            addrs,
            conversations,
            dialect,
        } => Prepared::Sockets(connect_many(addrs, *conversations, *dialect).await),
        Spec::Idle {
            addr,
            connections,
            unacknowledged_joins,
            dialect,
            ..
        } => {
            let sockets = connect_many(&[*addr], *connections, *dialect).await;
            let idle = |i| format!("idle-{}", i % 100);
            Prepared::Sockets(join_all(sockets, idle, *dialect, *unacknowledged_joins).await)
        }
    }
}

async fn execute(spec: &Spec, prepared: Prepared) -> (Outcome, Vec<Socket>) {
    match (spec, prepared) {
        (
            Spec::RestPost {
                addr,
                connections,
                seconds,
                requests,
            },
            _,
        ) => {
            let url = format!("http://{addr}/api/chat");
            let until = Until::new(*seconds, *requests);
            let outcome = closed_loop(*connections, until, move |http, _| {
                http.post(&url)
                    .json(&json!({"message": "benchmark message"}))
            })
            .await;
            (outcome, Vec::new())
        }
        (
            Spec::RestGet {
                addr,
                connections,
                seconds,
                ..
            },
            Prepared::Ids(ids),
        ) => {
            let base = format!("http://{addr}/api/conversations/");
            let ids = Arc::new(ids);
            let outcome = closed_loop(*connections, Until::new(*seconds, None), move |http, n| {
                http.get(format!("{base}{}", ids[n % ids.len()]))
            })
            .await;
            (outcome, Vec::new())
        }
        (
            Spec::Fanout {
                addrs,
                expected,
                dialect,
                ..
            },
            Prepared::Sockets(sockets),
        ) => fanout(addrs[0], sockets, expected, *dialect).await,
        (Spec::Streams { dialect, .. }, Prepared::Sockets(sockets)) => {
            (streams(sockets, *dialect).await, Vec::new())
        }
        (Spec::Idle { .. }, Prepared::Sockets(sockets)) => (Outcome::default(), sockets),
        _ => unreachable!("prepared to match the spec"),
    }
}

/// When a closed loop ends: at a deadline, or once a number of requests have been sent.
#[derive(Clone)]
struct Until {
    deadline: Instant,
    tickets: Option<Arc<AtomicUsize>>,
}

impl Until {
    fn new(seconds: f64, requests: Option<usize>) -> Until {
        Until {
            deadline: Instant::now() + Duration::from_secs_f64(seconds),
            tickets: requests.map(|n| Arc::new(AtomicUsize::new(n))),
        }
    }

    /// Whether one more request may go.
    fn another(&self) -> bool {
        Instant::now() < self.deadline
            && self.tickets.as_ref().is_none_or(|tickets| {
                tickets
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
            })
    }
}

async fn closed_loop(
    connections: usize,
    until: Until,
    request: impl Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
) -> Outcome {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .build()
        .unwrap();
    let request = Arc::new(request);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..connections {
        let (http, request, until) = (http.clone(), request.clone(), until.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut errors, mut samples) = (0, 0, Vec::new());
            let mut n = worker;
            while until.another() {
                let sent = Instant::now();
                match request(&http, n).send().await {
                    Ok(response) if response.status().is_success() => {
                        let _ = response.bytes().await;
                        ok += 1;
                        samples.push(sent.elapsed());
                    }
                    _ => errors += 1,
                }
                n += connections;
            }
            (ok, errors, samples)
        }));
    }
    let mut outcome = Outcome::default();
    let mut samples = Vec::new();
    for task in tasks {
        let (ok, errors, mut s) = task.await.unwrap();
        outcome.ok += ok;
        outcome.errors += errors;
        samples.append(&mut s);
    }
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome.latency = Latency::of(samples);
    outcome
}

/// Reads a `stream_chunk` frame's `seq` and `isComplete` without parsing the whole frame; the
/// original server's chunks have no `seq` (each carries the whole text so far), so `count`, the
/// chunk's place, stands in for it.
fn chunk_fields(dialect: Dialect, text: &str, count: u64) -> Option<(u64, bool)> {
    if !dialect.is(text, "stream_chunk") {
        return None;
    }
    let seq = text.rfind(r#""seq":"#).and_then(|at| {
        let digits: String = text[at + 6..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    });
    Some((seq.unwrap_or(count), text.contains(r#""isComplete":true"#)))
}

async fn fanout(
    addr: SocketAddr,
    sockets: Vec<Socket>,
    expected: &str,
    dialect: Dialect,
) -> (Outcome, Vec<Socket>) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut socket in sockets {
        let expected = expected.to_owned();
        tasks.push(tokio::spawn(async move {
            let (mut chunks, mut last_seq, mut correct) = (0u64, 0u64, false);
            let mut done = None;
            while let Ok(Some(Ok(message))) =
                tokio::time::timeout(Duration::from_secs(120), socket.next()).await
            {
                let Message::Text(text) = message else {
                    continue;
                };
                dialect.pong(&mut socket, &text).await;
                if let Some((seq, complete)) = chunk_fields(dialect, &text, chunks + 1) {
                    chunks += 1;
                    last_seq = seq;
                    if complete {
                        correct = dialect.data(&text)["content"] == expected.as_str();
                    }
                } else if dialect.is(&text, "stream_complete") {
                    done = Some(started.elapsed());
                    break;
                }
            }
            (chunks, last_seq, correct, done, socket)
        }));
    }
    let mut sender = dialect.connect(addr).await.unwrap();
    let ask = json!({"conversationId": "fanout", "message": "to everyone"});
    sender
        .send(dialect.frame("stream_chat", ask, None))
        .await
        .unwrap();
    let mut outcome = Outcome::default();
    let (mut samples, mut sockets, mut results) = (Vec::new(), Vec::new(), Vec::new());
    for task in tasks {
        let (chunks, last_seq, correct, done, socket) = task.await.unwrap();
        results.push((chunks, last_seq, correct, done.is_some()));
        outcome.chunks += chunks;
        if let Some(done) = done {
            samples.push(done);
        }
        sockets.push(socket);
    }
    let final_seq = results.iter().map(|r| r.1).max().unwrap_or(0);
    for (chunks, _, correct, completed) in results {
        outcome.missing += final_seq - chunks.min(final_seq);
        if correct && completed {
            outcome.ok += 1;
        } else {
            outcome.errors += 1;
        }
    }
    outcome.seconds = samples
        .iter()
        .max()
        .copied()
        .unwrap_or_default()
        .as_secs_f64();
    outcome.latency = Latency::of(samples);
    (outcome, sockets)
}

async fn streams(sockets: Vec<Socket>, dialect: Dialect) -> Outcome {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut socket) in sockets.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let message =
                json!({"conversationId": format!("stream-{i}"), "message": "stream please"});
            socket
                .send(dialect.frame("stream_chat", message, None))
                .await
                .ok()?;
            let mut first = None;
            while let Ok(Some(Ok(message))) =
                tokio::time::timeout(Duration::from_secs(60), socket.next()).await
            {
                let Message::Text(text) = message else {
                    continue;
                };
                dialect.pong(&mut socket, &text).await;
                if first.is_none() && dialect.is(&text, "stream_chunk") {
                    first = Some(sent.elapsed());
                }
                if dialect.is(&text, "stream_complete") {
                    return Some((first?, sent.elapsed()));
                }
                if dialect.is(&text, "error") {
                    return None;
                }
            }
            None
        }));
    }
    let mut outcome = Outcome::default();
    let (mut firsts, mut completions) = (Vec::new(), Vec::new());
    for task in tasks {
        match task.await.unwrap() {
            Some((first, done)) => {
                outcome.ok += 1;
                firsts.push(first);
                completions.push(done);
            }
            None => outcome.errors += 1,
        }
    }
    outcome.seconds = started.elapsed().as_secs_f64();
    outcome.first_chunk = Latency::of(firsts);
    outcome.latency = Latency::of(completions);
    outcome
}
