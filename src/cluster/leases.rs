//! Which node owns each conversation. A lease is a Redis key naming its node; a node takes a
//! conversation's lease when no live node holds it, keeps it while its actor runs (renewing it
//! at every heartbeat) and lets it expire after passivation. A lease is taken over only from a
//! node that is no longer alive (see [`super::nodes`]), and a node that lost one without knowing
//! it yet cannot write: the new owner's claim in the store fences it out.

use redis::Script;
use redis::aio::ConnectionManager;

use super::NodeId;
use super::bus::bounded;

/// For each lease KEYS[i]: the node that holds it, taking it for ARGV[1] (for ARGV[4]
/// milliseconds) when nobody alive does. A node is alive when its last beat in the set ARGV[2]
/// is within the lease ARGV[3]. A node that is not alive itself takes nothing.
const ACQUIRE: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local oldest = now - tonumber(ARGV[3])
local mine = redis.call('ZSCORE', ARGV[2], ARGV[1])
if not mine or tonumber(mine) < oldest then
  return redis.error_reply('LAPSED this node is not alive in the cluster')
end
local holders = {}
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if holder and holder ~= ARGV[1] then
    local beat = redis.call('ZSCORE', ARGV[2], holder)
    if not beat or tonumber(beat) < oldest then holder = false end
  end
  if holder and holder ~= ARGV[1] then
    holders[i] = holder
  else
    redis.call('SET', key, ARGV[1], 'PX', ARGV[4])
    holders[i] = ARGV[1]
  end
end
return holders
";

/// Leases checked in one script at most, so that one call never blocks Redis for long.
const CHUNK: usize = 500;

/// A lease lasts this many leases unless renewed: long enough that only a node that has lapsed
/// (and so stopped its actors) lets a held one expire.
const KEPT_FOR: u64 = 10;

/// Who owns a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Holder {
    /// This node.
    Me,
    /// Another node, alive.
    Other(NodeId),
}

/// Taking and keeping leases.
pub(super) struct Leases {
    me: NodeId,
    nodes_key: String,
    lease_ms: u64,
    script: Script,
}

impl Leases {
    pub(super) fn new(me: NodeId, nodes_key: String, lease_ms: u64) -> Self {
        Leases {
            me,
            nodes_key,
            lease_ms,
            script: Script::new(ACQUIRE),
        }
    }

    /// The holder of each lease in `keys`, taking for this node those nobody alive holds.
    pub(super) async fn acquire(
        &self,
        redis: &mut ConnectionManager,
        keys: &[String],
    ) -> Result<Vec<Holder>, String> {
        let mut holders = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(CHUNK) {
            let mut invocation = self.script.prepare_invoke();
            for key in chunk {
                invocation.key(key);
            }
            invocation
                .arg(&*self.me)
                .arg(&self.nodes_key)
                .arg(self.lease_ms)
                .arg(self.lease_ms * KEPT_FOR);
            let named: Vec<String> = bounded(invocation.invoke_async(redis)).await?;
            holders.extend(named.into_iter().map(|node| {
                if *node == *self.me {
                    Holder::Me
                } else {
                    Holder::Other(node.into())
                }
            }));
        }
        Ok(holders)
    }
}
