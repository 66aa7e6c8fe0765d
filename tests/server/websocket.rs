//! What only the plain WebSocket at `/ws` does, black-box: frames that are not events, frame
//! size limits, and clients too slow to keep up.

use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{
    ModelServer, RealtimeClient, TestServer, WsClient, config_for, final_content, names, pieces_of,
};

#[tokio::test]
async fn frames_that_are_not_events_get_an_error_and_the_connection_stays() {
    let (server, _model) = TestServer::with_model().await;
    let mut client = server.ws().await;
    let bad: Vec<Message> = vec![
        Message::text("not json"),
        Message::text("[1,2]"),
        Message::text(json!({"event": 5}).to_string()),
        Message::text(json!({"data": {}}).to_string()),
        Message::binary(vec![1, 2, 3]),
    ];
    for frame in bad {
        client.send_raw(frame.clone()).await;
        let (name, data) = client.next().await;
        assert_eq!(name, "error", "{frame:?}");
        assert_eq!(data["code"], "INVALID_REQUEST", "{frame:?}");
        assert!(data["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let events = client.chat("still-open", "works").await;
    assert_eq!(names(&events)[0], "stream_start");
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_dropped_without_slowing_others() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.subscriber_queue = 8;
    let server = TestServer::start(config).await;
    // 400 pieces of 100 characters: the accumulated chunks add up to megabytes, far more than
    // socket buffers hold for a client that does not read.
    let piece = format!("{} ", "w".repeat(99));
    model.set_reply(vec![piece; 400], Duration::ZERO);
    let mut stalled = server.ws().await;
    stalled.join("firehose").await;
    let mut reader = server.ws().await;
    let events = reader.chat("firehose", "go").await;
    assert_eq!(final_content(&events), model.reply_text());
    assert!(stalled.closed_within(Duration::from_secs(10)).await);
    server
        .wait_for_health(|h| h["activeConnections"] == 1)
        .await;
}

#[tokio::test]
async fn a_hundred_conversations_stream_at_once() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(pieces_of("a b c d e f g h i j"), Duration::from_millis(10));
    let mut tasks = Vec::new();
    for i in 0..100 {
        let addr = server.addr();
        tasks.push(tokio::spawn(async move {
            let mut client = WsClient::connect(addr).await;
            client.chat(&format!("many-{i}"), "go").await
        }));
    }
    for task in tasks {
        let events = task.await.unwrap();
        assert_eq!(final_content(&events), model.reply_text());
    }
    let (_, list) = server.get("/api/conversations").await;
    assert_eq!(list.as_array().unwrap().len(), 100);
}

#[tokio::test]
async fn frames_over_the_limit_close_the_connection_and_frames_at_it_pass() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.ws_max_frame_bytes = 2000;
    let server = TestServer::start(config).await;
    let frame_of = |size: usize| {
        let overhead =
            json!({"event": "stream_chat", "data": {"conversationId": "f", "message": ""}})
                .to_string()
                .len();
        json!({"event": "stream_chat", "data": {"conversationId": "f", "message": "m".repeat(size - overhead)}})
            .to_string()
    };
    let mut client = server.ws().await;
    let at_limit = frame_of(2000);
    assert_eq!(at_limit.len(), 2000);
    client.send_raw(Message::text(at_limit)).await;
    assert_eq!(client.next().await.0, "stream_start");
    client.until_complete().await;
    client.send_raw(Message::text(frame_of(2001))).await;
    assert_eq!(
        client.close_code_within(Duration::from_secs(5)).await,
        Some(1009)
    );
}
