//! Which nodes are alive. Every node beats in a sorted set of the cluster, scored by Redis's own
//! clock, every third of `CLUSTER_LEASE_MS`; a node whose last beat is older than the lease is
//! dead to the others, and its leases may be taken over.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use redis::Script;
use redis::aio::ConnectionManager;

use super::NodeId;
use super::bus::bounded;

/// Beats for ARGV[1] in the set KEYS[1]: the previous beat's age in milliseconds (-1 when it had
/// none), and the nodes alive, those that beat within the lease ARGV[2]. Nodes silent for a
/// hundred leases are forgotten.
const BEAT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local lease = tonumber(ARGV[2])
local previous = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 100 * lease)
local age = -1
if previous then age = now - tonumber(previous) end
return {age, redis.call('ZRANGEBYSCORE', KEYS[1], now - lease, '+inf')}
";

/// What one heartbeat found.
#[derive(Debug)]
pub(super) struct Beat {
    /// Whether this node had been silent longer than a lease (paused, cut off from Redis, or
    /// Redis lost its data): the others may have taken its conversations meanwhile.
    pub lapsed: bool,
    /// The nodes that were alive and no longer are.
    pub gone: Vec<NodeId>,
}

/// The nodes of the cluster as this node last saw them.
pub(super) struct Nodes {
    me: NodeId,
    key: String,
    lease_ms: u64,
    live: RwLock<Arc<BTreeSet<NodeId>>>,
    script: Script,
}

impl Nodes {
    pub(super) fn new(me: NodeId, key: String, lease_ms: u64) -> Self {
        Nodes {
            me,
            key,
            lease_ms,
            live: RwLock::new(Arc::default()),
            script: Script::new(BEAT),
        }
    }

    /// Beats once and learns who is alive.
    pub(super) async fn beat(&self, redis: &mut ConnectionManager) -> Result<Beat, String> {
        let (age, live): (i64, Vec<String>) = bounded(
            self.script
                .key(&self.key)
                .arg(&*self.me)
                .arg(self.lease_ms)
                .invoke_async(redis),
        )
        .await?;
        let live: BTreeSet<NodeId> = live.into_iter().map(NodeId::from).collect();
        let mut seen = self.live.write().unwrap_or_else(|e| e.into_inner());
        let gone = seen.difference(&live).cloned().collect();
        // A node that has beaten before and finds no beat of its own was forgotten: Redis lost
        // its data, or it was silent for a hundred leases.
        let lapsed = age > self.lease_ms as i64 || (age < 0 && seen.contains(&self.me));
        *seen = Arc::new(live);
        Ok(Beat { lapsed, gone })
    }

    /// Leaves the cluster: the other nodes may take this node's conversations at once.
    pub(super) async fn leave(&self, redis: &mut ConnectionManager) -> Result<(), String> {
        let mut command = redis::cmd("ZREM");
        command.arg(&self.key).arg(&*self.me);
        bounded(command.query_async::<()>(redis)).await
    }

    /// Whether `node` was alive at the last beat.
    pub(super) fn is_live(&self, node: &str) -> bool {
        self.live
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(node)
    }

    /// The nodes alive at the last beat.
    pub(super) fn live(&self) -> Arc<BTreeSet<NodeId>> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
