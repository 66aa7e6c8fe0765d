//! The plain WebSocket transport at `/ws`: text frames of `{"event": NAME, "data": PAYLOAD}`.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use warp::ws::{Message, WebSocket};

use super::Shared;
use super::payload::parse_json;
use super::session::Session;
use crate::actors::ChatEvent;
use crate::error::ApiError;

/// Close code for a client that could not keep up with its events.
const CLOSE_TOO_SLOW: u16 = 1008;
/// Close code for a frame over the size limit (or otherwise unreadable).
const CLOSE_TOO_BIG: u16 = 1009;
/// Close code when the server shuts down.
const CLOSE_GOING_AWAY: u16 = 1001;
/// How long a closing connection may take to send its last events and the close frame.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves one upgraded connection until either side closes it.
pub async fn serve(socket: WebSocket, shared: Arc<Shared>) {
    let (mut session, mut inbox) = Session::open(
        shared.conversations.clone(),
        shared.config.clone(),
        shared.metrics.clone(),
    );
    let (mut sink, mut frames) = socket.split();
    let shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            frame = frames.next() => {
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => {
                        tracing::debug!(connection = session.id(), error = %e, "unreadable frame");
                        let _ = sink.send(Message::close_with(CLOSE_TOO_BIG, "frame too large or malformed")).await;
                        break;
                    }
                    None => break,
                };
                if frame.is_close() {
                    break;
                }
                if let Some(reply) = handle_frame(&mut session, frame).await
                    && !write(&mut sink, Message::text(reply), &inbox.dropped).await
                {
                    break;
                }
            }
            Some(event) = inbox.events.recv() => {
                if !write(&mut sink, Message::text(event.frame.clone()), &inbox.dropped).await {
                    break;
                }
            }
            Some(id) = inbox.lost.recv() => session.rejoin(id).await,
            _ = inbox.dropped.cancelled() => {
                let _ = sink.send(Message::close_with(CLOSE_TOO_SLOW, "too slow")).await;
                break;
            }
            _ = shutdown.cancelled() => {
                let farewell = async {
                    while let Ok(event) = inbox.events.try_recv() {
                        if !write(&mut sink, Message::text(event.frame.clone()), &inbox.dropped).await {
                            return;
                        }
                    }
                    let _ = sink.send(Message::close_with(CLOSE_GOING_AWAY, "server shutting down")).await;
                };
                let _ = tokio::time::timeout(FAREWELL_TIMEOUT, farewell).await;
                break;
            }
        }
    }
    session.close().await;
}

/// Writes one frame; false when the connection is gone or was dropped for being too slow
/// while the write waited.
async fn write(
    sink: &mut (impl SinkExt<Message> + Unpin),
    frame: Message,
    dropped: &CancellationToken,
) -> bool {
    tokio::select! {
        written = sink.send(frame) => written.is_ok(),
        _ = dropped.cancelled() => false,
    }
}

/// Handles one client frame; the text is an `error` frame to send back, if any.
async fn handle_frame(session: &mut Session, frame: Message) -> Option<String> {
    if frame.is_ping() || frame.is_pong() {
        return None;
    }
    let result = match frame.to_str() {
        Ok(text) => dispatch(session, text).await,
        Err(()) => Err(ApiError::InvalidRequest("Frames must be JSON text".into())),
    };
    result
        .err()
        .map(|error| ChatEvent::from(&error).encode().frame.clone())
}

async fn dispatch(session: &mut Session, text: &str) -> Result<(), ApiError> {
    let value = parse_json(text.as_bytes())?;
    let event = value
        .get("event")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::InvalidRequest("event must be a string".into()))?;
    let data = value.get("data").unwrap_or(&Value::Null);
    session.handle(event, data).await.map(drop)
}
