//! Load benchmarks: the real server in this process on `127.0.0.1:0`, a fast test model server,
//! and real clients in a child process: this binary again for REST and `/ws`, Node's
//! socket.io-client (`tests/support/node/bench.mjs`) for Socket.IO. `cargo bench` runs every
//! scenario at full size; `cargo bench -- --quick` (or `BENCH_QUICK=1`) runs them small; naming
//! scenarios after `--` runs only those (`fanout`, `"idle socket.io"`, ...). Prints one table and
//! writes the figures to `target/bench/load.json`.
//! `BENCH_DB=memory` runs them on the in-memory store instead of SQLite, for comparison; the
//! `cluster` scenarios run two nodes in this process on a fresh schema of the PostgreSQL server
//! at `TEST_DATABASE_URL` and the Redis at `TEST_REDIS_URL` (by default the machine's own).

#[path = "../../tests/support/model_server.rs"]
#[allow(dead_code)]
mod model_server;
#[path = "../../tests/support/npm.rs"]
mod npm;
#[path = "../../src/store/postgres/test_database.rs"]
#[allow(dead_code, reason = "what only the store's own tests use")]
mod test_database;

mod bare;
mod client;
mod versus;

use std::borrow::Cow;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ai_chat_server::App;
use ai_chat_server::config::Config;
use ai_chat_server::domain::UserId;
use ai_chat_server::llm::DemoProvider;
use ai_chat_server::metrics::resident_bytes;
use ai_chat_server::store;
use client::{Dialect, Latency, Outcome, Spec};
use model_server::ModelServer;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Sizes of one run.
struct Sizes {
    seconds: f64,
    fanout: [usize; 2],
    streams: usize,
    idle: usize,
    conversations: usize,
    routing_conversations: usize,
}

const FULL: Sizes = Sizes {
    seconds: 10.0,
    fanout: [1_000, 10_000],
    streams: 2_000,
    idle: 10_000,
    conversations: 100_000,
    routing_conversations: 1_000,
};

const QUICK: Sizes = Sizes {
    seconds: 2.0,
    fanout: [100, 1_000],
    streams: 200,
    idle: 1_000,
    conversations: 5_000,
    routing_conversations: 200,
};

/// One line of the result table.
#[derive(Serialize, Deserialize)]
struct Row {
    scenario: String,
    figures: Vec<(Cow<'static, str>, String)>,
    json: Value,
}

/// The scenarios, in the order they run; each runs in a fresh process of its own, so that no
/// memory, task or socket of one is seen by the next.
const SCENARIOS: [&str; 17] = [
    "rest_post",
    "rest_get",
    "fanout /ws",
    "fanout socket.io",
    "streams",
    "idle /ws",
    "idle socket.io",
    "idle socket.io polling first",
    "conversations",
    "routing",
    "cluster fanout",
    "cluster streams",
    "versus idle",
    "versus fanout",
    "versus streams",
    "versus conversations",
    "versus rest",
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick") || std::env::var_os("BENCH_QUICK").is_some();
    match args.get(1).map(String::as_str) {
        Some("--client") => return client::run(&args[2]),
        Some("--bare") => return bare::run(&args[2]),
        Some("--scenario") => return run_scenario(&args[2], quick),
        _ => {}
    }
    let wanted: Vec<&str> = args[1..]
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let started = Instant::now();
    let rows: Vec<Row> = SCENARIOS
        .iter()
        .filter(|name| wanted.is_empty() || wanted.iter().any(|w| name.starts_with(w)))
        .flat_map(|name| in_fresh_process(name, quick))
        .collect();
    report(&rows, quick, started.elapsed());
}

/// Runs one scenario in a child process (this binary again) and reads its rows.
fn in_fresh_process(name: &str, quick: bool) -> Vec<Row> {
    let mut command = Command::new(std::env::current_exe().expect("the bench binary"));
    command.arg("--scenario").arg(name);
    if quick {
        command.arg("--quick");
    }
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .expect("scenario process runs");
    assert!(output.status.success(), "scenario {name} failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Entry point of a scenario's process: runs it and prints its rows, one JSON line each.
fn run_scenario(name: &str, quick: bool) {
    let sizes = if quick { QUICK } else { FULL };
    let side_by_side = if quick { versus::QUICK } else { versus::FULL };
    if name.starts_with("versus") {
        versus::pin_load();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = runtime.block_on(async {
        let mut rows = Vec::new();
        match name {
            "rest_post" => rows.push(rest_post(&sizes).await),
            "rest_get" => rows.push(rest_get(&sizes).await),
            "fanout /ws" | "fanout socket.io" => {
                let transport = Transport::named(&name["fanout ".len()..]);
                for subscribers in sizes.fanout {
                    let nodes = Nodes::one().await;
                    rows.push(fanout(&nodes, transport, subscribers).await);
                    nodes.finish().await;
                }
            }
            "streams" => {
                let nodes = Nodes::one().await;
                rows.push(streams(&nodes, &sizes).await);
                nodes.finish().await;
            }
            "cluster fanout" => {
                let subscribers = sizes.fanout[1];
                for transport in [Transport::Ws, Transport::SocketIo] {
                    let nodes = Nodes::cluster(2).await;
                    rows.push(fanout(&nodes, transport, subscribers).await);
                    nodes.finish().await;
                }
            }
            "cluster streams" => {
                let nodes = Nodes::cluster(2).await;
                rows.push(streams(&nodes, &sizes).await);
                nodes.finish().await;
            }
            "idle /ws" | "idle socket.io" => {
                rows.push(idle(Transport::named(&name["idle ".len()..]), false, &sizes).await)
            }
            "idle socket.io polling first" => {
                rows.push(idle(Transport::SocketIo, true, &sizes).await)
            }
            "conversations" => rows.push(conversations(&sizes).await),
            "routing" => rows.push(routing(&sizes).await),
            "versus idle" => rows.extend(versus::idle(&side_by_side).await),
            "versus fanout" => rows.extend(versus::fanout(&side_by_side).await),
            "versus streams" => rows.extend(versus::streams(&side_by_side).await),
            "versus conversations" => rows.extend(versus::conversations(&side_by_side).await),
            "versus rest" => rows.extend(versus::rest(&side_by_side).await),
            other => panic!("no scenario {other}"),
        }
        rows
    });
    for row in rows {
        println!("{}", serde_json::to_string(&row).unwrap());
    }
}

/// The server under test, with a durable SQLite store in a temporary folder.
struct Bench {
    app: App,
    model: ModelServer,
    _dir: tempfile::TempDir,
}

impl Bench {
    /// Shuts the server down, so that nothing of it runs on into the next server of the same
    /// process (the fan-out sizes share one).
    async fn finish(self) {
        self.app.shutdown(Duration::ZERO).await;
    }
}

fn bench_config(dir: &tempfile::TempDir) -> Config {
    let mut config = Config {
        port: 0,
        rate_limit_max_requests: 0,
        rt_messages_per_minute: 0,
        max_connections_per_ip: 0,
        database_url: std::env::var("BENCH_DB")
            .unwrap_or(format!("sqlite://{}/bench.db", dir.path().display())),
        ..Config::default()
    };
    config.model.api_key = Some("bench".into());
    config.model.model = "bench-model".into();
    config
}

/// The servers a scenario talks to: one, or the nodes of a cluster sharing one PostgreSQL
/// database and Redis, with one test model server.
struct Nodes {
    apps: Vec<App>,
    model: ModelServer,
    _dir: tempfile::TempDir,
    _database: Option<test_database::TestDatabase>,
}

impl Nodes {
    /// One server.
    async fn one() -> Nodes {
        let bench = bench_server(|_| {}).await;
        Nodes {
            apps: vec![bench.app],
            model: bench.model,
            _dir: bench._dir,
            _database: None,
        }
    }

    /// `count` nodes of a new cluster.
    async fn cluster(count: usize) -> Nodes {
        let dir = tempfile::tempdir().unwrap();
        let model = ModelServer::start().await;
        let database = test_database::TestDatabase::create().await;
        let mut config = bench_config(&dir);
        config.database_url = database.url.clone();
        config.model.base_url = Some(model.base_url());
        config.cluster = Some(ai_chat_server::config::ClusterConfig {
            redis_url: std::env::var("TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            name: format!("bench-{}", std::process::id()),
            lease: Duration::from_secs(5),
        });
        let mut apps = Vec::new();
        for _ in 0..count {
            apps.push(App::start(config.clone()).await.expect("node starts"));
        }
        Nodes {
            apps,
            model,
            _dir: dir,
            _database: Some(database),
        }
    }

    /// Where the servers listen.
    fn addrs(&self) -> Vec<std::net::SocketAddr> {
        self.apps.iter().map(App::addr).collect()
    }

    /// How the table names the servers, after a scenario's name.
    fn suffix(&self) -> String {
        match self.apps.len() {
            1 => String::new(),
            n => format!(" over {n} nodes"),
        }
    }

    async fn finish(self) {
        for app in self.apps {
            app.shutdown(Duration::ZERO).await;
        }
    }
}

async fn bench_server(tweak: impl FnOnce(&mut Config)) -> Bench {
    let dir = tempfile::tempdir().unwrap();
    let model = ModelServer::start().await;
    model.set_reply(
        model_server::pieces_of("Hello from the test model."),
        Duration::ZERO,
    );
    let mut config = bench_config(&dir);
    config.model.base_url = Some(model.base_url());
    tweak(&mut config);
    let app = App::start(config).await.expect("server starts");
    Bench {
        app,
        model,
        _dir: dir,
    }
}

/// How a scenario's clients talk to the server.
#[derive(Clone, Copy)]
enum Transport {
    /// The plain WebSocket at `/ws`, from this binary run with `--client` (which speaks
    /// Socket.IO too when a spec's `dialect` says so).
    Ws,
    /// Socket.IO on its websocket transport, from Node's socket.io-client.
    SocketIo,
}

impl Transport {
    /// Its name in the table.
    fn name(self) -> &'static str {
        match self {
            Transport::Ws => "/ws",
            Transport::SocketIo => "socket.io",
        }
    }

    /// The transport of a scenario name's last word.
    fn named(name: &str) -> Transport {
        if name == Transport::SocketIo.name() {
            Transport::SocketIo
        } else {
            Transport::Ws
        }
    }

    /// Its name in the JSON figures.
    fn key(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::SocketIo => "socket.io",
        }
    }

    /// The client child process that runs `spec`.
    fn client(self, spec: &Spec) -> Command {
        let spec = serde_json::to_string(spec).unwrap();
        let mut command = match self {
            Transport::Ws => {
                let mut command = Command::new(std::env::current_exe().unwrap());
                command.arg("--client");
                command
            }
            Transport::SocketIo => {
                npm::ensure_installed();
                let mut command = Command::new("node");
                command.arg(npm::node_dir().join("bench.mjs"));
                command
            }
        };
        command.arg(spec);
        command
    }

    /// Notes on a row which client it measured, when it is not this binary, and its transports.
    fn note_client(self, row: &mut Row, polling_first: bool) {
        if let Transport::SocketIo = self {
            let transports = if polling_first {
                "polling, then websocket"
            } else {
                "websocket only"
            };
            row.figures
                .push(("client".into(), format!("node, {transports}")));
            row.json["client"] = format!("node socket.io-client, {transports}").into();
        }
    }
}

/// A client child process running one spec.
struct ClientProcess {
    child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl ClientProcess {
    fn start(transport: Transport, spec: &Spec) -> ClientProcess {
        let mut child = transport
            .client(spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("client process starts");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut process = ClientProcess { child, lines };
        let ready = process.read();
        assert_eq!(ready["ready"], true);
        process
    }

    fn read(&mut self) -> Value {
        let line = self
            .lines
            .next()
            .expect("client answers")
            .expect("readable");
        serde_json::from_str(&line).expect("client speaks JSON")
    }

    fn tell(&mut self, word: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{word}").unwrap();
        stdin.flush().unwrap();
    }

    /// Says `go` and waits for the outcome; the client keeps its connections until `finish`.
    async fn go(mut self) -> (Outcome, ClientProcess) {
        tokio::task::spawn_blocking(move || {
            self.tell("go");
            let outcome = serde_json::from_value(self.read()).expect("an outcome");
            (outcome, self)
        })
        .await
        .unwrap()
    }

    fn finish(mut self) {
        self.tell("stop");
        let _ = self.child.wait();
    }
}

async fn run_client(transport: Transport, spec: Spec) -> Outcome {
    let process = tokio::task::spawn_blocking(move || ClientProcess::start(transport, &spec))
        .await
        .unwrap();
    let (outcome, process) = process.go().await;
    process.finish();
    outcome
}

fn ms(value: f64) -> String {
    format!("{value:.1} ms")
}

fn rate(count: f64, seconds: f64) -> f64 {
    if seconds > 0.0 { count / seconds } else { 0.0 }
}

fn latency_json(latency: &Latency) -> Value {
    serde_json::to_value(latency).unwrap()
}

async fn rest_post(sizes: &Sizes) -> Row {
    let bench = bench_server(|_| {}).await;
    let outcome = run_client(
        Transport::Ws,
        Spec::RestPost {
            addr: bench.app.addr(),
            connections: 64,
            seconds: sizes.seconds,
            requests: None,
        },
    )
    .await;
    let mut row = rest_row("rest_post", &outcome);
    row.json["model_calls"] = bench.model.received().len().into();
    bench.finish().await;
    row
}

async fn rest_get(sizes: &Sizes) -> Row {
    let bench = bench_server(|_| {}).await;
    let outcome = run_client(
        Transport::Ws,
        Spec::RestGet {
            addr: bench.app.addr(),
            connections: 64,
            seconds: sizes.seconds,
            conversations: 200,
        },
    )
    .await;
    bench.finish().await;
    rest_row("rest_get", &outcome)
}

/// The figures of a closed-loop REST scenario.
fn rest_row(scenario: &str, outcome: &Outcome) -> Row {
    let per_second = rate(outcome.ok as f64, outcome.seconds);
    Row {
        scenario: scenario.into(),
        figures: vec![
            ("requests/s".into(), format!("{per_second:.0}")),
            ("p50".into(), ms(outcome.latency.p50_ms)),
            ("p99".into(), ms(outcome.latency.p99_ms)),
            ("errors".into(), outcome.errors.to_string()),
        ],
        json: json!({"requests_per_second": per_second, "latency": latency_json(&outcome.latency), "errors": outcome.errors}),
    }
}

async fn fanout(nodes: &Nodes, transport: Transport, subscribers: usize) -> Row {
    ensure_open_files(subscribers);
    let words: Vec<String> = (0..200).map(|i| format!("tok{i} ")).collect();
    nodes.model.set_reply(words, Duration::from_millis(2));
    let outcome = run_client(
        transport,
        Spec::Fanout {
            addrs: nodes.addrs(),
            subscribers,
            expected: nodes.model.reply_text(),
            unacknowledged_joins: false,
            dialect: Dialect::Ws,
        },
    )
    .await;
    let per_second = rate(outcome.chunks as f64, outcome.seconds);
    let mut row = Row {
        scenario: format!(
            "fanout {} {subscribers}{}",
            transport.name(),
            nodes.suffix()
        ),
        figures: vec![
            ("chunks/s".into(), format!("{per_second:.0}")),
            ("p99 complete".into(), ms(outcome.latency.p99_ms)),
            ("missing".into(), outcome.missing.to_string()),
            ("complete".into(), format!("{}/{subscribers}", outcome.ok)),
        ],
        json: json!({"transport": transport.key(), "nodes": nodes.apps.len(), "subscribers": subscribers, "chunks": outcome.chunks, "chunks_per_second": per_second, "complete_latency": latency_json(&outcome.latency), "missing_chunks": outcome.missing, "subscribers_complete": outcome.ok}),
    };
    transport.note_client(&mut row, false);
    row
}

async fn streams(nodes: &Nodes, sizes: &Sizes) -> Row {
    let words: Vec<String> = (0..50).map(|i| format!("tok{i} ")).collect();
    let pace = Duration::from_millis(20) * 50;
    nodes.model.set_reply(words, Duration::from_millis(20));
    let outcome = run_client(
        Transport::Ws,
        Spec::Streams {
            addrs: nodes.addrs(),
            conversations: sizes.streams,
            dialect: Dialect::Ws,
        },
    )
    .await;
    let ratio = outcome.latency.p99_ms / pace.as_secs_f64() / 1e3;
    Row {
        scenario: format!("streams {}{}", sizes.streams, nodes.suffix()),
        figures: vec![
            ("p99/pace".into(), format!("{ratio:.2}x")),
            ("p99 complete".into(), ms(outcome.latency.p99_ms)),
            ("first chunk p99".into(), ms(outcome.first_chunk.p99_ms)),
            ("failures".into(), outcome.errors.to_string()),
        ],
        json: json!({"conversations": sizes.streams, "nodes": nodes.apps.len(), "model_pace_ms": pace.as_millis() as u64, "p99_over_pace": ratio, "complete_latency": latency_json(&outcome.latency), "first_chunk_latency": latency_json(&outcome.first_chunk), "failures": outcome.errors}),
    }
}

async fn wait_for(check: impl Fn() -> bool, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

/// Idle connections, each joined; `polling_first`: Socket.IO clients on their default options,
/// polling and then the upgrade, rather than a websocket from the start.
async fn idle(transport: Transport, polling_first: bool, sizes: &Sizes) -> Row {
    ensure_open_files(sizes.idle);
    let bench = bench_server(|_| {}).await;
    let addr = bench.app.addr();
    let health = || async move {
        let body: Value = reqwest::get(format!("http://{addr}/api/health"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body
    };
    run_client(
        transport,
        Spec::Idle {
            addr,
            connections: 100,
            unacknowledged_joins: false,
            dialect: Dialect::Ws,
            polling_first,
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    trim_heap();
    let before = resident_bytes();
    let count = sizes.idle;
    let spec = Spec::Idle {
        addr,
        connections: count,
        unacknowledged_joins: false,
        dialect: Dialect::Ws,
        polling_first,
    };
    let process = tokio::task::spawn_blocking(move || ClientProcess::start(transport, &spec))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while health().await["activeConnections"].as_u64() != Some(count as u64)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    trim_heap();
    let after = resident_bytes();
    let (_, process) = process.go().await;
    process.finish();
    bench.finish().await;
    let per_connection = after.saturating_sub(before) as f64 / count as f64;
    let mut row = Row {
        scenario: format!(
            "idle {}{} {count}",
            transport.name(),
            if polling_first { " polling first" } else { "" }
        ),
        figures: vec![
            ("bytes/connection".into(), format!("{per_connection:.0}")),
            (
                "rss before".into(),
                format!("{:.1} MB", before as f64 / 1e6),
            ),
            ("rss after".into(), format!("{:.1} MB", after as f64 / 1e6)),
        ],
        json: json!({"transport": transport.key(), "connections": count, "bytes_per_connection": per_connection, "rss_before": before, "rss_after": after}),
    };
    transport.note_client(&mut row, polling_first);
    row
}

/// Raises the open-file limit, which the client children inherit, to fit `connections` sockets
/// with room to spare: the server and the client each hold one descriptor per connection.
fn ensure_open_files(connections: usize) {
    let needed = connections as libc::rlim_t + 512;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the structs they are given.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        if limit.rlim_cur < needed {
            let raised = libc::rlimit {
                rlim_cur: needed.min(limit.rlim_max),
                ..limit
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    assert!(
        limit.rlim_cur >= needed,
        "{connections} connections need {needed} open files; raise `ulimit -n`"
    );
}

/// Returns freed heap to the system, so that resident memory shows what is really in use.
fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory held by glibc's allocator.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A server whose model is the demo model with no pause, for scenarios that measure the
/// conversations themselves rather than the model.
async fn demo_server(tweak: impl FnOnce(&mut Config)) -> (App, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = bench_config(&dir);
    tweak(&mut config);
    let store = store::open(&config.database_url, config.sqlite_durability)
        .await
        .unwrap();
    let app = App::start_with(config, store, Arc::new(DemoProvider::new(Duration::ZERO)))
        .await
        .unwrap();
    (app, dir)
}

async fn conversations(sizes: &Sizes) -> Row {
    let idle = Duration::from_secs(if sizes.conversations > 10_000 { 30 } else { 5 });
    let (app, _dir) = demo_server(|config| config.conversations.idle_timeout = idle).await;
    let conversations = app.conversations().clone();
    trim_heap();
    let before = resident_bytes();
    let count = sizes.conversations;
    let created = Instant::now();
    let workers = 64;
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let conversations = conversations.clone();
        tasks.push(tokio::spawn(async move {
            for _ in (worker..count).step_by(workers) {
                conversations
                    .chat(&UserId::anonymous(), None, "hello".into())
                    .await
                    .expect("created");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let creation = created.elapsed().as_secs_f64();
    trim_heap();
    let active = conversations.active();
    let with_actors = resident_bytes();
    let passivated = wait_for(|| conversations.active() == 0, Duration::from_secs(120)).await;
    trim_heap();
    let after = resident_bytes();
    let per_active = with_actors.saturating_sub(before) as f64 / active.max(1) as f64;
    let per_passivated = after.saturating_sub(before) as f64 / count as f64;
    app.shutdown(Duration::ZERO).await;
    Row {
        scenario: format!("conversations {count}"),
        figures: vec![
            ("bytes/active".into(), format!("{per_active:.0}")),
            ("bytes/passivated".into(), format!("{per_passivated:.0}")),
            (
                "created/s".into(),
                format!("{:.0}", rate(count as f64, creation)),
            ),
            ("all passivated".into(), passivated.to_string()),
        ],
        json: json!({"conversations": count, "active_at_peak": active, "bytes_per_active_conversation": per_active, "bytes_per_conversation_after_passivation": per_passivated, "created_per_second": rate(count as f64, creation), "rss_before": before, "rss_active": with_actors, "rss_after_passivation": after}),
    }
}

async fn routing(sizes: &Sizes) -> Row {
    let (app, _dir) = demo_server(|_| {}).await;
    let conversations = app.conversations().clone();
    let mut ids = Vec::new();
    for _ in 0..sizes.routing_conversations {
        let done = conversations
            .chat(&UserId::anonymous(), None, "hello".into())
            .await
            .unwrap();
        ids.push(done.conversation.id);
    }
    let ids = Arc::new(ids);
    let deadline = Instant::now() + Duration::from_secs_f64(sizes.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..64 {
        let (conversations, ids) = (conversations.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            let mut n = worker;
            while Instant::now() < deadline {
                for _ in 0..32 {
                    conversations
                        .get(&UserId::anonymous(), &ids[n % ids.len()])
                        .await
                        .expect("routed");
                    n += 7;
                    sent += 1;
                }
            }
            sent
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    let per_second = rate(total as f64, started.elapsed().as_secs_f64());
    app.shutdown(Duration::ZERO).await;
    Row {
        scenario: format!("routing {}", ids.len()),
        figures: vec![
            ("messages/s".into(), format!("{per_second:.0}")),
            ("tasks".into(), "64".into()),
        ],
        json: json!({"conversations": ids.len(), "tasks": 64, "messages_per_second": per_second}),
    }
}

fn report(rows: &[Row], quick: bool, took: Duration) {
    let mut out = String::new();
    out.push_str(&format!(
        "\nload benchmarks ({} mode, {} cores, {:.0} s)\n",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        took.as_secs_f64()
    ));
    for row in rows {
        let figures: Vec<String> = row
            .figures
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        out.push_str(&format!("{:<26} {}\n", row.scenario, figures.join("  |  ")));
    }
    print!("{out}");
    let json: Value = rows
        .iter()
        .map(|r| (r.scenario.clone(), r.json.clone()))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let folder = std::path::Path::new(&target).join("bench");
    let _ = std::fs::create_dir_all(&folder);
    let file = folder.join("load.json");
    let document = json!({"mode": if quick { "quick" } else { "full" }, "seconds": took.as_secs_f64(), "scenarios": json});
    std::fs::write(&file, serde_json::to_string_pretty(&document).unwrap()).unwrap();
    println!("figures written to {}", file.display());
}
