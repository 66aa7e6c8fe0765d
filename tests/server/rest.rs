//! The REST routes, black-box: a real server, a real HTTP client and a test model server.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Mode, TestServer, config_for, test_config};

fn is_iso_millis(value: &Value) -> bool {
    let text = value.as_str().unwrap_or_default();
    chrono::DateTime::parse_from_rfc3339(text).is_ok() && text.ends_with('Z') && text.len() == 24
}

#[tokio::test]
async fn health_reports_the_original_fields() {
    let server = TestServer::start(test_config()).await;
    let (status, health) = server.get("/api/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "OK");
    assert!(is_iso_millis(&health["timestamp"]));
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    assert!(health["uptime"].is_number());
    assert!(health["memory"]["rss"].as_u64().unwrap() > 0);
    assert_eq!(health["activeConversations"], 0);
}

#[tokio::test]
async fn chat_creates_a_conversation_with_the_model_reply() {
    let (server, model) = TestServer::with_model().await;
    let (status, body) = server
        .post("/api/chat", json!({"message": "Hello there"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let message = &body["message"];
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["content"], model.reply_text());
    assert!(is_iso_millis(&message["timestamp"]));
    let conversation = &body["conversation"];
    let id = conversation["id"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok());
    assert_eq!(message["conversationId"], id);
    assert_eq!(conversation["title"], "Hello there");
    assert!(is_iso_millis(&conversation["createdAt"]));
    let messages = conversation["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["content"], "Hello there");
    assert_eq!(messages[1], *message);

    let (status, fetched) = server.get(&format!("/api/conversations/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetched, *conversation);

    let sent = model.received();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["model"], "test-model");
    assert_eq!(sent[0]["stream"], Value::Null);
    assert_eq!(sent[0]["messages"][0]["role"], "system");
    assert_eq!(
        sent[0]["messages"][0]["content"],
        "You are a helpful assistant."
    );
    assert_eq!(sent[0]["messages"][1]["content"], "Hello there");
}

#[tokio::test]
async fn chat_answers_its_fields_in_the_original_order() {
    let (server, _model) = TestServer::with_model().await;
    let text = reqwest::Client::new()
        .post(server.url("/api/chat"))
        .json(&json!({"message": "Hello there"}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The original's Express writes each object's fields in the order it made them.
    let mut rest = text.as_str();
    for key in [
        r#"{"message":{"id":"#,
        r#","content":"#,
        r#","role":"#,
        r#","timestamp":"#,
        r#","conversationId":"#,
        r#"},"conversation":{"id":"#,
        r#","title":"#,
        r#","messages":[{"id":"#,
        r#","content":"#,
        r#","role":"#,
        r#","timestamp":"#,
        r#","conversationId":"#,
        r#","createdAt":"#,
        r#","updatedAt":"#,
    ] {
        let at = rest
            .find(key)
            .unwrap_or_else(|| panic!("{key} next, in order, in {text}"));
        rest = &rest[at + key.len()..];
    }
}

#[tokio::test]
async fn the_model_receives_the_whole_history() {
    let (server, model) = TestServer::with_model().await;
    let (_, first) = server.post("/api/chat", json!({"message": "one"})).await;
    let id = first["conversation"]["id"].as_str().unwrap().to_owned();
    let (status, second) = server
        .post("/api/chat", json!({"message": "two", "conversationId": id}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        second["conversation"]["messages"].as_array().unwrap().len(),
        4
    );
    let sent = &model.received()[1]["messages"];
    let roles: Vec<_> = sent
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].clone())
        .collect();
    assert_eq!(
        roles,
        [
            json!("system"),
            json!("user"),
            json!("assistant"),
            json!("user")
        ]
    );
    assert_eq!(sent[1]["content"], "one");
    assert_eq!(sent[2]["content"], model.reply_text());
    assert_eq!(sent[3]["content"], "two");
}

#[tokio::test]
async fn long_history_is_trimmed_oldest_first() {
    let model = crate::support::ModelServer::start().await;
    let mut config = config_for(&model);
    config.conversations.context_max_chars = 60;
    let server = TestServer::start(config).await;
    let (_, first) = server
        .post("/api/chat", json!({"message": "a".repeat(40)}))
        .await;
    let id = first["conversation"]["id"].as_str().unwrap().to_owned();
    server
        .post(
            "/api/chat",
            json!({"message": "b".repeat(30), "conversationId": id}),
        )
        .await;
    let sent = &model.received()[1]["messages"];
    let contents: Vec<_> = sent
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(contents.len(), 3, "{contents:?}");
    assert_eq!(contents[0], "You are a helpful assistant.");
    assert_eq!(contents[1], model.reply_text());
    assert_eq!(contents[2], "b".repeat(30));
}

#[tokio::test]
async fn titles_follow_the_fifty_character_rule() {
    let (server, _model) = TestServer::with_model().await;
    let long = "ü".repeat(60);
    let (_, body) = server.post("/api/chat", json!({"message": long})).await;
    assert_eq!(
        body["conversation"]["title"],
        format!("{}...", "ü".repeat(50))
    );
}

#[tokio::test]
async fn listing_is_newest_first_and_pages() {
    let (server, _model) = TestServer::with_model().await;
    let mut ids = Vec::new();
    for text in ["first", "second", "third"] {
        let (_, body) = server.post("/api/chat", json!({"message": text})).await;
        ids.push(body["conversation"]["id"].as_str().unwrap().to_owned());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server
        .post(
            "/api/chat",
            json!({"message": "again", "conversationId": ids[0]}),
        )
        .await;
    let (status, list) = server.get("/api/conversations").await;
    assert_eq!(status, StatusCode::OK);
    let listed: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, [ids[0].clone(), ids[2].clone(), ids[1].clone()]);
    assert_eq!(list[0]["messages"].as_array().unwrap().len(), 4);
    let (_, page) = server.get("/api/conversations?limit=1&offset=1").await;
    assert_eq!(page.as_array().unwrap().len(), 1);
    assert_eq!(page[0]["id"], ids[2]);
    let (status, bad) = server.get("/api/conversations?limit=abc").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(bad["code"], "INVALID_REQUEST");
}

/// Starts a conversation with `message`: the answer, the conversation's id and its path.
async fn chatted(server: &TestServer, message: &str) -> (Value, String, String) {
    let (_, answer) = server.post("/api/chat", json!({"message": message})).await;
    let id = answer["conversation"]["id"].as_str().unwrap().to_owned();
    let path = format!("/api/conversations/{id}");
    (answer, id, path)
}

#[tokio::test]
async fn a_conversation_read_again_shows_every_change_since() {
    let (server, model) = TestServer::with_model().await;
    let (first, id, path) = chatted(&server, "one").await;
    let (_, read) = server.get(&path).await;
    assert_eq!(read, first["conversation"]);
    assert_eq!(server.get(&path).await.1, read, "read twice, the same");

    let (_, second) = server
        .post("/api/chat", json!({"message": "two", "conversationId": id}))
        .await;
    let (_, read) = server.get(&path).await;
    assert_eq!(read, second["conversation"]);
    let contents: Vec<_> = read["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["content"])
        .collect();
    assert_eq!(
        contents,
        ["one", &model.reply_text(), "two", &model.reply_text()]
    );

    let (status, renamed) = server
        .call("PATCH", &path, Some(json!({"title": "renamed"})))
        .await;
    assert_eq!(status, StatusCode::OK, "{renamed}");
    let (_, read) = server.get(&path).await;
    assert_eq!(read["title"], "renamed");
    assert_eq!(read["updatedAt"], renamed["updatedAt"]);
    assert_eq!(read["messages"], second["conversation"]["messages"]);
}

#[tokio::test]
async fn delete_removes_a_conversation() {
    let (server, _model) = TestServer::with_model().await;
    let (_, id, path) = chatted(&server, "bye").await;
    let (status, deleted) = server.call("DELETE", &path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        deleted,
        json!({"message": "Conversation deleted successfully"})
    );
    let (status, missing) = server.get(&path).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(missing["code"], "CONVERSATION_NOT_FOUND");
    let (status, again) = server.call("DELETE", &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(again["code"], "CONVERSATION_NOT_FOUND");
    let (status, chat) = server
        .post("/api/chat", json!({"message": "hi", "conversationId": id}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(chat["code"], "CONVERSATION_NOT_FOUND");
    let (_, list) = server.get("/api/conversations").await;
    assert_eq!(list, json!([]));
}

#[tokio::test]
async fn errors_have_a_message_and_a_code() {
    let (server, _model) = TestServer::with_model().await;
    let cases: Vec<(&str, &str, Option<Value>, StatusCode, &str)> = vec![
        ("GET", "/nowhere", None, StatusCode::NOT_FOUND, "NOT_FOUND"),
        (
            "GET",
            "/api/unknown",
            None,
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
        ),
        (
            "GET",
            "/api/chat",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
        ),
        (
            "PUT",
            "/api/conversations",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
        ),
        (
            "POST",
            "/api/health",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
        ),
        (
            "POST",
            "/api/chat",
            Some(json!({})),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            "POST",
            "/api/chat",
            Some(json!({"message": ""})),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            "POST",
            "/api/chat",
            Some(json!({"message": " \n\t"})),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            "POST",
            "/api/chat",
            Some(json!({"message": 42})),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            "POST",
            "/api/chat",
            Some(json!(["message"])),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            "POST",
            "/api/chat",
            Some(json!({"message": "hi", "conversationId": 7})),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            "POST",
            "/api/chat",
            Some(json!({"message": "hi", "conversationId": "no spaces"})),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            "POST",
            "/api/chat",
            Some(json!({"message": "hi", "conversationId": "unknown"})),
            StatusCode::NOT_FOUND,
            "CONVERSATION_NOT_FOUND",
        ),
        (
            "GET",
            "/api/conversations/unknown",
            None,
            StatusCode::NOT_FOUND,
            "CONVERSATION_NOT_FOUND",
        ),
        (
            "GET",
            "/api/conversations/bad%20id",
            None,
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            "DELETE",
            "/api/conversations/unknown",
            None,
            StatusCode::NOT_FOUND,
            "CONVERSATION_NOT_FOUND",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let (got, answer) = server.call(method, path, body.clone()).await;
        assert_eq!(got, status, "{method} {path} {body:?}: {answer}");
        assert_eq!(answer["code"], code, "{method} {path}");
        assert!(
            answer["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
    }
    let (_, empty) = server.post("/api/chat", json!({"message": ""})).await;
    assert_eq!(empty["message"], "Message is required");
}

#[tokio::test]
async fn malformed_json_is_a_bad_request() {
    let (server, _model) = TestServer::with_model().await;
    let response = server
        .http
        .post(server.url("/api/chat"))
        .header("content-type", "application/json")
        .body("{\"message\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "INVALID_REQUEST");
}

#[tokio::test]
async fn bodies_over_the_limit_are_refused_at_the_edge() {
    let model = crate::support::ModelServer::start().await;
    let mut config = config_for(&model);
    config.body_limit_bytes = 1000;
    let server = TestServer::start(config).await;
    let body_of = |size: usize| {
        let overhead = r#"{"message":""}"#.len();
        format!(r#"{{"message":"{}"}}"#, "x".repeat(size - overhead))
    };
    let send = |body: String| {
        server
            .http
            .post(server.url("/api/chat"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let at_limit = send(body_of(1000)).await.unwrap();
    assert_eq!(at_limit.status(), StatusCode::OK);
    let over = send(body_of(1001)).await.unwrap();
    assert_eq!(over.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = over.json().await.unwrap();
    assert_eq!(body["code"], "PAYLOAD_TOO_LARGE");

    let chunked = futures::stream::iter(vec![Ok::<_, std::io::Error>(body_of(1001))]);
    let over = server
        .http
        .post(server.url("/api/chat"))
        .body(reqwest::Body::wrap_stream(chunked))
        .send()
        .await
        .unwrap();
    assert_eq!(over.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn message_length_is_limited_in_characters() {
    let model = crate::support::ModelServer::start().await;
    let mut config = config_for(&model);
    config.max_message_chars = 10;
    let server = TestServer::start(config).await;
    let (status, _) = server
        .post("/api/chat", json!({"message": "é".repeat(10)}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = server
        .post("/api/chat", json!({"message": "é".repeat(11)}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "INVALID_REQUEST");
}

#[tokio::test]
async fn a_failing_model_is_a_bad_gateway_and_stores_no_reply() {
    let (server, model) = TestServer::with_model().await;
    let (_, body) = server.post("/api/chat", json!({"message": "first"})).await;
    let id = body["conversation"]["id"].as_str().unwrap().to_owned();
    model.set_mode(Mode::Fail);
    let (status, error) = server
        .post(
            "/api/chat",
            json!({"message": "second", "conversationId": id}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(error["code"], "UPSTREAM_ERROR");
    let (_, conversation) = server.get(&format!("/api/conversations/{id}")).await;
    let messages = conversation["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[2]["content"], "second");
    assert_eq!(messages[2]["role"], "user");
}

#[tokio::test]
async fn a_hanging_model_times_out_as_a_bad_gateway() {
    let model = crate::support::ModelServer::start().await;
    let mut config = config_for(&model);
    config.conversations.upstream_timeout = Duration::from_millis(300);
    let server = TestServer::start(config).await;
    model.set_mode(Mode::Hang);
    let (status, error) = server.post("/api/chat", json!({"message": "hello?"})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(error["code"], "UPSTREAM_ERROR");
}

#[tokio::test]
async fn cors_allows_only_the_frontend_origin() {
    let server = TestServer::start(test_config()).await;
    let allowed = server
        .http
        .get(server.url("/api/health"))
        .header("origin", "http://localhost:8081")
        .send()
        .await
        .unwrap();
    let headers = allowed.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "http://localhost:8081"
    );
    assert_eq!(headers["access-control-allow-credentials"], "true");

    let other = server
        .http
        .get(server.url("/api/health"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    assert!(other.headers().get("access-control-allow-origin").is_none());

    let preflight = server
        .http
        .request(reqwest::Method::OPTIONS, server.url("/api/chat"))
        .header("origin", "http://localhost:8081")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    let headers = preflight.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "http://localhost:8081"
    );
    let methods = headers["access-control-allow-methods"].to_str().unwrap();
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        assert!(methods.contains(method), "{methods}");
    }
    let allowed_headers = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(allowed_headers.contains("content-type") && allowed_headers.contains("authorization"));
}

#[tokio::test]
async fn the_demo_model_answers_offline() {
    let server = TestServer::start(test_config()).await;
    let (status, body) = server
        .post("/api/chat", json!({"message": "Are you there?"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let reply = body["message"]["content"].as_str().unwrap();
    assert!(reply.contains("demo"), "{reply}");
    assert!(reply.contains("OPENAI_API_KEY"), "{reply}");
}

#[tokio::test]
async fn titles_are_checked_at_their_edges() {
    let server = TestServer::start(test_config()).await;
    let (_, created) = server.post("/api/chat", json!({"message": "hi"})).await;
    let id = created["conversation"]["id"].as_str().unwrap().to_owned();
    let path = format!("/api/conversations/{id}");
    let rename = |title: Value| server.call("PATCH", &path, Some(json!({"title": title})));
    assert_eq!(rename(json!("x")).await.0, StatusCode::OK);
    assert_eq!(rename(json!("é".repeat(200))).await.0, StatusCode::OK);
    for bad in [
        json!("é".repeat(201)),
        json!(""),
        json!("   "),
        json!(5),
        Value::Null,
    ] {
        let (status, body) = rename(bad.clone()).await;
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
async fn a_method_not_allowed_names_the_methods_that_are() {
    let server = TestServer::start(test_config()).await;
    for (method, path, allowed) in [
        ("POST", "/api/health", "GET"),
        ("GET", "/api/chat", "POST"),
        ("PUT", "/api/conversations/some-id", "GET, PATCH, DELETE"),
        ("TRACE", "/api/conversations/some-id/stop", "POST"),
        ("DELETE", "/", "GET"),
        ("DELETE", "/api/conversations/", "GET"),
        ("POST", "/api/health/", "GET"),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let answer = server
            .http
            .request(method.clone(), server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(
            answer.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_eq!(answer.headers()["allow"], allowed, "{method} {path}");
    }
    let missing = server
        .http
        .get(server.url("/api/nowhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert!(missing.headers().get("allow").is_none());
}
