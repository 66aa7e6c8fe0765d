//! Hostile input, property-based: arbitrary bytes and arbitrary JSON as REST bodies and as
//! WebSocket frames get a 4xx (never a 5xx) or an `error` event or a close, and the server goes
//! on serving everyone.

use std::cell::Cell;

use futures::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use tokio::runtime::Runtime;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{RealtimeClient, TestServer, WAIT, names, test_config};

/// Cases per property: enough variety, still quick on two cores.
const CASES: u32 = 96;

/// The event the WebSocket test sends after each hostile frame: its `error` answer shows the
/// connection is still served.
const PROBE: &str = "__probe__";

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    })
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Any JSON, with the field names and event names the server knows turning up often.
fn json_value() -> BoxedStrategy<Value> {
    let known = [
        "message",
        "conversationId",
        "title",
        "event",
        "data",
        "messageId",
        "seq",
    ];
    let key = prop_oneof![
        proptest::sample::select(known.to_vec()).prop_map(str::to_owned),
        any::<String>(),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        "[a-zA-Z0-9_-]{1,12}".prop_map(Value::String),
        event_name().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
    .boxed()
}

fn event_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(vec![
            "join_conversation",
            "leave_conversation",
            "stream_chat",
            "stop_generation",
            "regenerate",
        ])
        .prop_map(str::to_owned),
        1 => any::<String>(),
    ]
}

/// An object shaped like a real payload, with any JSON in its fields.
fn shaped() -> impl Strategy<Value = Value> {
    (json_value(), json_value(), json_value()).prop_map(
        |(message, id, title)| json!({"message": message, "conversationId": id, "title": title}),
    )
}

/// A payload that is nearly or wholly valid: any text, an id that may exist, a resume point.
fn plausible() -> impl Strategy<Value = Value> {
    (
        any::<String>(),
        prop::option::of("[a-zA-Z0-9_-]{1,12}"),
        prop::option::of(("[a-z0-9-]{1,36}", any::<u64>())),
    )
        .prop_map(|(text, id, resume)| {
            let mut payload = json!({"message": text, "title": text});
            if let Some(id) = id {
                payload["conversationId"] = id.into();
            }
            if let Some((message_id, seq)) = resume {
                payload["messageId"] = message_id.into();
                payload["seq"] = seq.into();
            }
            payload
        })
}

/// A request body: arbitrary bytes, any JSON document, or an object shaped like a real one.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        shaped().prop_map(|v| v.to_string().into_bytes()),
        plausible().prop_map(|v| v.to_string().into_bytes()),
    ]
}

#[test]
fn hostile_rest_bodies_get_client_errors_and_the_server_goes_on() {
    let runtime = runtime();
    let server = runtime.block_on(TestServer::start(test_config()));
    let (_, created) = runtime.block_on(server.post("/api/chat", json!({"message": "target"})));
    let existing = created["conversation"]["id"].as_str().unwrap().to_owned();
    let target = prop_oneof![
        Just(("POST", "/api/chat".to_owned())),
        Just(("PATCH", format!("/api/conversations/{existing}"))),
        "[a-zA-Z0-9_.~-]{1,40}".prop_map(|id| ("PATCH", format!("/api/conversations/{id}"))),
    ];
    runner()
        .run(&(target, body()), |((method, path), body)| {
            runtime.block_on(async {
                let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
                let request = server
                    .http
                    .request(method, server.url(&path))
                    .header("content-type", "application/json")
                    .body(body)
                    .send();
                let response = tokio::time::timeout(WAIT, request)
                    .await
                    .expect("an answer in time")
                    .expect("an answer");
                let status = response.status();
                assert!(!status.is_server_error(), "{status} for {path}");
                if status.is_client_error() {
                    let error: Value = response.json().await.expect("a JSON error");
                    assert!(error["code"].is_string() && error["message"].is_string());
                }
            });
            Ok(())
        })
        .unwrap();
    runtime.block_on(still_serving(&server));
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &TestServer) -> Socket {
    let url = format!("ws://{}/ws", server.addr());
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// The data of an event: any JSON, a shaped object, or (most often) a plausible payload.
fn event_data() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => json_value(),
        1 => shaped().boxed(),
        2 => plausible().boxed(),
    ]
}

/// A WebSocket frame: text holding any string, any JSON or an event-shaped object, or binary.
fn frame() -> impl Strategy<Value = Message> {
    prop_oneof![
        1 => any::<String>().prop_map(Message::text),
        1 => json_value().prop_map(|v| Message::text(v.to_string())),
        3 => (event_name(), event_data()).prop_map(|(event, data)| {
            Message::text(json!({"event": event, "data": data}).to_string())
        }),
        1 => prop::collection::vec(any::<u8>(), 0..512).prop_map(Message::binary),
    ]
}

/// Sends `frame` and then the probe; true when the probe's `error` came back, false when the
/// server closed the connection instead. Fails on a 5xx-like error or when nothing comes.
async fn survives(socket: &mut Socket, frame: Message) -> bool {
    let probe = Message::text(json!({"event": PROBE}).to_string());
    if socket.send(frame).await.is_err() || socket.send(probe).await.is_err() {
        return false;
    }
    loop {
        let next = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("the server answers in time");
        let text = match next {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return false,
            Some(Ok(_)) => continue,
        };
        let value: Value = serde_json::from_str(&text).expect("frames are JSON");
        if value["event"] == "error" {
            assert_ne!(value["data"]["code"], "INTERNAL_ERROR", "{value}");
            if value["data"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(PROBE))
            {
                return true;
            }
        }
    }
}

#[test]
fn hostile_websocket_frames_get_errors_or_a_close_and_the_server_goes_on() {
    let runtime = runtime();
    let mut config = test_config();
    config.max_joined_conversations = 1000;
    let server = runtime.block_on(TestServer::start(config));
    let socket = Cell::new(Some(runtime.block_on(connect(&server))));
    runner()
        .run(&frame(), |frame| {
            runtime.block_on(async {
                let mut current = socket.take().expect("a connection");
                if !survives(&mut current, frame).await {
                    current = connect(&server).await;
                }
                socket.set(Some(current));
            });
            Ok(())
        })
        .unwrap();
    runtime.block_on(still_serving(&server));
}

/// Health answers and a new client gets a whole reply.
async fn still_serving(server: &TestServer) {
    let (status, health) = server.get("/api/health").await;
    assert!(status.is_success(), "{health}");
    let mut client = server.ws().await;
    let events = client.chat("after-the-storm", "still there?").await;
    assert_eq!(names(&events)[0], "stream_start");
}
