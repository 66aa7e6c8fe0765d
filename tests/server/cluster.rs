//! Several nodes, real server processes on loopback ports, sharing one database and one Redis:
//! a client may talk to any node, each conversation has one owner at a time, and its events
//! reach the members on every node, the same, in order, through an owner's death or pause and a
//! Redis that goes away.

use std::time::Duration;

use ai_chat_server::actors::APOLOGY;
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::cluster::{LEASE, PrivateRedis, TestCluster};
use crate::support::{
    ModelServer, RealtimeClient, WAIT, WsClient, assert_whole_reply, final_content,
    over_every_transport, words,
};

over_every_transport!(
    members_on_every_node_get_identical_events,
    a_reply_cut_off_by_its_owners_death_ends_on_the_other_nodes,
);

/// Events until `stream_complete`, within `wait`.
async fn until_complete_within<C: RealtimeClient>(
    client: &mut C,
    wait: Duration,
) -> Vec<(String, Value)> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut events = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let event = client
            .try_next(left)
            .await
            .unwrap_or_else(|| panic!("no stream_complete in time; got {events:?}"));
        let done = event.0 == "stream_complete";
        events.push(event);
        if done {
            return events;
        }
    }
}

async fn members_on_every_node_get_identical_events<C: RealtimeClient>() {
    let model = ModelServer::start().await;
    model.set_reply(words(40), Duration::from_millis(3));
    let cluster = TestCluster::start(3, &model, &[]).await;
    let id = "shared";
    // The first join makes node 0 the owner; the others relay.
    let mut members = Vec::new();
    for i in 0..3 {
        let mut member = C::connect(cluster.addr(i)).await;
        member.join(id).await;
        members.push(member);
    }
    // A connection on node 2 that has not joined asks for the reply, and becomes a member.
    let mut sender = C::connect(cluster.addr(2)).await;
    let ack = sender
        .emit_with_ack(
            "stream_chat",
            json!({"conversationId": id, "message": "hello"}),
        )
        .await;
    assert_eq!(ack["conversationId"], id, "{ack}");
    members.push(sender);
    let mut seen = Vec::new();
    for member in &mut members {
        seen.push(member.until_complete().await);
    }
    assert_whole_reply(&seen[0], id, &words(40).concat());
    for (i, events) in seen.iter().enumerate().skip(1) {
        assert_eq!(events, &seen[0], "member {i} saw other events");
    }
    // Stored once, as every node reads it.
    let (_, stored) = cluster.get(1, &format!("/api/conversations/{id}")).await;
    assert_eq!(stored["messages"].as_array().unwrap().len(), 2, "{stored}");
    assert_eq!(stored["messages"][1]["content"], words(40).concat());
}

#[tokio::test]
async fn stop_rename_and_delete_work_from_any_node() {
    let model = ModelServer::start().await;
    model.set_reply(words(500), Duration::from_millis(20));
    let cluster = TestCluster::start(3, &model, &[]).await;
    let id = "anywhere";
    let mut owner_side = WsClient::connect(cluster.addr(0)).await;
    owner_side.join(id).await;
    let mut relayed = WsClient::connect(cluster.addr(1)).await;
    relayed.join(id).await;
    owner_side
        .emit(
            "stream_chat",
            json!({"conversationId": id, "message": "go"}),
        )
        .await;
    assert_eq!(owner_side.next().await.0, "stream_start");
    assert_eq!(owner_side.next().await.0, "stream_chunk");
    // A connection joining through node 2 mid-reply gets what it missed, then the rest.
    let mut late = WsClient::connect(cluster.addr(2)).await;
    late.join(id).await;
    assert_eq!(late.next().await.0, "stream_start");
    let (name, so_far) = late.next().await;
    assert_eq!(name, "stream_chunk");
    assert!(
        so_far["content"].as_str().unwrap().starts_with("w0 "),
        "{so_far}"
    );
    assert_eq!(so_far["delta"], so_far["content"]);
    late.close().await;

    // Stop through node 2, which neither owns the conversation nor has members of it.
    let (status, stopped) = cluster
        .call(2, "POST", &format!("/api/conversations/{id}/stop"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{stopped}");
    let ended = owner_side.until_complete().await;
    assert_eq!(ended[ended.len() - 2].1["isComplete"], true);
    let deadline = tokio::time::Instant::now() + WAIT;
    while model.dropped_streams() < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the model stream was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = relayed.until_complete().await;
    assert!(seen.ends_with(&ended), "{seen:?}");
    let (_, stored) = cluster.get(2, &format!("/api/conversations/{id}")).await;
    assert_eq!(stored["messages"][1]["status"], "cancelled", "{stored}");

    // Regenerated through node 2: the members on nodes 0 and 1 get the new reply.
    model.set_reply(words(3), Duration::ZERO);
    let (status, regenerated) = cluster
        .call(
            2,
            "POST",
            &format!("/api/conversations/{id}/regenerate"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{regenerated}");
    for member in [&mut owner_side, &mut relayed] {
        let events = member.until_complete().await;
        assert_whole_reply(&events, id, &words(3).concat());
        assert_eq!(events[0].1["messageId"], regenerated["messageId"]);
    }

    // A whole reply asked for through node 2, carried out by the owner.
    let (status, answered) = cluster
        .call(
            2,
            "POST",
            "/api/chat",
            Some(json!({"conversationId": id, "message": "and now?"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answered}");
    assert_eq!(answered["message"]["content"], words(3).concat());
    assert_eq!(
        answered["conversation"]["messages"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    for member in [&mut owner_side, &mut relayed] {
        let events = member.until_complete().await;
        assert_eq!(final_content(&events), words(3).concat());
    }

    // Renamed through node 1, seen by the member on node 0.
    let (status, renamed) = cluster
        .call(
            1,
            "PATCH",
            &format!("/api/conversations/{id}"),
            Some(json!({"title": "Renamed elsewhere"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{renamed}");
    let (name, update) = owner_side.next().await;
    assert_eq!(name, "conversation_updated");
    assert_eq!(update["title"], "Renamed elsewhere");
    assert_eq!(relayed.next().await, (name, update));

    // Deleted through node 2, seen by the members on nodes 0 and 1.
    let (status, _) = cluster
        .call(2, "DELETE", &format!("/api/conversations/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    for member in [&mut owner_side, &mut relayed] {
        assert_eq!(
            member.next().await,
            (
                "conversation_deleted".to_owned(),
                json!({"conversationId": id})
            )
        );
    }
    for i in 0..3 {
        let (status, _) = cluster.get(i, &format!("/api/conversations/{id}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "node {i}");
    }
    // Each node reports its own part: the owner published the events once for node 1, node 2
    // forwarded its requests.
    let published = cluster
        .metric(0, "chat_cluster_events_published_total")
        .await;
    assert!(published >= ended.len() as f64, "{published}");
    assert!(
        cluster
            .metric(2, "chat_cluster_calls_forwarded_total")
            .await
            >= 3.0
    );
    assert_eq!(cluster.metric(1, "chat_cluster_live_nodes").await, 3.0);
}

async fn a_reply_cut_off_by_its_owners_death_ends_on_the_other_nodes<C: RealtimeClient>() {
    let model = ModelServer::start().await;
    let mut cluster = TestCluster::start(3, &model, &[]).await;
    let id = "orphaned";
    let mut on_owner = C::connect(cluster.addr(0)).await;
    on_owner.join(id).await;
    let first = on_owner.chat(id, "hello").await;
    assert_whole_reply(&first, id, &model.reply_text());
    let mut watchers = Vec::new();
    for i in [1, 2] {
        let mut watcher = C::connect(cluster.addr(i)).await;
        watcher.join(id).await;
        watchers.push(watcher);
    }
    model.set_reply(words(400), Duration::from_millis(25));
    on_owner
        .emit(
            "stream_chat",
            json!({"conversationId": id, "message": "tell me a story"}),
        )
        .await;
    for watcher in &mut watchers {
        assert_eq!(watcher.next().await.0, "stream_start");
        for _ in 0..5 {
            assert_eq!(watcher.next().await.0, "stream_chunk");
        }
    }

    cluster.kill(0);
    let killed = tokio::time::Instant::now();
    for watcher in &mut watchers {
        let events = until_complete_within(watcher, LEASE + Duration::from_secs(5)).await;
        let last_chunk = &events[events.len() - 2];
        assert_eq!(last_chunk.0, "stream_chunk", "{events:?}");
        assert_eq!(last_chunk.1["isComplete"], true);
        let content = last_chunk.1["content"].as_str().unwrap();
        assert!(content.ends_with(APOLOGY), "{content}");
        assert!(content.starts_with("w0 "), "{content}");
        assert_eq!(last_chunk.1["delta"], format!("\n\n{APOLOGY}"));
    }
    assert!(
        killed.elapsed() < LEASE + Duration::from_secs(5),
        "{:?}",
        killed.elapsed()
    );

    // The next message, through another node, finds the whole history (a failed reply is
    // never sent back to the model).
    model.set_reply(words(3), Duration::from_millis(1));
    let events = watchers[0].chat(id, "and then?").await;
    assert_whole_reply(&events, id, &words(3).concat());
    let asked = model.received().pop().unwrap();
    let history: Vec<&str> = asked["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    let first_reply = final_content(&first);
    assert_eq!(
        history[1..],
        ["hello", &first_reply, "tell me a story", "and then?"]
    );
    let (_, stored) = cluster.get(2, &format!("/api/conversations/{id}")).await;
    let cut_off = stored["messages"][3]["content"].as_str().unwrap();
    assert!(cut_off.ends_with(APOLOGY), "{stored}");
    assert_eq!(stored["messages"][3]["status"], "error");
}

#[tokio::test]
async fn nodes_racing_to_activate_a_conversation_agree_on_one_owner() {
    let model = ModelServer::start().await;
    model.set_reply(words(3), Duration::ZERO);
    let cluster = TestCluster::start(2, &model, &[]).await;
    let mut clients = [
        WsClient::connect(cluster.addr(0)).await,
        WsClient::connect(cluster.addr(1)).await,
    ];
    const ROUNDS: usize = 20;
    let mut started = 0;
    for round in 0..ROUNDS {
        let id = format!("race-{round}");
        let [first, second] = &mut clients;
        let data = json!({"conversationId": id, "message": "first!"});
        let (a, b) = tokio::join!(
            first.emit_with_ack("stream_chat", data.clone()),
            second.emit_with_ack("stream_chat", data),
        );
        let winners = [&a, &b]
            .iter()
            .filter(|ack| ack["messageId"].is_string())
            .count();
        for ack in [&a, &b] {
            assert!(
                ack["messageId"].is_string() || ack["error"]["code"] == "CONFLICT",
                "{ack}"
            );
        }
        assert!(winners >= 1, "round {round}: {a} {b}");
        started += winners;
        // Each winner sees its own reply through.
        for (client, ack) in clients.iter_mut().zip([&a, &b]) {
            let Some(message_id) = ack["messageId"].as_str() else {
                continue;
            };
            until_complete(client, message_id).await;
        }
        // Both starts that won are stored once each, whichever node took them.
        let path = format!("/api/conversations/{id}");
        let stored: Vec<Value> = join_all((0..2).map(|i| cluster.get(i, &path)))
            .await
            .into_iter()
            .map(|(_, c)| c)
            .collect();
        assert_eq!(stored[0], stored[1]);
        let messages = stored[0]["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 2 * winners, "{}", stored[0]);
        for pair in messages.chunks(2) {
            assert_eq!(pair[0]["content"], "first!");
            assert_eq!(pair[1]["status"], "complete");
        }
    }
    assert!(started >= ROUNDS);
    // One actor per conversation over the whole cluster.
    assert_eq!(cluster.active_conversations().await, ROUNDS as u64);
}

#[tokio::test]
async fn a_paused_owner_whose_lease_was_taken_cannot_write() {
    let model = ModelServer::start().await;
    model.set_reply(words(200), Duration::from_millis(30));
    let cluster = TestCluster::start(2, &model, &[]).await;
    let id = "paused";
    let mut client = WsClient::connect(cluster.addr(0)).await;
    client
        .emit(
            "stream_chat",
            json!({"conversationId": id, "message": "first"}),
        )
        .await;
    for _ in 0..4 {
        client.next().await;
    }

    cluster.pause(0);
    tokio::time::sleep(LEASE * 2).await;
    model.set_reply(words(2), Duration::ZERO);
    let (status, answer) = cluster
        .call(
            1,
            "POST",
            "/api/chat",
            Some(json!({"conversationId": id, "message": "second"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, successor) = cluster.get(1, &format!("/api/conversations/{id}")).await;
    let messages = successor["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4, "{successor}");
    assert!(
        messages[1]["content"].as_str().unwrap().ends_with(APOLOGY),
        "{successor}"
    );
    assert_eq!(messages[1]["status"], "error");
    assert_eq!(messages[3]["content"], words(2).concat());

    // The paused owner wakes up with its reply still streaming in: whatever it tries to write
    // is refused, and the successor's conversation stands.
    cluster.resume(0);
    tokio::time::sleep(LEASE * 2).await;
    for i in 0..2 {
        let (status, now) = cluster.get(i, &format!("/api/conversations/{id}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(now, successor, "node {i}");
    }
    let logged = cluster.logged(0).join("\n");
    assert!(
        logged.contains("another node owns the conversation now")
            || logged.contains("claimed by a newer writer"),
        "{logged}"
    );
}

#[tokio::test]
async fn redis_going_away_fails_fast_and_loses_nothing() {
    let model = ModelServer::start().await;
    model.set_reply(words(2), Duration::ZERO);
    let mut redis = PrivateRedis::start().await;
    let cluster = TestCluster::start_on(2, &model, &redis.url(), &[]).await;
    let mut acknowledged = Vec::new();
    let chat = async |node: usize| {
        let started = tokio::time::Instant::now();
        let (status, answer) = cluster
            .call(node, "POST", "/api/chat", Some(json!({"message": "hi"})))
            .await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        (status, answer)
    };
    for node in [0, 1, 0, 1] {
        let (status, answer) = chat(node).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        acknowledged.push(answer["conversation"]["id"].as_str().unwrap().to_owned());
    }

    redis.stop();
    let mut unavailable = 0;
    for node in [0, 1, 0, 1, 0, 1] {
        let (status, answer) = chat(node).await;
        match status {
            StatusCode::OK => {
                acknowledged.push(answer["conversation"]["id"].as_str().unwrap().to_owned())
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(answer["code"], "UNAVAILABLE");
                unavailable += 1;
            }
            other => panic!("{other}: {answer}"),
        }
    }
    assert!(unavailable > 0);

    redis.start_again().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    for node in [0, 1] {
        loop {
            let (status, answer) = chat(node).await;
            if status == StatusCode::OK {
                acknowledged.push(answer["conversation"]["id"].as_str().unwrap().to_owned());
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {node} never came back"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for id in &acknowledged {
        for node in [0, 1] {
            let (status, stored) = cluster.get(node, &format!("/api/conversations/{id}")).await;
            assert_eq!(status, StatusCode::OK, "{id} on node {node}");
            let messages = stored["messages"].as_array().unwrap();
            assert_eq!(messages.len(), 2, "{stored}");
            assert_eq!(messages[1]["content"], words(2).concat());
        }
    }
}

#[tokio::test]
async fn a_relay_that_misses_events_catches_up_from_the_owner() {
    let model = ModelServer::start().await;
    let reply = words(120);
    model.set_reply(reply.clone(), Duration::from_millis(15));
    let redis = PrivateRedis::start().await;
    let cluster = TestCluster::start_on(2, &model, &redis.url(), &[]).await;
    let id = "gaps";
    let mut on_owner = WsClient::connect(cluster.addr(0)).await;
    on_owner.join(id).await;
    let mut relayed = WsClient::connect(cluster.addr(1)).await;
    relayed.join(id).await;
    on_owner
        .emit(
            "stream_chat",
            json!({"conversationId": id, "message": "go"}),
        )
        .await;
    for _ in 0..5 {
        relayed.next().await;
    }
    // Every node's subscriptions drop for a moment: what is published meanwhile never reaches
    // the relaying node.
    let mut connection = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert!(killed >= 2, "{killed}");
    let whole = reply.concat();
    let owner_side = on_owner.until_complete().await;
    assert_whole_reply(&owner_side, id, &whole);
    let rest = relayed.until_complete().await;
    // Nothing lost, nothing twice: the text the relayed member saw adds up to the reply.
    assert_eq!(final_content(&rest), whole);
    let seen: String = crate::support::deltas(&rest);
    assert!(whole.ends_with(&seen), "{seen}");
    let seqs = crate::support::seqs(&rest);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

#[tokio::test]
async fn a_users_daily_tokens_count_over_every_node() {
    let model = ModelServer::start().await;
    model.set_reply(words(4), Duration::ZERO);
    // Each reply costs its prompt's messages and its four pieces, as the test model reports.
    let cluster = TestCluster::start(2, &model, &[("USER_DAILY_TOKENS", "12".into())]).await;
    let chat = async |node: usize| {
        cluster
            .call(node, "POST", "/api/chat", Some(json!({"message": "hi"})))
            .await
    };
    for node in [0, 1] {
        let (status, answer) = chat(node).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    for node in [0, 1] {
        let (status, answer) = chat(node).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
        assert_eq!(answer["code"], "QUOTA_EXCEEDED");
    }
}

#[tokio::test]
async fn a_sender_that_never_joined_gets_its_reply_from_the_owner_node() {
    let model = ModelServer::start().await;
    model.set_reply(words(3), Duration::ZERO);
    let cluster = TestCluster::start(2, &model, &[]).await;
    let mut owner_side = WsClient::connect(cluster.addr(0)).await;
    let mut other_side = WsClient::connect(cluster.addr(1)).await;
    let data = json!({"conversationId": "far", "message": "first"});
    let ack = owner_side.emit_with_ack("stream_chat", data).await;
    let first = ack["messageId"]
        .as_str()
        .expect("the first reply starts")
        .to_owned();
    until_complete(&mut owner_side, &first).await;
    // The conversation lives on node 0; a client of node 1 that never joined it writes there.
    let data = json!({"conversationId": "far", "message": "second"});
    let ack = other_side.emit_with_ack("stream_chat", data).await;
    let second = ack["messageId"]
        .as_str()
        .unwrap_or_else(|| panic!("{ack}"))
        .to_owned();
    until_complete(&mut other_side, &second).await;
    let (_, stored) = cluster.get(1, "/api/conversations/far").await;
    assert_eq!(stored["messages"].as_array().unwrap().len(), 4, "{stored}");
}

/// Reads `client`'s events until `message_id`'s reply completes.
async fn until_complete(client: &mut WsClient, message_id: &str) {
    loop {
        let (name, data) = client.next().await;
        if name == "stream_complete" && data["messageId"] == message_id {
            return;
        }
    }
}
