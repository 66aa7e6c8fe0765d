//! The reply features over Socket.IO, with the real `socket.io-client` 4.x: replies that outlive
//! their connection, catch-up after a reconnect, stop, regenerate, rename and delete,
//! heartbeats, a stop seen alike on both transports, and the per-address connection cap.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::RealtimeClient;
use support::socketio::SioClient;
use support::{
    ModelServer, TestServer, WAIT, chunks, config_for, deltas, eventually, final_content, names,
    pieces_of, seqs, words,
};
use tokio_tungstenite::tungstenite;

fn websocket_only() -> Value {
    json!({"transports": ["websocket"]})
}

#[tokio::test]
async fn a_reply_outlives_the_socket_io_client_that_asked_for_it() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(20), Duration::from_millis(20));

    // A clean `socket.disconnect()` mid-stream, from a client that started on polling.
    let mut client = SioClient::connect(server.addr(), json!({})).await;
    let ack = client
        .emit_with_ack(
            "stream_chat",
            json!({"conversationId": "left", "message": "go"}),
        )
        .await;
    assert_eq!(ack["conversationId"], "left");
    assert_eq!(client.next().await.0, "stream_start");
    assert_eq!(client.next().await.0, "stream_chunk");
    client.disconnect().await;
    let reply = server.settled_reply("left").await;
    assert_eq!(reply["status"], "complete");
    assert_eq!(reply["id"], ack["messageId"]);
    assert_eq!(reply["content"], model.reply_text());

    // A client that dies mid-stream, without a goodbye.
    let mut client = SioClient::connect(server.addr(), websocket_only()).await;
    client
        .emit(
            "stream_chat",
            json!({"conversationId": "dropped", "message": "go"}),
        )
        .await;
    assert_eq!(client.next().await.0, "stream_start");
    assert_eq!(client.next().await.0, "stream_chunk");
    client.kill().await;
    let reply = server.settled_reply("dropped").await;
    assert_eq!(reply["status"], "complete");
    assert_eq!(reply["content"], model.reply_text());

    assert_eq!(model.dropped_streams(), 0);
    assert_eq!(model.finished_streams(), 2);
}

#[tokio::test]
async fn a_reconnecting_socket_io_client_gets_exactly_what_it_missed() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(60), Duration::from_millis(25));
    let mut first = SioClient::connect(server.addr(), websocket_only()).await;
    // The next tab's client process is up before the reply starts, so the reply is surely
    // still going when it joins.
    let mut again = SioClient::connect(server.addr(), json!({})).await;
    let ack = first
        .emit_with_ack(
            "stream_chat",
            json!({"conversationId": "resume", "message": "go"}),
        )
        .await;
    let message_id = ack["messageId"].as_str().unwrap().to_owned();
    let (name, start) = first.next().await;
    assert_eq!(name, "stream_start");
    assert_eq!(start["messageId"], message_id.as_str());
    let mut received = String::new();
    let mut last_seq = 0;
    for _ in 0..6 {
        let (name, chunk) = first.next().await;
        assert_eq!(name, "stream_chunk");
        received.push_str(chunk["delta"].as_str().unwrap());
        last_seq = chunk["seq"].as_u64().unwrap();
    }
    assert_eq!(last_seq, 6);
    first.kill().await;
    server
        .wait_for_health(|h| h["activeConnections"] == 1)
        .await;

    let joined = again
        .emit_with_ack(
            "join_conversation",
            json!({"conversationId": "resume", "messageId": message_id, "seq": last_seq}),
        )
        .await;
    assert_eq!(joined, json!({"conversationId": "resume"}));
    let events = again.until_complete().await;
    assert_eq!(names(&events)[0], "stream_chunk", "{:?}", names(&events));
    let seen = seqs(&events);
    assert!(seen.iter().all(|&seq| seq > last_seq), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
    for chunk in chunks(&events) {
        assert_eq!(chunk["messageId"], message_id.as_str());
    }
    received.push_str(&deltas(&events));
    assert_eq!(final_content(&events), received);

    let stored = server.settled_reply("resume").await;
    assert_eq!(stored["status"], "complete");
    assert_eq!(stored["content"], received.as_str());
    assert_eq!(received, model.reply_text());
}

#[tokio::test]
async fn a_second_socket_io_tab_gets_the_reply_so_far_then_the_rest() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(40), Duration::from_millis(20));
    let mut first = SioClient::connect(server.addr(), websocket_only()).await;
    let mut second = SioClient::connect(server.addr(), json!({})).await;
    first
        .emit(
            "stream_chat",
            json!({"conversationId": "tabs", "message": "go"}),
        )
        .await;
    let mut seen_first = Vec::new();
    for _ in 0..6 {
        seen_first.push(first.next().await);
    }
    let message_id = seen_first[0].1["messageId"].clone();

    let joined = second
        .emit_with_ack("join_conversation", json!({"conversationId": "tabs"}))
        .await;
    assert_eq!(joined, json!({"conversationId": "tabs"}));
    let events = second.until_complete().await;
    assert_eq!(
        events[0],
        (
            "stream_start".to_owned(),
            json!({"messageId": message_id, "conversationId": "tabs"})
        )
    );
    let (name, catch_up) = &events[1];
    assert_eq!(name, "stream_chunk");
    assert!(catch_up["seq"].as_u64().unwrap() >= 5, "{catch_up}");
    assert_eq!(catch_up["delta"], catch_up["content"]);
    assert_eq!(catch_up["isComplete"], false);
    assert!(
        catch_up["content"]
            .as_str()
            .unwrap()
            .starts_with(&deltas(&seen_first))
    );
    assert_eq!(deltas(&events), model.reply_text());
    assert_eq!(final_content(&events), model.reply_text());
    let seen = seqs(&events);
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");

    seen_first.extend(first.until_complete().await);
    assert_eq!(final_content(&seen_first), model.reply_text());
    assert_eq!(seqs(&seen_first).last(), seen.last());
}

#[tokio::test]
async fn stop_generation_over_socket_io_ends_the_reply_and_the_model_stream() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(100), Duration::from_millis(30));
    let mut client = SioClient::connect(server.addr(), websocket_only()).await;
    let ack = client
        .emit_with_ack(
            "stream_chat",
            json!({"conversationId": "halt", "message": "go"}),
        )
        .await;
    let mut events = Vec::new();
    for _ in 0..4 {
        events.push(client.next().await);
    }
    let stopped = client
        .emit_with_ack("stop_generation", json!({"conversationId": "halt"}))
        .await;
    assert_eq!(stopped, json!({"conversationId": "halt"}));
    events.extend(client.until_complete().await);

    let order = names(&events);
    assert_eq!(order[0], "stream_start");
    assert_eq!(order[order.len() - 1], "stream_complete");
    assert!(
        order[1..order.len() - 1]
            .iter()
            .all(|n| *n == "stream_chunk")
    );
    let all = chunks(&events);
    let last = all.last().unwrap();
    assert_eq!(last["isComplete"], true);
    assert!(
        all[..all.len() - 1]
            .iter()
            .all(|c| c["isComplete"] == false)
    );
    assert_eq!(last["content"], deltas(&events).as_str());
    assert_eq!(
        events.last().unwrap().1,
        json!({"messageId": ack["messageId"], "conversationId": "halt"})
    );

    let stored = server.stored_reply("halt").await;
    assert_eq!(stored["status"], "cancelled");
    assert_eq!(stored["content"], last["content"]);
    assert!(stored["content"].as_str().unwrap().len() < model.reply_text().len());
    eventually(|| model.dropped_streams() == 1).await;
    assert_eq!(model.finished_streams(), 0);
    assert_eq!(client.try_next(Duration::from_millis(200)).await, None);

    // Nothing in progress any more: a stop is still answered with success, and no error.
    let again = client
        .emit_with_ack("stop_generation", json!({"conversationId": "halt"}))
        .await;
    assert_eq!(again, json!({"conversationId": "halt"}));
    client
        .emit("stop_generation", json!({"conversationId": "halt"}))
        .await;
    assert_eq!(client.try_next(Duration::from_millis(200)).await, None);
    assert_eq!(server.stored_reply("halt").await, stored);
    assert_eq!(client.disconnect_reason, None);
}

#[tokio::test]
async fn stop_generation_over_socket_io_before_the_first_token() {
    let (server, model) = TestServer::with_model().await;
    model.set_first_delay(Duration::from_secs(2));
    let mut client = SioClient::connect(server.addr(), json!({})).await;
    client
        .emit(
            "stream_chat",
            json!({"conversationId": "early", "message": "go"}),
        )
        .await;
    let (name, start) = client.next().await;
    assert_eq!(name, "stream_start");
    client
        .emit("stop_generation", json!({"conversationId": "early"}))
        .await;
    let events = client.until_complete().await;
    assert_eq!(names(&events), ["stream_chunk", "stream_complete"]);
    assert_eq!(events[0].1["messageId"], start["messageId"]);
    assert_eq!(events[0].1["content"], "");
    assert_eq!(events[0].1["isComplete"], true);
    let stored = server.stored_reply("early").await;
    assert_eq!(stored["status"], "cancelled");
    assert_eq!(stored["content"], "");
    eventually(|| model.dropped_streams() == 1).await;
}

#[tokio::test]
async fn regenerate_over_socket_io_replaces_the_last_reply() {
    let (server, model) = TestServer::with_model().await;
    let mut client = SioClient::connect(server.addr(), websocket_only()).await;
    client.chat("again", "question").await;
    let old_reply = server.stored_reply("again").await["id"].clone();
    let mut member = SioClient::connect(server.addr(), json!({})).await;
    member
        .emit_with_ack("join_conversation", json!({"conversationId": "again"}))
        .await;

    model.set_reply(pieces_of("a better answer"), Duration::from_millis(5));
    let ack = client
        .emit_with_ack("regenerate", json!({"conversationId": "again"}))
        .await;
    let message_id = ack["messageId"].clone();
    assert_eq!(
        ack,
        json!({"conversationId": "again", "messageId": message_id})
    );
    assert_ne!(message_id, old_reply);
    let events = client.until_complete().await;
    assert_eq!(
        events[0],
        (
            "stream_start".to_owned(),
            json!({"messageId": message_id, "conversationId": "again"})
        )
    );
    assert_eq!(final_content(&events), "a better answer");
    assert_eq!(member.until_complete().await, events);

    let (_, conversation) = server.get("/api/conversations/again").await;
    let messages = conversation["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["content"], "question");
    assert_eq!(messages[1]["id"], message_id);
    assert_eq!(messages[1]["content"], "a better answer");
    assert_eq!(messages[1]["status"], "complete");
    let sent = model.received().last().unwrap()["messages"].clone();
    assert_eq!(sent.as_array().unwrap().len(), 2, "{sent}");
    assert_eq!(sent[1]["content"], "question");

    // A conversation that does not exist: the acknowledgement and an `error` event say so.
    let ack = client
        .emit_with_ack("regenerate", json!({"conversationId": "ghost"}))
        .await;
    assert_eq!(ack["error"]["code"], "CONVERSATION_NOT_FOUND");
    assert!(
        ack["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert_eq!(
        client.next().await,
        ("error".to_owned(), ack["error"].clone())
    );
    client
        .emit("regenerate", json!({"conversationId": "ghost"}))
        .await;
    assert_eq!(
        client.next().await,
        ("error".to_owned(), ack["error"].clone())
    );

    // While a reply is being generated: CONFLICT.
    model.set_reply(words(30), Duration::from_millis(20));
    client
        .emit("regenerate", json!({"conversationId": "again"}))
        .await;
    assert_eq!(client.next().await.0, "stream_start");
    let ack = client
        .emit_with_ack("regenerate", json!({"conversationId": "again"}))
        .await;
    assert_eq!(ack["error"]["code"], "CONFLICT");
    let rest = client.until_complete().await;
    assert!(names(&rest).contains(&"error"), "{:?}", names(&rest));
    assert_eq!(final_content(&rest), model.reply_text());
    assert_eq!(client.disconnect_reason, None);
}

#[tokio::test]
async fn rename_and_delete_reach_socket_io_members() {
    let (server, _model) = TestServer::with_model().await;
    let (status, created) = server
        .post("/api/chat", json!({"message": "original title"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let id = created["conversation"]["id"].as_str().unwrap().to_owned();
    let mut member = SioClient::connect(server.addr(), json!({})).await;
    let joined = member
        .emit_with_ack("join_conversation", json!({"conversationId": id}))
        .await;
    assert_eq!(joined, json!({"conversationId": id}));

    let (status, renamed) = server
        .call(
            "PATCH",
            &format!("/api/conversations/{id}"),
            Some(json!({"title": "New name"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        member.next().await,
        (
            "conversation_updated".to_owned(),
            json!({"conversationId": id, "title": "New name", "updatedAt": renamed["updatedAt"]})
        )
    );

    let (status, _) = server
        .call("DELETE", &format!("/api/conversations/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        member.next().await,
        (
            "conversation_deleted".to_owned(),
            json!({"conversationId": id})
        )
    );
    assert_eq!(member.disconnect_reason, None);
}

#[tokio::test]
async fn heartbeats_reach_socket_io_members_while_the_model_is_silent() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.conversations.heartbeat_interval = Duration::from_millis(100);
    let server = TestServer::start(config).await;
    model.set_first_delay(Duration::from_millis(500));
    let mut client = SioClient::connect(server.addr(), json!({})).await;
    let events = client.chat("quiet", "think hard").await;
    let message_id = &events[0].1["messageId"];
    let beats: Vec<&Value> = events
        .iter()
        .filter(|(name, _)| name == "stream_heartbeat")
        .map(|(_, data)| data)
        .collect();
    assert!(beats.len() >= 2, "{:?}", names(&events));
    for beat in beats {
        assert_eq!(
            *beat,
            json!({"messageId": message_id, "conversationId": "quiet"})
        );
    }
    let first_chunk = names(&events)
        .iter()
        .position(|n| *n == "stream_chunk")
        .unwrap();
    assert!(
        names(&events)[1..first_chunk]
            .iter()
            .all(|n| *n == "stream_heartbeat")
    );
    assert_eq!(final_content(&events), model.reply_text());
}

#[tokio::test]
async fn a_stop_looks_the_same_to_socket_io_and_ws_members() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(100), Duration::from_millis(30));
    let mut sio = SioClient::connect(server.addr(), json!({})).await;
    sio.emit_with_ack("join_conversation", json!({"conversationId": "both"}))
        .await;
    let mut ws = server.ws().await;
    ws.send(
        "stream_chat",
        json!({"conversationId": "both", "message": "go"}),
    )
    .await;
    let mut seen_ws = Vec::new();
    for _ in 0..4 {
        seen_ws.push(ws.next().await);
    }
    let stopped = sio
        .emit_with_ack("stop_generation", json!({"conversationId": "both"}))
        .await;
    assert_eq!(stopped, json!({"conversationId": "both"}));
    seen_ws.extend(ws.until_complete().await);
    let seen_sio = sio.until_complete().await;
    assert_eq!(seen_sio, seen_ws);

    let last = *chunks(&seen_sio).last().unwrap();
    assert_eq!(last["isComplete"], true);
    let all = seqs(&seen_sio);
    assert_eq!(all, (1..=all.len() as u64).collect::<Vec<_>>());
    let stored = server.stored_reply("both").await;
    assert_eq!(stored["status"], "cancelled");
    assert_eq!(stored["content"], last["content"]);
    eventually(|| model.dropped_streams() == 1).await;
}

/// A `/ws` handshake from 127.0.0.1: `Ok` when accepted, the refusal's status otherwise.
async fn ws_handshake(server: &TestServer) -> Result<(), u16> {
    let url = format!("ws://{}/ws", server.addr());
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("handshake in time")
    {
        Ok(_) => Ok(()),
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

#[tokio::test]
async fn socket_io_connections_per_address_are_capped() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.max_connections_per_ip = 2;
    let server = TestServer::start(config).await;
    let first = SioClient::connect(server.addr(), websocket_only()).await;
    let mut second = SioClient::connect(server.addr(), json!({})).await;
    second
        .emit_with_ack("join_conversation", json!({"conversationId": "kept"}))
        .await;

    // A third one, on its default transport (polling first), is told why and disconnected.
    let mut third = SioClient::connect(server.addr(), json!({})).await;
    let (name, error) = third.next().await;
    assert_eq!(name, "error");
    assert_eq!(error["code"], "RATE_LIMIT_EXCEEDED");
    assert_eq!(
        third.disconnected_within(WAIT).await.as_deref(),
        Some("io server disconnect")
    );
    // The cap counts both transports.
    assert_eq!(ws_handshake(&server).await, Err(429));

    // Closing one lets a new one in (once the server has seen it go).
    first.disconnect().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let events = loop {
        let mut next = SioClient::connect(server.addr(), websocket_only()).await;
        next.emit(
            "stream_chat",
            json!({"conversationId": "capped", "message": "hello"}),
        )
        .await;
        let (name, data) = next.next().await;
        if name == "stream_start" {
            let mut events = vec![(name, data)];
            events.extend(next.until_complete().await);
            break events;
        }
        assert_eq!(data["code"], "RATE_LIMIT_EXCEEDED", "{name} {data}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "a closed connection never freed its place"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(final_content(&events), model.reply_text());
    assert_eq!(second.try_next(Duration::from_millis(100)).await, None);
    assert_eq!(second.disconnect_reason, None);
}
