//! What only the plain WebSocket at `/ws` does, black-box: frames that are not events, frame
//! size limits, acknowledgement ids, pings, and clients too slow to keep up.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{
    ModelServer, RealtimeClient, TestServer, WAIT, WsClient, config_for, final_content, names,
    pieces_of, test_config, ws_handshake,
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
async fn acknowledgements_echo_string_and_number_ids() {
    let (server, _model) = TestServer::with_model().await;
    let mut client = server.ws().await;
    let join = |id: Value| json!({"event": "join_conversation", "data": {"conversationId": "acks"}, "id": id});
    for id in [
        json!("a-string"),
        json!(""),
        json!(7),
        json!(-1.5),
        json!(u64::MAX),
    ] {
        client
            .send_raw(Message::text(join(id.clone()).to_string()))
            .await;
        assert_eq!(
            client.next_frame().await,
            json!({"event": "ack", "id": id, "data": {"conversationId": "acks"}})
        );
    }

    // A failure: the `error` event first, then the acknowledgement carrying the error.
    let bad = json!({"event": "join_conversation", "data": {}, "id": "bad"});
    client.send_raw(Message::text(bad.to_string())).await;
    let error = client.next_frame().await;
    assert_eq!(error["event"], "error");
    assert_eq!(error["data"]["code"], "INVALID_REQUEST");
    assert_eq!(
        client.next_frame().await,
        json!({"event": "ack", "id": "bad", "data": {"error": error["data"]}})
    );
    // A frame with an id but no event name is answered the same way.
    client
        .send_raw(Message::text(json!({"id": 3}).to_string()))
        .await;
    assert_eq!(client.next_frame().await["event"], "error");
    let ack = client.next_frame().await;
    assert_eq!((&ack["event"], &ack["id"]), (&json!("ack"), &json!(3)));
    assert_eq!(ack["data"]["error"]["code"], "INVALID_REQUEST");
}

#[tokio::test]
async fn frames_without_an_id_get_no_acknowledgement() {
    let (server, _model) = TestServer::with_model().await;
    let mut client = server.ws().await;
    for frame in [
        json!({"event": "join_conversation", "data": {"conversationId": "quiet"}}),
        json!({"event": "join_conversation", "data": {"conversationId": "quiet"}, "id": null}),
        json!({"event": "leave_conversation", "data": {"conversationId": "quiet"}}),
    ] {
        client.send_raw(Message::text(frame.to_string())).await;
    }
    assert_eq!(client.try_next(Duration::from_millis(200)).await, None);
    // Only the failure is told, as an `error` event.
    client
        .send_raw(Message::text(
            json!({"event": "join_conversation"}).to_string(),
        ))
        .await;
    let frame = client.next_frame().await;
    assert_eq!(frame["event"], "error");
    assert_eq!(client.try_next(Duration::from_millis(200)).await, None);
}

#[tokio::test]
async fn an_id_that_is_neither_a_string_nor_a_number_is_an_invalid_request() {
    let (server, _model) = TestServer::with_model().await;
    let mut client = server.ws().await;
    for id in [json!({"n": 1}), json!([1]), json!(true)] {
        let frame =
            json!({"event": "join_conversation", "data": {"conversationId": "ids"}, "id": id});
        client.send_raw(Message::text(frame.to_string())).await;
        let (name, error) = client.next().await;
        assert_eq!(name, "error", "{id}");
        assert_eq!(error["code"], "INVALID_REQUEST", "{id}");
        assert!(error["message"].as_str().unwrap().contains("id"), "{error}");
    }
    assert_eq!(client.try_next(Duration::from_millis(200)).await, None);
    // The event was not handled: the connection is a member of nothing.
    let ack = client
        .emit_with_ack("leave_conversation", json!({"conversationId": "ids"}))
        .await;
    assert_eq!(ack, json!({"conversationId": "ids"}));
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() {
    let mut config = test_config();
    config.ws_ping_interval = Duration::from_millis(100);
    config.ws_ping_timeout = Duration::from_millis(1000);
    let server = TestServer::start(config).await;
    let mut client = server.ws().await;
    // Several intervals and more than interval + timeout: the client answers every ping as
    // it reads.
    let (pings, open) = client.pings_within(Duration::from_millis(1500)).await;
    assert!(open, "closed after {pings} pings");
    assert!(pings >= 3, "{pings} pings");
    let events = client.chat("alive", "still there?").await;
    assert_eq!(names(&events)[0], "stream_start");
}

#[tokio::test]
async fn any_frame_answers_a_ping() {
    let mut config = test_config();
    config.ws_ping_interval = Duration::from_millis(100);
    config.ws_ping_timeout = Duration::from_millis(500);
    let server = TestServer::start(config).await;
    let url = format!("ws://{}/ws", server.addr());
    // A client that talks but never reads, so it never answers a ping with a pong.
    let (mut talker, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let leave = json!({"event": "leave_conversation", "data": {"conversationId": "x"}});
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1200) {
        talker
            .send(Message::text(leave.to_string()))
            .await
            .expect("still open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server
        .wait_for_health(|h| h["activeConnections"] == 1)
        .await;
    // It was pinged all along, and never answered with a pong.
    let mut pings = 0;
    while pings < 3 {
        match tokio::time::timeout(WAIT, talker.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            other => panic!("{other:?} after {pings} pings"),
        }
    }
}

#[tokio::test]
async fn a_client_that_never_answers_is_closed_and_frees_its_place() {
    let mut config = test_config();
    config.max_connections_per_ip = 1;
    config.ws_ping_interval = Duration::from_millis(200);
    config.ws_ping_timeout = Duration::from_millis(300);
    let server = TestServer::start(config).await;
    let opened = Instant::now();
    // Connected, then never read: tungstenite answers pings only as it reads.
    let url = format!("ws://{}/ws", server.addr());
    let (mut silent, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(ws_handshake(&server).await, Err(429));

    let deadline = Instant::now() + WAIT;
    while ws_handshake(&server).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the silent client kept its place"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let freed = opened.elapsed();
    assert!(
        freed >= Duration::from_millis(500),
        "closed after {freed:?}, before interval + timeout"
    );

    // What the silent client would have read: a ping, then the end.
    let mut pings = 0;
    loop {
        match tokio::time::timeout(WAIT, silent.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(other))) => panic!("unexpected {other:?}"),
            Ok(Some(Err(_)) | None) => break,
            Err(_) => panic!("the connection is still open"),
        }
    }
    assert_eq!(pings, 1);
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
