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
use tokio_tungstenite::tungstenite::handshake::client::Response;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// What the child process is asked to do. The Socket.IO client (`tests/support/node/bench.mjs`)
/// takes the same spec for `fanout`, `streams` and `idle`; `unacknowledged_joins` tells it that
/// the server does not acknowledge joins (the original Node.js server), so it waits a moment
/// after sending them instead.
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
    },
    /// `conversations` replies streaming at once, one per connection, the connections made to
    /// the nodes at `addrs` in turn.
    Streams {
        addrs: Vec<SocketAddr>,
        conversations: usize,
    },
    /// `connections` idle connections, each joined to one of 100 conversations.
    Idle {
        addr: SocketAddr,
        connections: usize,
        #[serde(default)]
        unacknowledged_joins: bool,
    },
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

/// Connections opened before `go`.
enum Prepared {
    None,
    Sockets(Vec<Socket>),
    Ids(Vec<String>),
}

/// Opens a WebSocket to `/ws` with a small read buffer: tungstenite zeroes its whole read buffer
/// (128 KiB by default) on every read, which would make the client the bottleneck.
async fn connect(addr: SocketAddr) -> tokio_tungstenite::tungstenite::Result<(Socket, Response)> {
    let config = WebSocketConfig::default().read_buffer_size(4096);
    tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/ws"), Some(config), false)
        .await
}

/// `count` connections, made to the servers at `addrs` in turn.
async fn connect_many(addrs: &[SocketAddr], count: usize) -> Vec<Socket> {
    let gate = Arc::new(Semaphore::new(200));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let gate = gate.clone();
        let addr = addrs[i % addrs.len()];
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            for attempt in 0..20 {
                match connect(addr).await {
                    Ok((socket, _)) => return socket,
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

fn frame(event: &str, data: Value) -> Message {
    Message::text(json!({"event": event, "data": data}).to_string())
}

/// Joins each socket to the conversation `id(i)` and returns once the server has handled every
/// join: the server handles a connection's frames in order, so the `error` answer to an unknown
/// event sent after the join means the join is done.
async fn join_all(sockets: Vec<Socket>, id: impl Fn(usize) -> String) -> Vec<Socket> {
    let tasks: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, mut socket)| {
            let join = frame("join_conversation", json!({"conversationId": id(i)}));
            tokio::spawn(async move {
                socket.send(join).await.unwrap();
                socket.send(frame("joined?", Value::Null)).await.unwrap();
                while let Some(Ok(message)) = socket.next().await {
                    if matches!(&message, Message::Text(text) if text.starts_with(r#"{"event":"error""#))
                    {
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
            addrs, subscribers, ..
        } => {
            let sockets = connect_many(addrs, *subscribers).await;
            Prepared::Sockets(join_all(sockets, |_| "fanout".to_owned()).await)
        }
        Spec::Streams {
            addrs,
            conversations,
        } => Prepared::Sockets(connect_many(addrs, *conversations).await),
        Spec::Idle {
            addr, connections, ..
        } => {
            let sockets = connect_many(&[*addr], *connections).await;
            Prepared::Sockets(join_all(sockets, |i| format!("idle-{}", i % 100)).await)
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
                addrs, expected, ..
            },
            Prepared::Sockets(sockets),
        ) => fanout(addrs[0], sockets, expected).await,
        (Spec::Streams { .. }, Prepared::Sockets(sockets)) => (streams(sockets).await, Vec::new()),
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

/// Reads a `stream_chunk` frame's `seq` and `isComplete` without parsing the whole frame.
fn chunk_fields(text: &str) -> Option<(u64, bool)> {
    if !text.starts_with(r#"{"event":"stream_chunk""#) {
        return None;
    }
    let at = text.rfind(r#""seq":"#)? + 6;
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((digits.parse().ok()?, text.contains(r#""isComplete":true"#)))
}

async fn fanout(addr: SocketAddr, sockets: Vec<Socket>, expected: &str) -> (Outcome, Vec<Socket>) {
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
                if let Some((seq, complete)) = chunk_fields(&text) {
                    chunks += 1;
                    last_seq = seq;
                    if complete {
                        let value: Value = serde_json::from_str(&text).unwrap();
                        correct = value["data"]["content"] == expected.as_str();
                    }
                } else if text.starts_with(r#"{"event":"stream_complete""#) {
                    done = Some(started.elapsed());
                    break;
                }
            }
            (chunks, last_seq, correct, done, socket)
        }));
    }
    let (mut sender, _) = connect(addr).await.unwrap();
    sender
        .send(frame(
            "stream_chat",
            json!({"conversationId": "fanout", "message": "to everyone"}),
        ))
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

async fn streams(sockets: Vec<Socket>) -> Outcome {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, mut socket) in sockets.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let message =
                json!({"conversationId": format!("stream-{i}"), "message": "stream please"});
            socket.send(frame("stream_chat", message)).await.ok()?;
            let mut first = None;
            while let Ok(Some(Ok(message))) =
                tokio::time::timeout(Duration::from_secs(60), socket.next()).await
            {
                let Message::Text(text) = message else {
                    continue;
                };
                if first.is_none() && text.starts_with(r#"{"event":"stream_chunk""#) {
                    first = Some(sent.elapsed());
                }
                if text.starts_with(r#"{"event":"stream_complete""#) {
                    return Some((first?, sent.elapsed()));
                }
                if text.starts_with(r#"{"event":"error""#) {
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
