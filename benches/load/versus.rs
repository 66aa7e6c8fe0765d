//! Side by side with the server this one replaces: the original Node.js server
//! (`../shared/peers/seed-node`, or `SEED_NODE_DIR`), run with Node where it is present, and this
//! server's release binary, each in a process of its own pinned to the first core while the
//! clients and the test model server share the second. Both get the same clients, the same model
//! server and the same sizes; a row shows both figures and their ratio.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::client::{Dialect, Outcome, Spec};
use crate::model_server::ModelServer;
use crate::{ClientProcess, Row, Transport, ensure_open_files, ms, npm, rate, run_client};

/// The core the servers run on; the bench's own process, its clients and the model server run
/// on the other.
const SERVER_CORE: usize = 0;
const LOAD_CORE: usize = 1;

/// Sizes of a side-by-side run, those of the table in full mode.
pub struct Sizes {
    idle: usize,
    fanout: usize,
    streams: usize,
    stream_tokens: usize,
    stream_pace: Duration,
    conversations: usize,
    seconds: f64,
}

pub const FULL: Sizes = Sizes {
    idle: 19_000,
    fanout: 10_000,
    streams: 2_000,
    stream_tokens: 200,
    stream_pace: Duration::from_millis(50),
    conversations: 100_000,
    seconds: 10.0,
};

pub const QUICK: Sizes = Sizes {
    idle: 1_000,
    fanout: 1_000,
    streams: 200,
    stream_tokens: 50,
    stream_pace: Duration::from_millis(20),
    conversations: 5_000,
    seconds: 2.0,
};

/// Pins this process's threads from now on, and so the children it starts, to the load core,
/// when the machine has two cores or more.
pub fn pin_load() {
    if two_cores() {
        pin(LOAD_CORE);
    }
}

/// Whether this process may run on two cores or more, as it could before [`pin_load`] pinned it
/// (after that, `available_parallelism` counts the one core it is pinned to).
fn two_cores() -> bool {
    static TWO_CORES: OnceLock<bool> = OnceLock::new();
    *TWO_CORES.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2))
}

/// Pins the calling thread (and the threads and processes it starts) to one core.
fn pin(core: usize) {
    // SAFETY: the set is a plain bit mask on the stack, and sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The servers compared.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    /// The original Node.js server.
    Original,
    /// This server's release binary.
    This,
    /// A WebSocket server that does no work (`bare.rs`), the floor.
    Bare,
}

impl Target {
    fn key(self) -> &'static str {
        match self {
            Target::Original => "original",
            Target::This => "this",
            Target::Bare => "bare",
        }
    }
}

/// A server under test, in a child process of its own pinned to the server core; killed when
/// dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `target` with its model at `model`; `None` when it cannot run here (the original
    /// without Node or its sources), with the reason printed.
    async fn start(target: Target, model: &ModelServer) -> Option<Server> {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = match target {
            Target::Original => {
                let seed = match original_installed() {
                    Ok(seed) => seed,
                    Err(why) => {
                        eprintln!("versus: the original server is not measured: {why}");
                        return None;
                    }
                };
                let mut command = Command::new("node");
                command
                    .args(["--import", "tsx", "src/index.ts"])
                    .current_dir(seed)
                    .env("SEED_QUIET", "1");
                command
            }
            Target::Bare => {
                let mut command = Command::new(std::env::current_exe().unwrap());
                command.arg("--bare").arg(port.to_string());
                command
            }
            Target::This => {
                let mut command = Command::new(env!("CARGO_BIN_EXE_ai-chat-server"));
                command
                    .current_dir(dir.path())
                    .env(
                        "DATABASE_URL",
                        format!("sqlite://{}/chat.db", dir.path().display()),
                    )
                    .env("OPENAI_MODEL", "bench-model")
                    .env("RATE_LIMIT_MAX_REQUESTS", "0")
                    .env("RT_MESSAGES_PER_MINUTE", "0")
                    .env("MAX_CONNECTIONS_PER_IP", "0")
                    .env("RUST_LOG", "warn");
                command
            }
        };
        command
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("OPENAI_API_KEY", "bench")
            .env("OPENAI_BASE_URL", model.base_url())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if two_cores() {
            // SAFETY: between fork and exec the child only calls sched_setaffinity, which is
            // async-signal-safe.
            unsafe {
                command.pre_exec(|| {
                    pin(SERVER_CORE);
                    Ok(())
                });
            }
        }
        let child = command.spawn().expect("the server process starts");
        let server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _dir: dir,
        };
        server.wait_until_up().await;
        Some(server)
    }

    /// Waits until it accepts connections (each server listens once it is ready).
    async fn wait_until_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(self.addr).await.is_err() {
            assert!(Instant::now() < deadline, "the server did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its resident memory, from `/proc`.
    fn resident(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the server's /proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|kb| kb.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }
}

impl Server {
    /// The CPU time it has used so far, user and system, from `/proc`.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("the server's /proc stat");
        // After the command's closing parenthesis: state is the first field, utime the 12th.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf only reads a system setting.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Duration::from_secs_f64(ticks as f64 / per_second)
    }

    /// Runs `work`, and returns its outcome with the CPU time the server spent meanwhile.
    async fn timing<T>(&self, work: impl Future<Output = T>) -> (T, Duration) {
        let before = self.cpu();
        let outcome = work.await;
        (outcome, self.cpu().saturating_sub(before))
    }
}

/// How busy a server was: CPU time per unit of work, and the share of its core it used (below
/// 100 %, the load, not the server, set the pace).
fn busy(cpu: Duration, units: f64, unit: &str, seconds: f64) -> String {
    format!(
        "{:.0} µs/{unit}, {:.0} % of its core",
        cpu.as_secs_f64() * 1e6 / units.max(1.0),
        100.0 * cpu.as_secs_f64() / seconds.max(1e-9)
    )
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The original server's sources copied to `target/bench/seed-node` with its packages installed
/// (`npm ci`), or why it cannot run.
fn original_installed() -> Result<PathBuf, String> {
    let source = std::env::var_os("SEED_NODE_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/seed-node"),
        PathBuf::from,
    );
    if !source.join("package.json").exists() {
        return Err(format!(
            "no sources at {} (SEED_NODE_DIR)",
            source.display()
        ));
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Err("no `node` on the PATH".into());
    }
    let copy = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/seed-node");
    copy_tree(&source, &copy).map_err(|e| format!("copying {}: {e}", source.display()))?;
    npm::install(&copy, "socket.io");
    Ok(copy)
}

/// Copies `from` into `to`, leaving out `node_modules`.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_name() == "node_modules" {
            continue;
        }
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Which server is loaded in which dialect in a side-by-side row: the original only has
/// Socket.IO, and this server's `/ws` is shown beside it. The load comes from this binary's
/// client in every run (Node's socket.io-client, on its one core, would be the bottleneck of the
/// fan-out rather than either server), Socket.IO over a websocket from the start.
const RUNS: [(Target, Dialect); 3] = [
    (Target::Original, Dialect::SocketIo),
    (Target::This, Dialect::SocketIo),
    (Target::This, Dialect::Ws),
];

/// The runs of the rows that also show the floor: a server that does no work.
const WITH_BARE: [(Target, Dialect); 4] = [RUNS[0], RUNS[1], RUNS[2], (Target::Bare, Dialect::Ws)];

/// One figure of each server, and how they compare.
struct Versus {
    scenario: String,
    unit: &'static str,
    decimals: usize,
    figures: Vec<(&'static str, Option<f64>)>,
    extra: Vec<(String, String)>,
    json: Value,
}

impl Versus {
    fn new(scenario: String, unit: &'static str, decimals: usize) -> Versus {
        Versus {
            scenario,
            unit,
            decimals,
            figures: Vec::new(),
            extra: Vec::new(),
            json: json!({}),
        }
    }

    fn add(&mut self, who: &'static str, figure: Option<f64>, details: Value) {
        self.figures.push((who, figure));
        self.json[who] = details;
    }

    /// Adds how the figure of `a` compares with that of `b`.
    fn compare(&mut self, a: &str, b: &str) {
        let figure = |who: &str| self.figures.iter().find(|f| f.0 == who).and_then(|f| f.1);
        if let (Some(x), Some(y)) = (figure(a), figure(b))
            && y > 0.0
        {
            self.extra
                .push((format!("{a}/{b}"), format!("{:.2}x", x / y)));
        }
    }

    fn row(self) -> Row {
        let mut figures: Vec<(std::borrow::Cow<'static, str>, String)> = self
            .figures
            .iter()
            .map(|(who, figure)| {
                let shown =
                    figure.map_or("not measured".into(), |f| format!("{f:.*}", self.decimals));
                ((*who).into(), format!("{shown} {}", self.unit))
            })
            .collect();
        if let [(_, Some(original)), (_, Some(this)), ..] = self.figures[..]
            && original > 0.0
        {
            figures.push(("this/original".into(), format!("{:.2}x", this / original)));
        }
        figures.extend(self.extra.into_iter().map(|(k, v)| (k.into(), v)));
        Row {
            scenario: self.scenario,
            figures,
            json: self.json,
        }
    }
}

/// Starts `target`, or, when it cannot run here, marks it as not measured in each of `rows`.
async fn start_or_mark(
    target: Target,
    model: &ModelServer,
    who: &'static str,
    rows: &mut [&mut Versus],
) -> Option<Server> {
    let server = Server::start(target, model).await;
    if server.is_none() {
        for row in rows {
            row.add(who, None, Value::Null);
        }
    }
    server
}

/// The label of a run in a row, and of its figures in the JSON.
fn label(target: Target, dialect: Dialect) -> &'static str {
    match (target, dialect) {
        (Target::Original, _) => "original",
        (Target::Bare, _) => "bare",
        (Target::This, Dialect::SocketIo) => "this",
        (Target::This, Dialect::Ws) => "this /ws",
    }
}

/// Idle connections, each joined to one of 100 conversations: resident bytes per connection.
/// Once with websockets from the start (this binary's client, the bare server too), once as
/// `socket.io-client` connects on its default options, polling and then upgrading (Node's client,
/// each server started afresh).
pub async fn idle(sizes: &Sizes) -> Vec<Row> {
    ensure_open_files(sizes.idle);
    let model = ModelServer::start().await;
    let direct = format!("versus idle {}", sizes.idle);
    let polling = format!("versus idle polling first {}", sizes.idle);
    vec![
        idle_row(direct, &WITH_BARE, Transport::Ws, false, &model, sizes).await,
        idle_row(
            polling,
            &RUNS[..2],
            Transport::SocketIo,
            true,
            &model,
            sizes,
        )
        .await,
    ]
}

/// One row of [`idle`]: `runs` idle through `transport`'s client, polling first or not.
async fn idle_row(
    scenario: String,
    runs: &[(Target, Dialect)],
    transport: Transport,
    polling_first: bool,
    model: &ModelServer,
    sizes: &Sizes,
) -> Row {
    let mut versus = Versus::new(scenario, "bytes/conn", 0);
    for &(target, dialect) in runs {
        let who = label(target, dialect);
        let Some(server) = start_or_mark(target, model, who, &mut [&mut versus]).await else {
            continue;
        };
        let spec = |connections| Spec::Idle {
            addr: server.addr,
            connections,
            unacknowledged_joins: target == Target::Original,
            dialect,
            polling_first,
        };
        let (bytes, details) = bytes_per_connection(&server, transport, spec, sizes.idle).await;
        versus.add(who, Some(bytes), details);
    }
    versus.row()
}

/// The resident bytes each of `count` idle clients of `spec` adds to `server`, measured after 100
/// of them have come and gone (so that the server's start-up is not counted).
async fn bytes_per_connection(
    server: &Server,
    transport: Transport,
    spec: impl Fn(usize) -> Spec,
    count: usize,
) -> (f64, Value) {
    run_client(transport, spec(100)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.resident();
    let client = start_client(transport, spec(count)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = server.resident();
    let (_, client) = client.go().await;
    client.finish();
    let per_connection = after.saturating_sub(before) as f64 / count as f64;
    let details =
        json!({"bytes_per_connection": per_connection, "rss_before": before, "rss_after": after});
    (per_connection, details)
}

async fn start_client(transport: Transport, spec: Spec) -> ClientProcess {
    tokio::task::spawn_blocking(move || ClientProcess::start(transport, &spec))
        .await
        .unwrap()
}

/// One reply of 200 tokens to every member of one conversation: chunks delivered per second,
/// chunks missing, and the server's resident memory at its highest during the reply.
pub async fn fanout(sizes: &Sizes) -> Vec<Row> {
    ensure_open_files(sizes.fanout);
    let model = ModelServer::start().await;
    let words: Vec<String> = (0..200).map(|i| format!("tok{i} ")).collect();
    model.set_reply(words, Duration::from_millis(2));
    let mut throughput = Versus::new(format!("versus fanout {}", sizes.fanout), "chunks/s", 0);
    let mut memory = Versus::new(format!("versus fanout {} rss", sizes.fanout), "MB", 0);
    for (target, dialect) in WITH_BARE {
        let who = label(target, dialect);
        let Some(server) =
            start_or_mark(target, &model, who, &mut [&mut throughput, &mut memory]).await
        else {
            continue;
        };
        let spec = Spec::Fanout {
            addrs: vec![server.addr],
            subscribers: sizes.fanout,
            expected: model.reply_text(),
            unacknowledged_joins: target == Target::Original,
            dialect,
        };
        let client = start_client(Transport::Ws, spec).await;
        let ((outcome, peak), cpu) = server.timing(while_sampling(&server, client.go())).await;
        let (outcome, client) = outcome;
        let usage = busy(
            cpu,
            outcome.chunks as f64 / 1e3,
            "1,000 chunks",
            outcome.seconds,
        );
        throughput.extra.push((format!("{who} cpu"), usage));
        client.finish();
        let per_second = rate(outcome.chunks as f64, outcome.seconds);
        throughput.add(
            who,
            Some(per_second),
            json!({"chunks": outcome.chunks, "chunks_per_second": per_second, "missing_chunks": outcome.missing, "subscribers_complete": outcome.ok, "p99_complete_ms": outcome.latency.p99_ms}),
        );
        throughput.extra.push((
            format!("{who} missing"),
            format!(
                "{} ({}/{} complete)",
                outcome.missing, outcome.ok, sizes.fanout
            ),
        ));
        memory.add(who, Some(peak as f64 / 1e6), json!({"peak_rss": peak}));
    }
    throughput.compare("this /ws", "bare");
    throughput.compare("this", "bare");
    vec![throughput.row(), memory.row()]
}

/// Runs `work` while reading the server's resident memory every 20 ms; returns its outcome and
/// the highest reading.
async fn while_sampling<T>(server: &Server, work: impl Future<Output = T>) -> (T, u64) {
    let mut peak = server.resident();
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            outcome = &mut work => return (outcome, peak.max(server.resident())),
            _ = tick.tick() => peak = peak.max(server.resident()),
        }
    }
}

/// Many replies streaming at once, one per connection and conversation: the 99th percentile of
/// their duration over the model's own pace, and of the time to their first chunk.
pub async fn streams(sizes: &Sizes) -> Vec<Row> {
    ensure_open_files(sizes.streams);
    let model = ModelServer::start().await;
    let words: Vec<String> = (0..sizes.stream_tokens)
        .map(|i| format!("tok{i} "))
        .collect();
    model.set_reply(words, sizes.stream_pace);
    let pace = sizes.stream_pace.as_secs_f64() * sizes.stream_tokens as f64;
    let name = format!(
        "versus streams {} of {} at {} ms",
        sizes.streams,
        sizes.stream_tokens,
        sizes.stream_pace.as_millis()
    );
    let mut complete = Versus::new(format!("{name}, p99"), "x pace", 2);
    let mut first = Versus::new(format!("{name}, first chunk p99"), "ms", 0);
    for (target, dialect) in RUNS {
        let who = label(target, dialect);
        let Some(server) =
            start_or_mark(target, &model, who, &mut [&mut complete, &mut first]).await
        else {
            continue;
        };
        let spec = Spec::Streams {
            addrs: vec![server.addr],
            conversations: sizes.streams,
            dialect,
        };
        let (outcome, cpu): (Outcome, _) = server.timing(run_client(Transport::Ws, spec)).await;
        let usage = busy(cpu, outcome.ok as f64, "stream", outcome.seconds);
        complete.extra.push((format!("{who} cpu"), usage));
        let ratio = outcome.latency.p99_ms / 1e3 / pace;
        complete.add(
            who,
            Some(ratio),
            json!({"p99_over_pace": ratio, "p99_complete_ms": outcome.latency.p99_ms, "failures": outcome.errors}),
        );
        complete
            .extra
            .push((format!("{who} failures"), outcome.errors.to_string()));
        first.add(
            who,
            Some(outcome.first_chunk.p99_ms),
            json!({"first_chunk_p99_ms": outcome.first_chunk.p99_ms, "first_chunk_p50_ms": outcome.first_chunk.p50_ms}),
        );
    }
    vec![complete.row(), first.row()]
}

/// Conversations created with `POST /api/chat` by 64 connections: created per second, and the
/// server's resident bytes per conversation, all of them still active.
pub async fn conversations(sizes: &Sizes) -> Vec<Row> {
    let model = ModelServer::start().await;
    model.set_reply(
        crate::model_server::pieces_of("Hello from the test model."),
        Duration::ZERO,
    );
    let count = sizes.conversations;
    let mut created = Versus::new(format!("versus conversations {count}"), "created/s", 0);
    let mut memory = Versus::new(format!("versus conversations {count} rss"), "bytes each", 0);
    for target in [Target::Original, Target::This] {
        let who = target.key();
        let Some(server) =
            start_or_mark(target, &model, who, &mut [&mut created, &mut memory]).await
        else {
            continue;
        };
        let post = |requests| Spec::RestPost {
            addr: server.addr,
            connections: 64,
            seconds: 600.0,
            requests: Some(requests),
        };
        run_client(Transport::Ws, post(200)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = server.resident();
        let (outcome, cpu) = server.timing(run_client(Transport::Ws, post(count))).await;
        let usage = busy(cpu, outcome.ok as f64, "conversation", outcome.seconds);
        created.extra.push((format!("{who} cpu"), usage));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = server.resident();
        let per_second = rate(outcome.ok as f64, outcome.seconds);
        let each = after.saturating_sub(before) as f64 / count as f64;
        created.add(
            who,
            Some(per_second),
            json!({"created_per_second": per_second, "errors": outcome.errors}),
        );
        memory.add(
            who,
            Some(each),
            json!({"bytes_per_conversation": each, "rss_before": before, "rss_after": after}),
        );
    }
    vec![created.row(), memory.row()]
}

/// Closed-loop `POST /api/chat` (a new conversation each; the original answers a placeholder
/// without a model call or a store, this server calls the model and commits) and
/// `GET /api/conversations/:id` over 200 stored conversations, 64 connections each.
pub async fn rest(sizes: &Sizes) -> Vec<Row> {
    let model = ModelServer::start().await;
    model.set_reply(
        crate::model_server::pieces_of("Hello from the test model."),
        Duration::ZERO,
    );
    let mut post = Versus::new("versus POST /api/chat".into(), "req/s", 0);
    let mut get = Versus::new("versus GET /api/conversations/:id".into(), "req/s", 0);
    for target in [Target::Original, Target::This] {
        let who = target.key();
        let Some(server) = start_or_mark(target, &model, who, &mut [&mut post, &mut get]).await
        else {
            continue;
        };
        let specs = [
            Spec::RestPost {
                addr: server.addr,
                connections: 64,
                seconds: sizes.seconds,
                requests: None,
            },
            Spec::RestGet {
                addr: server.addr,
                connections: 64,
                seconds: sizes.seconds,
                conversations: 200,
            },
        ];
        for (versus, spec) in [&mut post, &mut get].into_iter().zip(specs) {
            let (outcome, cpu) = server.timing(run_client(Transport::Ws, spec)).await;
            let per_second = rate(outcome.ok as f64, outcome.seconds);
            versus.add(
                who,
                Some(per_second),
                json!({"requests_per_second": per_second, "p50_ms": outcome.latency.p50_ms, "p99_ms": outcome.latency.p99_ms, "errors": outcome.errors, "cpu_seconds": cpu.as_secs_f64()}),
            );
            versus.extra.push((
                format!("{who} p99"),
                format!("{} ({} errors)", ms(outcome.latency.p99_ms), outcome.errors),
            ));
            let usage = busy(cpu, outcome.ok as f64, "req", outcome.seconds);
            versus.extra.push((format!("{who} cpu"), usage));
        }
    }
    vec![post.row(), get.row()]
}
