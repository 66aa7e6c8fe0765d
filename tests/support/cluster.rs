//! A cluster of real server processes on loopback ports, sharing one PostgreSQL database (a
//! schema of its own on `TEST_DATABASE_URL`) and one Redis (`TEST_REDIS_URL`),
//! with the test model server of the test process. Each cluster has a name of its own, so that
//! tests and runs sharing the Redis never hear each other.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use super::model_server::ModelServer;
use super::process::ServerProcess;
use super::{WAIT, call_at};

/// The Redis the tests use (`TEST_REDIS_URL`, by default the machine's own).
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// How long a node's leases last in the tests: short, so that a dead node's conversations move
/// within seconds.
pub const LEASE: Duration = Duration::from_millis(3000);

/// Server processes that form one cluster.
pub struct TestCluster {
    nodes: Vec<Option<ServerProcess>>,
    env: Vec<(String, String)>,
    _database: super::postgres::TestDatabase,
}

impl TestCluster {
    /// `count` nodes on a fresh PostgreSQL database and the tests' Redis, answered by `model`, with
    /// `env` on top of the cluster's settings.
    pub async fn start(count: usize, model: &ModelServer, env: &[(&str, String)]) -> TestCluster {
        Self::start_on(count, model, &redis_url(), env).await
    }

    /// `count` nodes whose Redis is at `redis`.
    pub async fn start_on(
        count: usize,
        model: &ModelServer,
        redis: &str,
        env: &[(&str, String)],
    ) -> TestCluster {
        let database = super::postgres::TestDatabase::create().await;
        let mut settings: Vec<(String, String)> = [
            ("DATABASE_URL", database.url.clone()),
            ("REDIS_URL", redis.to_owned()),
            (
                "CLUSTER_NAME",
                format!("test-{}", uuid::Uuid::new_v4().simple()),
            ),
            ("CLUSTER_LEASE_MS", LEASE.as_millis().to_string()),
            ("OPENAI_API_KEY", "test-key".into()),
            ("OPENAI_BASE_URL", model.base_url()),
            ("OPENAI_MODEL", "test-model".into()),
            ("RT_MESSAGES_PER_MINUTE", "0".into()),
            ("MAX_CONNECTIONS_PER_IP", "0".into()),
            ("LOG_LEVEL", "info".into()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
        settings.extend(env.iter().map(|(n, v)| ((*n).to_owned(), v.clone())));
        let mut cluster = TestCluster {
            nodes: Vec::new(),
            env: settings,
            _database: database,
        };
        for _ in 0..count {
            let node = cluster.spawn();
            cluster.nodes.push(Some(node));
        }
        cluster.wait_for_nodes(count).await;
        cluster
    }

    fn spawn(&self) -> ServerProcess {
        let env: Vec<(&str, String)> = self
            .env
            .iter()
            .map(|(n, v)| (n.as_str(), v.clone()))
            .collect();
        ServerProcess::spawn(&env)
    }

    /// Where node `i` listens.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.node(i).addr
    }

    fn node(&self, i: usize) -> &ServerProcess {
        self.nodes[i].as_ref().expect("the node runs")
    }

    /// Kills node `i` with SIGKILL: no chance to clean up or to leave the cluster.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].take().expect("the node runs").kill();
    }

    /// Pauses node `i` (SIGSTOP), as a machine that freezes does.
    pub fn pause(&self, i: usize) {
        self.signal(i, Signal::SIGSTOP);
    }

    /// Lets a paused node `i` go on (SIGCONT).
    pub fn resume(&self, i: usize) {
        self.signal(i, Signal::SIGCONT);
    }

    fn signal(&self, i: usize, signal: Signal) {
        let pid = Pid::from_raw(self.node(i).child.id() as i32);
        kill(pid, signal).expect("signal sent");
    }

    /// `GET path` on node `i`.
    pub async fn get(&self, i: usize, path: &str) -> (reqwest::StatusCode, Value) {
        call_at(self.addr(i), "GET", path, None).await
    }

    /// A request to node `i`.
    pub async fn call(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (reqwest::StatusCode, Value) {
        call_at(self.addr(i), method, path, body).await
    }

    /// The value of the Prometheus series `name` (without labels) on node `i`; 0 when absent.
    pub async fn metric(&self, i: usize, name: &str) -> f64 {
        let (_, text) = self.get(i, "/metrics").await;
        let text = text.as_str().expect("metrics are text");
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .map_or(0.0, |value| value.trim().parse().expect("a number"))
    }

    /// Waits until every running node sees `count` live nodes.
    pub async fn wait_for_nodes(&self, count: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        for i in 0..self.nodes.len() {
            if self.nodes[i].is_none() {
                continue;
            }
            loop {
                let (_, health) = self.get(i, "/api/health").await;
                let seen = health["cluster"]["nodes"].as_array().map_or(0, Vec::len);
                if seen == count {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "node {i} sees {health}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// How many conversation actors run on each running node.
    pub async fn active_conversations(&self) -> u64 {
        let mut total = 0;
        for i in 0..self.nodes.len() {
            if self.nodes[i].is_some() {
                let (_, health) = self.get(i, "/api/health").await;
                total += health["activeConversations"].as_u64().unwrap();
            }
        }
        total
    }

    /// Every line node `i` has logged so far.
    pub fn logged(&self, i: usize) -> Vec<String> {
        self.node(i).logged.try_iter().collect()
    }
}

/// A Redis server of the test's own on a free port, which the test may stop and start again.
pub struct PrivateRedis {
    port: u16,
    server: Option<Child>,
}

impl PrivateRedis {
    /// Starts a Redis that keeps nothing on disk.
    pub async fn start() -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = PrivateRedis { port, server: None };
        redis.start_again().await;
        redis
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops it at once, losing everything it held.
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }

    /// Starts it again on the same port, empty, and waits until it answers.
    pub async fn start_again(&mut self) {
        let server = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.server = Some(server);
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis never answered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}
