//! Stop, catch-up, regenerate, rename, delete, heartbeat and the connection cap over Socket.IO,
//! with the real `socket.io-client` 4.x.

mod support;

use support::RealtimeClient;

use std::time::Duration;

use serde_json::{Value, json};
use support::socketio::SioClient;
use support::{
    ModelServer, TestServer, config_for, eventually, final_content, names, pieces_of, words,
};

fn websocket_only() -> Value {
    json!({"transports": ["websocket"]})
}

async fn last_message(server: &TestServer, id: &str) -> Value {
    let (_, conversation) = server.get(&format!("/api/conversations/{id}")).await;
    conversation["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn stop_reaches_socket_io_and_ws_members_alike_and_drops_the_model_stream() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(100), Duration::from_millis(30));
    let mut sio = SioClient::connect(server.addr(), websocket_only()).await;
    let mut ws = server.ws().await;
    ws.send("join_conversation", json!({"conversationId": "halt"}))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let ack = sio
        .emit_with_ack(
            "stream_chat",
            json!({"conversationId": "halt", "message": "go"}),
        )
        .await;
    assert_eq!(ack["conversationId"], "halt");
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(sio.next().await);
    }
    let ack = sio
        .emit_with_ack("stop_generation", json!({"conversationId": "halt"}))
        .await;
    assert_eq!(ack, json!({"conversationId": "halt"}));
    seen.extend(sio.until_complete().await);
    let watched = ws.until_complete().await;
    assert_eq!(seen, watched);
    let last_chunk = &seen[seen.len() - 2].1;
    assert_eq!(last_chunk["isComplete"], true);
    let stored = last_message(&server, "halt").await;
    assert_eq!(stored["status"], "cancelled");
    assert_eq!(stored["content"], last_chunk["content"]);
    eventually(|| model.dropped_streams() == 1).await;

    let ack = sio
        .emit_with_ack("stop_generation", json!({"conversationId": "halt"}))
        .await;
    assert_eq!(ack, json!({"conversationId": "halt"}));
}

#[tokio::test]
async fn a_reconnecting_socket_io_client_gets_exactly_what_it_missed() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(40), Duration::from_millis(20));
    let mut first = SioClient::connect(server.addr(), json!({})).await;
    first
        .emit(
            "stream_chat",
            json!({"conversationId": "resume", "message": "go"}),
        )
        .await;
    let (_, start) = first.next().await;
    let message_id = start["messageId"].as_str().unwrap().to_owned();
    let (mut received, mut last_seq) = (String::new(), 0);
    for _ in 0..6 {
        let (name, chunk) = first.next().await;
        assert_eq!(name, "stream_chunk");
        received.push_str(chunk["delta"].as_str().unwrap());
        last_seq = chunk["seq"].as_u64().unwrap();
    }
    first.kill().await;

    let mut again = SioClient::connect(server.addr(), json!({})).await;
    again
        .emit(
            "join_conversation",
            json!({"conversationId": "resume", "messageId": message_id, "seq": last_seq}),
        )
        .await;
    let events = again.until_complete().await;
    assert_ne!(names(&events)[0], "stream_start");
    for (name, data) in &events {
        if name == "stream_chunk" {
            assert!(data["seq"].as_u64().unwrap() > last_seq);
            received.push_str(data["delta"].as_str().unwrap());
        }
    }
    assert_eq!(received, model.reply_text());
    assert_eq!(
        last_message(&server, "resume").await["content"],
        received.as_str()
    );
}

#[tokio::test]
async fn regenerate_rename_and_delete_over_socket_io() {
    let (server, model) = TestServer::with_model().await;
    let mut client = SioClient::connect(server.addr(), websocket_only()).await;
    client.chat("again", "question").await;
    model.set_reply(pieces_of("a better answer"), Duration::ZERO);
    let ack = client
        .emit_with_ack("regenerate", json!({"conversationId": "again"}))
        .await;
    assert_eq!(ack["conversationId"], "again");
    let events = client.until_complete().await;
    assert_eq!(events[0].1["messageId"], ack["messageId"]);
    assert_eq!(final_content(&events), "a better answer");
    let (_, conversation) = server.get("/api/conversations/again").await;
    assert_eq!(conversation["messages"].as_array().unwrap().len(), 2);

    let ack = client
        .emit_with_ack("regenerate", json!({"conversationId": "ghost"}))
        .await;
    assert_eq!(ack["error"]["code"], "CONVERSATION_NOT_FOUND");
    let (name, error) = client.next().await;
    assert_eq!(name, "error");
    assert_eq!(error["code"], "CONVERSATION_NOT_FOUND");

    server
        .call(
            "PATCH",
            "/api/conversations/again",
            Some(json!({"title": "Renamed"})),
        )
        .await;
    let (name, updated) = client.next().await;
    assert_eq!(name, "conversation_updated");
    assert_eq!(updated["title"], "Renamed");
    server
        .call("DELETE", "/api/conversations/again", None)
        .await;
    let (name, deleted) = client.next().await;
    assert_eq!(name, "conversation_deleted");
    assert_eq!(deleted, json!({"conversationId": "again"}));
}

#[tokio::test]
async fn heartbeats_reach_socket_io_members() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.conversations.heartbeat_interval = Duration::from_millis(100);
    let server = TestServer::start(config).await;
    model.set_first_delay(Duration::from_millis(450));
    let mut client = SioClient::connect(server.addr(), websocket_only()).await;
    let events = client.chat("quiet", "think hard").await;
    let beats = events
        .iter()
        .filter(|(n, _)| n == "stream_heartbeat")
        .count();
    assert!(beats >= 2, "{:?}", names(&events));
    assert_eq!(final_content(&events), model.reply_text());
}

#[tokio::test]
async fn socket_io_connections_per_address_are_capped() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.max_connections_per_ip = 2;
    let server = TestServer::start(config).await;
    let first = SioClient::connect(server.addr(), websocket_only()).await;
    let mut second = SioClient::connect(server.addr(), websocket_only()).await;
    let mut third = SioClient::connect(server.addr(), websocket_only()).await;
    let (name, error) = third.next().await;
    assert_eq!(name, "error");
    assert_eq!(error["code"], "RATE_LIMIT_EXCEEDED");
    assert!(
        third
            .disconnected_within(Duration::from_secs(5))
            .await
            .is_some()
    );
    first.disconnect().await;
    server
        .wait_for_health(|h| h["activeConnections"] == 1)
        .await;
    let mut fourth = SioClient::connect(server.addr(), websocket_only()).await;
    let events = fourth.chat("capped", "hello").await;
    assert_eq!(final_content(&events), model.reply_text());
    assert_eq!(second.try_next(Duration::from_millis(100)).await, None);
}
