//! The Socket.IO transport at `/socket.io/`, black-box, with the real `socket.io-client` 4.x.

mod support;

use support::RealtimeClient;

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, CONTENT_TYPE, ORIGIN,
};
use serde_json::{Value, json};
use support::socketio::SioClient;
use support::{
    Mode, ModelServer, TestServer, WsClient, config_for, final_content, names, pieces_of,
};

/// Checks a whole reply's events: start, chunks that add up in order, complete.
fn assert_whole_reply(events: &[(String, Value)], conversation_id: &str, text: &str) {
    let order = names(events);
    assert_eq!(order[0], "stream_start");
    assert_eq!(*order.last().unwrap(), "stream_complete");
    let message_id = events[0].1["messageId"].as_str().unwrap();
    assert_eq!(events[0].1["conversationId"], conversation_id);
    let chunks = &events[1..events.len() - 1];
    let mut so_far = String::new();
    for (i, (name, chunk)) in chunks.iter().enumerate() {
        assert_eq!(name, "stream_chunk");
        assert_eq!(chunk["messageId"], message_id);
        assert_eq!(chunk["conversationId"], conversation_id);
        so_far.push_str(chunk["delta"].as_str().unwrap());
        assert_eq!(chunk["content"], so_far.as_str());
        assert_eq!(chunk["seq"], (i + 1) as u64);
        assert_eq!(chunk["isComplete"], i == chunks.len() - 1);
    }
    assert_eq!(final_content(events), text);
    assert_eq!(
        events.last().unwrap().1,
        json!({"messageId": message_id, "conversationId": conversation_id})
    );
}

#[tokio::test]
async fn the_default_client_polls_then_upgrades_and_streams_in_order() {
    let (server, model) = TestServer::with_model().await;
    let mut client = SioClient::connect(server.addr(), json!({})).await;
    assert_eq!(client.first_transport.as_deref(), Some("polling"));
    let events = client.chat("sio-1", "Hi model").await;
    assert_whole_reply(&events, "sio-1", &model.reply_text());
    assert_eq!(client.upgraded().await, "websocket");
    let events = client.chat("sio-1", "Again").await;
    assert_whole_reply(&events, "sio-1", &model.reply_text());

    let (status, conversation) = server.get("/api/conversations/sio-1").await;
    assert_eq!(status, StatusCode::OK);
    let messages = conversation["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4);
    assert_eq!(messages[0]["content"], "Hi model");
    assert_eq!(messages[3]["id"], events[0].1["messageId"]);
    assert_eq!(messages[3]["content"], model.reply_text());
}

#[tokio::test]
async fn a_websocket_only_client_streams() {
    let (server, model) = TestServer::with_model().await;
    let mut client = SioClient::connect(server.addr(), json!({"transports": ["websocket"]})).await;
    assert_eq!(client.first_transport.as_deref(), Some("websocket"));
    client
        .emit("stream_chat", json!({"message": "no id given"}))
        .await;
    let events = client.until_complete().await;
    let id = events[0].1["conversationId"].as_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    assert_whole_reply(&events, &id, &model.reply_text());
}

#[tokio::test]
async fn socketio_and_ws_members_get_identical_events_in_the_same_order() {
    let (server, model) = TestServer::with_model().await;
    let mut sio = SioClient::connect(server.addr(), json!({})).await;
    let joined = sio
        .emit_with_ack("join_conversation", json!({"conversationId": "mixed"}))
        .await;
    assert_eq!(joined, json!({"conversationId": "mixed"}));
    let mut ws = server.ws().await;
    let sent = ws.chat("mixed", "from ws").await;
    let seen = sio.until_complete().await;
    assert_eq!(sent, seen);
    assert_whole_reply(&seen, "mixed", &model.reply_text());

    // And the other way round: the /ws client is a member since it sent.
    let sent = sio.chat("mixed", "from socket.io").await;
    let seen = ws.until_complete().await;
    assert_eq!(sent, seen);
}

#[tokio::test]
async fn a_member_that_leaves_gets_nothing_more() {
    let (server, _model) = TestServer::with_model().await;
    let mut sio = SioClient::connect(server.addr(), json!({})).await;
    sio.emit_with_ack("join_conversation", json!({"conversationId": "room"}))
        .await;
    let mut ws = server.ws().await;
    ws.chat("room", "first").await;
    assert_eq!(names(&sio.until_complete().await)[0], "stream_start");
    let left = sio
        .emit_with_ack("leave_conversation", json!({"conversationId": "room"}))
        .await;
    assert_eq!(left, json!({"conversationId": "room"}));
    ws.chat("room", "second").await;
    assert_eq!(sio.try_next(Duration::from_millis(300)).await, None);
}

#[tokio::test]
async fn a_disconnected_socket_leaves_every_conversation() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.conversations.idle_timeout = Duration::from_millis(100);
    let server = TestServer::start(config).await;

    // A clean disconnect.
    let mut client = SioClient::connect(server.addr(), json!({})).await;
    client.chat("a", "one").await;
    client.chat("b", "two").await;
    server
        .wait_for_health(|h| h["activeConnections"] == 1 && h["activeConversations"] == 2)
        .await;
    client.disconnect().await;
    server
        .wait_for_health(|h| h["activeConnections"] == 0 && h["activeConversations"] == 0)
        .await;

    // A dropped one: the client process dies.
    let mut client = SioClient::connect(server.addr(), json!({"transports": ["websocket"]})).await;
    client.chat("a", "three").await;
    server
        .wait_for_health(|h| h["activeConnections"] == 1 && h["activeConversations"] == 1)
        .await;
    client.kill().await;
    server
        .wait_for_health(|h| h["activeConnections"] == 0 && h["activeConversations"] == 0)
        .await;

    let (_, conversation) = server.get("/api/conversations/a").await;
    assert_eq!(conversation["messages"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn bad_payloads_get_an_error_and_the_socket_stays() {
    let (server, _model) = TestServer::with_model().await;
    let mut client = SioClient::connect(server.addr(), json!({})).await;
    let bad: Vec<(&str, Vec<Value>)> = vec![
        ("stream_chat", vec![]),
        ("stream_chat", vec![json!("text")]),
        ("stream_chat", vec![json!(null)]),
        ("stream_chat", vec![json!([{"message": "in an array"}])]),
        ("stream_chat", vec![json!({"message": ""})]),
        ("stream_chat", vec![json!({"message": 1})]),
        (
            "stream_chat",
            vec![json!({"message": "x", "conversationId": "bad id!"})],
        ),
        ("join_conversation", vec![json!({})]),
        ("join_conversation", vec![json!({"conversationId": ["x"]})]),
        ("leave_conversation", vec![json!(7)]),
        ("no_such_event", vec![json!({})]),
    ];
    for (event, args) in bad {
        client.emit_args(event, args.clone()).await;
        let (name, data) = client.next().await;
        assert_eq!(name, "error", "{event} {args:?}");
        assert_eq!(data["code"], "INVALID_REQUEST", "{event} {args:?}");
        assert!(data["message"].as_str().is_some_and(|m| !m.is_empty()));
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
    assert_eq!(client.disconnect_reason, None);
}

#[tokio::test]
async fn acknowledgements_carry_the_ids_or_the_error() {
    let (server, model) = TestServer::with_model().await;
    let mut client = SioClient::connect(server.addr(), json!({})).await;
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
    assert_eq!(client.next().await.1["code"], "CONVERSATION_NOT_FOUND");
}

#[tokio::test]
async fn a_failing_model_ends_the_stream_with_the_apology() {
    let (server, model) = TestServer::with_model().await;
    model.set_mode(Mode::Fail);
    let mut client = SioClient::connect(server.addr(), json!({})).await;
    let events = client.chat("fails", "hello").await;
    assert_eq!(
        names(&events),
        ["stream_start", "stream_chunk", "stream_complete"]
    );
    assert_eq!(final_content(&events), ai_chat_server::actors::APOLOGY);
}

#[tokio::test]
async fn a_thousand_token_reply_reaches_a_polling_client_whole() {
    let (server, model) = TestServer::with_model().await;
    let pieces: Vec<String> = (0..1000).map(|i| format!("token{i} ")).collect();
    model.set_reply(pieces, Duration::ZERO);
    let mut client = SioClient::connect(server.addr(), json!({"transports": ["polling"]})).await;
    let ack = client
        .emit_with_ack(
            "stream_chat",
            json!({"conversationId": "long", "message": "a long one, please"}),
        )
        .await;
    assert_eq!(ack["conversationId"], "long");
    // The client pauses (a busy page, a slow network) while the reply bursts out.
    client.stall(Duration::from_secs(1)).await;
    let events = client.until_complete().await;
    assert_whole_reply(&events, "long", &model.reply_text());
    assert_eq!(client.upgraded_to, None);
    assert_eq!(client.disconnect_reason, None);
    let (_, conversation) = server.get("/api/conversations/long").await;
    assert_eq!(conversation["messages"][1]["content"], model.reply_text());
}

#[tokio::test]
async fn cors_on_polling_follows_frontend_url() {
    let (server, _model) = TestServer::with_model().await;
    let allowed = "http://localhost:8081";
    let handshake = server.url("/socket.io/?EIO=4&transport=polling");

    let response = server
        .http
        .get(&handshake)
        .header(ORIGIN, allowed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[ACCESS_CONTROL_ALLOW_ORIGIN], allowed);
    assert_eq!(response.headers()[ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
    let body = response.text().await.unwrap();
    let open: Value =
        serde_json::from_str(body.strip_prefix('0').expect("an open packet")).unwrap();
    let sid = open["sid"].as_str().unwrap().to_owned();
    let session = format!("{handshake}&sid={sid}");

    let preflight = server
        .http
        .request(reqwest::Method::OPTIONS, &session)
        .header(ORIGIN, allowed)
        .header(ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(ACCESS_CONTROL_REQUEST_HEADERS, "content-type")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    assert_eq!(preflight.headers()[ACCESS_CONTROL_ALLOW_ORIGIN], allowed);
    let methods = preflight.headers()[ACCESS_CONTROL_ALLOW_METHODS]
        .to_str()
        .unwrap();
    assert!(methods.contains("POST"), "{methods}");

    let posted = server
        .http
        .post(&session)
        .header(ORIGIN, allowed)
        .header(CONTENT_TYPE, "text/plain;charset=UTF-8")
        .body("40")
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), StatusCode::OK);
    assert_eq!(posted.headers()[ACCESS_CONTROL_ALLOW_ORIGIN], allowed);
    let polled = server
        .http
        .get(&session)
        .header(ORIGIN, allowed)
        .send()
        .await
        .unwrap();
    assert_eq!(polled.headers()[ACCESS_CONTROL_ALLOW_ORIGIN], allowed);
    let polled = polled.text().await.unwrap();
    // Engine.IO packets, separated by the record separator: the namespace's CONNECT among them.
    assert!(
        polled.split('\x1e').any(|p| p.starts_with("40{\"sid\":")),
        "{polled}"
    );

    let foreign = server
        .http
        .get(&handshake)
        .header(ORIGIN, "http://evil.example")
        .send()
        .await
        .unwrap();
    assert!(foreign.headers().get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
}

#[tokio::test]
async fn many_socketio_clients_stream_at_once() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(pieces_of("a b c d e f g h i j"), Duration::from_millis(10));
    let mut tasks = Vec::new();
    for i in 0..10 {
        let addr = server.addr();
        tasks.push(tokio::spawn(async move {
            let transports = if i % 2 == 0 {
                json!(["polling", "websocket"])
            } else {
                json!(["websocket"])
            };
            let mut client = SioClient::connect(addr, json!({"transports": transports})).await;
            client.chat(&format!("many-{i}"), "go").await
        }));
    }
    for task in tasks {
        let events = task.await.unwrap();
        assert_eq!(final_content(&events), model.reply_text());
    }
    let mut ws = WsClient::connect(server.addr()).await;
    assert_eq!(
        final_content(&ws.chat("many-0", "and /ws").await),
        model.reply_text()
    );
}

#[tokio::test]
async fn shutting_down_closes_the_sockets_promptly() {
    let (server, _model) = TestServer::with_model().await;
    let mut polling = SioClient::connect(server.addr(), json!({"transports": ["polling"]})).await;
    let mut websocket =
        SioClient::connect(server.addr(), json!({"transports": ["websocket"]})).await;
    polling.chat("bye", "one").await;
    websocket.chat("bye", "two").await;
    // Well within the server's own 10 s grace for open connections: pending polls are answered.
    tokio::time::timeout(
        Duration::from_secs(5),
        server.app.shutdown(Duration::from_millis(500)),
    )
    .await
    .expect("the server stops in time");
    // Dropped by the server's going away, not sent off: socket.io-client reconnects after these.
    for client in [&mut polling, &mut websocket] {
        let reason = client.disconnected_within(Duration::from_secs(5)).await;
        assert!(
            matches!(
                reason.as_deref(),
                Some("transport close" | "transport error")
            ),
            "{:?}: {reason:?}",
            client.first_transport
        );
    }
}
