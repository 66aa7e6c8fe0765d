//! The Socket.IO transport at `/socket.io/` (protocol v5 over Engine.IO v4, polling and
//! websocket), served by socketioxide on the same listener as REST and `/ws`.
//!
//! socketioxide calls its handlers as callbacks, so each socket gets one task that owns its
//! [`Session`]: the handlers forward client events to it over a channel, in arrival order, and the
//! task writes the session's events out as Socket.IO events.

use std::fmt::Display;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use socketioxide::adapter::LocalAdapter;
use socketioxide::extract::{AckSender, Event, SocketRef, TryData};
use socketioxide::handler::{
    ConnectHandler, FromConnectParts, FromMessageParts, MessageHandler, Value as PacketValue,
};
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::Socket;
use socketioxide::{SendError, SocketError, SocketIo};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::session::{Session, token_expired, token_expiry};
use super::{ClientAddr, Shared};
use crate::actors::EncodedEvent;
use crate::auth::User;

/// Client events one socket may have waiting to be handled; more are refused with an `error`.
const PENDING_EVENTS: usize = 1024;
/// How often a socket whose buffer is full is asked again to take its disconnect packet.
const DISCONNECT_RETRY: Duration = Duration::from_millis(20);

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

/// A client event, with the acknowledgement callback when the client asked for one.
struct ClientEvent {
    name: String,
    data: serde_json::Value,
    ack: Option<AckSender>,
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
                let _ = reply(&socket, Err(error), None);
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
            serve(SocketRef::from(socket), user, events, shared).await;
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
        let ack = ack_id.map(|_| {
            let Ok(ack) = AckSender::from_message_parts(&socket, &mut packet, &ack_id);
            ack
        });
        let event = Incoming::Event(Box::new(ClientEvent {
            name,
            data: data.unwrap_or_default(),
            ack,
        }));
        if let Err(mpsc::error::TrySendError::Full(Incoming::Event(event))) = self.0.try_send(event)
        {
            tracing::warn!(socket = %socket.id, "too many client events waiting, refusing one");
            let _ = reply(&socket, Err(ApiError::RateLimited), event.ack);
        }
    }
}

/// Serves one socket until it disconnects, is too slow, or the server shuts down.
async fn serve(
    socket: SocketRef,
    user: User,
    mut incoming: mpsc::Receiver<Incoming>,
    shared: Arc<Shared>,
) {
    let expiry = token_expiry(user.token_lifetime());
    tokio::pin!(expiry);
    let (mut session, mut inbox) = Session::open(&shared, user.id);
    tracing::debug!(connection = session.id(), socket = %socket.id, "socket.io connected");
    let shutdown = shared.shutdown.clone();
    let too_slow = loop {
        let sent = tokio::select! {
            message = incoming.recv() => match message {
                Some(Incoming::Event(event)) => {
                    // Boxed: the socket's task stays small while it waits between events.
                    let result = Box::pin(session.handle(&event.name, &event.data)).await;
                    reply(&socket, result, event.ack)
                }
                Some(Incoming::Disconnected) | None => break false,
            },
            Some(event) = inbox.events.recv() => emit(&socket, &event),
            Some(id) = inbox.lost.recv() => {
                Box::pin(session.rejoin(id)).await;
                Ok(())
            }
            _ = inbox.dropped.cancelled() => break true,
            () = &mut expiry => {
                let _ = emit(&socket, &token_expired());
                disconnect(socket.clone()).await;
                break false;
            }
            _ = shutdown.cancelled() => break false,
        };
        match sent {
            Ok(()) => {}
            Err(SocketError::InternalChannelFull) => break true,
            Err(SocketError::Closed) => break false,
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

/// Emits one event; a full buffer means the client is too slow.
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

/// Answers a client event: the acknowledgement when the client asked for one, and on failure
/// an `error` event too.
fn reply(
    socket: &Socket,
    result: Result<serde_json::Value, ApiError>,
    ack: Option<AckSender>,
) -> Result<(), SocketError> {
    let acknowledgement = match result {
        Ok(value) => value,
        Err(error) => {
            emit(socket, &error.event().encode())?;
            json!({ "error": error.body() })
        }
    };
    match ack.map(|ack| ack.send(&acknowledgement)) {
        Some(Err(SendError::Socket(e))) => Err(e),
        _ => Ok(()),
    }
}

/// Disconnects a socket whose buffer may be full: retries until the disconnect packet fits or
/// the socket is gone (Engine.IO's heartbeat closes a client that never reads again).
async fn disconnect(socket: SocketRef) {
    while socket.connected() {
        match socket.clone().disconnect() {
            Err(SocketError::InternalChannelFull) => tokio::time::sleep(DISCONNECT_RETRY).await,
            _ => return,
        }
    }
}
