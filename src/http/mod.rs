//! The HTTP side: warp routes for REST and `/ws`, and Socket.IO at `/socket.io/`, wrapped in
//! tower layers and served by hyper with connection upgrades.

pub mod client;
mod connection;
pub mod error;
pub mod limits;
mod middleware;
pub mod openapi;
mod payload;
mod reply;
mod rest;
mod routes;
mod session;
mod socketio;
mod web;
mod ws;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use futures::{Stream, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{Layer, ServiceBuilder};
use tower_http::cors::{AllowOrigin, CorsLayer};
use warp::http::{HeaderValue, Method, header};
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

use crate::actors::Conversations;
use crate::auth::{Accounts, AuthError, Authenticator, User};
use crate::cluster::rates::SharedRates;
use crate::config::Config;
use crate::metrics::Metrics;
pub use client::ClientAddr;
use connection::{Activity, Timeouts, TrackingLayer, Watched};
use error::ApiError;
use limits::{ConnectionLimit, RateLimitLayer, ReplyLimiter};
use middleware::AccessLogLayer;

/// How long a closing real-time connection may take to send its last events.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// What every route and connection shares.
pub struct Shared {
    pub conversations: Conversations,
    /// Who each request and connection is from.
    pub auth: Arc<Authenticator>,
    /// Replies asked for per minute: per signed-in user over all their connections, per connection
    /// without sign-in.
    pub reply_limiter: ReplyLimiter,
    /// Where the rate limits count in cluster mode; `None` counts on this node alone.
    pub rates: Option<SharedRates>,
    /// The server's own accounts, with `AUTH_MODE=local`.
    pub accounts: Option<Accounts>,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// Open real-time connections per client address, over every transport.
    pub connection_limit: Arc<ConnectionLimit>,
    pub started: Instant,
    /// Cancelled when the server stops accepting connections.
    pub stop_accepting: CancellationToken,
    /// Cancelled once replies in progress are over; open WebSockets close on it.
    pub shutdown: CancellationToken,
    /// Every open real-time connection holds a token of it; shutdown waits for them to close.
    pub connections: TaskTracker,
}

fn with_shared(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (Arc<Shared>,), Error = Infallible> + Clone {
    warp::any().map(move || shared.clone())
}

/// How request bodies are read: `BODY_LIMIT_BYTES`, and what becomes of a body over it.
#[derive(Debug, Clone, Copy)]
struct BodyLimits {
    /// The largest body read.
    max: usize,
    /// How much more of a refused body is read and thrown away.
    discard_max: usize,
    /// For how long a refused body is read.
    discard_time: Duration,
}

impl BodyLimits {
    fn new(config: &Config) -> Self {
        BodyLimits {
            max: config.body_limit_bytes,
            discard_max: config.body_discard_limit_bytes,
            discard_time: config.body_discard_timeout,
        }
    }

    /// Reads and drops the rest of a refused body in the background, at most `discard_max`
    /// bytes for at most `discard_time`, while the 413 goes out: a client still sending would
    /// otherwise have its connection reset under it and never read the answer. A body declared
    /// longer than that is not read at all.
    fn discard<B: Buf>(
        &self,
        mut body: impl Stream<Item = Result<B, warp::Error>> + Send + Unpin + 'static,
        declared: Option<u64>,
    ) {
        if declared.is_some_and(|length| length > self.discard_max as u64) {
            return;
        }
        let (mut left, time) = (self.discard_max, self.discard_time);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(time, async {
                while let Some(Ok(chunk)) = body.next().await {
                    match left.checked_sub(chunk.remaining()) {
                        Some(rest) => left = rest,
                        None => return,
                    }
                }
            })
            .await;
        });
    }
}

/// Who a request is from, as the rate limit verified it, so that the route need not again.
#[derive(Clone)]
pub struct Caller(pub Result<User, AuthError>);

/// The user a request is made by, from its `Authorization: Bearer` token: 401 when sign-in is on
/// and the token is missing or not good; with sign-in off, the anonymous user.
fn user(shared: Arc<Shared>) -> impl Filter<Extract = (User,), Error = Rejection> + Clone {
    warp::ext::optional::<Caller>()
        .and(warp::header::optional::<String>("authorization"))
        .and_then(move |caller: Option<Caller>, header: Option<String>| {
            let shared = shared.clone();
            async move {
                let caller = match caller {
                    Some(Caller(caller)) => caller,
                    None => shared.auth.authenticate_header(header.as_deref()).await,
                };
                caller.map_err(|e| warp::reject::custom(ApiError::from(e)))
            }
        })
}

/// A JSON body within the [`BodyLimits`]: 413 above them, 400 when it is not JSON.
fn json_body(
    limits: BodyLimits,
) -> impl Filter<Extract = (serde_json::Value,), Error = Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and(warp::body::stream())
        .and_then(move |length: Option<u64>, body| async move {
            let mut body = Box::pin(body);
            let read = if length.is_some_and(|l| l > limits.max as u64) {
                Err(ApiError::PayloadTooLarge)
            } else {
                read_limited(&mut body, limits.max).await
            };
            match read {
                Ok(bytes) => payload::parse_json(&bytes).map_err(warp::reject::custom),
                Err(error) => {
                    if error == ApiError::PayloadTooLarge {
                        limits.discard(body, length);
                    }
                    Err(warp::reject::custom(error))
                }
            }
        })
}

async fn read_limited<B: Buf>(
    mut body: impl Stream<Item = Result<B, warp::Error>> + Unpin,
    limit: usize,
) -> Result<BytesMut, ApiError> {
    let mut bytes = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk =
            chunk.map_err(|e| ApiError::InvalidRequest(format!("Unreadable body: {e}")))?;
        if bytes.len() + chunk.remaining() > limit {
            return Err(ApiError::PayloadTooLarge);
        }
        while chunk.has_remaining() {
            let piece = chunk.chunk();
            bytes.extend_from_slice(piece);
            let n = piece.len();
            chunk.advance(n);
        }
    }
    Ok(bytes)
}

/// Every route of the server, with errors turned into `{message, code}` answers.
pub fn routes(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let limit = BodyLimits::new(&shared.config);
    let state = with_shared(shared.clone());
    let user = || user(shared.clone());
    let conversation_path = || warp::path!("api" / "conversations" / String);

    let health = warp::path!("api" / "health")
        .and(warp::get())
        .and(state.clone())
        .map(|shared: Arc<Shared>| rest::health(&shared));
    let register = warp::path!("api" / "auth" / "register")
        .and(warp::post())
        .and(state.clone())
        .and(json_body(limit))
        .then(rest::register);
    let login = warp::path!("api" / "auth" / "login")
        .and(warp::post())
        .and(state.clone())
        .and(warp::ext::optional::<ClientAddr>())
        .and(json_body(limit))
        .then(rest::login);
    let me = warp::path!("api" / "me")
        .and(warp::get())
        .and(state.clone())
        .and(user())
        .then(rest::me);
    let chat = warp::path!("api" / "chat")
        .and(warp::post())
        .and(state.clone())
        .and(user())
        .and(json_body(limit))
        .then(rest::chat);
    let list = warp::path!("api" / "conversations")
        .and(warp::get())
        .and(state.clone())
        .and(user())
        .and(warp::query::<rest::ListQuery>())
        .then(rest::list);
    let get = conversation_path()
        .and(warp::get())
        .and(state.clone())
        .and(user())
        .then(|id, shared, user| rest::get(shared, user, id));
    let delete = conversation_path()
        .and(warp::delete())
        .and(state.clone())
        .and(user())
        .then(|id, shared, user| rest::delete(shared, user, id));
    let rename = conversation_path()
        .and(warp::patch())
        .and(state.clone())
        .and(user())
        .and(json_body(limit))
        .then(|id, shared, user, body| rest::rename(shared, user, id, body));
    let stop = warp::path!("api" / "conversations" / String / "stop")
        .and(warp::post())
        .and(state.clone())
        .and(user())
        .then(|id, shared, user| rest::stop(shared, user, id));
    let regenerate = warp::path!("api" / "conversations" / String / "regenerate")
        .and(warp::post())
        .and(state.clone())
        .and(user())
        .then(|id, shared, user| rest::regenerate(shared, user, id));
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(state.clone())
        .map(|shared: Arc<Shared>| rest::metrics(&shared));
    let websocket = ws::route(shared.clone());
    let socketio = socketio::route(shared.clone());
    let page = web::routes(shared.config.web_client);
    let reference = openapi::routes();

    let api = me
        .or(register)
        .unify()
        .or(login)
        .unify()
        .or(chat)
        .unify()
        .or(list)
        .unify()
        .or(get)
        .unify()
        .or(delete)
        .unify()
        .or(rename)
        .unify()
        .or(stop)
        .unify()
        .or(regenerate)
        .unify()
        .map(|result: Result<Response, ApiError>| result.unwrap_or_else(|e| error_response(&e)));
    health
        .or(api)
        .unify()
        .or(metrics)
        .unify()
        .or(websocket)
        .unify()
        .or(socketio)
        .unify()
        .or(page)
        .unify()
        .or(reference)
        .unify()
        .recover(recover)
        .unify()
}

/// The `{message, code}` answer for an error.
pub fn error_response(error: &ApiError) -> Response {
    warp::reply::with_status(reply::json(&error.body()), error.status()).into_response()
}

async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    let error = if let Some(e) = rejection.find::<ApiError>() {
        e.clone()
    } else if rejection.is_not_found() {
        ApiError::NotFound
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::MethodNotAllowed
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::PayloadTooLarge
    } else if let Some(e) = rejection.find::<warp::reject::InvalidQuery>() {
        ApiError::InvalidRequest(e.to_string())
    } else {
        ApiError::InvalidRequest(format!("Bad request: {rejection:?}"))
    };
    let mut response = error_response(&error);
    if error == ApiError::PayloadTooLarge {
        // The rest of the body is not wanted: the connection closes once it has been read.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

fn cors(frontend_url: &str) -> CorsLayer {
    let origin = AllowOrigin::list(HeaderValue::from_str(frontend_url).ok());
    CorsLayer::new()
        .allow_origin(origin)
        .allow_credentials(true)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION])
}

/// Accepts connections until `shutdown` is cancelled, then waits up to `grace` for the open
/// ones to finish.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, grace: Duration) {
    let config = &shared.config;
    let rate_limit = RateLimitLayer::new(
        config.rate_limit_window,
        config.rate_limit_max_requests,
        shared.auth.clone(),
        shared.rates.clone(),
    );
    let app = rate_limit.layer(warp::service(routes(shared.clone())));
    let cors = cors(&config.frontend_url);
    let access_log = AccessLogLayer::new(shared.metrics.clone());
    tokio::spawn(middleware::upkeep(
        shared.metrics.clone(),
        rate_limit.clone(),
        shared.reply_limiter.clone(),
        shared.stop_accepting.clone(),
    ));
    let timeouts = Timeouts {
        header: config.http_header_timeout,
        keep_alive: config.http_keepalive_timeout,
    };
    let proxies = Arc::new(config.trusted_proxies.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let stop_accepting = shared.stop_accepting.clone();
    loop {
        let (stream, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop_accepting.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let proxies = proxies.clone();
        let service = ServiceBuilder::new()
            .layer(TrackingLayer::new(activity.clone()))
            .map_request(move |mut request: http::Request<_>| {
                let client = proxies.client(addr, request.headers());
                request.extensions_mut().insert(client);
                ws::PendingUpgrade::take_from(&mut request);
                request
            })
            .layer(middleware::security_headers())
            .layer(access_log.clone())
            .layer(cors.clone())
            .service(app.clone());
        let connection = auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(
                TokioIo::new(Watched::new(stream, activity, timeouts)),
                TowerToHyperService::new(service),
            )
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period");
    }
}
