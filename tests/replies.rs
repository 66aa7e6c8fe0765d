//! What chat users ask for most: replies that outlive their connection, catch-up after a
//! reconnect, stop, regenerate, rename and heartbeats.

mod support;

use support::RealtimeClient;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{
    ModelServer, TestServer, WsClient, config_for, deltas, eventually, final_content, names,
    pieces_of, seqs, words,
};

#[tokio::test]
async fn a_reply_outlives_the_connection_that_asked_for_it() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(20), Duration::from_millis(20));
    let mut client = server.ws().await;
    client
        .send(
            "stream_chat",
            json!({"conversationId": "left", "message": "go"}),
        )
        .await;
    assert_eq!(client.next().await.0, "stream_start");
    assert_eq!(client.next().await.0, "stream_chunk");
    client.close().await;
    let reply = server.settled_reply("left").await;
    assert_eq!(reply["status"], "complete");
    assert_eq!(reply["content"], model.reply_text());
    assert_eq!(model.dropped_streams(), 0);
}

#[tokio::test]
async fn a_second_tab_gets_the_reply_so_far_then_the_rest() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(30), Duration::from_millis(20));
    let mut first = server.ws().await;
    first
        .send(
            "stream_chat",
            json!({"conversationId": "tabs", "message": "go"}),
        )
        .await;
    for _ in 0..6 {
        first.next().await;
    }
    let mut second = server.ws().await;
    second
        .send("join_conversation", json!({"conversationId": "tabs"}))
        .await;
    let events = second.until_complete().await;
    assert_eq!(names(&events)[0], "stream_start");
    let catch_up = &events[1].1;
    assert!(catch_up["seq"].as_u64().unwrap() >= 5);
    assert_eq!(catch_up["delta"], catch_up["content"]);
    let deltas = deltas(&events);
    assert_eq!(deltas, model.reply_text());
    assert_eq!(final_content(&events), model.reply_text());
    let seqs = seqs(&events);
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
}

#[tokio::test]
async fn a_reconnect_with_the_last_seq_receives_exactly_what_it_missed() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(40), Duration::from_millis(20));
    let mut client = server.ws().await;
    client
        .send(
            "stream_chat",
            json!({"conversationId": "resume", "message": "go"}),
        )
        .await;
    let (_, start) = client.next().await;
    let message_id = start["messageId"].as_str().unwrap().to_owned();
    let mut received = String::new();
    let mut last_seq = 0;
    for _ in 0..8 {
        let (name, chunk) = client.next().await;
        assert_eq!(name, "stream_chunk");
        received.push_str(chunk["delta"].as_str().unwrap());
        last_seq = chunk["seq"].as_u64().unwrap();
    }
    client.close().await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut again = server.ws().await;
    again
        .send(
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
    let stored = server.settled_reply("resume").await;
    assert_eq!(received, stored["content"].as_str().unwrap());
    assert_eq!(received, model.reply_text());

    let mut late = server.ws().await;
    late.send(
        "join_conversation",
        json!({"conversationId": "resume", "messageId": message_id, "seq": last_seq}),
    )
    .await;
    assert_eq!(late.try_next(Duration::from_millis(300)).await, None);
}

#[tokio::test]
async fn stop_ends_the_reply_on_the_server() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(100), Duration::from_millis(30));
    let mut client = server.ws().await;
    let mut watcher = server.ws().await;
    watcher
        .send("join_conversation", json!({"conversationId": "halt"}))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    client
        .send(
            "stream_chat",
            json!({"conversationId": "halt", "message": "go"}),
        )
        .await;
    for _ in 0..4 {
        client.next().await;
    }
    client
        .send("stop_generation", json!({"conversationId": "halt"}))
        .await;
    let rest = client.until_complete().await;
    let last_chunk = &rest[rest.len() - 2];
    assert_eq!(last_chunk.0, "stream_chunk");
    assert_eq!(last_chunk.1["isComplete"], true);
    let watched = watcher.until_complete().await;
    assert_eq!(
        final_content(&watched),
        last_chunk.1["content"].as_str().unwrap()
    );

    let reply = server.stored_reply("halt").await;
    assert_eq!(reply["status"], "cancelled");
    assert_eq!(reply["content"], last_chunk.1["content"]);
    assert!(reply["content"].as_str().unwrap().len() < model.reply_text().len());
    eventually(|| model.dropped_streams() == 1).await;
    assert_eq!(model.finished_streams(), 0);
    assert_eq!(client.try_next(Duration::from_millis(200)).await, None);
}

#[tokio::test]
async fn stop_over_rest_and_with_nothing_to_stop() {
    let (server, model) = TestServer::with_model().await;
    let (status, _) = server
        .post("/api/conversations/nothing/stop", json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let mut client = server.ws().await;
    client.chat("idle", "hello").await;
    let (status, body) = server.post("/api/conversations/idle/stop", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    model.set_reply(words(100), Duration::from_millis(30));
    client
        .send(
            "stream_chat",
            json!({"conversationId": "idle", "message": "long one"}),
        )
        .await;
    client.next().await;
    client.next().await;
    let (status, _) = server.post("/api/conversations/idle/stop", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let events = client.until_complete().await;
    assert_eq!(events[events.len() - 2].1["isComplete"], true);
    assert_eq!(server.stored_reply("idle").await["status"], "cancelled");
    eventually(|| model.dropped_streams() == 1).await;
}

#[tokio::test]
async fn stop_before_the_first_token() {
    let (server, model) = TestServer::with_model().await;
    model.set_first_delay(Duration::from_millis(500));
    let mut client = server.ws().await;
    client
        .send(
            "stream_chat",
            json!({"conversationId": "early", "message": "go"}),
        )
        .await;
    assert_eq!(client.next().await.0, "stream_start");
    client
        .send("stop_generation", json!({"conversationId": "early"}))
        .await;
    let events = client.until_complete().await;
    assert_eq!(names(&events), ["stream_chunk", "stream_complete"]);
    assert_eq!(events[0].1["content"], "");
    assert_eq!(events[0].1["isComplete"], true);
    let reply = server.stored_reply("early").await;
    assert_eq!(reply["status"], "cancelled");
    eventually(|| model.dropped_streams() == 1).await;
}

#[tokio::test]
async fn regenerate_replaces_the_last_reply() {
    let (server, model) = TestServer::with_model().await;
    let mut client = server.ws().await;
    client.chat("again", "question").await;
    let (_, before) = server.get("/api/conversations/again").await;
    let old_reply = before["messages"][1]["id"].clone();

    model.set_reply(pieces_of("a better answer"), Duration::from_millis(5));
    client
        .send("regenerate", json!({"conversationId": "again"}))
        .await;
    let events = client.until_complete().await;
    assert_eq!(names(&events)[0], "stream_start");
    assert_ne!(events[0].1["messageId"], old_reply);
    assert_eq!(final_content(&events), "a better answer");
    let (_, after) = server.get("/api/conversations/again").await;
    let messages = after["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["content"], "question");
    assert_eq!(messages[1]["content"], "a better answer");
    let sent = model.received().last().unwrap()["messages"].clone();
    assert_eq!(sent.as_array().unwrap().len(), 2);
    assert_eq!(sent[1]["content"], "question");

    model.set_reply(pieces_of("third time"), Duration::from_millis(5));
    let (status, body) = server
        .post("/api/conversations/again/regenerate", json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["conversationId"], "again");
    let events = client.until_complete().await;
    assert_eq!(events[0].1["messageId"], body["messageId"]);
    assert_eq!(final_content(&events), "third time");

    let (status, body) = server
        .post("/api/conversations/ghost/regenerate", json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "CONVERSATION_NOT_FOUND");
    client
        .send("regenerate", json!({"conversationId": "ghost"}))
        .await;
    let (name, error) = client.next().await;
    assert_eq!(name, "error");
    assert_eq!(error["code"], "CONVERSATION_NOT_FOUND");

    model.set_reply(words(50), Duration::from_millis(20));
    client
        .send("regenerate", json!({"conversationId": "again"}))
        .await;
    client.next().await;
    let (status, body) = server
        .post("/api/conversations/again/regenerate", json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "CONFLICT");
}

#[tokio::test]
async fn rename_changes_the_title_and_tells_the_members() {
    let (server, _model) = TestServer::with_model().await;
    let mut member = server.ws().await;
    member.chat("named", "original title").await;
    let (status, renamed) = server
        .call(
            "PATCH",
            "/api/conversations/named",
            Some(json!({"title": "New name"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(renamed["title"], "New name");
    let (name, event) = member.next().await;
    assert_eq!(name, "conversation_updated");
    assert_eq!(event["conversationId"], "named");
    assert_eq!(event["title"], "New name");
    assert_eq!(event["updatedAt"], renamed["updatedAt"]);
    assert_eq!(
        server.get("/api/conversations/named").await.1["title"],
        "New name"
    );

    let edge = |title: Value| {
        server.call(
            "PATCH",
            "/api/conversations/named",
            Some(json!({"title": title})),
        )
    };
    assert_eq!(edge(json!("x")).await.0, StatusCode::OK);
    assert_eq!(edge(json!("é".repeat(200))).await.0, StatusCode::OK);
    for bad in [
        json!("é".repeat(201)),
        json!(""),
        json!("   "),
        json!(5),
        Value::Null,
    ] {
        let (status, body) = edge(bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(body["code"], "INVALID_REQUEST");
    }
    let (status, body) = server
        .call(
            "PATCH",
            "/api/conversations/missing",
            Some(json!({"title": "t"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "CONVERSATION_NOT_FOUND");
}

#[tokio::test]
async fn a_silent_model_sends_heartbeats() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.conversations.heartbeat_interval = Duration::from_millis(100);
    let server = TestServer::start(config).await;
    model.set_first_delay(Duration::from_millis(450));
    let mut client = WsClient::connect(server.addr()).await;
    let events = client.chat("quiet", "think hard").await;
    let message_id = &events[0].1["messageId"];
    let heartbeats: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "stream_heartbeat")
        .map(|(_, d)| d)
        .collect();
    assert!(heartbeats.len() >= 2, "{:?}", names(&events));
    for beat in heartbeats {
        assert_eq!(beat["messageId"], *message_id);
        assert_eq!(beat["conversationId"], "quiet");
    }
    assert_eq!(final_content(&events), model.reply_text());
}
