//! The Socket.IO transport at `/socket.io/`: protocol v5 over Engine.IO v4, on long polling
//! (upgraded to a websocket when the client asks) or on a websocket from the start, on the same
//! listener as REST and `/ws`. Every connection runs the `/ws` loop in Socket.IO's framing
//! ([`protocol`]); long polling is a transport of its own ([`polling`]).

use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use warp::reply::{Reply, Response};
use warp::{Buf, Filter, Rejection};

use super::error::ApiError;
use super::reply;
use super::ws::{self, Framing, PendingUpgrade, Transport};
use super::{ClientAddr, Shared, read_limited};
use polling::{Known, Polling, Sessions};

pub mod polling;
pub mod protocol;

/// Where Socket.IO is served (its clients' default).
const PATH: &str = "/socket.io/";

/// The Engine.IO query of a request.
#[derive(Debug, Default, PartialEq)]
struct Query<'a> {
    version: Option<&'a str>,
    transport: Option<&'a str>,
    sid: Option<&'a str>,
}

impl<'a> Query<'a> {
    fn parse(query: &'a str) -> Query<'a> {
        let mut parsed = Query::default();
        for pair in query.split('&') {
            match pair.split_once('=').unwrap_or((pair, "")) {
                ("EIO", version) => parsed.version = Some(version),
                ("transport", transport) => parsed.transport = Some(transport),
                ("sid", sid) => parsed.sid = Some(sid),
                _ => {}
            }
        }
        parsed
    }
}

/// Whether a request asks for a Socket.IO websocket, opened directly or upgrading a polling
/// session.
pub fn is_websocket<B>(request: &http::Request<B>) -> bool {
    matches!(request.uri().path(), "/socket.io/" | "/socket.io")
        && request.method() == http::Method::GET
        && Query::parse(request.uri().query().unwrap_or_default()).transport == Some("websocket")
}

/// Engine.IO's refusals of a request, answered in its own words: `{code, message}` with a
/// numeric code, as Socket.IO's own server answers them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EngineError {
    TransportUnknown,
    SessionUnknown,
    BadHandshakeMethod,
    BadRequest,
    UnsupportedVersion,
    PayloadTooLarge,
}

impl EngineError {
    fn code(self) -> u8 {
        match self {
            EngineError::TransportUnknown => 0,
            EngineError::SessionUnknown => 1,
            EngineError::BadHandshakeMethod => 2,
            EngineError::BadRequest | EngineError::PayloadTooLarge => 3,
            EngineError::UnsupportedVersion => 5,
        }
    }

    fn message(self) -> &'static str {
        match self {
            EngineError::TransportUnknown => "Transport unknown",
            EngineError::SessionUnknown => "Session ID unknown",
            EngineError::BadHandshakeMethod => "Bad handshake method",
            EngineError::BadRequest => "Bad request",
            EngineError::UnsupportedVersion => "Unsupported protocol version",
            EngineError::PayloadTooLarge => "Payload too large",
        }
    }

    fn response(self) -> Response {
        let status = match self {
            EngineError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        let body = serde_json::json!({ "code": self.code(), "message": self.message() });
        warp::reply::with_status(reply::json(&body), status).into_response()
    }
}

/// A request under `/socket.io/`, as the route takes it.
struct Request {
    method: Method,
    query: String,
    headers: HeaderMap,
    pending: Option<PendingUpgrade>,
    client: Option<ClientAddr>,
}

/// Every request under `/socket.io/`: a polling session's handshake, `GET`s and `POST`s, and
/// websockets, opened directly or upgrading a polling session.
pub fn route(shared: Arc<Shared>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let sessions = Arc::new(Sessions::default());
    warp::path(&PATH[1..PATH.len() - 1])
        .and(warp::path::end())
        .and(warp::method())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<PendingUpgrade>())
        .and(warp::ext::optional::<ClientAddr>())
        .and(warp::body::stream())
        .then(move |method, query, headers, pending, client, body| {
            let request = Request {
                method,
                query,
                headers,
                pending,
                client,
            };
            let (shared, sessions) = (shared.clone(), sessions.clone());
            async move {
                handle(request, Box::pin(body), &shared, &sessions)
                    .await
                    .unwrap_or_else(EngineError::response)
            }
        })
}

async fn handle(
    request: Request,
    body: impl Stream<Item = Result<impl Buf, warp::Error>> + Unpin,
    shared: &Arc<Shared>,
    sessions: &Arc<Sessions>,
) -> Result<Response, EngineError> {
    let query = Query::parse(&request.query);
    let websocket = match query.transport {
        Some("polling") => false,
        Some("websocket") => true,
        _ => return Err(EngineError::TransportUnknown),
    };
    let Some(sid) = query.sid else {
        if request.method != Method::GET {
            return Err(EngineError::BadHandshakeMethod);
        }
        if query.version != Some("4") {
            return Err(EngineError::UnsupportedVersion);
        }
        return match websocket {
            true => open_websocket(request, shared.clone()),
            false => open_polling(request, shared, sessions).await,
        };
    };
    let session = match sessions.get(sid) {
        Some(Known::Polling(session)) => session,
        Some(Known::Upgraded) if websocket => return refuse_websocket(request, shared.clone()),
        Some(Known::Upgraded) => return Err(EngineError::BadRequest),
        None => return Err(EngineError::SessionUnknown),
    };
    match (websocket, &request.method) {
        (true, &Method::GET) => upgrade(request, session, shared, sessions.clone()),
        (false, &Method::GET) => {
            let payload = session
                .poll(sessions, shared.config.socketio_buffer)
                .await?;
            Ok(payload_response(payload, "text/plain; charset=UTF-8"))
        }
        (false, &Method::POST) => {
            let limit = shared.config.ws_max_frame_bytes;
            let payload = read_limited(body, limit).await.map_err(|error| {
                session.close(sessions);
                match error {
                    ApiError::PayloadTooLarge => EngineError::PayloadTooLarge,
                    _ => EngineError::BadRequest,
                }
            })?;
            session.post(sessions, &payload).await?;
            Ok(payload_response(Bytes::from_static(b"ok"), "text/html"))
        }
        _ => Err(EngineError::BadRequest),
    }
}

fn payload_response(payload: Bytes, content_type: &'static str) -> Response {
    let mut response = Response::new(payload.into());
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The 101 that opens a websocket, and the connection's upgrade.
fn accept(request: Request) -> Result<(hyper::upgrade::OnUpgrade, Response), EngineError> {
    ws::accept(&request.headers, request.pending).map_err(|_| EngineError::BadRequest)
}

/// A websocket opened straight away: the handshake and the connect on it, then the socket.
fn open_websocket(request: Request, shared: Arc<Shared>) -> Result<Response, EngineError> {
    let client = request.client;
    let (on_upgrade, switching) = accept(request)?;
    tokio::spawn(async move {
        if let Some(socket) = ws::opened(on_upgrade, &shared).await {
            let sid = uuid::Uuid::new_v4().simple().to_string();
            connect_and_serve(socket, sid, &[], client, shared).await;
        }
    });
    Ok(switching)
}

/// A polling session's handshake: the session opens, and this first `GET` takes its open packet.
async fn open_polling(
    request: Request,
    shared: &Arc<Shared>,
    sessions: &Arc<Sessions>,
) -> Result<Response, EngineError> {
    let config = &shared.config;
    let linger = config.ws_ping_interval + config.ws_ping_timeout;
    let (session, transport) = sessions.open(config.socketio_buffer, linger);
    let sid = session.sid.to_string();
    let serving = connect_and_serve(
        transport,
        sid,
        &["websocket"],
        request.client,
        shared.clone(),
    );
    tokio::spawn(serving);
    let payload = session.poll(sessions, config.socketio_buffer).await?;
    Ok(payload_response(payload, "text/plain; charset=UTF-8"))
}

/// The Socket.IO connect on a transport, then the socket until it ends.
async fn connect_and_serve(
    mut transport: impl Transport,
    sid: String,
    upgrades: &'static [&'static str],
    client: Option<ClientAddr>,
    shared: Arc<Shared>,
) {
    if let Some((user, permit)) =
        protocol::connect(&mut transport, &shared, client, &sid, upgrades).await
    {
        ws::serve(transport, user, shared, Framing::SocketIo).await;
        drop(permit);
    }
}

/// A websocket asking to upgrade a session that is on a websocket already: opened, then closed.
fn refuse_websocket(request: Request, shared: Arc<Shared>) -> Result<Response, EngineError> {
    let (on_upgrade, switching) = accept(request)?;
    tokio::spawn(async move {
        if let Some(mut socket) = ws::opened(on_upgrade, &shared).await {
            let _ = socket.close(None).await;
        }
    });
    Ok(switching)
}

/// A websocket upgrading a polling session: once the client has probed it and said so, the
/// session carries on over it.
fn upgrade(
    request: Request,
    session: Arc<Polling>,
    shared: &Arc<Shared>,
    sessions: Arc<Sessions>,
) -> Result<Response, EngineError> {
    let Some(handover) = session.take_upgrade() else {
        // Another websocket is upgrading the session.
        return refuse_websocket(request, shared.clone());
    };
    let (on_upgrade, switching) = match accept(request) {
        Ok(accepted) => accepted,
        Err(error) => {
            session.give_back(handover);
            return Err(error);
        }
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        match ws::opened(on_upgrade, &shared).await {
            Some(socket) => session.upgrade(&sessions, handover, socket).await,
            None => session.give_back(handover),
        }
    });
    Ok(switching)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: http::Method, uri: &str) -> http::Request<()> {
        http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
    }

    #[test]
    fn queries_name_version_transport_and_session() {
        let query = Query::parse("EIO=4&transport=polling&t=abc&sid=s1");
        let expected = Query {
            version: Some("4"),
            transport: Some("polling"),
            sid: Some("s1"),
        };
        assert_eq!(query, expected);
        assert_eq!(Query::parse(""), Query::default());
    }

    #[test]
    fn only_websocket_gets_under_the_path_are_websockets() {
        use http::Method;
        assert!(is_websocket(&request(
            Method::GET,
            "/socket.io/?EIO=4&transport=websocket"
        )));
        assert!(is_websocket(&request(
            Method::GET,
            "/socket.io/?EIO=4&transport=websocket&sid=abc"
        )));
        for (method, uri) in [
            (Method::GET, "/socket.io/?EIO=4&transport=polling"),
            (Method::POST, "/socket.io/?EIO=4&transport=websocket"),
            (Method::GET, "/socket.io/x?EIO=4&transport=websocket"),
            (Method::GET, "/ws?EIO=4&transport=websocket"),
        ] {
            assert!(!is_websocket(&request(method, uri)), "{uri}");
        }
    }
}
