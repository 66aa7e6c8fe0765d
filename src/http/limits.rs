//! Limits per client: the request rate on `/api/` (a tower layer answering 429 with
//! express-rate-limit's draft-6 `RateLimit-*` headers), open real-time connections per address,
//! and replies asked for per real-time connection. The rates count per signed-in user where
//! there is one (however many addresses and connections they use), per address or connection
//! otherwise. They use a GCRA: a client may use its whole allowance at once, which then refills
//! evenly over the window. In cluster mode the rates count in Redis, for every node at once (see
//! [`crate::cluster::rates`]); open connections always count per node.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tower::{Layer, Service};
use uuid::Uuid;
use warp::http::{HeaderMap, HeaderValue, Request};
use warp::reply::Response;

use super::Caller;
use super::error::ApiError;
use super::{ClientAddr, error_response};
use crate::auth::{AuthError, Authenticator, User};
use crate::cluster::rates::{Decision, Limiter, SharedRates};
use crate::domain::UserId;

/// What a rate counts against: a signed-in user, or else a request's client address or a
/// real-time connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RateKey {
    User(UserId),
    Address(IpAddr),
    /// A connection without sign-in, by an id no other connection of any node has.
    Connection(Uuid),
}

/// The key's name in Redis: its kind, then its id, so that no user id can pass for an address.
impl fmt::Display for RateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateKey::User(id) => write!(f, "u:{}", id.as_str()),
            RateKey::Address(ip) => write!(f, "a:{ip}"),
            RateKey::Connection(id) => write!(f, "c:{id}"),
        }
    }
}

/// The key of a request from `ip` made by `caller`: its user when it is a signed-in one, its
/// address otherwise (no token, a bad one, or sign-in off).
fn rate_key(caller: &Result<User, AuthError>, ip: IpAddr) -> RateKey {
    match caller {
        Ok(user) if user.id != UserId::anonymous() => RateKey::User(user.id.clone()),
        _ => RateKey::Address(client_key(ip)),
    }
}

/// The key a client is counted under: its address, with IPv4-mapped IPv6 addresses as IPv4
/// and IPv6 addresses by their /56 network (what one subscriber usually gets, as
/// express-rate-limit counts them).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(
            v6.to_bits() & !((1u128 << (128 - 56)) - 1),
        )),
        v4 => v4,
    }
}

/// Whole seconds, rounded up: what the `RateLimit-Reset` and `Retry-After` headers carry.
fn seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// `RATE_LIMIT_WINDOW_MS` and `RATE_LIMIT_MAX_REQUESTS` on `/api/`, per client address: a layer
/// around the warp routes, whose answers it needs for its 429.
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Option<Arc<ApiRateLimiter>>,
    auth: Arc<Authenticator>,
}

/// The shared state of an active [`RateLimitLayer`].
struct ApiRateLimiter {
    clients: Limiter<RateKey>,
    policy: HeaderValue,
}

impl RateLimitLayer {
    /// `max_requests` per `window`, for each user `auth` recognizes and each address, counted
    /// in `shared` when there is one (cluster mode); 0 requests turns the limit off.
    pub fn new(
        window: Duration,
        max_requests: u32,
        auth: Arc<Authenticator>,
        shared: Option<SharedRates>,
    ) -> Self {
        let limiter = Limiter::new("api", max_requests, window, shared).map(|clients| {
            let policy = format!("{};w={}", clients.limit(), seconds(window));
            Arc::new(ApiRateLimiter {
                clients,
                policy: HeaderValue::from_str(&policy).expect("digits make a header value"),
            })
        });
        RateLimitLayer { limiter, auth }
    }

    /// Forgets clients whose allowance is whole again, so memory follows the active clients.
    pub fn forget_quiet_clients(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.clients.forget_quiet();
        }
    }
}

impl ApiRateLimiter {
    /// Counts one request of `key`: the headers to answer with, and whether it is over the limit.
    async fn check(&self, key: &RateKey) -> (HeaderMap, bool) {
        let (limit, refill) = (self.clients.limit(), self.clients.refill());
        let (remaining, reset, retry_after) = match self.clients.check(key).await {
            Decision::Allowed { remaining } => {
                (remaining, refill * limit.saturating_sub(remaining), None)
            }
            Decision::Refused { wait } => (0, wait + refill * (limit - 1), Some(wait)),
        };
        let mut headers = HeaderMap::new();
        headers.insert("ratelimit-policy", self.policy.clone());
        headers.insert("ratelimit-limit", limit.into());
        headers.insert("ratelimit-remaining", remaining.into());
        headers.insert("ratelimit-reset", seconds(reset).into());
        if let Some(wait) = retry_after {
            headers.insert("retry-after", seconds(wait).max(1).into());
        }
        (headers, retry_after.is_some())
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
            auth: self.auth.clone(),
        }
    }
}

/// The service of [`RateLimitLayer`].
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Option<Arc<ApiRateLimiter>>,
    auth: Arc<Authenticator>,
}

impl<S, B> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let client = request.extensions().get::<ClientAddr>().map(|c| c.0.ip());
        let limited = match (&self.limiter, client) {
            (Some(limiter), Some(ip)) if request.uri().path().starts_with("/api/") => {
                Some((limiter.clone(), ip))
            }
            _ => None,
        };
        // A header that is not text is left to the route, which refuses it.
        let authorization = match request.headers().get(http::header::AUTHORIZATION) {
            None => Some(None),
            Some(value) => value.to_str().ok().map(|text| Some(text.to_owned())),
        };
        let auth = self.auth.clone();
        // The service that was made ready goes with the request; a clone stays for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let checked = match (limited, authorization) {
                (Some((limiter, ip)), Some(header)) => {
                    let caller = auth.authenticate_header(header.as_deref()).await;
                    let key = rate_key(&caller, ip);
                    // The route takes the caller from here instead of verifying the token again.
                    request.extensions_mut().insert(Caller(caller));
                    Some(limiter.check(&key).await)
                }
                (Some((limiter, ip)), None) => {
                    Some(limiter.check(&RateKey::Address(client_key(ip))).await)
                }
                (None, _) => None,
            };
            let answer = match checked {
                Some((headers, true)) => {
                    let mut response = error_response(&ApiError::RateLimited);
                    response.headers_mut().extend(headers);
                    return Ok(response);
                }
                Some((headers, false)) => Some(headers),
                None => None,
            };
            let mut response = inner.call(request).await?;
            if let Some(headers) = answer {
                response.headers_mut().extend(headers);
            }
            Ok(response)
        })
    }
}

/// Open real-time connections per client address (`MAX_CONNECTIONS_PER_IP`, 0 is off).
#[derive(Debug)]
pub struct ConnectionLimit {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection counted against its address; dropping it closes the count.
#[derive(Debug)]
pub struct ConnectionPermit {
    limit: Arc<ConnectionLimit>,
    key: IpAddr,
}

impl ConnectionLimit {
    /// At most `max` open connections per address; 0 is no limit.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionLimit {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a new connection from `ip`, or `RATE_LIMIT_EXCEEDED` when it has too many open.
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, ApiError> {
        let key = client_key(ip);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(key).or_default();
        if self.max > 0 && *count >= self.max {
            return Err(ApiError::RateLimited);
        }
        *count += 1;
        Ok(ConnectionPermit {
            limit: self.clone(),
            key,
        })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut open = self
            .limit
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Replies asked for per minute over real-time connections (`RT_MESSAGES_PER_MINUTE`): for each
/// signed-in user over all their connections (on every node in cluster mode), for each
/// connection without sign-in.
#[derive(Clone)]
pub struct ReplyLimiter(Option<Arc<Limiter<RateKey>>>);

impl ReplyLimiter {
    /// `per_minute` replies a minute, counted in `shared` when there is one (cluster mode); 0 is
    /// no limit.
    pub fn new(per_minute: u32, shared: Option<SharedRates>) -> Self {
        let limiter = Limiter::new("reply", per_minute, Duration::from_secs(60), shared);
        ReplyLimiter(limiter.map(Arc::new))
    }

    /// Forgets users and connections whose allowance is whole again.
    pub fn forget_quiet_users(&self) {
        if let Some(limiter) = &self.0 {
            limiter.forget_quiet();
        }
    }
}

/// Replies one real-time connection may ask for: counted for its signed-in user when there is
/// one, for the connection alone otherwise.
pub struct ReplyRate {
    rate: ReplyLimiter,
    key: RateKey,
}

impl ReplyRate {
    /// The rate of a connection of `user`.
    pub fn new(rate: &ReplyLimiter, user: &UserId) -> Self {
        let key = if *user == UserId::anonymous() {
            RateKey::Connection(Uuid::new_v4())
        } else {
            RateKey::User(user.clone())
        };
        ReplyRate {
            rate: rate.clone(),
            key,
        }
    }

    /// Counts one reply asked for, or `RATE_LIMIT_EXCEEDED` when over the rate.
    pub async fn check(&self) -> Result<(), ApiError> {
        match &self.rate.0 {
            Some(limiter) if !limiter.check(&self.key).await.allowed() => {
                Err(ApiError::RateLimited)
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::rates::testing::{PrivateRedis, node, unique_prefix};

    #[test]
    fn ipv6_clients_count_by_network() {
        let a: IpAddr = "2001:db8:1:2ff:1::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:200::9".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_eq!(client_key(a).to_string(), "2001:db8:1:200::");
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(client_key(mapped).to_string(), "10.1.2.3");
    }

    #[test]
    fn permits_count_open_connections() {
        let limit = ConnectionLimit::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let first = limit.open(ip).unwrap();
        let _second = limit.open(ip).unwrap();
        assert_eq!(limit.open(ip).unwrap_err(), ApiError::RateLimited);
        assert!(limit.open("10.0.0.2".parse().unwrap()).is_ok());
        drop(first);
        assert!(limit.open(ip).is_ok());
    }

    fn api_limiter(limit: u32, shared: Option<SharedRates>) -> Arc<ApiRateLimiter> {
        let no_sign_in = Authenticator::new(&crate::auth::AuthConfig::default()).unwrap();
        RateLimitLayer::new(Duration::from_secs(60), limit, Arc::new(no_sign_in), shared)
            .limiter
            .unwrap()
    }

    fn address(ip: &str) -> RateKey {
        RateKey::Address(ip.parse().unwrap())
    }

    #[tokio::test]
    async fn the_rate_limit_counts_down_then_refuses() {
        let limiter = api_limiter(2, None);
        let ip = address("10.0.0.1");
        let (headers, over) = limiter.check(&ip).await;
        assert!(!over);
        assert_eq!(headers["ratelimit-limit"], "2");
        assert_eq!(headers["ratelimit-remaining"], "1");
        assert_eq!(headers["ratelimit-reset"], "30");
        assert_eq!(headers["ratelimit-policy"], "2;w=60");
        assert!(!limiter.check(&ip).await.1);
        let (headers, over) = limiter.check(&ip).await;
        assert!(over);
        assert_eq!(headers["ratelimit-remaining"], "0");
        let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((29..=30).contains(&retry), "{retry}");
    }

    #[tokio::test]
    async fn shared_rates_answer_with_the_same_headers_as_local_ones() {
        let local = api_limiter(3, None);
        let shared = api_limiter(3, Some(node(&unique_prefix()).await));
        let ip = address("10.0.0.1");
        for _ in 0..5 {
            assert_eq!(shared.check(&ip).await, local.check(&ip).await);
        }
    }

    #[tokio::test]
    async fn nodes_sharing_redis_refuse_a_client_over_the_limit_on_any_of_them() {
        let cluster = unique_prefix();
        let first = api_limiter(3, Some(node(&cluster).await));
        let second = api_limiter(3, Some(node(&cluster).await));
        let ann = RateKey::User(UserId::new("10.0.0.1"));
        assert!(!first.check(&ann).await.1);
        assert!(!second.check(&ann).await.1);
        assert!(!first.check(&ann).await.1);
        let (headers, over) = second.check(&ann).await;
        assert!(over);
        assert!(headers.contains_key("retry-after"));
        // An address that reads like the user's id is another client.
        assert!(!second.check(&address("10.0.0.1")).await.1);
    }

    #[tokio::test]
    async fn without_redis_requests_are_counted_on_this_node() {
        let mut redis = PrivateRedis::start().await;
        let shared = SharedRates::new(redis.connect().await, unique_prefix());
        let limiter = api_limiter(2, Some(shared));
        let ip = address("10.0.0.1");
        assert!(!limiter.check(&ip).await.1);
        redis.stop();
        let started = std::time::Instant::now();
        let local = api_limiter(2, None);
        for _ in 0..3 {
            assert_eq!(limiter.check(&ip).await, local.check(&ip).await);
        }
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn replies_count_per_user_on_every_node_and_per_connection_without_sign_in() {
        let cluster = unique_prefix();
        let first = ReplyLimiter::new(2, Some(node(&cluster).await));
        let second = ReplyLimiter::new(2, Some(node(&cluster).await));
        let ann = UserId::new("ann");
        let (ann_first, ann_second) = (ReplyRate::new(&first, &ann), ReplyRate::new(&second, &ann));
        assert_eq!(ann_first.check().await, Ok(()));
        assert_eq!(ann_second.check().await, Ok(()));
        assert_eq!(ann_first.check().await, Err(ApiError::RateLimited));
        assert_eq!(ann_second.check().await, Err(ApiError::RateLimited));

        let anonymous = UserId::anonymous();
        let one = ReplyRate::new(&first, &anonymous);
        let other = ReplyRate::new(&first, &anonymous);
        assert_eq!(one.check().await, Ok(()));
        assert_eq!(one.check().await, Ok(()));
        assert_eq!(one.check().await, Err(ApiError::RateLimited));
        assert_eq!(other.check().await, Ok(()));
    }
}
