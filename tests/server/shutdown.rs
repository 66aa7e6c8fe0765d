//! Graceful shutdown of the real binary: SIGTERM lets replies that fit in the grace period
//! finish, ends the others, closes WebSockets with 1001 and exits 0.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::support::process::ServerProcess;
use crate::support::{
    ModelServer, RealtimeClient, TestServer, WsClient, chunks, config_for, final_content,
    over_every_transport, pieces_of,
};

const GRACE: Duration = Duration::from_millis(2000);

/// Starts the binary against `model`, with the limits off and the grace period above.
fn spawn_server(model: &ModelServer) -> ServerProcess {
    ServerProcess::spawn(&[
        ("OPENAI_API_KEY", "test".into()),
        ("OPENAI_BASE_URL", model.base_url()),
        ("SHUTDOWN_GRACE_MS", GRACE.as_millis().to_string()),
        ("MAX_CONNECTIONS_PER_IP", "0".into()),
        ("RT_MESSAGES_PER_MINUTE", "0".into()),
        // Where a durable store is the default, keep this test's conversations in memory.
        ("DATABASE_URL", "memory".into()),
    ])
}

fn signal(server: &ServerProcess, signal: Signal) {
    kill(Pid::from_raw(server.child.id() as i32), signal).expect("signal sent");
}

/// Waits for the process to exit, up to `bound`.
async fn exit_within(server: &mut ServerProcess, bound: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if let Some(status) = server.child.try_wait().expect("process status") {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Sends `stream_chat` and waits for the reply's first chunk.
async fn start_reply(client: &mut WsClient, conversation: &str) -> Vec<(String, Value)> {
    client
        .emit(
            "stream_chat",
            json!({"conversationId": conversation, "message": "tell me"}),
        )
        .await;
    let mut events = Vec::new();
    loop {
        let event = client.next().await;
        let first_chunk = event.0 == "stream_chunk";
        events.push(event);
        if first_chunk {
            return events;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_short_replies_ends_long_ones_and_exits_zero() {
    let model = ModelServer::start().await;
    let mut server = spawn_server(&model);
    let mut short = WsClient::connect(server.addr).await;
    let mut long = WsClient::connect(server.addr).await;

    let short_text = "this reply fits in the grace period";
    model.set_reply(pieces_of(short_text), Duration::from_millis(100));
    let mut short_events = start_reply(&mut short, "fits").await;
    let long_pieces = pieces_of(&"word ".repeat(40));
    let long_text = long_pieces.concat();
    model.set_reply(long_pieces, Duration::from_millis(200));
    let mut long_events = start_reply(&mut long, "too-long").await;

    let signalled = Instant::now();
    signal(&server, Signal::SIGTERM);

    short_events.extend(short.until_complete().await);
    assert_eq!(final_content(&short_events), short_text);
    long_events.extend(long.until_complete().await);
    let ended = signalled.elapsed();
    let partial = final_content(&long_events);
    assert!(
        !partial.is_empty() && partial.len() < long_text.len() && long_text.starts_with(&partial),
        "{partial:?}"
    );
    assert!(
        ended >= GRACE - Duration::from_millis(200) && ended < GRACE + Duration::from_secs(3),
        "ended after {ended:?}"
    );

    assert_eq!(
        short.close_code_within(Duration::from_secs(5)).await,
        Some(1001)
    );
    assert_eq!(
        long.close_code_within(Duration::from_secs(5)).await,
        Some(1001)
    );
    let status = exit_within(&mut server, GRACE + Duration::from_secs(5))
        .await
        .expect("the server exits");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_with_nothing_in_progress_exits_at_once() {
    let model = ModelServer::start().await;
    let mut server = spawn_server(&model);
    let mut client = WsClient::connect(server.addr).await;
    let events = client.chat("quiet", "hello").await;
    assert_eq!(final_content(&events), model.reply_text());

    let signalled = Instant::now();
    signal(&server, Signal::SIGINT);
    assert_eq!(
        client.close_code_within(Duration::from_secs(5)).await,
        Some(1001)
    );
    let status = exit_within(&mut server, Duration::from_secs(5))
        .await
        .expect("the server exits");
    assert!(status.success(), "{status:?}");
    assert!(signalled.elapsed() < GRACE, "{:?}", signalled.elapsed());
    assert!(
        tokio::net::TcpStream::connect(server.addr).await.is_err(),
        "the port is closed"
    );
}

over_every_transport!(a_reply_ended_by_shutdown_reaches_its_members_whole);

/// In process: the reply that shutdown interrupts ends for its members with the text so far as
/// its last chunk, then `stream_complete`, whatever their transport.
async fn a_reply_ended_by_shutdown_reaches_its_members_whole<C: RealtimeClient>() {
    let model = ModelServer::start().await;
    model.set_reply(pieces_of(&"word ".repeat(200)), Duration::from_millis(50));
    let TestServer { app, .. } = TestServer::start(config_for(&model)).await;
    let mut client = C::connect(app.addr()).await;
    client
        .emit(
            "stream_chat",
            json!({"conversationId": "interrupted", "message": "tell me"}),
        )
        .await;
    let mut events = Vec::new();
    while events.iter().all(|(name, _)| name != "stream_chunk") {
        events.push(client.next().await);
    }
    let stopping = tokio::spawn(app.shutdown(Duration::ZERO));
    events.extend(client.until_complete().await);
    let last = &chunks(&events).last().cloned().expect("chunks")["content"];
    assert!(!last.as_str().unwrap_or_default().is_empty(), "{events:?}");
    assert_eq!(
        events.last().map(|(name, _)| name.as_str()),
        Some("stream_complete")
    );
    stopping.await.expect("shutdown ends");
}
