//! The API document and its browsable reference, black-box: the document is served, is OpenAPI
//! 3.1, names every route the server answers, and describes what the server really sends.

use std::collections::BTreeSet;

use crate::support::{RealtimeClient, TestServer, test_config};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Every route the server answers, as (method, path template): a route added to the server is
/// added here, and then fails this test until the document describes it.
const ROUTES: [(&str, &str); 16] = [
    ("get", "/api/health"),
    ("post", "/api/auth/register"),
    ("post", "/api/auth/login"),
    ("get", "/api/me"),
    ("post", "/api/chat"),
    ("get", "/api/conversations"),
    ("get", "/api/conversations/{id}"),
    ("delete", "/api/conversations/{id}"),
    ("patch", "/api/conversations/{id}"),
    ("post", "/api/conversations/{id}/stop"),
    ("post", "/api/conversations/{id}/regenerate"),
    ("get", "/metrics"),
    ("get", "/ws"),
    ("get", "/api/openapi.json"),
    ("get", "/api/docs"),
    ("get", "/api/docs/docs.js"),
];

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

async fn document(server: &TestServer) -> Value {
    let (status, document) = server.get("/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    document
}

/// The first place where `value` does not match `schema` (resolved in `document`), if any.
/// Stricter than JSON Schema: a field the schema does not name is a mismatch too, so that the
/// document cannot fall behind what the server sends.
fn mismatch(document: &Value, schema: &Value, value: &Value, at: &str) -> Option<String> {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/schemas/");
        let target = &document["components"]["schemas"][name];
        assert!(target.is_object(), "{reference} is not in the document");
        return mismatch(document, target, value, at);
    }
    if let Some(variants) = schema["oneOf"].as_array() {
        let fits = variants
            .iter()
            .any(|v| mismatch(document, v, value, at).is_none());
        return (!fits).then(|| format!("{at}: {value} matches no variant of {schema}"));
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(name) => vec![name.as_str()],
        Value::Array(names) => names.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let typed = |name: &str| match name {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => false,
    };
    if !types.is_empty() && !types.into_iter().any(typed) {
        return Some(format!("{at}: {value} is not {}", schema["type"]));
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        return Some(format!("{at}: {value} is not one of {allowed:?}"));
    }
    match value {
        Value::Object(fields) => {
            for name in schema["required"].as_array().into_iter().flatten() {
                let name = name.as_str().unwrap_or_default();
                if !fields.contains_key(name) {
                    return Some(format!("{at}: no {name}"));
                }
            }
            let properties = schema["properties"].as_object()?;
            fields
                .iter()
                .find_map(|(name, field)| match properties.get(name) {
                    Some(property) => mismatch(document, property, field, &format!("{at}.{name}")),
                    None => Some(format!("{at}: {name} is not in the document")),
                })
        }
        Value::Array(items) if schema["items"].is_object() => {
            items.iter().enumerate().find_map(|(i, item)| {
                mismatch(document, &schema["items"], item, &format!("{at}[{i}]"))
            })
        }
        _ => None,
    }
}

/// Checks `value` against the JSON schema of the answer `status` of `method path`.
fn assert_answer(document: &Value, method: &str, path: &str, status: StatusCode, value: &Value) {
    let answer = &document["paths"][path][method]["responses"][status.as_str()];
    assert!(
        answer.is_object(),
        "{method} {path} answered {status}, which the document does not name"
    );
    let schema = &answer["content"]["application/json"]["schema"];
    if let Some(problem) = mismatch(
        document,
        schema,
        value,
        &format!("{method} {path} {status}"),
    ) {
        panic!("{problem}");
    }
}

/// Checks a real-time event against the payload schema the document gives its name.
fn assert_event(document: &Value, (name, data): &(String, Value)) {
    let schema = &document["x-realtime"]["serverEvents"][name];
    assert!(schema.is_object(), "event {name} is not in the document");
    if let Some(problem) = mismatch(document, schema, data, name) {
        panic!("{problem}");
    }
}

#[tokio::test]
async fn the_document_is_openapi_3_1_json() {
    let server = TestServer::start(test_config()).await;
    let response = server
        .http
        .get(server.url("/api/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    let document: Value = response.json().await.unwrap();
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        document["openapi"]
    );
    assert_eq!(document["info"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(document["components"]["schemas"]["ErrorBody"].is_object());
}

#[tokio::test]
async fn the_document_names_every_route_and_only_those() {
    let server = TestServer::start(test_config()).await;
    let document = document(&server).await;
    let documented: BTreeSet<(String, String)> = document["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            let methods = item.as_object().unwrap().keys();
            methods
                .filter(|m| METHODS.contains(&m.as_str()))
                .map(|m| (m.clone(), path.clone()))
        })
        .collect();
    let routes: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|&(m, p)| (m.to_owned(), p.to_owned()))
        .collect();
    assert_eq!(documented, routes);
    assert_eq!(document["x-realtime"]["socketio"]["path"], "/socket.io/");
    assert_eq!(document["x-realtime"]["websocket"]["path"], "/ws");

    // Every route is there on the server, and a method the document does not name is a 405.
    let paths: BTreeSet<&str> = ROUTES.iter().map(|&(_, path)| path).collect();
    for path in paths {
        let url = path.replace("{id}", "docs-1");
        for method in METHODS {
            let (status, body) = server.call(&method.to_uppercase(), &url, None).await;
            if routes.contains(&(method.to_owned(), path.to_owned())) {
                assert_ne!(body["code"], "NOT_FOUND", "{method} {url}");
                assert_ne!(body["code"], "METHOD_NOT_ALLOWED", "{method} {url}");
            } else {
                assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {url}");
                let schema = &document["components"]["responses"]["MethodNotAllowed"]["content"]["application/json"]
                    ["schema"];
                assert_eq!(mismatch(&document, schema, &body, &url), None);
            }
        }
    }
    let (status, body) = server.get("/api/nowhere").await;
    assert_eq!(
        (status, &body["code"]),
        (StatusCode::NOT_FOUND, &json!("NOT_FOUND"))
    );
    let schema =
        &document["components"]["responses"]["NotFound"]["content"]["application/json"]["schema"];
    assert_eq!(mismatch(&document, schema, &body, "/api/nowhere"), None);
}

#[tokio::test]
async fn every_route_under_api_documents_its_rate_limit_and_errors() {
    let server = TestServer::start(test_config()).await;
    let document = document(&server).await;
    for (method, path) in ROUTES.iter().filter(|(_, p)| p.starts_with("/api/")) {
        let responses = &document["paths"][path][method]["responses"];
        let too_many = &responses["429"];
        assert!(too_many["headers"]["Retry-After"].is_object(), "{path}");
        assert!(responses["500"].is_object(), "{path}");
        for (status, answer) in responses.as_object().unwrap() {
            for header in [
                "RateLimit-Policy",
                "RateLimit-Limit",
                "RateLimit-Remaining",
                "RateLimit-Reset",
            ] {
                assert!(
                    answer["headers"][header].is_object(),
                    "{method} {path} {status} {header}"
                );
            }
            if status.starts_with('4') || status.starts_with('5') {
                assert_eq!(
                    answer["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody"
                );
            }
        }
    }
    let list = &document["paths"]["/api/conversations"]["get"]["parameters"];
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["limit", "offset"]);
}

#[tokio::test]
async fn rest_answers_match_the_document() {
    let server = TestServer::start(test_config()).await;
    let document = document(&server).await;
    let check = |method: &str, path: &str, (status, body): &(StatusCode, Value)| {
        assert_answer(&document, method, path, *status, body)
    };
    let one = "/api/conversations/{id}";

    check("get", "/api/health", &server.get("/api/health").await);
    let chat = server
        .post(
            "/api/chat",
            json!({"message": "Hello", "conversationId": null}),
        )
        .await;
    check("post", "/api/chat", &chat);
    let id = chat.1["conversation"]["id"].as_str().unwrap().to_owned();
    let url = format!("/api/conversations/{id}");
    check(
        "get",
        "/api/conversations",
        &server.get("/api/conversations?limit=5").await,
    );
    check("get", one, &server.get(&url).await);
    let renamed = server
        .call("PATCH", &url, Some(json!({"title": "Renamed"})))
        .await;
    check("patch", one, &renamed);
    let stop = format!("{url}/stop");
    check(
        "post",
        "/api/conversations/{id}/stop",
        &server.call("POST", &stop, None).await,
    );
    let regenerate = format!("{url}/regenerate");
    let regenerated = server.call("POST", &regenerate, None).await;
    assert_eq!(regenerated.0, StatusCode::ACCEPTED);
    check("post", "/api/conversations/{id}/regenerate", &regenerated);
    server.settled_reply(&id).await;
    check("delete", one, &server.call("DELETE", &url, None).await);

    // Errors, each where the document puts it.
    check("get", one, &server.get(&url).await);
    check("get", one, &server.get("/api/conversations/a%20b").await);
    check(
        "post",
        "/api/chat",
        &server.post("/api/chat", json!({})).await,
    );
    check(
        "get",
        "/api/conversations",
        &server.get("/api/conversations?limit=-1").await,
    );
}

#[tokio::test]
async fn realtime_events_match_the_document() {
    let server = TestServer::start(test_config()).await;
    let document = document(&server).await;
    let mut client = server.ws().await;
    let mut events = client.chat("docs-events", "Hello").await;
    server
        .call(
            "PATCH",
            "/api/conversations/docs-events",
            Some(json!({"title": "Renamed"})),
        )
        .await;
    events.push(client.next().await);
    client
        .emit("stop_generation", json!({"conversationId": 5}))
        .await;
    events.push(client.next().await);
    server
        .call("DELETE", "/api/conversations/docs-events", None)
        .await;
    events.push(client.next().await);

    let names: BTreeSet<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    let expected = [
        "stream_start",
        "stream_chunk",
        "stream_complete",
        "conversation_updated",
        "error",
        "conversation_deleted",
    ];
    assert_eq!(names, BTreeSet::from(expected));
    for event in &events {
        assert_event(&document, event);
    }
}

#[tokio::test]
async fn the_reference_page_and_its_script_are_served() {
    let server = TestServer::start(test_config()).await;
    let page = server
        .http
        .get(server.url("/api/docs"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let policy = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"<script src="/api/docs/docs.js"></script>"#));
    assert_eq!(
        html.matches("<script").count(),
        1,
        "no inline script: the Content-Security-Policy forbids it"
    );

    let script = server
        .http
        .get(server.url("/api/docs/docs.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(script.status(), StatusCode::OK);
    assert_eq!(
        script.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert!(script.text().await.unwrap().contains("/api/openapi.json"));
}
