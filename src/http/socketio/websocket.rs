//! Socket.IO clients that open a websocket straight away (`transports: ["websocket"]`), served
//! without socketioxide: the Engine.IO handshake and the Socket.IO connect are answered here, and
//! the connection then runs the same loop as `/ws` in Socket.IO's framing. Every member of a
//! conversation so gets the one frame encoded for all of them, and an idle socket costs what an
//! idle `/ws` connection costs. Polling sessions, and the websockets they upgrade to, stay with
//! socketioxide.
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
use super::super::ws::Socket;
use super::super::{ClientAddr, Shared};
use crate::auth::User;

/// How long a socket may take after the handshake to connect to the main namespace (the
/// `connectTimeout` of Socket.IO's own server).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(45);

/// Engine.IO's ping, sent by the server; the client answers with a pong (`3`).
pub const PING: &str = "2";
/// Socket.IO's disconnect of the main namespace, in an Engine.IO message.
pub const DISCONNECT: &str = "41";

/// Whether a request opens a Socket.IO websocket with no polling session before it:
/// `GET /socket.io/?EIO=4&transport=websocket` without a `sid`.
pub fn opens_directly<B>(request: &http::Request<B>) -> bool {
    if request.method() != http::Method::GET
        || !matches!(request.uri().path(), "/socket.io/" | "/socket.io")
    {
        return false;
    }
    let (mut version, mut websocket) = (false, false);
    for pair in request.uri().query().unwrap_or_default().split('&') {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("EIO", "4") => version = true,
            ("transport", "websocket") => websocket = true,
            ("sid", _) => return false,
            _ => {}
        }
    }
    version && websocket
}

/// Opens the Engine.IO session and waits for the client to connect to the main namespace with
/// its `auth: {token}`; the socket's user and its place under the connection cap, or `None` when
/// the client went away or did not connect in time. A token that does not verify is answered
/// with a connect error (`UNAUTHORIZED: token expired`) and the client may try again; a client
/// over the cap is connected, told why in an `error` event, and disconnected.
pub async fn connect(
    socket: &mut Socket,
    shared: &Shared,
    client: Option<ClientAddr>,
) -> Option<(User, Option<ConnectionPermit>)> {
    let config = &shared.config;
    let open = json!({
        "sid": uuid::Uuid::new_v4().simple().to_string(),
        "upgrades": [],
        "pingInterval": config.ws_ping_interval.as_millis() as u64,
        "pingTimeout": config.ws_ping_timeout.as_millis() as u64,
        "maxPayload": config.ws_max_frame_bytes,
    });
    socket.send(Message::text(format!("0{open}"))).await.ok()?;
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    loop {
        let text = match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) | Err(_) => return None,
            Ok(Some(Ok(_))) => continue,
        };
        let Some(packet) = text.strip_prefix("40") else {
            if text.starts_with('1') {
                return None;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str) -> http::Request<()> {
        http::Request::get(uri).body(()).unwrap()
    }

    #[test]
    fn only_websockets_without_a_polling_session_open_directly() {
        assert!(opens_directly(&request(
            "/socket.io/?EIO=4&transport=websocket"
        )));
        assert!(opens_directly(&request(
            "/socket.io/?transport=websocket&t=abc&EIO=4"
        )));
        for uri in [
            "/socket.io/?EIO=4&transport=websocket&sid=abc",
            "/socket.io/?EIO=4&transport=polling",
            "/socket.io/?EIO=3&transport=websocket",
            "/socket.io/x?EIO=4&transport=websocket",
            "/ws?EIO=4&transport=websocket",
        ] {
            assert!(!opens_directly(&request(uri)), "{uri}");
        }
    }
}
