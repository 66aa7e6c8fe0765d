//! Real-time streaming, black-box, written once and run over every transport (`/ws`, and
//! Socket.IO with the real `socket.io-client` 4.x, polling first or a websocket from the start): replies in order, members, leaving and
//! closing, bad payloads, acknowledgements, conflicts, a failing model, and the join limit.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{
    Mode, ModelServer, RealtimeClient, TestServer, assert_whole_reply, config_for, final_content,
    names, over_every_transport, pieces_of,
};

over_every_transport!(
    a_reply_streams_in_order_and_is_stored,
    a_new_conversation_id_comes_back_in_stream_start,
    every_member_gets_the_same_events,
    a_member_that_leaves_gets_nothing_more,
    a_closed_connection_leaves_every_conversation,
    bad_payloads_get_an_error_and_the_connection_stays,
    acknowledgements_carry_the_ids_or_the_error,
    a_second_message_while_streaming_is_a_conflict,
    a_failing_model_ends_the_stream_with_the_apology,
    a_stream_cut_midway_keeps_the_partial_text_and_apologizes,
    a_hanging_model_times_out_with_the_apology,
    a_connection_may_join_only_so_many_conversations,
    a_deleted_conversation_frees_its_place_among_those_joined,
);

async fn a_reply_streams_in_order_and_is_stored<C: RealtimeClient>() {
    let (server, model) = TestServer::with_model().await;
    let mut client = C::connect(server.addr()).await;
    let events = client.chat("conv-1", "Hi model").await;
    assert_whole_reply(&events, "conv-1", &model.reply_text());

    let (status, conversation) = server.get("/api/conversations/conv-1").await;
    assert_eq!(status, StatusCode::OK);
    let messages = conversation["messages"].as_array().unwrap();
    assert_eq!(messages[0]["content"], "Hi model");
    assert_eq!(messages[1]["id"], events[0].1["messageId"]);
    assert_eq!(messages[1]["content"], model.reply_text());
    assert_eq!(messages[1]["status"], "complete");
    assert_eq!(model.received()[0]["stream"], true);
}

async fn a_new_conversation_id_comes_back_in_stream_start<C: RealtimeClient>() {
    let (server, model) = TestServer::with_model().await;
    let mut client = C::connect(server.addr()).await;
    client
        .emit("stream_chat", json!({"message": "no id"}))
        .await;
    let events = client.until_complete().await;
    let id = events[0].1["conversationId"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    assert_whole_reply(&events, &id, &model.reply_text());
    let (status, _) = server.get(&format!("/api/conversations/{id}")).await;
    assert_eq!(status, StatusCode::OK);
}

async fn every_member_gets_the_same_events<C: RealtimeClient>() {
    let (server, model) = TestServer::with_model().await;
    let mut watcher = C::connect(server.addr()).await;
    watcher.join("shared").await;
    let mut sender = C::connect(server.addr()).await;
    sender.join("other").await;
    let sent = sender.chat("shared", "hello all").await;
    let seen = watcher.until_complete().await;
    assert_eq!(sent, seen);
    assert_eq!(final_content(&seen), model.reply_text());

    // And the other way round: the sender is a member since it sent.
    let sent = watcher.chat("shared", "and back").await;
    assert_eq!(sender.until_complete().await, sent);
}

async fn a_member_that_leaves_gets_nothing_more<C: RealtimeClient>() {
    let (server, _model) = TestServer::with_model().await;
    let mut stayer = C::connect(server.addr()).await;
    let mut leaver = C::connect(server.addr()).await;
    leaver.join("room").await;
    stayer.chat("room", "first").await;
    assert_eq!(names(&leaver.until_complete().await)[0], "stream_start");
    let left = leaver
        .emit_with_ack("leave_conversation", json!({"conversationId": "room"}))
        .await;
    assert_eq!(left, json!({"conversationId": "room"}));
    stayer.chat("room", "second").await;
    assert_eq!(leaver.try_next(Duration::from_millis(300)).await, None);
}

async fn a_closed_connection_leaves_every_conversation<C: RealtimeClient>() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.conversations.idle_timeout = Duration::from_millis(100);
    let server = TestServer::start(config).await;

    // A clean close.
    let mut client = C::connect(server.addr()).await;
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

    // A dropped one: the client dies without a goodbye.
    let mut again = C::connect(server.addr()).await;
    let events = again.chat("a", "three").await;
    assert_eq!(final_content(&events), model.reply_text());
    assert_eq!(model.received()[2]["messages"].as_array().unwrap().len(), 4);
    server
        .wait_for_health(|h| h["activeConnections"] == 1 && h["activeConversations"] == 1)
        .await;
    again.kill().await;
    server
        .wait_for_health(|h| h["activeConnections"] == 0 && h["activeConversations"] == 0)
        .await;
    let (_, conversation) = server.get("/api/conversations/a").await;
    assert_eq!(conversation["messages"].as_array().unwrap().len(), 4);
}

async fn bad_payloads_get_an_error_and_the_connection_stays<C: RealtimeClient>() {
    let (server, _model) = TestServer::with_model().await;
    let mut client = C::connect(server.addr()).await;
    let bad = [
        ("stream_chat", json!("text")),
        ("stream_chat", Value::Null),
        ("stream_chat", json!([{"message": "in an array"}])),
        ("stream_chat", json!({"message": ""})),
        ("stream_chat", json!({"message": 1})),
        (
            "stream_chat",
            json!({"message": "x", "conversationId": "bad id!"}),
        ),
        ("join_conversation", json!({})),
        ("join_conversation", json!({"conversationId": ["x"]})),
        ("leave_conversation", json!(7)),
        ("no_such_event", json!({})),
    ];
    for (event, data) in bad {
        client.emit(event, data.clone()).await;
        let (name, error) = client.next().await;
        assert_eq!(name, "error", "{event} {data}");
        assert_eq!(error["code"], "INVALID_REQUEST", "{event} {data}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    client.emit("stream_chat", json!({"message": "   "})).await;
    assert_eq!(
        client.next().await,
        (
            "error".to_owned(),
            json!({"message": "Message is required", "code": "INVALID_REQUEST"})
        )
    );
    let events = client.chat("still-open", "works").await;
    assert_eq!(names(&events)[0], "stream_start");
}

async fn acknowledgements_carry_the_ids_or_the_error<C: RealtimeClient>() {
    let (server, model) = TestServer::with_model().await;
    let mut client = C::connect(server.addr()).await;
    let ack = client
        .emit_with_ack(
            "stream_chat",
            json!({"conversationId": "acked", "message": "hello"}),
        )
        .await;
    let events = client.until_complete().await;
    assert_whole_reply(&events, "acked", &model.reply_text());
    assert_eq!(
        ack,
        json!({"conversationId": "acked", "messageId": events[0].1["messageId"]})
    );
    for event in ["join_conversation", "leave_conversation", "stop_generation"] {
        let ack = client
            .emit_with_ack(event, json!({"conversationId": "acked"}))
            .await;
        assert_eq!(ack, json!({"conversationId": "acked"}), "{event}");
    }

    // A failed event: the acknowledgement carries the error, and the `error` event comes too.
    let ack = client
        .emit_with_ack("stream_chat", json!({"message": ""}))
        .await;
    let error = json!({"message": "Message is required", "code": "INVALID_REQUEST"});
    assert_eq!(ack, json!({ "error": error }));
    assert_eq!(client.next().await, ("error".to_owned(), error));

    let ack = client
        .emit_with_ack("stop_generation", json!({"conversationId": "unknown"}))
        .await;
    assert_eq!(ack["error"]["code"], "CONVERSATION_NOT_FOUND");
    assert_eq!(
        client.next().await,
        ("error".to_owned(), ack["error"].clone())
    );
    assert_eq!(client.try_next(Duration::from_millis(100)).await, None);
}

async fn a_second_message_while_streaming_is_a_conflict<C: RealtimeClient>() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(
        pieces_of("slow reply with several words"),
        Duration::from_millis(50),
    );
    let mut client = C::connect(server.addr()).await;
    client
        .emit(
            "stream_chat",
            json!({"conversationId": "busy", "message": "one"}),
        )
        .await;
    assert_eq!(client.next().await.0, "stream_start");
    let ack = client
        .emit_with_ack(
            "stream_chat",
            json!({"conversationId": "busy", "message": "two"}),
        )
        .await;
    assert_eq!(ack["error"]["code"], "CONFLICT");
    let rest = client.until_complete().await;
    let errors: Vec<&Value> = rest
        .iter()
        .filter(|(name, _)| name == "error")
        .map(|(_, data)| data)
        .collect();
    assert_eq!(errors, [&ack["error"]]);
    assert_eq!(final_content(&rest), model.reply_text());
    let (status, body) = server
        .post(
            "/api/chat",
            json!({"conversationId": "busy", "message": "three"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn a_failing_model_ends_the_stream_with_the_apology<C: RealtimeClient>() {
    let (server, model) = TestServer::with_model().await;
    model.set_mode(Mode::Fail);
    let mut client = C::connect(server.addr()).await;
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

async fn a_stream_cut_midway_keeps_the_partial_text_and_apologizes<C: RealtimeClient>() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(
        pieces_of("one two three four five six"),
        Duration::from_millis(5),
    );
    model.set_mode(Mode::Cut);
    let mut client = C::connect(server.addr()).await;
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

async fn a_hanging_model_times_out_with_the_apology<C: RealtimeClient>() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.conversations.upstream_timeout = Duration::from_millis(300);
    let server = TestServer::start(config).await;
    model.set_mode(Mode::Hang);
    let mut client = C::connect(server.addr()).await;
    let events = client.chat("hangs", "hello").await;
    assert_eq!(final_content(&events), ai_chat_server::actors::APOLOGY);
}

async fn a_connection_may_join_only_so_many_conversations<C: RealtimeClient>() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.max_joined_conversations = 3;
    let server = TestServer::start(config).await;
    let mut client = C::connect(server.addr()).await;
    for id in ["j1", "j2", "j3", "j1"] {
        client.join(id).await;
    }
    let ack = client
        .emit_with_ack("join_conversation", json!({"conversationId": "j4"}))
        .await;
    assert_eq!(ack["error"]["code"], "INVALID_REQUEST");
    let (name, data) = client.next().await;
    assert_eq!(name, "error");
    assert_eq!(data, ack["error"]);
    client
        .emit(
            "stream_chat",
            json!({"conversationId": "j5", "message": "no room"}),
        )
        .await;
    assert_eq!(
        client.next().await,
        ("error".to_owned(), ack["error"].clone())
    );
    client
        .emit("leave_conversation", json!({"conversationId": "j2"}))
        .await;
    let events = client.chat("j4", "now it fits").await;
    assert_eq!(names(&events)[0], "stream_start");
}

async fn a_deleted_conversation_frees_its_place_among_those_joined<C: RealtimeClient>() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.max_joined_conversations = 1;
    let server = TestServer::start(config).await;
    let mut client = C::connect(server.addr()).await;
    client.chat("gone-soon", "hello").await;
    let (status, _) = server
        .call("DELETE", "/api/conversations/gone-soon", None)
        .await;
    assert_eq!(status, reqwest::StatusCode::OK);
    assert_eq!(client.next().await.0, "conversation_deleted");
    let ack = client
        .emit_with_ack("join_conversation", json!({"conversationId": "next"}))
        .await;
    assert_eq!(ack, json!({"conversationId": "next"}));
}
