//! Live counters of the server's activity, read by the health route.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Counters shared by the actors and the transports.
#[derive(Debug, Default)]
pub struct Metrics {
    active_conversations: AtomicI64,
    open_connections: AtomicI64,
    replies_in_progress: AtomicI64,
    tokens_streamed: AtomicU64,
    upstream_requests: AtomicU64,
    upstream_errors: AtomicU64,
    upstream_micros: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MetricsSnapshot {
    pub active_conversations: i64,
    pub open_connections: i64,
    pub replies_in_progress: i64,
    pub tokens_streamed: u64,
    pub upstream_requests: u64,
    pub upstream_errors: u64,
    pub upstream_seconds_total: f64,
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
        self.tokens_streamed.fetch_add(count, Ordering::Relaxed);
    }

    /// A model request ended after `took`.
    pub fn upstream_finished(&self, took: Duration, failed: bool) {
        self.upstream_requests.fetch_add(1, Ordering::Relaxed);
        self.upstream_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        if failed {
            self.upstream_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            active_conversations: self.active_conversations.load(Ordering::Relaxed),
            open_connections: self.open_connections.load(Ordering::Relaxed),
            replies_in_progress: self.replies_in_progress.load(Ordering::Relaxed),
            tokens_streamed: self.tokens_streamed.load(Ordering::Relaxed),
            upstream_requests: self.upstream_requests.load(Ordering::Relaxed),
            upstream_errors: self.upstream_errors.load(Ordering::Relaxed),
            upstream_seconds_total: self.upstream_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
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
