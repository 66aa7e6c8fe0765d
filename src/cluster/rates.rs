//! Rate limits that hold across the cluster. [`SharedRates`] counts requests in Redis with the
//! same GCRA `governor` uses on one node, so every node sees one allowance per client; a
//! [`Limiter`] counts there when the cluster has Redis, and on this node otherwise, including for
//! any request Redis does not answer in time: an outage loosens a limit to one allowance per node
//! for a while, rather than failing or holding up requests.

use std::fmt::Display;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::{DefaultKeyedRateLimiter, Quota};
use redis::Script;
use redis::aio::ConnectionManager;

/// How long a request waits for Redis before it is counted on this node instead.
const REDIS_TIMEOUT: Duration = Duration::from_millis(100);

/// How often at most the log says that requests are counted on this node for want of Redis.
const WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Counts one request, atomically, on Redis's clock (so nodes whose clocks disagree still agree
/// on the count). As `governor` does: `KEYS[1]` holds the key's theoretical arrival time (TAT),
/// `ARGV[1]` is the refill period T and `ARGV[2]` the burst, so a request is allowed unless the
/// TAT is more than T × (burst − 1) ahead of now, and each allowed one moves it T further. Times
/// are microseconds (exact in Lua's doubles), written with `%d` so that Redis never stores them
/// in exponent notation. The key expires once the TAT has passed, when its allowance is whole
/// again. Answers `{1, remaining burst}` or `{0, microseconds until one is allowed}`. `TIME`
/// before a write needs Redis 5 or later.
static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local period = tonumber(ARGV[1])
local tolerance = period * (tonumber(ARGV[2]) - 1)
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now)
if now < tat - tolerance then
  return {0, tat - tolerance - now}
end
local next = tat + period
redis.call('SET', KEYS[1], string.format('%d', next),
  'PX', string.format('%d', math.ceil((next - now) / 1000)))
return {1, math.floor((now + tolerance + period - next) / period)}
",
    )
});

/// What counting one request answered, as `governor` answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Within the limit; `remaining` more requests could be made at once.
    Allowed { remaining: u32 },
    /// Over the limit until `wait` from now.
    Refused { wait: Duration },
}

impl Decision {
    /// Whether the request is within the limit.
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allowed { .. })
    }
}

/// Why Redis did not count a request.
#[derive(Debug, thiserror::Error)]
pub enum RateError {
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis failed: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The rate limits' counts in Redis, shared by every node of a cluster whose keys start with the
/// same prefix. Cheap to clone: the clones share one connection.
#[derive(Clone)]
pub struct SharedRates {
    redis: ConnectionManager,
    prefix: Arc<str>,
    /// When the log last said that Redis did not count, so that it says so at most once a minute.
    last_warning: Arc<Mutex<Option<Instant>>>,
}

impl SharedRates {
    /// Counts in `redis`, under keys starting with `prefix` (the cluster's, such as `chat:rate:`).
    pub fn new(redis: ConnectionManager, prefix: impl Into<Arc<str>>) -> Self {
        SharedRates {
            redis,
            prefix: prefix.into(),
            last_warning: Arc::default(),
        }
    }

    /// Counts one request of `key` against the limit `name` (which holds no ':'): `burst` at
    /// once, and one more every `refill`. Answers within [`REDIS_TIMEOUT`].
    pub async fn count(
        &self,
        name: &str,
        key: &str,
        burst: NonZeroU32,
        refill: Duration,
    ) -> Result<Decision, RateError> {
        let mut redis = self.redis.clone();
        let mut invocation = GCRA.key(self.redis_key(name, key));
        invocation.arg(refill.as_micros().max(1)).arg(burst.get());
        let (allowed, value): (bool, u64) =
            tokio::time::timeout(REDIS_TIMEOUT, invocation.invoke_async(&mut redis))
                .await
                .map_err(|_| RateError::Timeout(REDIS_TIMEOUT))??;
        Ok(if allowed {
            Decision::Allowed {
                remaining: u32::try_from(value).unwrap_or(u32::MAX),
            }
        } else {
            Decision::Refused {
                wait: Duration::from_micros(value),
            }
        })
    }

    /// The Redis key of `key` under the limit `name`. The name ends at the first ':' after the
    /// prefix, so a key holding ':' (a user id may) never meets another limit's.
    fn redis_key(&self, name: &str, key: &str) -> String {
        debug_assert!(!name.contains(':'), "a limit's name holds no ':': {name}");
        format!("{}{name}:{key}", self.prefix)
    }

    /// Logs that the limit `name` counted a request on this node, at most once a minute.
    fn warn_counted_locally(&self, name: &str, error: &RateError) {
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|at| at.elapsed() >= WARNING_INTERVAL) {
            *last = Some(Instant::now());
            tracing::warn!(
                limit = name,
                %error,
                "rate limits counted on this node alone while Redis does not answer"
            );
        }
    }
}

/// One rate limit: `limit` requests per window for each key, usable all at once and coming back
/// evenly over the window (GCRA). With [`SharedRates`] it counts in Redis for the whole cluster;
/// without, or when Redis does not answer in time, with `governor` on this node.
pub struct Limiter<K: Hash + Eq + Clone> {
    /// The limit's name in Redis.
    name: &'static str,
    burst: NonZeroU32,
    /// The time one request's allowance takes to come back.
    refill: Duration,
    local: DefaultKeyedRateLimiter<K, StateInformationMiddleware>,
    shared: Option<SharedRates>,
}

impl<K: Hash + Eq + Clone + Display> Limiter<K> {
    /// `limit` requests per `window` for each key, or `None` for a `limit` of 0 (no limit). In
    /// Redis, a key's count is named by `name` (which holds no ':') and the key's text, so keys
    /// of different kinds must not share a text.
    pub fn new(
        name: &'static str,
        limit: u32,
        window: Duration,
        shared: Option<SharedRates>,
    ) -> Option<Self> {
        let burst = NonZeroU32::new(limit)?;
        let refill = (window / burst.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(refill)
            .expect("the period is not zero")
            .allow_burst(burst);
        Some(Limiter {
            name,
            burst,
            refill,
            local: DefaultKeyedRateLimiter::keyed(quota).with_middleware(),
            shared,
        })
    }

    /// The requests a key may make at once.
    pub fn limit(&self) -> u32 {
        self.burst.get()
    }

    /// The time one request's allowance takes to come back.
    pub fn refill(&self) -> Duration {
        self.refill
    }

    /// Counts one request of `key`.
    pub async fn check(&self, key: &K) -> Decision {
        if let Some(shared) = &self.shared {
            let counted = shared
                .count(self.name, &key.to_string(), self.burst, self.refill)
                .await;
            match counted {
                Ok(decision) => return decision,
                Err(error) => shared.warn_counted_locally(self.name, &error),
            }
        }
        match self.local.check_key(key) {
            Ok(state) => Decision::Allowed {
                remaining: state.remaining_burst_capacity(),
            },
            Err(not_until) => Decision::Refused {
                wait: not_until.wait_time_from(self.local.clock().now()),
            },
        }
    }

    /// Forgets the keys counted on this node whose allowance is whole again, so memory follows
    /// the active clients (Redis forgets its own as they expire).
    pub fn forget_quiet(&self) {
        self.local.retain_recent();
        self.local.shrink_to_fit();
    }
}

/// Redis for tests: the shared one at `TEST_REDIS_URL`, and private ones a test may stop.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use redis::aio::ConnectionManager;

    use super::SharedRates;

    /// A connection to the tests' Redis, `TEST_REDIS_URL` (by default `redis://127.0.0.1:6379`).
    pub async fn connect() -> ConnectionManager {
        let url =
            std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        let client = redis::Client::open(url).expect("TEST_REDIS_URL is a Redis URL");
        ConnectionManager::new(client)
            .await
            .expect("the tests need Redis at TEST_REDIS_URL (default redis://127.0.0.1:6379)")
    }

    /// A key prefix no other test or test run uses.
    pub fn unique_prefix() -> String {
        format!("test-{}:rate:", uuid::Uuid::new_v4())
    }

    /// One node's rates, on a connection of its own, in the cluster named by `prefix`.
    pub async fn node(prefix: &str) -> SharedRates {
        SharedRates::new(connect().await, prefix)
    }

    /// A Redis server of one test's own, which it may stop and start again; stopped when dropped.
    pub struct PrivateRedis {
        pub port: u16,
        server: Child,
    }

    impl PrivateRedis {
        /// A new server on a free port.
        pub async fn start() -> PrivateRedis {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .expect("a free port")
                .port();
            PrivateRedis::start_on(port).await
        }

        /// A new server on `port`, once it answers.
        pub async fn start_on(port: u16) -> PrivateRedis {
            let server = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server runs");
            let redis = PrivateRedis { port, server };
            for _ in 0..100 {
                if let Ok(mut connection) = redis.client().get_multiplexed_async_connection().await
                    && redis::cmd("PING")
                        .query_async::<String>(&mut connection)
                        .await
                        .is_ok()
                {
                    return redis;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("redis-server did not answer on port {port}");
        }

        pub fn client(&self) -> redis::Client {
            redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).expect("a Redis URL")
        }

        /// A connection that reconnects when the server comes back.
        pub async fn connect(&self) -> ConnectionManager {
            ConnectionManager::new(self.client())
                .await
                .expect("the private Redis answers")
        }

        /// Stops the server, at once.
        pub fn stop(&mut self) {
            let _ = self.server.kill();
            let _ = self.server.wait();
        }
    }

    impl Drop for PrivateRedis {
        fn drop(&mut self) {
            self.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{PrivateRedis, node, unique_prefix};
    use super::*;

    const ONE: NonZeroU32 = NonZeroU32::MIN;
    const THREE: NonZeroU32 = NonZeroU32::new(3).unwrap();

    async fn count(
        rates: &SharedRates,
        key: &str,
        burst: NonZeroU32,
        refill: Duration,
    ) -> Decision {
        rates.count("test", key, burst, refill).await.unwrap()
    }

    #[tokio::test]
    async fn the_burst_is_allowed_at_once_and_the_next_waits_one_refill() {
        let rates = node(&unique_prefix()).await;
        let refill = Duration::from_secs(10);
        for remaining in [2, 1, 0] {
            assert_eq!(
                count(&rates, "ann", THREE, refill).await,
                Decision::Allowed { remaining }
            );
        }
        let Decision::Refused { wait } = count(&rates, "ann", THREE, refill).await else {
            panic!("the fourth request is allowed");
        };
        assert!(
            wait <= refill && wait > refill - Duration::from_secs(1),
            "{wait:?}"
        );
        // Another key has its own allowance.
        assert!(count(&rates, "bob", THREE, refill).await.allowed());
    }

    #[tokio::test]
    async fn the_allowance_refills_one_request_per_period() {
        let rates = node(&unique_prefix()).await;
        let refill = Duration::from_millis(200);
        let burst = NonZeroU32::new(2).unwrap();
        assert!(count(&rates, "ann", burst, refill).await.allowed());
        assert!(count(&rates, "ann", burst, refill).await.allowed());
        let Decision::Refused { wait } = count(&rates, "ann", burst, refill).await else {
            panic!("the third request is allowed");
        };
        tokio::time::sleep(wait + Duration::from_millis(20)).await;
        assert_eq!(
            count(&rates, "ann", burst, refill).await,
            Decision::Allowed { remaining: 0 }
        );
        assert!(!count(&rates, "ann", burst, refill).await.allowed());
        tokio::time::sleep(refill * 2 + Duration::from_millis(20)).await;
        assert_eq!(
            count(&rates, "ann", burst, refill).await,
            Decision::Allowed { remaining: 1 }
        );
    }

    #[tokio::test]
    async fn nodes_of_one_cluster_count_together_and_other_clusters_apart() {
        let cluster = unique_prefix();
        let (first, second) = (node(&cluster).await, node(&cluster).await);
        let other = node(&unique_prefix()).await;
        let refill = Duration::from_secs(60);
        assert!(count(&first, "ann", THREE, refill).await.allowed());
        assert!(count(&second, "ann", THREE, refill).await.allowed());
        assert_eq!(
            count(&first, "ann", THREE, refill).await,
            Decision::Allowed { remaining: 0 }
        );
        assert!(!count(&second, "ann", THREE, refill).await.allowed());
        assert_eq!(
            count(&other, "ann", THREE, refill).await,
            Decision::Allowed { remaining: 2 }
        );
    }

    #[tokio::test]
    async fn limits_and_keys_with_colons_never_share_a_count() {
        let rates = node(&unique_prefix()).await;
        let refill = Duration::from_secs(60);
        assert!(
            rates
                .count("a", "b:c", ONE, refill)
                .await
                .unwrap()
                .allowed()
        );
        assert!(rates.count("b", "c", ONE, refill).await.unwrap().allowed());
        assert!(rates.count("a", "b", ONE, refill).await.unwrap().allowed());
        assert!(
            !rates
                .count("a", "b:c", ONE, refill)
                .await
                .unwrap()
                .allowed()
        );
    }

    #[tokio::test]
    async fn keys_expire_once_their_allowance_is_whole() {
        let rates = node(&unique_prefix()).await;
        let mut redis = rates.redis.clone();
        let key = rates.redis_key("test", "ann");
        let pttl = |redis: &mut ConnectionManager| {
            let mut redis = redis.clone();
            let key = key.clone();
            async move {
                redis::cmd("PTTL")
                    .arg(key)
                    .query_async::<i64>(&mut redis)
                    .await
                    .unwrap()
            }
        };
        let long = Duration::from_secs(10);
        count(&rates, "ann", THREE, long).await;
        count(&rates, "ann", THREE, long).await;
        let ttl = pttl(&mut redis).await;
        assert!((19_000..=20_000).contains(&ttl), "{ttl}");

        let key = rates.redis_key("test", "bob");
        count(&rates, "bob", THREE, Duration::from_millis(50)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let exists: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(!exists);
    }

    #[tokio::test]
    async fn a_redis_that_is_paused_or_gone_fails_quickly_and_is_used_again_when_back() {
        let mut redis = PrivateRedis::start().await;
        let rates = SharedRates::new(redis.connect().await, unique_prefix());
        let refill = Duration::from_secs(60);
        assert!(rates.count("test", "ann", ONE, refill).await.is_ok());

        let mut control = redis
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("CLIENT")
            .arg(&["PAUSE", "300", "ALL"])
            .query_async(&mut control)
            .await
            .unwrap();
        let started = Instant::now();
        let paused = rates.count("test", "bob", ONE, refill).await;
        assert!(matches!(paused, Err(RateError::Timeout(_))), "{paused:?}");
        assert!(started.elapsed() < Duration::from_millis(250));

        redis.stop();
        for _ in 0..3 {
            let started = Instant::now();
            assert!(rates.count("test", "ann", ONE, refill).await.is_err());
            assert!(started.elapsed() < Duration::from_millis(500));
        }

        let _back = PrivateRedis::start_on(redis.port).await;
        for _ in 0..200 {
            if let Ok(decision) = rates.count("test", "carl", ONE, refill).await {
                assert!(decision.allowed());
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("Redis was not used again once back");
    }
}
