//! Live measures of the server's activity: counters the health route reads, and the
//! Prometheus series `GET /metrics` renders. Each server has its own recorder, never a global one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use metrics::{Counter, Histogram, Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

/// Histogram buckets, in seconds, for request and model latencies.
const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

const METADATA: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

const HTTP_REQUESTS: &str = "http_requests_total";
const HTTP_DURATION: &str = "http_request_duration_seconds";
const OPEN_CONNECTIONS: &str = "chat_open_connections";
const ACTIVE_CONVERSATIONS: &str = "chat_active_conversations";
const REPLIES_IN_PROGRESS: &str = "chat_replies_in_progress";
const TOKENS_STREAMED: &str = "chat_tokens_streamed_total";
const UPSTREAM_ERRORS: &str = "chat_upstream_errors_total";
const UPSTREAM_DURATION: &str = "chat_upstream_duration_seconds";
const LEASES_TAKEN: &str = "chat_cluster_leases_taken_total";
const LEASES_LOST: &str = "chat_cluster_leases_lost_total";
const CALLS_FORWARDED: &str = "chat_cluster_calls_forwarded_total";
const EVENTS_PUBLISHED: &str = "chat_cluster_events_published_total";
const NODE: &str = "chat_cluster_node";
const LIVE_NODES: &str = "chat_cluster_live_nodes";
const RELAYED: &str = "chat_cluster_relayed_conversations";

/// Counters shared by the actors and the transports.
#[derive(Debug)]
pub struct Metrics {
    active_conversations: AtomicI64,
    open_connections: AtomicI64,
    replies_in_progress: AtomicI64,
    recorder: PrometheusRecorder,
    /// The request series registered so far, by method, route and status.
    requests: Mutex<HashMap<RequestSeries, (Counter, Histogram)>>,
    tokens: Counter,
    upstream_errors: Counter,
    upstream_latency: Histogram,
    leases_taken: Counter,
    leases_lost: Counter,
    calls_forwarded: Counter,
    events_published: Counter,
}

/// What labels a request's series: method, route and status.
type RequestSeries = (&'static str, &'static str, u16);

/// What a node of a cluster reports beside its own measures.
#[derive(Debug, Clone)]
pub struct ClusterGauges {
    pub cluster: String,
    pub node: String,
    pub live_nodes: usize,
    pub relayed: usize,
}

/// A copy of the gauges at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MetricsSnapshot {
    pub active_conversations: i64,
    pub open_connections: i64,
    pub replies_in_progress: i64,
}

impl Default for Metrics {
    fn default() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS)
            .expect("buckets are not empty")
            .build_recorder();
        let descriptions = [
            (
                HTTP_REQUESTS,
                Unit::Count,
                "HTTP answers by method, route and status",
            ),
            (HTTP_DURATION, Unit::Seconds, "Time to answer HTTP requests"),
            (OPEN_CONNECTIONS, Unit::Count, "Open real-time connections"),
            (
                ACTIVE_CONVERSATIONS,
                Unit::Count,
                "Running conversation actors",
            ),
            (REPLIES_IN_PROGRESS, Unit::Count, "Replies being generated"),
            (
                TOKENS_STREAMED,
                Unit::Count,
                "Pieces of reply text streamed",
            ),
            (UPSTREAM_ERRORS, Unit::Count, "Model requests that failed"),
            (
                UPSTREAM_DURATION,
                Unit::Seconds,
                "Time the model took for a whole reply",
            ),
            (
                LEASES_TAKEN,
                Unit::Count,
                "Conversation leases this node took or renewed on activation",
            ),
            (
                LEASES_LOST,
                Unit::Count,
                "Conversation leases another node took from this one",
            ),
            (
                CALLS_FORWARDED,
                Unit::Count,
                "Requests sent to the node that owns their conversation",
            ),
            (
                EVENTS_PUBLISHED,
                Unit::Count,
                "Conversation events published once for the nodes relaying them",
            ),
            (NODE, Unit::Count, "This node, by cluster and node name"),
            (LIVE_NODES, Unit::Count, "Nodes alive in the cluster"),
            (
                RELAYED,
                Unit::Count,
                "Conversations owned elsewhere whose events this node relays",
            ),
        ];
        // The exporter keeps one description per name, whatever the kind of series.
        for (name, unit, help) in descriptions {
            recorder.describe_counter(name.into(), Some(unit), help.into());
        }
        let counter = |name| recorder.register_counter(&Key::from_static_name(name), &METADATA);
        Metrics {
            active_conversations: AtomicI64::new(0),
            open_connections: AtomicI64::new(0),
            replies_in_progress: AtomicI64::new(0),
            tokens: counter(TOKENS_STREAMED),
            upstream_errors: counter(UPSTREAM_ERRORS),
            upstream_latency: recorder
                .register_histogram(&Key::from_static_name(UPSTREAM_DURATION), &METADATA),
            leases_taken: counter(LEASES_TAKEN),
            leases_lost: counter(LEASES_LOST),
            calls_forwarded: counter(CALLS_FORWARDED),
            events_published: counter(EVENTS_PUBLISHED),
            requests: Mutex::default(),
            recorder,
        }
    }
}

impl Metrics {
    /// A conversation actor started.
    pub fn actor_started(&self) {
        self.active_conversations.fetch_add(1, Ordering::Relaxed);
    }

    /// A conversation actor stopped.
    pub fn actor_stopped(&self) {
        self.active_conversations.fetch_sub(1, Ordering::Relaxed);
    }

    /// A real-time connection opened.
    pub fn connection_opened(&self) {
        self.open_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A real-time connection closed.
    pub fn connection_closed(&self) {
        self.open_connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// A reply began.
    pub fn reply_started(&self) {
        self.replies_in_progress.fetch_add(1, Ordering::Relaxed);
    }

    /// A reply ended, however it ended.
    pub fn reply_finished(&self) {
        self.replies_in_progress.fetch_sub(1, Ordering::Relaxed);
    }

    /// Pieces of text streamed to members.
    pub fn tokens_streamed(&self, count: u64) {
        self.tokens.increment(count);
    }

    /// A model request ended after `took`.
    pub fn upstream_finished(&self, took: Duration, failed: bool) {
        self.upstream_latency.record(took.as_secs_f64());
        if failed {
            self.upstream_errors.increment(1);
        }
    }

    /// This node took a conversation's lease.
    pub fn lease_taken(&self) {
        self.leases_taken.increment(1);
    }

    /// Another node took a lease this node held.
    pub fn lease_lost(&self) {
        self.leases_lost.increment(1);
    }

    /// A request went to the node that owns its conversation.
    pub fn call_forwarded(&self) {
        self.calls_forwarded.increment(1);
    }

    /// An event was published for the nodes relaying its conversation.
    pub fn event_published(&self) {
        self.events_published.increment(1);
    }

    /// An HTTP request was answered; `route` is its template, e.g. `/api/conversations/:id`.
    pub fn request_answered(
        &self,
        method: &'static str,
        route: &'static str,
        status: u16,
        took: Duration,
    ) {
        let mut requests = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let (count, duration) = requests.entry((method, route, status)).or_insert_with(|| {
            let labels = vec![
                Label::new("method", method),
                Label::new("route", route),
                Label::new("status", status.to_string()),
            ];
            let key = Key::from_parts(HTTP_REQUESTS, labels.clone());
            let count = self.recorder.register_counter(&key, &METADATA);
            let key = Key::from_parts(HTTP_DURATION, labels);
            (count, self.recorder.register_histogram(&key, &METADATA))
        });
        count.increment(1);
        duration.record(took.as_secs_f64());
    }

    /// The gauges now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            active_conversations: self.active_conversations.load(Ordering::Relaxed),
            open_connections: self.open_connections.load(Ordering::Relaxed),
            replies_in_progress: self.replies_in_progress.load(Ordering::Relaxed),
        }
    }

    /// Every series in Prometheus's text format, with the cluster's gauges on a node of one.
    pub fn render(&self, cluster: Option<ClusterGauges>) -> String {
        if let Some(cluster) = cluster {
            let labels = vec![
                Label::new("cluster", cluster.cluster),
                Label::new("node", cluster.node),
            ];
            self.recorder
                .register_gauge(&Key::from_parts(NODE, labels), &METADATA)
                .set(1.0);
            for (name, value) in [(LIVE_NODES, cluster.live_nodes), (RELAYED, cluster.relayed)] {
                self.recorder
                    .register_gauge(&Key::from_static_name(name), &METADATA)
                    .set(value as f64);
            }
        }
        let now = self.snapshot();
        for (name, value) in [
            (OPEN_CONNECTIONS, now.open_connections),
            (ACTIVE_CONVERSATIONS, now.active_conversations),
            (REPLIES_IN_PROGRESS, now.replies_in_progress),
        ] {
            self.recorder
                .register_gauge(&Key::from_static_name(name), &METADATA)
                .set(value as f64);
        }
        self.recorder.handle().render()
    }

    /// Folds recorded samples into their histograms so memory stays bounded between scrapes;
    /// call it every few seconds.
    pub fn run_upkeep(&self) {
        self.recorder.handle().run_upkeep();
    }
}

/// The process's resident memory in bytes (`VmRSS`), or 0 where it cannot be read.
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(0, |kb| kb * 1024)
}
