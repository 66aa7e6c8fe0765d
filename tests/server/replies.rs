//! What chat users ask for most, written once and run over every transport: replies that
//! outlive their connection, catch-up after a reconnect and for a second tab, stop, regenerate,
//! rename and delete, and heartbeats.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{
    ModelServer, RealtimeClient, TestServer, chunks, config_for, deltas, eventually, final_content,
    names, over_every_transport, pieces_of, seqs, words,
};

over_every_transport!(
    a_reply_outlives_the_connection_that_asked_for_it,
    a_second_tab_gets_the_reply_so_far_then_the_rest,
    a_reconnect_with_the_last_seq_receives_exactly_what_it_missed,
    stop_ends_the_reply_and_the_model_stream,
    stop_over_rest_and_with_nothing_to_stop,
    stop_before_the_first_token,
    regenerate_replaces_the_last_reply,
    rename_and_delete_reach_the_members,
    a_silent_model_sends_heartbeats,
);

async fn a_reply_outlives_the_connection_that_asked_for_it<C: RealtimeClient>() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(20), Duration::from_millis(20));

    // A clean close mid-stream.
    let mut client = C::connect(server.addr()).await;
    let ack = client
        .emit_with_ack(
            "stream_chat",
            json!({"conversationId": "left", "message": "go"}),
        )
        .await;
    assert_eq!(ack["conversationId"], "left");
    assert_eq!(client.next().await.0, "stream_start");
    assert_eq!(client.next().await.0, "stream_chunk");
    client.close().await;
    let reply = server.settled_reply("left").await;
    assert_eq!(reply["status"], "complete");
    assert_eq!(reply["id"], ack["messageId"]);
    assert_eq!(reply["content"], model.reply_text());

    // A client that dies mid-stream, without a goodbye.
    let mut client = C::connect(server.addr()).await;
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

async fn a_second_tab_gets_the_reply_so_far_then_the_rest<C: RealtimeClient>() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(40), Duration::from_millis(20));
    let mut first = C::connect(server.addr()).await;
    // The second tab is connected before the reply starts, so the reply is surely still going
    // when it joins.
    let mut second = C::connect(server.addr()).await;
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

    second.join("tabs").await;
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

async fn a_reconnect_with_the_last_seq_receives_exactly_what_it_missed<C: RealtimeClient>() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(60), Duration::from_millis(25));
    let mut first = C::connect(server.addr()).await;
    // The reconnecting client is up before the reply starts, so the reply is surely still
    // going when it joins.
    let mut again = C::connect(server.addr()).await;
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

    let resume = json!({"conversationId": "resume", "messageId": message_id, "seq": last_seq});
    again.join_from(resume.clone()).await;
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

    // Once the reply is over, the same resume point has nothing to catch up on.
    let mut late = C::connect(server.addr()).await;
    late.join_from(resume).await;
    assert_eq!(late.try_next(Duration::from_millis(300)).await, None);
}

async fn stop_ends_the_reply_and_the_model_stream<C: RealtimeClient>() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(100), Duration::from_millis(30));
    let mut client = C::connect(server.addr()).await;
    let mut watcher = C::connect(server.addr()).await;
    watcher.join("halt").await;
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
    assert_eq!(watcher.until_complete().await, events);

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
}

async fn stop_over_rest_and_with_nothing_to_stop<C: RealtimeClient>() {
    let (server, model) = TestServer::with_model().await;
    let (status, _) = server
        .post("/api/conversations/nothing/stop", json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let mut client = C::connect(server.addr()).await;
    client.chat("idle", "hello").await;
    let (status, body) = server.post("/api/conversations/idle/stop", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    model.set_reply(words(100), Duration::from_millis(30));
    client
        .emit(
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

async fn stop_before_the_first_token<C: RealtimeClient>() {
    let (server, model) = TestServer::with_model().await;
    model.set_first_delay(Duration::from_secs(2));
    let mut client = C::connect(server.addr()).await;
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

async fn regenerate_replaces_the_last_reply<C: RealtimeClient>() {
    let (server, model) = TestServer::with_model().await;
    let mut client = C::connect(server.addr()).await;
    client.chat("again", "question").await;
    let old_reply = server.stored_reply("again").await["id"].clone();
    let mut member = C::connect(server.addr()).await;
    member.join("again").await;

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

    // Over REST, the members see it stream too.
    model.set_reply(pieces_of("third time"), Duration::from_millis(5));
    let (status, body) = server
        .post("/api/conversations/again/regenerate", json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["conversationId"], "again");
    let events = client.until_complete().await;
    assert_eq!(events[0].1["messageId"], body["messageId"]);
    assert_eq!(final_content(&events), "third time");
    assert_eq!(member.until_complete().await, events);

    // A conversation that does not exist: the acknowledgement and an `error` event say so.
    let (status, body) = server
        .post("/api/conversations/ghost/regenerate", json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "CONVERSATION_NOT_FOUND");
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

    // While a reply is being generated: CONFLICT, over either way in.
    model.set_reply(words(30), Duration::from_millis(20));
    client
        .emit("regenerate", json!({"conversationId": "again"}))
        .await;
    assert_eq!(client.next().await.0, "stream_start");
    let ack = client
        .emit_with_ack("regenerate", json!({"conversationId": "again"}))
        .await;
    assert_eq!(ack["error"]["code"], "CONFLICT");
    let (status, body) = server
        .post("/api/conversations/again/regenerate", json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "CONFLICT");
    let rest = client.until_complete().await;
    assert!(names(&rest).contains(&"error"), "{:?}", names(&rest));
    assert_eq!(final_content(&rest), model.reply_text());
}

async fn rename_and_delete_reach_the_members<C: RealtimeClient>() {
    let (server, _model) = TestServer::with_model().await;
    let (status, created) = server
        .post("/api/chat", json!({"message": "original title"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let id = created["conversation"]["id"].as_str().unwrap().to_owned();
    let mut member = C::connect(server.addr()).await;
    member.join(&id).await;

    let (status, renamed) = server
        .call(
            "PATCH",
            &format!("/api/conversations/{id}"),
            Some(json!({"title": "New name"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(renamed["title"], "New name");
    assert_eq!(
        member.next().await,
        (
            "conversation_updated".to_owned(),
            json!({"conversationId": id, "title": "New name", "updatedAt": renamed["updatedAt"]})
        )
    );
    assert_eq!(
        server.get(&format!("/api/conversations/{id}")).await.1["title"],
        "New name"
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
}

async fn a_silent_model_sends_heartbeats<C: RealtimeClient>() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.conversations.heartbeat_interval = Duration::from_millis(100);
    let server = TestServer::start(config).await;
    model.set_first_delay(Duration::from_millis(500));
    let mut client = C::connect(server.addr()).await;
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
