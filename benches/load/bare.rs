//! A bare WebSocket server that does no work, the floor of the side-by-side fan-out and idle
//! rows: tokio-tungstenite with the buffer sizes `/ws` uses, acknowledging joins, and on a
//! `stream_chat` sending every member the fan-out's 200 chunks (each frame encoded once, 2 ms
//! apart, as the test model paces them) and `stream_complete`. No store, no actors, no model.
//!
//! Runs as `load --bare PORT`, on `127.0.0.1`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// The queues of the connections that joined.
type Members = Arc<Mutex<Vec<mpsc::UnboundedSender<Utf8Bytes>>>>;

/// Tokens of the reply, and their pace: those of the side-by-side fan-out.
const TOKENS: usize = 200;
const PACE: Duration = Duration::from_millis(2);

pub fn run(port: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = TcpListener::bind(("127.0.0.1", port.parse().expect("a port")))
            .await
            .expect("the bare server listens");
        let members = Members::default();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve(stream, members.clone()));
        }
    });
}

async fn serve(stream: tokio::net::TcpStream, members: Members) {
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(16 * 1024);
    let Ok(socket) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (mut sink, mut frames) = socket.split();
    let (queue, mut outgoing) = mpsc::unbounded_channel::<Utf8Bytes>();
    loop {
        tokio::select! {
            frame = frames.next() => {
                let Some(Ok(Message::Text(text))) = frame else {
                    return;
                };
                let request: Value = serde_json::from_str(&text).unwrap_or_default();
                match request["event"].as_str() {
                    Some("join_conversation") => {
                        members.lock().unwrap_or_else(PoisonError::into_inner).push(queue.clone());
                        let ack = json!({"event": "ack", "id": request["id"], "data": {}});
                        if sink.send(Message::text(ack.to_string())).await.is_err() {
                            return;
                        }
                    }
                    Some("stream_chat") => {
                        tokio::spawn(reply(members.clone()));
                    }
                    _ => {}
                }
            }
            Some(frame) = outgoing.recv() => {
                let mut written = sink.feed(Message::Text(frame)).await;
                while let (Ok(()), Ok(frame)) = (&written, outgoing.try_recv()) {
                    written = sink.feed(Message::Text(frame)).await;
                }
                if written.is_err() || sink.flush().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends the reply to every member, each frame encoded once.
async fn reply(members: Members) {
    let broadcast = |frame: String| {
        let frame = Utf8Bytes::from(frame);
        let members = members.lock().unwrap_or_else(PoisonError::into_inner);
        for member in members.iter() {
            let _ = member.send(frame.clone());
        }
    };
    let mut content = String::new();
    for seq in 1..=TOKENS + 1 {
        let complete = seq > TOKENS;
        if !complete {
            content.push_str(&format!("tok{} ", seq - 1));
            tokio::time::sleep(PACE).await;
        }
        let data = json!({"content": content, "seq": seq, "isComplete": complete});
        broadcast(format!(r#"{{"event":"stream_chunk","data":{data}}}"#));
    }
    broadcast(r#"{"event":"stream_complete","data":{}}"#.to_owned());
}
