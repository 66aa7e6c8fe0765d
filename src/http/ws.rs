//! The plain WebSocket transport at `/ws`: text frames of `{"event": NAME, "data": PAYLOAD}`.
//! A frame that carries an `id` is answered with an `ack` frame once handled. Connections are
//! pinged, and one that sends nothing back in time is closed.
//!
//! The handshake is answered here (with tungstenite's accept key) rather than by warp's filter, so
//! that every connection gets small read and write buffers: an idle connection costs a few
//! kilobytes, not tungstenite's default 128 KiB of buffer.
//!
//! Socket.IO connections, on a websocket or on long polling, are served by the same loop in
//! Socket.IO's framing ([`Framing::SocketIo`], `socketio/`).

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{Sink, SinkExt, Stream, StreamExt};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use warp::http::{HeaderMap, StatusCode, header};
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

use super::error::ApiError;
use super::payload::parse_json;
use super::session::{Session, token_expired, token_expiry};
use super::socketio::{self, protocol};
use super::{ClientAddr, FAREWELL_TIMEOUT, Shared, error_response};
use crate::actors::EncodedEvent;
use crate::auth::{AuthError, User};
use crate::config::Config;

/// Close code for a client that could not keep up with its events.
const CLOSE_TOO_SLOW: u16 = 1008;
/// Close code for a frame over the size limit (or otherwise unreadable).
const CLOSE_TOO_BIG: u16 = 1009;
/// Close code for a connection whose token has expired (a policy violation).
const CLOSE_EXPIRED: u16 = 1008;
/// Close code when the server shuts down.
const CLOSE_GOING_AWAY: u16 = 1001;
/// Bytes read from the socket at a time; larger frames grow the buffer as they arrive.
const READ_BUFFER: usize = 1024;
/// Bytes of frames gathered before they are written out.
const WRITE_BUFFER: usize = 16 * 1024;
/// Queued events written in one go before the socket is flushed.
const WRITE_BATCH: usize = 64;

/// An upgraded connection.
pub type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// What a connection's frames travel over: a WebSocket, or Socket.IO's long polling.
pub trait Transport:
    Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Unpin + Send + 'static
{
}

impl<T> Transport for T where
    T: Stream<Item = Result<Message, WsError>>
        + Sink<Message, Error = WsError>
        + Unpin
        + Send
        + 'static
{
}

/// A connection's heartbeat: a ping every `WS_PING_INTERVAL_MS`, and a connection that sends
/// nothing for `WS_PING_TIMEOUT_MS` after one is presumed gone. One timer per connection: when to
/// ping next or, once a ping is out, when to give up.
pub struct Heartbeat {
    timer: Pin<Box<Sleep>>,
    ping_sent: Option<Instant>,
    interval: Duration,
    timeout: Duration,
}

impl Heartbeat {
    pub fn new(config: &Config) -> Heartbeat {
        Heartbeat {
            timer: Box::pin(tokio::time::sleep(config.ws_ping_interval)),
            ping_sent: None,
            interval: config.ws_ping_interval,
            timeout: config.ws_ping_timeout,
        }
    }

    /// Waits until it is time to ping: `true`, or `false` when the ping that is out went
    /// unanswered.
    pub async fn due(&mut self) -> bool {
        self.timer.as_mut().await;
        self.ping_sent.is_none()
    }

    /// A ping went out now.
    pub fn pinged(&mut self) {
        let now = Instant::now();
        self.ping_sent = Some(now);
        self.timer.as_mut().reset(now + self.timeout);
    }

    /// The client sent a frame, which answers the ping that is out.
    pub fn answered(&mut self) {
        if let Some(sent) = self.ping_sent.take() {
            self.timer.as_mut().reset(sent + self.interval);
        }
    }
}

/// How a connection's frames carry events.
#[derive(Clone, Copy)]
pub enum Framing {
    /// `/ws`: `{"event", "data", "id"?}` text frames, WebSocket pings.
    Plain,
    /// Engine.IO v4 packets holding Socket.IO v5 packets of the main namespace, Engine.IO pings.
    SocketIo,
}

impl Framing {
    fn event(self, event: &EncodedEvent) -> Message {
        match self {
            Framing::Plain => Message::Text(event.frame.clone()),
            Framing::SocketIo => Message::Text(event.socketio_frame()),
        }
    }

    fn ping(self) -> Message {
        match self {
            Framing::Plain => Message::Ping(Default::default()),
            Framing::SocketIo => Message::text(protocol::PING),
        }
    }

    /// Handles one client frame; `None` when the client disconnected.
    async fn handle(self, session: &mut Session, frame: Message) -> Option<Vec<Message>> {
        match self {
            Framing::Plain => Some(handle_frame(session, frame).await),
            Framing::SocketIo => protocol::handle_frame(session, frame).await,
        }
    }

    /// The frames that end a connection whose token expired.
    fn expired(self) -> Vec<Message> {
        let mut farewell = vec![self.event(&token_expired())];
        farewell.extend(self.disconnected(CLOSE_EXPIRED, "token expired"));
        farewell
    }

    /// The frames that end a connection the server sends off: Socket.IO's disconnect first, so
    /// that the client does not reconnect on its own.
    fn disconnected(self, code: u16, reason: &'static str) -> Vec<Message> {
        match self {
            Framing::Plain => vec![close(code, reason)],
            Framing::SocketIo => vec![Message::text(protocol::DISCONNECT), close(code, reason)],
        }
    }

    /// How long the server waits for a client that fell behind to take its last frames: a
    /// Socket.IO client is told it was disconnected once it reads again (a polling client with
    /// its next request), as long as its heartbeat would keep it.
    fn patience(self, config: &Config) -> Duration {
        match self {
            Framing::Plain => FAREWELL_TIMEOUT,
            Framing::SocketIo => config.ws_ping_interval + config.ws_ping_timeout,
        }
    }
}

/// The connection's upgrade, taken from the request before it reaches the routes.
#[derive(Clone, Default)]
pub struct PendingUpgrade(Arc<Mutex<Option<OnUpgrade>>>);

impl PendingUpgrade {
    /// Takes the upgrade of a `/ws` request, or of a Socket.IO websocket, out of it, for the
    /// route to complete.
    pub fn take_from<B>(request: &mut http::Request<B>) {
        if request.uri().path() == "/ws" || socketio::is_websocket(request) {
            let upgrade = hyper::upgrade::on(&mut *request);
            let pending = PendingUpgrade(Arc::new(Mutex::new(Some(upgrade))));
            request.extensions_mut().insert(pending);
        }
    }

    fn take(&self) -> Option<OnUpgrade> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// The query of `/ws`: browsers cannot set headers on a WebSocket, so the token may come here.
#[derive(Debug, Deserialize)]
struct WsQuery {
    token: Option<String>,
}

/// `GET /ws`: checks the handshake and who it is from, answers 101 and serves the connection.
pub fn route(shared: Arc<Shared>) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    warp::path!("ws")
        .and(warp::get())
        .and(warp::header::headers_cloned())
        .and(warp::query::<WsQuery>())
        .and(warp::ext::optional::<PendingUpgrade>())
        .and(warp::ext::optional::<ClientAddr>())
        .then(move |headers: HeaderMap, query: WsQuery, pending, client| {
            let shared = shared.clone();
            async move {
                upgrade(&headers, query.token, pending, client, shared)
                    .await
                    .unwrap_or_else(|e| error_response(&e))
            }
        })
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(token))
}

/// The user a handshake is from: its `Authorization: Bearer` header, or else its `?token=`.
async fn handshake_user(
    shared: &Shared,
    headers: &HeaderMap,
    query_token: Option<String>,
) -> Result<User, ApiError> {
    let user = match headers.get(header::AUTHORIZATION) {
        Some(value) => {
            let header = value.to_str().map_err(|_| AuthError::Malformed)?;
            shared.auth.authenticate_header(Some(header)).await
        }
        None => shared.auth.authenticate(query_token.as_deref()).await,
    };
    Ok(user?)
}

async fn upgrade(
    headers: &HeaderMap,
    query_token: Option<String>,
    pending: Option<PendingUpgrade>,
    client: Option<ClientAddr>,
    shared: Arc<Shared>,
) -> Result<Response, ApiError> {
    let (on_upgrade, switching) = accept(headers, pending)?;
    let user = handshake_user(&shared, headers, query_token).await?;
    let permit = match client {
        Some(ClientAddr(addr)) => Some(shared.connection_limit.open(addr.ip())?),
        None => None,
    };
    tokio::spawn(async move {
        if let Some(socket) = opened(on_upgrade, &shared).await {
            serve(socket, user, shared, Framing::Plain).await;
        }
        drop(permit);
    });
    Ok(switching)
}

/// Checks a WebSocket handshake: the connection's upgrade and the 101 answer that completes it.
pub fn accept(
    headers: &HeaderMap,
    pending: Option<PendingUpgrade>,
) -> Result<(OnUpgrade, Response), ApiError> {
    let not_websocket = || ApiError::InvalidRequest("Expected a WebSocket upgrade".into());
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|_| header_has(headers, header::CONNECTION, "upgrade"))
        .filter(|_| header_has(headers, header::UPGRADE, "websocket"))
        .filter(|_| header_has(headers, header::SEC_WEBSOCKET_VERSION, "13"))
        .ok_or_else(not_websocket)?;
    let on_upgrade = pending.and_then(|p| p.take()).ok_or_else(not_websocket)?;
    let accept = derive_accept_key(key.as_bytes());
    let reply = warp::reply::with_status(warp::reply(), StatusCode::SWITCHING_PROTOCOLS);
    let reply = warp::reply::with_header(reply, header::CONNECTION, "upgrade");
    let reply = warp::reply::with_header(reply, header::UPGRADE, "websocket");
    let reply = warp::reply::with_header(reply, header::SEC_WEBSOCKET_ACCEPT, accept);
    Ok((on_upgrade, reply.into_response()))
}

/// The WebSocket of an upgraded connection, with small buffers and the frame size limit. Boxed:
/// a connection's task moves it from one step to the next, and each step would keep a copy.
pub async fn opened(on_upgrade: OnUpgrade, shared: &Shared) -> Option<Box<Socket>> {
    match on_upgrade.await {
        Ok(upgraded) => {
            let limit = Some(shared.config.ws_max_frame_bytes);
            let config = WebSocketConfig::default()
                .read_buffer_size(READ_BUFFER)
                .write_buffer_size(WRITE_BUFFER)
                .max_frame_size(limit)
                .max_message_size(limit);
            let io = TokioIo::new(upgraded);
            let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            Some(Box::new(socket))
        }
        Err(e) => {
            tracing::debug!(error = %e, "websocket upgrade failed");
            None
        }
    }
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

/// Serves one connection until either side closes it. Every write is boxed, as is the handling
/// of a client's frame: a task is as large as its largest await for its whole life, and a
/// connection spends most of it waiting, idle.
pub async fn serve(socket: impl Transport, user: User, shared: Arc<Shared>, framing: Framing) {
    let expiry = token_expiry(user.token_lifetime());
    tokio::pin!(expiry);
    let (mut session, mut inbox) = Session::open(&shared, user.id);
    let (mut sink, mut frames) = socket.split();
    let shutdown = shared.shutdown.clone();
    let send_timeout = shared.config.send_timeout;
    let ping_timeout = shared.config.ws_ping_timeout;
    let mut heartbeat = Heartbeat::new(&shared.config);
    // Whether the client fell behind: it is sent off once the session is closed.
    let too_slow = loop {
        tokio::select! {
            frame = frames.next() => {
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => {
                        tracing::debug!(connection = session.id(), error = %e, "unreadable frame");
                        let _ = Box::pin(sink.send(close(CLOSE_TOO_BIG, "frame too large or malformed"))).await;
                        break false;
                    }
                    None => break false,
                };
                if let Message::Close(_) = frame {
                    // Sends the close frame that answers the client's.
                    let _ = Box::pin(tokio::time::timeout(FAREWELL_TIMEOUT, sink.flush())).await;
                    break false;
                }
                heartbeat.answered();
                // Boxed, like a membership change: the connection's task stays small while it waits.
                let Some(answer) = Box::pin(framing.handle(&mut session, frame)).await else {
                    let _ = Box::pin(tokio::time::timeout(FAREWELL_TIMEOUT, sink.close())).await;
                    break false;
                };
                if !answer.is_empty()
                    && !Box::pin(write(&mut sink, answer, &inbox.dropped, send_timeout)).await
                {
                    break true;
                }
            }
            alive = heartbeat.due() => {
                if !alive {
                    // The client is presumed gone: no close frame, the socket is just dropped.
                    tracing::debug!(connection = session.id(), "no answer to a ping, closing");
                    break false;
                }
                let ping = sink.send(framing.ping());
                if !matches!(Box::pin(tokio::time::timeout(ping_timeout, ping)).await, Ok(Ok(()))) {
                    break false;
                }
                heartbeat.pinged();
            }
            event = inbox.events.recv() => {
                let mut batch = vec![framing.event(&event)];
                while batch.len() < WRITE_BATCH
                    && let Some(event) = inbox.events.try_recv()
                {
                    batch.push(framing.event(&event));
                }
                if !Box::pin(write(&mut sink, batch, &inbox.dropped, send_timeout)).await {
                    break true;
                }
            }
            Some(change) = inbox.memberships.recv() => {
                Box::pin(session.membership_changed(change)).await
            }
            _ = inbox.dropped.cancelled() => break true,
            () = &mut expiry => {
                Box::pin(write(&mut sink, framing.expired(), &inbox.dropped, send_timeout)).await;
                break false;
            }
            _ = shutdown.cancelled() => {
                let farewell = async {
                    let mut last = Vec::new();
                    while let Some(event) = inbox.events.try_recv() {
                        last.push(framing.event(&event));
                    }
                    last.push(close(CLOSE_GOING_AWAY, "server shutting down"));
                    write(&mut sink, last, &inbox.dropped, send_timeout).await;
                };
                let _ = Box::pin(tokio::time::timeout(FAREWELL_TIMEOUT, farewell)).await;
                break false;
            }
        }
    };
    Box::pin(session.close()).await;
    if too_slow {
        let farewell = framing.disconnected(CLOSE_TOO_SLOW, "too slow");
        let mut farewell = futures::stream::iter(farewell.into_iter().map(Ok));
        let patience = framing.patience(&shared.config);
        let _ = Box::pin(tokio::time::timeout(patience, sink.send_all(&mut farewell))).await;
    }
}

/// Writes frames and flushes once; false when the connection is gone, was dropped for being
/// too slow while the write waited, or took no frame for `send_timeout` (it stopped reading).
async fn write(
    sink: &mut (impl SinkExt<Message> + Unpin),
    frames: Vec<Message>,
    dropped: &CancellationToken,
    send_timeout: Duration,
) -> bool {
    let stalled = |_: &_| tracing::warn!(?send_timeout, "client stopped reading, dropping it");
    let written = async {
        for frame in frames {
            let fed = tokio::time::timeout(send_timeout, sink.feed(frame)).await;
            fed.inspect_err(stalled).ok()?.ok()?;
        }
        let flushed = tokio::time::timeout(send_timeout, sink.flush()).await;
        flushed.inspect_err(stalled).ok()?.ok()
    };
    tokio::select! {
        written = written => written.is_some(),
        _ = dropped.cancelled() => false,
    }
}

/// Handles one client frame; the answer is the frames to send back: an `error` event when it
/// failed, then the acknowledgement when the frame carried an `id`.
async fn handle_frame(session: &mut Session, frame: Message) -> Vec<Message> {
    let request = match &frame {
        Message::Text(text) => parse_json(text.as_bytes()),
        Message::Binary(_) => Err(ApiError::InvalidRequest("Frames must be JSON text".into())),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) | Message::Close(_) => {
            return Vec::new();
        }
    };
    let (ack_id, result) = match request {
        Ok(request) => dispatch(session, request).await,
        Err(error) => (None, Err(error)),
    };
    let (error, acknowledgement) = ApiError::outcome(result);
    let mut answer: Vec<Message> = error.iter().map(|e| Framing::Plain.event(e)).collect();
    if let Some(id) = ack_id {
        let ack = json!({ "event": "ack", "id": id, "data": acknowledgement });
        answer.push(Message::text(ack.to_string()));
    }
    answer
}

/// Handles one client request `{event, data, id?}`: the acknowledgement id it carried, if any,
/// and the handler's value.
async fn dispatch(
    session: &mut Session,
    mut request: Value,
) -> (Option<Value>, Result<Value, ApiError>) {
    let ack_id = match take_ack_id(&mut request) {
        Ok(id) => id,
        Err(error) => return (None, Err(error)),
    };
    let result = match request.get("event").and_then(Value::as_str) {
        Some(event) => {
            let data = request.get("data").unwrap_or(&Value::Null);
            session.handle(event, data).await
        }
        None => Err(ApiError::InvalidRequest("event must be a string".into())),
    };
    (ack_id, result)
}

/// Takes a request's acknowledgement id out of it: a string or a number; null is none.
fn take_ack_id(request: &mut Value) -> Result<Option<Value>, ApiError> {
    match request.get_mut("id").map(Value::take) {
        None | Some(Value::Null) => Ok(None),
        Some(id @ (Value::String(_) | Value::Number(_))) => Ok(Some(id)),
        Some(_) => Err(ApiError::InvalidRequest(
            "id must be a string or a number".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_tokens_are_matched_in_lists() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        assert!(header_has(&headers, header::CONNECTION, "upgrade"));
        assert!(!header_has(&headers, header::UPGRADE, "websocket"));
    }

    #[test]
    fn acknowledgement_ids_are_strings_or_numbers() {
        for id in [json!("a"), json!(""), json!(0), json!(-2.5)] {
            let mut request = json!({ "event": "e", "id": id });
            assert_eq!(take_ack_id(&mut request).ok(), Some(Some(id)));
        }
        for request in [json!({ "event": "e" }), json!({ "id": null }), json!([1])] {
            assert_eq!(take_ack_id(&mut request.clone()).ok(), Some(None));
        }
        for id in [json!(true), json!([1]), json!({ "n": 1 })] {
            assert!(take_ack_id(&mut json!({ "id": id })).is_err());
        }
    }
}
