//! The packets of a Socket.IO connection, whichever transport carries them: the Engine.IO
//! handshake and the Socket.IO connect, then each client packet of a connected socket. A connected
//! socket runs the same loop as `/ws`, in Socket.IO's framing, so every member of a conversation
//! gets the one frame encoded for all of them.
//!
//! Engine.IO v4 packets are one text frame each: `0` open, `1` close, `2` ping, `3` pong, `4`
//! message. A message holds a Socket.IO v5 packet: `0` connect, `1` disconnect, `2` event,
//! `3` ack, `4` connect error, `5`/`6` binary event/ack; a namespace other than `/` is written
//! `/name,` before the ack id and the JSON array.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::super::error::ApiError;
use super::super::limits::ConnectionPermit;
use super::super::session::Session;
use super::super::ws::{Heartbeat, Transport};
use super::super::{ClientAddr, Shared};
use crate::auth::User;

/// How long a socket may take after the handshake to connect to the main namespace (the
/// `connectTimeout` of Socket.IO's own server).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(45);

/// Engine.IO's ping, sent by the server; the client answers with a pong (`3`).
pub const PING: &str = "2";
/// Socket.IO's disconnect of the main namespace, in an Engine.IO message.
pub const DISCONNECT: &str = "41";

/// Opens the Engine.IO session `sid` and waits for the client to connect to the main namespace
/// with its `auth: {token}`, pinging it meanwhile; the socket's user and its place under the
/// connection cap, or `None` when the client went away, did not connect in time, or the server is
/// stopping. A token that does not verify is answered with a connect error
/// (`UNAUTHORIZED: token expired`) and the client may try again; a client over the cap is
/// connected, told why in an `error` event, and disconnected. `upgrades` are the transports the
/// session may move to.
pub async fn connect(
    socket: &mut impl Transport,
    shared: &Shared,
    client: Option<ClientAddr>,
    sid: &str,
    upgrades: &[&str],
) -> Option<(User, Option<ConnectionPermit>)> {
    let config = &shared.config;
    let open = json!({
        "sid": sid,
        "upgrades": upgrades,
        "pingInterval": config.ws_ping_interval.as_millis() as u64,
        "pingTimeout": config.ws_ping_timeout.as_millis() as u64,
        "maxPayload": config.ws_max_frame_bytes,
    });
    socket.send(Message::text(format!("0{open}"))).await.ok()?;
    let mut heartbeat = Heartbeat::new(config);
    let deadline = tokio::time::sleep(CONNECT_TIMEOUT);
    tokio::pin!(deadline);
    loop {
        let text = tokio::select! {
            frame = socket.next() => match frame {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(_)) | Err(_)) | None => return None,
                Some(Ok(_)) => continue,
            },
            alive = heartbeat.due() => {
                if !alive {
                    return None;
                }
                socket.send(Message::text(PING)).await.ok()?;
                heartbeat.pinged();
                continue;
            }
            () = &mut deadline => return None,
            _ = shared.shutdown.cancelled() => {
                let _ = socket.send(Message::Close(None)).await;
                return None;
            }
        };
        heartbeat.answered();
        let Some(packet) = text.strip_prefix("40") else {
            match text.as_bytes().first() {
                Some(b'1') => return None,
                Some(b'2') => socket.send(Message::text("3")).await.ok()?,
                _ => {}
            }
            continue;
        };
        if packet.starts_with('/') && !packet.starts_with("/,") {
            let namespace = packet.split(',').next().unwrap_or(packet);
            let refusal = format!(r#"44{namespace},{{"message":"Invalid namespace"}}"#);
            socket.send(Message::text(refusal)).await.ok()?;
            continue;
        }
        let auth: Option<Value> = serde_json::from_str(packet.trim_start_matches("/,")).ok();
        let token = auth
            .as_ref()
            .and_then(|a| a.get("token"))
            .and_then(Value::as_str);
        let user = match shared.auth.authenticate(token).await {
            Ok(user) => user,
            Err(e) => {
                let error = ApiError::from(e);
                let message = json!({ "message": format!("{}: {}", error.code(), error) });
                socket
                    .send(Message::text(format!("44{message}")))
                    .await
                    .ok()?;
                continue;
            }
        };
        let connected = json!({ "sid": uuid::Uuid::new_v4().simple().to_string() });
        socket
            .send(Message::text(format!("40{connected}")))
            .await
            .ok()?;
        return match client.map(|c| shared.connection_limit.open(c.0.ip())) {
            Some(Err(error)) => {
                let refusal = Message::Text(error.event().encode().socketio_frame());
                let mut farewell = futures::stream::iter(
                    [refusal, Message::text(DISCONNECT), Message::Close(None)].map(Ok),
                );
                let _ = socket.send_all(&mut farewell).await;
                None
            }
            Some(Ok(permit)) => Some((user, Some(permit))),
            None => Some((user, None)),
        };
    }
}

/// Handles one client frame of a connected socket: the frames to send back, or `None` when the
/// client disconnected or closed the session. An event is handled by the session and answered
/// with an `error` event when it failed, then its acknowledgement when it asked for one.
pub async fn handle_frame(session: &mut Session, frame: Message) -> Option<Vec<Message>> {
    let Message::Text(text) = frame else {
        return Some(Vec::new());
    };
    match text.as_bytes().first() {
        Some(b'1') => None,
        Some(b'2') => Some(vec![Message::text("3")]),
        Some(b'4') => match text[1..].as_bytes().first() {
            Some(b'1') => None,
            Some(b'2') => Some(event(session, &text[2..]).await),
            Some(b'5' | b'6') => Some(refusal("Binary attachments are not supported")),
            Some(b'0' | b'3') => Some(Vec::new()),
            _ => Some(refusal("Unknown Socket.IO packet")),
        },
        _ => Some(Vec::new()),
    }
}

/// Handles an event packet's body: `[/namespace,][ack id]["name", data, ...]`. Events of other
/// namespaces, which the socket never joined, are ignored.
async fn event(session: &mut Session, body: &str) -> Vec<Message> {
    let body = match body.strip_prefix('/') {
        Some(rest) => match rest.split_once(',') {
            Some(("", rest)) => rest,
            _ => return Vec::new(),
        },
        None => body,
    };
    let digits = body.bytes().take_while(u8::is_ascii_digit).count();
    let ack: Option<u64> = body[..digits].parse().ok();
    let result = match serde_json::from_str::<Vec<Value>>(&body[digits..]) {
        Ok(arguments) => {
            let mut arguments = arguments.into_iter();
            match arguments.next() {
                Some(Value::String(name)) => {
                    let data = arguments.next().unwrap_or_default();
                    session.handle(&name, &data).await
                }
                _ => Err(ApiError::InvalidRequest(
                    "An event's name must be a string".into(),
                )),
            }
        }
        Err(_) => Err(ApiError::InvalidRequest(
            "An event must be a JSON array".into(),
        )),
    };
    let (error, acknowledgement) = ApiError::outcome(result);
    let mut answer: Vec<Message> = error
        .map(|event| Message::Text(event.socketio_frame()))
        .into_iter()
        .collect();
    if let Some(id) = ack {
        answer.push(Message::text(format!("43{id}[{acknowledgement}]")));
    }
    answer
}

/// The `error` event answering a packet that cannot be handled.
fn refusal(message: &str) -> Vec<Message> {
    let event = ApiError::InvalidRequest(message.into()).event().encode();
    vec![Message::Text(event.socketio_frame())]
}
