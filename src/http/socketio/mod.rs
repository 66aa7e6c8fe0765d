//! The Socket.IO transport at `/socket.io/` (protocol v5 over Engine.IO v4, polling and
//! websocket) on the same listener as REST and `/ws`. A websocket opened straight away is served
//! by this server's own loop ([`websocket`]); polling sessions, and the websockets they upgrade
//! to, by socketioxide.
//!
//! socketioxide calls its handlers as callbacks, so each socket gets one task that owns its
//! [`Session`]: the handlers forward client events to it over a channel, in arrival order, and the
//! task writes the session's events out as Socket.IO events.
//!
//! socketioxide buffers `SOCKETIO_BUFFER` packets per socket and refuses more until the client
//! takes them (a polling client with its next request). The task then holds what was refused and
//! tries again shortly, taking nothing else meanwhile: the session's events wait in its outbox,
//! where a reply's chunks merge, and client events wait in their channel. A socket that takes
//! nothing for `SEND_TIMEOUT_MS` is disconnected.

use std::collections::VecDeque;
use std::fmt::Display;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::OptionFuture;
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::{AckSender, Event, TryData};
use socketioxide::handler::{
    ConnectHandler, FromConnectParts, FromMessageParts, MessageHandler, Value as PacketValue,
};
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::Socket;
use socketioxide::{SendError, SocketError, SocketIo};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep};

pub mod websocket;

use super::error::ApiError;
use super::session::{Session, token_expired, token_expiry};
use super::{ClientAddr, FAREWELL_TIMEOUT, Shared};
use crate::actors::EncodedEvent;
use crate::actors::outbox::Outbox;
use crate::auth::User;

/// Client events one socket may have waiting to be handled; more are refused with an `error`.
const PENDING_EVENTS: usize = 1024;
/// How often a socket whose buffer is full is offered again what it refused.
const FULL_BUFFER_RETRY: Duration = Duration::from_millis(20);

/// Where socketioxide serves Socket.IO (its default).
const PATH: &str = "/socket.io";
/// The websocket read buffer of a socket; it grows for larger frames, up to the frame limit.
const READ_BUFFER: usize = 1024;

/// Copies a `/socket.io/` request's URI and headers out of the connection's read buffer.
/// hyper parses them as slices of that buffer (8 to 16 KiB), and socketioxide keeps every
/// session's request head for the life of the session, so without the copy each socket would
/// hold a whole buffer.
pub fn detach_head<B>(request: &mut http::Request<B>) {
    if !request.uri().path().starts_with(PATH) {
        return;
    }
    if let Ok(uri) = http::Uri::try_from(request.uri().to_string()) {
        *request.uri_mut() = uri;
    }
    for value in request.headers_mut().values_mut() {
        if let Ok(copy) = http::HeaderValue::from_bytes(value.as_bytes()) {
            *value = copy;
        }
    }
}

/// Where the routes serve the Socket.IO websockets opened directly ([`websocket`]): socketioxide
/// answers every request under `/socket.io/` and passes the others on.
pub const DIRECT_PATH: &str = "/socket.io-websocket";

/// Moves a Socket.IO websocket opened directly to [`DIRECT_PATH`], past socketioxide, keeping
/// its query.
pub fn steer_direct<B>(mut request: http::Request<B>) -> http::Request<B> {
    if websocket::opens_directly(&request) {
        let query = request.uri().query().unwrap_or_default();
        if let Ok(uri) = http::Uri::try_from(format!("{DIRECT_PATH}?{query}")) {
            *request.uri_mut() = uri;
        }
    }
    request
}

/// The tower layer that answers `/socket.io/` and passes every other request on.
pub fn layer(shared: Arc<Shared>) -> SocketIoLayer {
    let limit = shared.config.ws_max_frame_bytes;
    let (layer, io) = SocketIo::builder()
        .ws_read_buffer_size(READ_BUFFER)
        .max_buffer_size(shared.config.socketio_buffer)
        .max_payload(limit as u64)
        .ws_max_message_size(limit)
        .ws_max_frame_size(limit)
        .build_layer();
    io.ns("/", OnConnect(shared.clone()));
    tokio::spawn(async move {
        shared.shutdown.cancelled().await;
        // The sockets hand over their last events first.
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, shared.connections.wait()).await;
        io.close().await;
    });
    layer
}

/// What the handlers tell a socket's task.
enum Incoming {
    /// A client event; boxed, so the channel's slots stay small while the socket is idle.
    Event(Box<ClientEvent>),
    /// The socket is gone.
    Disconnected,
}

/// A client event, with the id of its acknowledgement when the client asked for one.
struct ClientEvent {
    name: String,
    data: serde_json::Value,
    ack: Option<i64>,
}

/// A packet for the client, kept in order while socketioxide's buffer is full.
enum Outgoing {
    /// A server event.
    Event(Arc<EncodedEvent>),
    /// The acknowledgement of a client event, by its id.
    Ack(i64, serde_json::Value),
}

/// Sets up a socket as it connects: its handlers first, so no event can arrive before them,
/// then its task.
#[derive(Clone)]
struct OnConnect(Arc<Shared>);

/// Marks this crate's own handler implementations apart from socketioxide's closure ones.
struct Direct;

impl ConnectHandler<LocalAdapter, Direct> for OnConnect {
    /// Checks the handshake's `auth: {token}` before the socket is connected: a missing or bad
    /// token is refused with a `connect_error` whose message begins with the code
    /// (`UNAUTHORIZED: token expired`); socketioxide sends a message alone, no data.
    fn call_middleware<'a>(
        &'a self,
        socket: Arc<Socket>,
        auth: &'a Option<PacketValue>,
    ) -> Pin<Box<dyn Future<Output = Result<(), Box<dyn Display + Send>>> + Send + 'a>> {
        let Ok(TryData(payload)) = TryData::<serde_json::Value>::from_connect_parts(&socket, auth);
        Box::pin(async move {
            let token = payload.ok();
            let token = token
                .as_ref()
                .and_then(|p| p.get("token"))
                .and_then(|t| t.as_str());
            match self.0.auth.authenticate(token).await {
                Ok(user) => {
                    socket.extensions.insert(user);
                    Ok(())
                }
                Err(e) => {
                    let error = ApiError::from(e);
                    let refusal: Box<dyn Display + Send> =
                        Box::new(format!("{}: {}", error.code(), error));
                    Err(refusal)
                }
            }
        })
    }

    fn call(&self, socket: Arc<Socket>, _auth: Option<PacketValue>) {
        // The middleware let the socket in only once it had put its user here.
        let Some(user) = socket.extensions.get::<User>() else {
            let _ = socket.disconnect();
            return;
        };
        let client = socket.req_parts().extensions.get::<ClientAddr>().copied();
        let permit = match client.map(|c| self.0.connection_limit.open(c.0.ip())) {
            Some(Err(error)) => {
                reply_now(&socket, error, None);
                let _ = socket.disconnect();
                return;
            }
            Some(Ok(permit)) => Some(permit),
            None => None,
        };
        let (incoming, events) = mpsc::channel(PENDING_EVENTS);
        socket.on_fallback(ForwardEvent(incoming.clone()));
        socket.on_disconnect(async move || {
            let _ = incoming.send(Incoming::Disconnected).await;
        });
        let shared = self.0.clone();
        tokio::spawn(async move {
            serve(socket, user, events, shared).await;
            drop(permit);
        });
    }
}

/// Forwards every client event, whatever its name, to the socket's task. It runs inline as the
/// packet is read (socketioxide spawns closure handlers, which could reorder events).
struct ForwardEvent(mpsc::Sender<Incoming>);

impl MessageHandler<LocalAdapter, Direct> for ForwardEvent {
    fn call(&self, socket: Arc<Socket>, mut packet: PacketValue, ack_id: Option<i64>) {
        let name = Event::from_message_parts(&socket, &mut packet, &ack_id)
            .map(|Event(name)| name)
            .unwrap_or_default();
        let Ok(TryData(data)) =
            TryData::<serde_json::Value>::from_message_parts(&socket, &mut packet, &ack_id);
        let event = Incoming::Event(Box::new(ClientEvent {
            name,
            data: data.unwrap_or_default(),
            ack: ack_id,
        }));
        if let Err(mpsc::error::TrySendError::Full(Incoming::Event(event))) = self.0.try_send(event)
        {
            tracing::warn!(socket = %socket.id, "too many client events waiting, refusing one");
            reply_now(&socket, ApiError::RateLimited, event.ack);
        }
    }
}

/// Serves one socket until it disconnects, is too slow, or the server shuts down.
async fn serve(
    socket: Arc<Socket>,
    user: User,
    mut incoming: mpsc::Receiver<Incoming>,
    shared: Arc<Shared>,
) {
    let expiry = token_expiry(user.token_lifetime());
    tokio::pin!(expiry);
    let (mut session, mut inbox) = Session::open(&shared, user.id);
    tracing::debug!(connection = session.id(), socket = %socket.id, "socket.io connected");
    let shutdown = shared.shutdown.clone();
    let send_timeout = shared.config.send_timeout;
    let mut refused = Refused::default();
    let too_slow = loop {
        let backed_up = !refused.is_empty();
        // Boxed, and only while backed up: an idle socket's task stays small.
        let retry = OptionFuture::from(backed_up.then(|| Box::pin(sleep(FULL_BUFFER_RETRY))));
        let sent = tokio::select! {
            message = incoming.recv(), if !backed_up => match message {
                Some(Incoming::Event(event)) => {
                    // Boxed: the socket's task stays small while it waits between events.
                    let result = Box::pin(session.handle(&event.name, &event.data)).await;
                    replies(result, event.ack).try_for_each(|o| refused.offer(&socket, o))
                }
                Some(Incoming::Disconnected) | None => break false,
            },
            event = inbox.events.recv(), if !backed_up => {
                refused.offer(&socket, Outgoing::Event(event))
            }
            Some(()) = retry, if backed_up => refused.retry(&socket),
            Some(change) = inbox.memberships.recv() => {
                Box::pin(session.membership_changed(change)).await;
                Ok(())
            }
            _ = inbox.dropped.cancelled() => break true,
            () = &mut expiry => {
                let _ = emit(&socket, &token_expired());
                disconnect(socket.clone()).await;
                break false;
            }
            _ = shutdown.cancelled() => {
                let farewell = refused.flush(&socket, &mut inbox.events);
                let _ = tokio::time::timeout(FAREWELL_TIMEOUT, farewell).await;
                break false;
            }
        };
        if sent.is_err() {
            break false;
        }
        if refused.stalled_for(send_timeout) {
            break true;
        }
    };
    let connection = session.id();
    session.close().await;
    drop(incoming);
    if too_slow {
        tracing::warn!(connection, socket = %socket.id, "socket.io client too slow, disconnecting it");
        disconnect(socket).await;
    }
}

/// The packets socketioxide's full buffer refused, in order, and since when it took none.
#[derive(Default)]
struct Refused {
    packets: VecDeque<Outgoing>,
    since: Option<Instant>,
}

impl Refused {
    fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Hands a packet to socketioxide, or keeps it behind those refused before; fails only when
    /// the socket is gone.
    fn offer(&mut self, socket: &Arc<Socket>, outgoing: Outgoing) -> Result<(), SocketError> {
        if self.packets.is_empty() {
            match send(socket, &outgoing) {
                Err(SocketError::InternalChannelFull) => self.since = Some(Instant::now()),
                sent => return sent,
            }
        }
        self.packets.push_back(outgoing);
        Ok(())
    }

    /// Hands socketioxide every event still waiting, then retries the refused packets until all
    /// are taken or the socket is gone: the last events before a shutdown.
    async fn flush(&mut self, socket: &Arc<Socket>, events: &mut Outbox) {
        while let Some(event) = events.try_recv() {
            if self.offer(socket, Outgoing::Event(event)).is_err() {
                return;
            }
        }
        while !self.is_empty() {
            sleep(FULL_BUFFER_RETRY).await;
            if self.retry(socket).is_err() {
                return;
            }
        }
    }

    /// Offers the refused packets again, oldest first, until the buffer is full again.
    fn retry(&mut self, socket: &Arc<Socket>) -> Result<(), SocketError> {
        let waiting = self.packets.len();
        while let Some(outgoing) = self.packets.front() {
            match send(socket, outgoing) {
                Ok(()) => {
                    self.packets.pop_front();
                }
                Err(SocketError::InternalChannelFull) => break,
                Err(e) => return Err(e),
            }
        }
        if self.packets.is_empty() {
            self.packets.shrink_to_fit();
            self.since = None;
        } else if self.packets.len() < waiting {
            self.since = Some(Instant::now());
        }
        Ok(())
    }

    /// Whether packets have waited `timeout` without the socket taking any.
    fn stalled_for(&self, timeout: Duration) -> bool {
        self.since.is_some_and(|since| since.elapsed() >= timeout)
    }
}

/// Hands one packet to socketioxide.
fn send(socket: &Arc<Socket>, outgoing: &Outgoing) -> Result<(), SocketError> {
    if !socket.connected() {
        return Err(SocketError::Closed);
    }
    match outgoing {
        Outgoing::Event(event) => emit(socket, event),
        Outgoing::Ack(id, value) => {
            let mut no_payload = PacketValue::Bytes(Bytes::new());
            let Ok(ack) = AckSender::from_message_parts(socket, &mut no_payload, &Some(*id));
            match ack.send(value) {
                Err(SendError::Socket(e)) => Err(e),
                _ => Ok(()),
            }
        }
    }
}

/// Emits one event.
fn emit(socket: &Socket, event: &EncodedEvent) -> Result<(), SocketError> {
    match socket.emit(event.name, &event.data) {
        Ok(()) => Ok(()),
        Err(SendError::Socket(e)) => Err(e),
        Err(SendError::Serialize(e)) => {
            tracing::error!(error = %e, event = event.name, "event not encodable for socket.io");
            Ok(())
        }
    }
}

/// What answers a client event: on failure an `error` event, then the acknowledgement when the
/// client asked for one.
fn replies(
    result: Result<serde_json::Value, ApiError>,
    ack: Option<i64>,
) -> impl Iterator<Item = Outgoing> {
    let (error, acknowledgement) = ApiError::outcome(result);
    let ack = ack.map(|id| Outgoing::Ack(id, acknowledgement));
    error.map(Outgoing::Event).into_iter().chain(ack)
}

/// Answers a client event at once, for a socket the task does not serve; what a full buffer
/// refuses is lost.
fn reply_now(socket: &Arc<Socket>, error: ApiError, ack: Option<i64>) {
    for outgoing in replies(Err(error), ack) {
        let _ = send(socket, &outgoing);
    }
}

/// Disconnects a socket whose buffer may be full: retries until the disconnect packet fits or
/// the socket is gone (Engine.IO's heartbeat closes a client that never reads again).
async fn disconnect(socket: Arc<Socket>) {
    while socket.connected() {
        match socket.clone().disconnect() {
            Err(SocketError::InternalChannelFull) => sleep(FULL_BUFFER_RETRY).await,
            _ => return,
        }
    }
}
