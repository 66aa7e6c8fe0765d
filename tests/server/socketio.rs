//! What only Socket.IO does, black-box, with the real `socket.io-client` 4.x: the handshake,
//! polling and the upgrade, CORS of polling, a full buffer, shutdown, the connection cap; and
//! Socket.IO and `/ws` members of one conversation side by side.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, CONTENT_TYPE, ORIGIN,
};
use serde_json::{Value, json};

use crate::support::socketio::SioClient;
use crate::support::{
    ModelServer, RealtimeClient, TestServer, WAIT, WsClient, assert_whole_reply, chunks,
    config_for, eventually, final_content, names, pieces_of, seqs, words, ws_handshake,
};

fn websocket_only() -> Value {
    json!({"transports": ["websocket"]})
}

#[tokio::test]
async fn the_default_client_polls_then_upgrades_and_streams_in_order() {
    let (server, model) = TestServer::with_model().await;
    let mut client = SioClient::connect(server.addr()).await;
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
    let mut client = SioClient::connect_with(server.addr(), websocket_only()).await;
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
    let mut sio = SioClient::connect(server.addr()).await;
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
async fn an_event_without_data_gets_an_error_and_the_socket_stays() {
    let (server, _model) = TestServer::with_model().await;
    let mut client = SioClient::connect(server.addr()).await;
    client.emit_args("stream_chat", vec![]).await;
    let (name, data) = client.next().await;
    assert_eq!(name, "error");
    assert_eq!(data["code"], "INVALID_REQUEST");
    let events = client.chat("still-open", "works").await;
    assert_eq!(names(&events)[0], "stream_start");
    assert_eq!(client.disconnect_reason, None);
}

#[tokio::test]
async fn a_thousand_token_reply_reaches_a_polling_client_whole() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    // A thousand chunks of a growing reply take seconds on a busy machine; the whole reply's
    // time limit is not what this test is about.
    config.conversations.upstream_timeout = Duration::from_secs(60);
    let server = TestServer::start(config).await;
    let pieces: Vec<String> = (0..1000).map(|i| format!("token{i} ")).collect();
    model.set_reply(pieces, Duration::ZERO);
    let mut client =
        SioClient::connect_with(server.addr(), json!({"transports": ["polling"]})).await;
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
            let mut client = SioClient::connect_with(addr, json!({"transports": transports})).await;
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
    let mut polling =
        SioClient::connect_with(server.addr(), json!({"transports": ["polling"]})).await;
    let mut websocket = SioClient::connect_with(server.addr(), websocket_only()).await;
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
#[tokio::test]
async fn a_stop_looks_the_same_to_socket_io_and_ws_members() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(100), Duration::from_millis(30));
    let mut sio = SioClient::connect(server.addr()).await;
    sio.emit_with_ack("join_conversation", json!({"conversationId": "both"}))
        .await;
    let mut ws = server.ws().await;
    ws.emit(
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

#[tokio::test]
async fn socket_io_connections_per_address_are_capped() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.max_connections_per_ip = 2;
    let server = TestServer::start(config).await;
    let first = SioClient::connect_with(server.addr(), websocket_only()).await;
    let mut second = SioClient::connect(server.addr()).await;
    second
        .emit_with_ack("join_conversation", json!({"conversationId": "kept"}))
        .await;

    // A third one, on its default transport (polling first), is told why and disconnected.
    let mut third = SioClient::connect(server.addr()).await;
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
    first.close().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let events = loop {
        let mut next = SioClient::connect_with(server.addr(), websocket_only()).await;
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

/// A raw websocket at `/socket.io/`, opened without polling first, speaking the packets
/// themselves: what the protocol says of the handshake, namespaces, events and acknowledgements,
/// and what the server answers to packets it cannot handle.
struct RawSocket(
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
);

impl RawSocket {
    async fn open(server: &TestServer) -> RawSocket {
        RawSocket::at(server, "").await
    }

    /// A websocket upgrading the polling session `sid`.
    async fn upgrading(server: &TestServer, sid: &str) -> RawSocket {
        RawSocket::at(server, &format!("&sid={sid}")).await
    }

    async fn at(server: &TestServer, query: &str) -> RawSocket {
        let url = format!(
            "ws://{}/socket.io/?EIO=4&transport=websocket{query}",
            server.addr()
        );
        let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        RawSocket(socket)
    }

    /// A socket opened and connected to the main namespace.
    async fn connected(server: &TestServer) -> RawSocket {
        let mut socket = RawSocket::open(server).await;
        socket.expect("0").await;
        socket.send("40").await;
        socket.expect("40").await;
        socket
    }

    async fn send(&mut self, packet: &str) {
        use futures::SinkExt;
        self.0.send(packet.into()).await.unwrap();
    }

    /// The next text packet; `None` once the socket is closed.
    async fn next(&mut self) -> Option<String> {
        use futures::StreamExt;
        loop {
            let frame = tokio::time::timeout(WAIT, self.0.next())
                .await
                .expect("a packet");
            match frame {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) => {
                    return Some(text.to_string());
                }
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_)) | Err(_)) | None => {
                    return None;
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// Sends an event with the acknowledgement id `id`, and returns its acknowledgement's
    /// arguments.
    async fn call(&mut self, id: u32, event: &str, data: Value) -> Value {
        self.send(&format!("42{id}{}", json!([event, data]))).await;
        self.expect(&format!("43{id}")).await
    }

    /// The payload of a packet that starts with `prefix`.
    async fn expect(&mut self, prefix: &str) -> Value {
        let packet = self.next().await.expect("the socket is open");
        let payload = packet
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{packet} does not start with {prefix}"));
        serde_json::from_str(payload).unwrap_or(Value::Null)
    }
}

#[tokio::test]
async fn a_websocket_opened_directly_speaks_the_protocol() {
    let (server, _model) = TestServer::with_model().await;
    let mut socket = RawSocket::open(&server).await;
    let open = socket.expect("0").await;
    assert!(open["sid"].as_str().is_some_and(|sid| !sid.is_empty()));
    assert_eq!(open["upgrades"], json!([]));
    assert_eq!(open["pingInterval"], 25_000);
    assert_eq!(open["pingTimeout"], 20_000);

    // Only the main namespace exists; the socket may still connect to it afterwards.
    socket.send("40/admin,").await;
    let refused = socket.expect("44/admin,").await;
    assert_eq!(refused["message"], "Invalid namespace");
    socket.send("40").await;
    let connected = socket.expect("40").await;
    assert!(connected["sid"].as_str().is_some());

    // An event with an acknowledgement id gets its acknowledgement.
    let joined = socket.call(7, "join_conversation", json!({"conversationId": "raw"}));
    assert_eq!(joined.await, json!([{"conversationId": "raw"}]));
    // An answered client ping, and a client's pong, which needs no answer.
    socket.send("2").await;
    assert_eq!(socket.next().await.as_deref(), Some("3"));
    socket.send("3").await;

    // What cannot be handled is answered with an `error` event, and the socket stays.
    for (packet, fragment) in [
        (r#"42["stream_chat""#, "JSON array"),
        (r#"42[7,{}]"#, "name"),
        (
            r#"451-["stream_chat",{"_placeholder":true,"num":0}]"#,
            "Binary",
        ),
        ("49", "Unknown"),
    ] {
        socket.send(packet).await;
        let error = socket.expect("42").await;
        assert_eq!(error[0], "error", "{packet}");
        assert_eq!(error[1]["code"], "INVALID_REQUEST", "{packet}");
        let message = error[1]["message"].as_str().unwrap();
        assert!(message.contains(fragment), "{packet}: {message}");
    }
    // An event without an acknowledgement id that fails is answered with the error alone.
    socket.send(r#"42["stream_chat",{"message":""}]"#).await;
    let error = socket.expect("42").await;
    assert_eq!(error[1]["code"], "INVALID_REQUEST");
    // Events of a namespace the socket is not connected to are ignored.
    socket
        .send(r#"42/admin,["stream_chat",{"message":"hi"}]"#)
        .await;
    let left = socket.call(8, "leave_conversation", json!({"conversationId": "raw"}));
    assert_eq!(left.await, json!([{"conversationId": "raw"}]));

    // The client's disconnect closes the connection.
    socket.send("41").await;
    assert_eq!(socket.next().await, None);
    server
        .wait_for_health(|h| h["activeConnections"] == 0)
        .await;
}

#[tokio::test]
async fn a_websocket_opened_directly_is_pinged_and_closed_when_it_stops_answering() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.ws_ping_interval = Duration::from_millis(200);
    config.ws_ping_timeout = Duration::from_millis(300);
    let server = TestServer::start(config).await;
    let mut socket = RawSocket::open(&server).await;
    let open = socket.expect("0").await;
    assert_eq!(open["pingInterval"], 200);
    socket.send("40").await;
    socket.expect("40").await;
    // Answered pings keep it open.
    for _ in 0..3 {
        assert_eq!(socket.next().await.as_deref(), Some("2"));
        socket.send("3").await;
    }
    // An unanswered one ends it.
    assert_eq!(socket.next().await.as_deref(), Some("2"));
    assert_eq!(socket.next().await, None);
}

#[tokio::test]
async fn a_websocket_that_never_connects_to_a_namespace_is_not_a_member_of_anything() {
    let (server, _model) = TestServer::with_model().await;
    let mut socket = RawSocket::open(&server).await;
    socket.expect("0").await;
    // Events before the connect are not handled: the socket has no user yet.
    socket
        .send(r#"421["join_conversation",{"conversationId":"early"}]"#)
        .await;
    socket.send("40").await;
    socket.expect("40").await;
    let joined = socket.call(2, "join_conversation", json!({"conversationId": "early"}));
    assert_eq!(joined.await, json!([{"conversationId": "early"}]));
}

#[tokio::test]
async fn a_websocket_opened_directly_over_the_cap_is_told_why_and_disconnected() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.max_connections_per_ip = 1;
    let server = TestServer::start(config).await;
    let _first = RawSocket::connected(&server).await;
    let mut second = RawSocket::connected(&server).await;
    let error = second.expect("42").await;
    assert_eq!(error[0], "error");
    assert_eq!(error[1]["code"], "RATE_LIMIT_EXCEEDED");
    assert_eq!(second.next().await.as_deref(), Some("41"));
    assert_eq!(second.next().await, None);
}

/// A raw long-polling session at `/socket.io/`: each `GET` takes the server's packets, each
/// `POST` sends the client's, as Engine.IO's own protocol test suite drives a server.
struct RawPolling {
    http: reqwest::Client,
    url: String,
    sid: String,
}

impl RawPolling {
    /// A session opened by its handshake, and the handshake's open packet.
    async fn open(server: &TestServer) -> (RawPolling, Value) {
        let handshake = server.url("/socket.io/?EIO=4&transport=polling");
        let response = server.http.get(&handshake).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.text().await.unwrap();
        let open: Value = serde_json::from_str(body.strip_prefix('0').unwrap()).unwrap();
        let sid = open["sid"].as_str().unwrap().to_owned();
        let polling = RawPolling {
            http: server.http.clone(),
            url: format!("{handshake}&sid={sid}"),
            sid,
        };
        (polling, open)
    }

    /// A session connected to the main namespace.
    async fn connected(server: &TestServer) -> RawPolling {
        let (polling, _) = RawPolling::open(server).await;
        assert_eq!(polling.post("40").await, (StatusCode::OK, "ok".into()));
        let (status, connected) = polling.get().await;
        assert_eq!(status, StatusCode::OK);
        assert!(connected.starts_with("40{\"sid\":"), "{connected}");
        polling
    }

    async fn get(&self) -> (StatusCode, String) {
        let response = tokio::time::timeout(WAIT, self.http.get(&self.url).send())
            .await
            .expect("a poll answered in time")
            .unwrap();
        (response.status(), response.text().await.unwrap())
    }

    async fn post(&self, payload: &str) -> (StatusCode, String) {
        let response = self
            .http
            .post(&self.url)
            .body(payload.to_owned())
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    }
}

/// An Engine.IO error's status and numeric code.
async fn engine_error(response: reqwest::Response) -> (StatusCode, u64) {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    (status, body["code"].as_u64().unwrap())
}

#[tokio::test]
async fn long_polling_speaks_the_protocol() {
    let (server, _model) = TestServer::with_model().await;
    let (polling, open) = RawPolling::open(&server).await;
    assert_eq!(open["upgrades"], json!(["websocket"]));
    assert_eq!(open["pingInterval"], 25_000);
    assert_eq!(open["pingTimeout"], 20_000);
    assert_eq!(open["maxPayload"], 1_048_576);

    // Engine.IO's refusals, in its own words.
    let http = &server.http;
    for (method, query, status, code) in [
        ("GET", "EIO=4", StatusCode::BAD_REQUEST, 0),
        (
            "GET",
            "EIO=4&transport=carrier-pigeon",
            StatusCode::BAD_REQUEST,
            0,
        ),
        (
            "GET",
            "EIO=4&transport=polling&sid=nope",
            StatusCode::BAD_REQUEST,
            1,
        ),
        (
            "POST",
            "EIO=4&transport=polling",
            StatusCode::BAD_REQUEST,
            2,
        ),
        ("GET", "transport=polling", StatusCode::BAD_REQUEST, 5),
        ("GET", "EIO=3&transport=polling", StatusCode::BAD_REQUEST, 5),
    ] {
        let url = server.url(&format!("/socket.io/?{query}"));
        let request = http.request(method.parse().unwrap(), url);
        let answer = engine_error(request.send().await.unwrap()).await;
        assert_eq!(answer, (status, code), "{method} {query}");
    }

    // Several packets in one payload, answered in one.
    assert_eq!(polling.post("40\u{1e}2").await.1, "ok");
    let (_, answer) = polling.get().await;
    let packets: Vec<&str> = answer.split('\u{1e}').collect();
    assert_eq!(packets.len(), 2, "{answer}");
    assert!(packets[0].starts_with("40{"), "{answer}");
    assert_eq!(packets[1], "3");
    let join = r#"421["join_conversation",{"conversationId":"polled"}]"#;
    polling.post(join).await;
    assert_eq!(polling.get().await.1, r#"431[{"conversationId":"polled"}]"#);

    // A client's close ends the session: the poll waiting gets a noop, later ones are refused.
    let waiting = polling.get();
    let closing = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        polling.post("1").await
    };
    let ((status, answer), _) = tokio::join!(waiting, closing);
    assert_eq!((status, answer.as_str()), (StatusCode::OK, "6"));
    assert_eq!(polling.get().await.0, StatusCode::BAD_REQUEST);
    server
        .wait_for_health(|h| h["activeConnections"] == 0)
        .await;
}

#[tokio::test]
async fn a_polling_session_ends_on_two_polls_at_once_a_bad_packet_or_a_payload_too_large() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.ws_max_frame_bytes = 1000;
    let server = TestServer::start(config).await;

    let polling = RawPolling::connected(&server).await;
    let first = polling.get();
    let second = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        polling.get().await
    };
    let ((status, answer), (second_status, _)) = tokio::join!(first, second);
    assert_eq!((status, answer.as_str()), (StatusCode::OK, "1"));
    assert_eq!(second_status, StatusCode::BAD_REQUEST);
    assert_eq!(polling.get().await.0, StatusCode::BAD_REQUEST);

    let polling = RawPolling::connected(&server).await;
    assert_eq!(polling.post("abc").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(polling.get().await.0, StatusCode::BAD_REQUEST);

    let polling = RawPolling::connected(&server).await;
    let at_the_limit = format!(r#"42["noop","{}"]"#, "x".repeat(1000 - 13));
    assert_eq!(at_the_limit.len(), 1000);
    assert_eq!(polling.post(&at_the_limit).await.0, StatusCode::OK);
    let over = format!("{at_the_limit} ");
    assert_eq!(polling.post(&over).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(polling.get().await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_polling_session_is_pinged_and_ends_when_it_stops_answering() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.ws_ping_interval = Duration::from_millis(200);
    config.ws_ping_timeout = Duration::from_millis(300);
    let server = TestServer::start(config).await;
    // Before and after connecting to the namespace.
    let (polling, open) = RawPolling::open(&server).await;
    assert_eq!(open["pingInterval"], 200);
    for _ in 0..2 {
        assert_eq!(polling.get().await.1, "2");
        polling.post("3").await;
    }
    polling.post("40").await;
    assert!(polling.get().await.1.starts_with("40"));
    for _ in 0..2 {
        assert_eq!(polling.get().await.1, "2");
        polling.post("3").await;
    }
    assert_eq!(polling.get().await.1, "2");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(polling.get().await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_polling_session_upgrades_and_its_waiting_packets_come_first_on_the_websocket() {
    let (server, _model) = TestServer::with_model().await;
    let polling = RawPolling::connected(&server).await;
    let mut socket = RawSocket::upgrading(&server, &polling.sid).await;
    socket.send("2probe").await;
    assert_eq!(socket.next().await.as_deref(), Some("3probe"));
    // The poll waiting is let go with a noop, for the client to complete the upgrade.
    assert_eq!(polling.get().await, (StatusCode::OK, "6".into()));
    // An acknowledgement the client has not polled for goes over the websocket, first.
    let join = r#"421["join_conversation",{"conversationId":"moved"}]"#;
    polling.post(join).await;
    socket.send("5").await;
    socket.expect("431").await;
    let joined = socket.call(2, "join_conversation", json!({"conversationId": "moved"}));
    assert_eq!(joined.await, json!([{"conversationId": "moved"}]));

    // The session is on the websocket now: polling is refused, another upgrade closed at once.
    assert_eq!(polling.get().await.0, StatusCode::BAD_REQUEST);
    let mut again = RawSocket::upgrading(&server, &polling.sid).await;
    assert_eq!(again.next().await, None);
    let left = socket.call(3, "leave_conversation", json!({"conversationId": "moved"}));
    assert_eq!(left.await, json!([{"conversationId": "moved"}]));
}
