//! Clients that fall behind a reply: a burst of chunks bigger than their queue reaches them
//! merged, with the latest text and to its end, on either transport; only a client that takes
//! nothing for `SEND_TIMEOUT_MS` is dropped.

use crate::support::RealtimeClient;

use std::time::Duration;

use crate::support::socketio::SioClient;
use crate::support::{
    ModelServer, TestServer, WAIT, WsClient, chunks, config_for, deltas, final_content, names,
    seqs, words,
};
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// Pieces in the burst: their chunks add up to about 12 MB, more than socket buffers hold.
const BURST: usize = 2000;
/// The receive buffer of a `/ws` client that falls behind.
const RECEIVE_BUFFER: u32 = 64 * 1024;

/// The tests here run one at a time: a burst keeps a debug build busy for seconds, and the
/// timings they check would not hold with several at once.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// A server whose model answers `BURST` pieces at once, with small queues on both transports.
async fn bursting_server(send_timeout: Duration) -> (TestServer, ModelServer) {
    let model = ModelServer::start().await;
    model.set_reply(words(BURST), Duration::ZERO);
    let mut config = config_for(&model);
    config.subscriber_queue = 8;
    config.socketio_buffer = 8;
    config.send_timeout = send_timeout;
    // Room for a debug build fanning out megabytes on a busy machine.
    config.conversations.upstream_timeout = Duration::from_secs(60);
    (TestServer::start(config).await, model)
}

/// Checks the events of a reply a client got while behind: start, chunks whose `content` is
/// always whole and ends as the stored reply, deltas that add up to it, rising `seq`s, complete.
/// Returns how many chunks arrived.
async fn assert_latest_text(server: &TestServer, id: &str, events: &[(String, Value)]) -> usize {
    let stored = server.settled_reply(id).await;
    assert_eq!(stored["status"], "complete");
    let stored = stored["content"].as_str().unwrap();
    let order = names(events);
    assert_eq!(order.first(), Some(&"stream_start"));
    assert_eq!(order.last(), Some(&"stream_complete"));
    let chunks = chunks(events);
    assert_eq!(chunks.len(), events.len() - 2, "{order:?}");
    let mut so_far = String::new();
    for chunk in &chunks {
        so_far.push_str(chunk["delta"].as_str().unwrap());
        assert_eq!(chunk["content"], so_far.as_str(), "content is always whole");
    }
    assert_eq!(final_content(events), stored);
    assert_eq!(deltas(events), stored);
    let seqs = seqs(events);
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "{seqs:?}");
    chunks.len()
}

#[tokio::test]
async fn a_polling_socketio_client_that_falls_behind_gets_the_latest_text_to_the_end() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (server, _model) = bursting_server(Duration::from_secs(5)).await;
    let mut client =
        SioClient::connect_with(server.addr(), json!({"transports": ["polling"]})).await;
    let ack = client
        .emit_with_ack(
            "stream_chat",
            json!({"conversationId": "burst", "message": "a long one, please"}),
        )
        .await;
    assert_eq!(ack["conversationId"], "burst");
    // The client pauses (a busy page, a slow network) while the reply bursts out.
    client.stall(Duration::from_secs(1)).await;
    let events = client.until_complete().await;
    let received = assert_latest_text(&server, "burst", &events).await;
    assert!(received < BURST, "the chunks merged: {received}");
    assert_eq!(client.disconnect_reason, None);
    assert_eq!(client.upgraded_to, None);
}

#[tokio::test]
async fn a_ws_client_that_reads_slowly_gets_the_latest_text_to_the_end() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (server, _model) = bursting_server(Duration::from_secs(60)).await;
    let mut client = WsClient::connect_with_receive_buffer(server.addr(), RECEIVE_BUFFER).await;
    client
        .emit(
            "stream_chat",
            json!({"conversationId": "burst", "message": "a long one, please"}),
        )
        .await;
    // It reads nothing until the whole reply has burst out, then reads slowly.
    let deadline = tokio::time::Instant::now() + 4 * WAIT;
    while server.stored_reply("burst").await["status"] == "streaming" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reply never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut events = Vec::new();
    loop {
        let event = client.next().await;
        let done = event.0 == "stream_complete";
        events.push(event);
        if done {
            break;
        }
        if events.len() % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let received = assert_latest_text(&server, "burst", &events).await;
    assert!(received < BURST, "the chunks merged: {received}");
    client
        .emit("leave_conversation", json!({"conversationId": "burst"}))
        .await;
    assert!(!client.closed_within(Duration::from_millis(200)).await);
}

#[tokio::test]
async fn a_ws_client_that_never_reads_is_dropped_after_the_send_timeout_without_slowing_others() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (server, model) = bursting_server(Duration::from_secs(10)).await;
    let mut stalled = WsClient::connect_with_receive_buffer(server.addr(), RECEIVE_BUFFER).await;
    stalled
        .emit("join_conversation", json!({"conversationId": "burst"}))
        .await;
    server
        .wait_for_health(|h| h["activeConnections"] == 1)
        .await;
    let mut reader = server.ws().await;
    let events = reader.chat("burst", "go").await;
    assert_eq!(final_content(&events), model.reply_text());
    // A full queue alone does not drop it: its chunks merge while it takes nothing.
    let (_, health) = server.get("/api/health").await;
    assert_eq!(health["activeConnections"], 2);
    // Taking nothing for the send timeout does.
    server
        .wait_for_health(|h| h["activeConnections"] == 1)
        .await;
    assert!(stalled.closed_within(WAIT).await);
}

#[tokio::test]
async fn a_socketio_client_that_takes_nothing_for_the_send_timeout_is_disconnected() {
    let _one = ONE_AT_A_TIME.lock().await;
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.socketio_buffer = 8;
    config.send_timeout = Duration::from_secs(1);
    let server = TestServer::start(config).await;
    let piece = format!("{} ", "w".repeat(99));
    model.set_reply(vec![piece; 400], Duration::from_millis(1));
    let mut stalled =
        SioClient::connect_with(server.addr(), json!({"transports": ["polling"]})).await;
    stalled
        .emit_with_ack("join_conversation", json!({"conversationId": "firehose"}))
        .await;
    stalled.stall(Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut reader = server.ws().await;
    let events = reader.chat("firehose", "go").await;
    assert_eq!(final_content(&events), model.reply_text());
    server
        .wait_for_health(|h| h["activeConnections"] == 1)
        .await;

    let reason = stalled.disconnected_within(Duration::from_secs(10)).await;
    assert_eq!(reason.as_deref(), Some("io server disconnect"));
    // What did arrive is a gapless beginning of the reply.
    let mut got = Vec::new();
    while let Some(event) = stalled.try_next(Duration::ZERO).await {
        got.push(event);
    }
    assert_eq!(
        got.first().map(|(name, _)| name.as_str()),
        Some("stream_start")
    );
    assert!(names(&got).iter().all(|n| *n != "stream_complete"));
    for (i, (name, chunk)) in got[1..].iter().enumerate() {
        assert_eq!(name, "stream_chunk");
        assert_eq!(chunk["seq"], (i + 1) as u64);
    }
}
