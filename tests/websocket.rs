//! The plain WebSocket transport at `/ws`, black-box.

mod support;

use support::RealtimeClient;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use support::{
    Mode, ModelServer, TestServer, WsClient, chunks, config_for, final_content, names, pieces_of,
};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_reply_streams_in_order_and_is_stored() {
    let (server, model) = TestServer::with_model().await;
    let mut client = server.ws().await;
    let events = client.chat("conv-1", "Hi model").await;
    let order = names(&events);
    assert_eq!(order[0], "stream_start");
    assert_eq!(*order.last().unwrap(), "stream_complete");
    assert!(
        order[1..order.len() - 1]
            .iter()
            .all(|n| *n == "stream_chunk")
    );
    let message_id = events[0].1["messageId"].as_str().unwrap().to_owned();
    assert_eq!(events[0].1["conversationId"], "conv-1");
    let chunks = chunks(&events);
    let mut so_far = String::new();
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk["messageId"], message_id.as_str());
        assert_eq!(chunk["conversationId"], "conv-1");
        so_far.push_str(chunk["delta"].as_str().unwrap());
        assert_eq!(chunk["content"], so_far.as_str());
        assert_eq!(chunk["seq"], (i + 1) as u64);
        assert_eq!(chunk["isComplete"], i == chunks.len() - 1);
    }
    assert_eq!(final_content(&events), model.reply_text());
    assert_eq!(
        events.last().unwrap().1,
        json!({"messageId": message_id, "conversationId": "conv-1"})
    );

    let (status, conversation) = server.get("/api/conversations/conv-1").await;
    assert_eq!(status, StatusCode::OK);
    let messages = conversation["messages"].as_array().unwrap();
    assert_eq!(messages[0]["content"], "Hi model");
    assert_eq!(messages[1]["id"], message_id.as_str());
    assert_eq!(messages[1]["content"], model.reply_text());
    assert_eq!(messages[1]["status"], "complete");
    assert_eq!(model.received()[0]["stream"], true);
}

#[tokio::test]
async fn a_new_conversation_id_comes_back_in_stream_start() {
    let (server, _model) = TestServer::with_model().await;
    let mut client = server.ws().await;
    client
        .send("stream_chat", json!({"message": "no id"}))
        .await;
    let events = client.until_complete().await;
    let id = events[0].1["conversationId"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    let (status, _) = server.get(&format!("/api/conversations/{id}")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn every_member_gets_the_same_events() {
    let (server, model) = TestServer::with_model().await;
    let mut watcher = server.ws().await;
    watcher
        .send("join_conversation", json!({"conversationId": "shared"}))
        .await;
    let mut sender = server.ws().await;
    sender
        .send("join_conversation", json!({"conversationId": "other"}))
        .await;
    // The watcher's join is handled before the sender's message, since the sender waits for
    // its own join first.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let sent = sender.chat("shared", "hello all").await;
    let seen = watcher.until_complete().await;
    assert_eq!(sent, seen);
    assert_eq!(final_content(&seen), model.reply_text());
}

#[tokio::test]
async fn a_member_that_leaves_gets_nothing_more() {
    let (server, _model) = TestServer::with_model().await;
    let mut stayer = server.ws().await;
    let mut leaver = server.ws().await;
    leaver
        .send("join_conversation", json!({"conversationId": "room"}))
        .await;
    stayer.chat("room", "first").await;
    leaver.until_complete().await;
    leaver
        .send("leave_conversation", json!({"conversationId": "room"}))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    stayer.chat("room", "second").await;
    assert_eq!(leaver.try_next(Duration::from_millis(300)).await, None);
}

#[tokio::test]
async fn a_closed_connection_leaves_every_conversation() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.conversations.idle_timeout = Duration::from_millis(100);
    let server = TestServer::start(config).await;
    let mut client = server.ws().await;
    client.chat("a", "one").await;
    client.chat("b", "two").await;
    server
        .wait_for_health(|h| h["activeConnections"] == 1 && h["activeConversations"] == 2)
        .await;
    client.close().await;
    // Members gone, the actors go idle and stop: nothing kept the connection.
    server
        .wait_for_health(|h| h["activeConnections"] == 0 && h["activeConversations"] == 0)
        .await;
    let (status, conversation) = server.get("/api/conversations/a").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(conversation["messages"].as_array().unwrap().len(), 2);
    let mut again = server.ws().await;
    let events = again.chat("a", "three").await;
    assert_eq!(final_content(&events), model.reply_text());
    assert_eq!(model.received()[2]["messages"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn bad_frames_get_an_error_and_the_connection_stays() {
    let (server, _model) = TestServer::with_model().await;
    let mut client = server.ws().await;
    let bad: Vec<Message> = vec![
        Message::text("not json"),
        Message::text("[1,2]"),
        Message::text(json!({"event": "no_such_event", "data": {}}).to_string()),
        Message::text(json!({"event": 5}).to_string()),
        Message::text(json!({"event": "stream_chat", "data": "text"}).to_string()),
        Message::text(json!({"event": "stream_chat", "data": {"message": ""}}).to_string()),
        Message::text(json!({"event": "stream_chat", "data": {"message": 1}}).to_string()),
        Message::text(
            json!({"event": "stream_chat", "data": {"message": "x", "conversationId": "bad id!"}})
                .to_string(),
        ),
        Message::text(json!({"event": "join_conversation", "data": {}}).to_string()),
        Message::text(
            json!({"event": "join_conversation", "data": {"conversationId": ["x"]}}).to_string(),
        ),
        Message::binary(vec![1, 2, 3]),
    ];
    for frame in bad {
        client.send_raw(frame.clone()).await;
        let (name, data) = client.next().await;
        assert_eq!(name, "error", "{frame:?}");
        assert_eq!(data["code"], "INVALID_REQUEST", "{frame:?}");
        assert!(data["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    client.send("stream_chat", json!({"message": "   "})).await;
    assert_eq!(client.next().await.1["message"], "Message is required");
    let events = client.chat("still-open", "works").await;
    assert_eq!(names(&events)[0], "stream_start");
}

#[tokio::test]
async fn a_second_message_while_streaming_is_a_conflict() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(
        pieces_of("slow reply with several words"),
        Duration::from_millis(50),
    );
    let mut client = server.ws().await;
    client
        .send(
            "stream_chat",
            json!({"conversationId": "busy", "message": "one"}),
        )
        .await;
    assert_eq!(client.next().await.0, "stream_start");
    client
        .send(
            "stream_chat",
            json!({"conversationId": "busy", "message": "two"}),
        )
        .await;
    let mut saw_conflict = false;
    loop {
        let (name, data) = client.next().await;
        if name == "error" {
            assert_eq!(data["code"], "CONFLICT");
            saw_conflict = true;
        }
        if name == "stream_complete" {
            break;
        }
    }
    assert!(saw_conflict);
    let (status, body) = server
        .post(
            "/api/chat",
            json!({"conversationId": "busy", "message": "three"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_failing_model_ends_the_stream_with_the_apology() {
    let (server, model) = TestServer::with_model().await;
    model.set_mode(Mode::Fail);
    let mut client = server.ws().await;
    let events = client.chat("fails", "hello").await;
    assert_eq!(
        names(&events),
        ["stream_start", "stream_chunk", "stream_complete"]
    );
    assert_eq!(final_content(&events), ai_chat_server::actors::APOLOGY);
    let (_, conversation) = server.get("/api/conversations/fails").await;
    let reply = &conversation["messages"][1];
    assert_eq!(reply["content"], ai_chat_server::actors::APOLOGY);
    assert_eq!(reply["status"], "error");
}

#[tokio::test]
async fn a_stream_cut_midway_keeps_the_partial_text_and_apologizes() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(
        pieces_of("one two three four five six"),
        Duration::from_millis(5),
    );
    model.set_mode(Mode::Cut);
    let mut client = server.ws().await;
    let events = client.chat("cut", "hello").await;
    let content = final_content(&events);
    assert!(content.starts_with("one two three "), "{content}");
    assert!(
        content.ends_with(ai_chat_server::actors::APOLOGY),
        "{content}"
    );
    let (_, conversation) = server.get("/api/conversations/cut").await;
    assert_eq!(conversation["messages"][1]["content"], content.as_str());
    assert_eq!(conversation["messages"][1]["status"], "error");
}

#[tokio::test]
async fn a_hanging_model_times_out_with_the_apology() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.conversations.upstream_timeout = Duration::from_millis(300);
    let server = TestServer::start(config).await;
    model.set_mode(Mode::Hang);
    let mut client = server.ws().await;
    let events = client.chat("hangs", "hello").await;
    assert_eq!(final_content(&events), ai_chat_server::actors::APOLOGY);
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
    assert!(client.closed_within(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_connection_may_join_only_so_many_conversations() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.max_joined_conversations = 3;
    let server = TestServer::start(config).await;
    let mut client = server.ws().await;
    for id in ["j1", "j2", "j3"] {
        client
            .send("join_conversation", json!({"conversationId": id}))
            .await;
    }
    client
        .send("join_conversation", json!({"conversationId": "j1"}))
        .await;
    client
        .send("join_conversation", json!({"conversationId": "j4"}))
        .await;
    let (name, data) = client.next().await;
    assert_eq!(name, "error");
    assert_eq!(data["code"], "INVALID_REQUEST");
    client
        .send("leave_conversation", json!({"conversationId": "j2"}))
        .await;
    let events = client.chat("j4", "now it fits").await;
    assert_eq!(names(&events)[0], "stream_start");
}
