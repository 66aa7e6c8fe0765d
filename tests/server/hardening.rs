//! Production hardening, black-box: security headers, the access log, rate and connection
//! limits, input limits at their edges, and the Prometheus metrics.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

use crate::support::{
    Mode, ModelServer, RealtimeClient, TestServer, WAIT, config_for, names, over_every_transport,
    test_config,
};

over_every_transport!(
    real_time_replies_are_limited_per_connection,
    message_length_over_real_time_is_limited_at_the_edge,
);

/// helmet's defaults, as every answer must carry them.
const SECURITY_HEADERS: [(&str, &str); 12] = [
    (
        "content-security-policy",
        "default-src 'self';base-uri 'self';font-src 'self' https: data:;form-action 'self';\
         frame-ancestors 'self';img-src 'self' data:;object-src 'none';script-src 'self';\
         script-src-attr 'none';style-src 'self' https: 'unsafe-inline';upgrade-insecure-requests",
    ),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    ("origin-agent-cluster", "?1"),
    ("referrer-policy", "no-referrer"),
    (
        "strict-transport-security",
        "max-age=31536000; includeSubDomains",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-dns-prefetch-control", "off"),
    ("x-download-options", "noopen"),
    ("x-frame-options", "SAMEORIGIN"),
    ("x-permitted-cross-domain-policies", "none"),
    ("x-xss-protection", "0"),
];

fn assert_security_headers(headers: &HeaderMap, what: &str) {
    for (name, value) in SECURITY_HEADERS {
        assert_eq!(
            headers.get(name).and_then(|v| v.to_str().ok()),
            Some(value),
            "{name} on {what}"
        );
    }
    for name in ["server", "x-powered-by"] {
        assert!(headers.get(name).is_none(), "{name} on {what}");
    }
}

/// An HTTP client whose requests come from `ip` (any address in 127.0.0.0/8 works).
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

/// A WebSocket handshake to `/ws` from `ip`: the client, or the refusal's status and body.
async fn ws_from(
    addr: SocketAddr,
    ip: &str,
) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, (u16, Value)> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(ip.parse().unwrap(), 0))
        .unwrap();
    let stream = socket.connect(addr).await.unwrap();
    match tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream).await {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            Err((
                response.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            ))
        }
        Err(e) => panic!("handshake failed: {e}"),
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("{name} is missing"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    let mut config = test_config();
    config.rate_limit_max_requests = 1;
    let server = TestServer::start(config).await;
    let http = client_from("127.0.0.1");
    let url = |path: &str| server.url(path);
    let answers = [
        ("health", http.get(url("/api/health"))),
        ("an unknown route", http.get(url("/nowhere"))),
        ("a wrong method", http.post(url("/api/health"))),
        (
            "malformed JSON",
            http.post(url("/api/chat"))
                .header("content-type", "application/json")
                .body("{"),
        ),
        ("metrics", http.get(url("/metrics"))),
        (
            "a CORS preflight",
            http.request(reqwest::Method::OPTIONS, url("/api/chat"))
                .header("origin", "http://localhost:8081")
                .header("access-control-request-method", "POST"),
        ),
    ];
    for (what, request) in answers {
        let response = request.send().await.unwrap();
        assert_security_headers(response.headers(), what);
    }
    let limited = http.get(url("/api/health")).send().await.unwrap();
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_security_headers(limited.headers(), "a 429");

    let (_, upgrade) = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr()))
        .await
        .unwrap();
    for (name, value) in SECURITY_HEADERS {
        assert_eq!(upgrade.headers()[name], value, "{name} on the upgrade");
    }
}

#[tokio::test]
async fn api_requests_are_limited_per_client_address() {
    let mut config = test_config();
    config.rate_limit_max_requests = 3;
    config.rate_limit_window = Duration::from_secs(60);
    let server = TestServer::start(config).await;
    let first = client_from("127.0.0.2");
    for remaining in ["2", "1", "0"] {
        let response = first.get(server.url("/api/health")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert_eq!(header(headers, "ratelimit-limit"), "3");
        assert_eq!(header(headers, "ratelimit-remaining"), remaining);
        assert_eq!(header(headers, "ratelimit-policy"), "3;w=60");
        let reset: u64 = header(headers, "ratelimit-reset").parse().unwrap();
        assert!((1..=60).contains(&reset), "{reset}");
        assert!(headers.get("retry-after").is_none());
    }
    let over = first
        .get(server.url("/api/conversations"))
        .header("origin", "http://localhost:8081")
        .send()
        .await
        .unwrap();
    assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);
    let headers = over.headers().clone();
    assert_eq!(header(&headers, "ratelimit-remaining"), "0");
    let retry: u64 = header(&headers, "retry-after").parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        "http://localhost:8081"
    );
    let body: Value = over.json().await.unwrap();
    assert_eq!(
        body,
        json!({"message": "Too many requests from this IP", "code": "RATE_LIMIT_EXCEEDED"})
    );

    let metrics = first.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    assert!(metrics.headers().get("ratelimit-limit").is_none());

    let second = client_from("127.0.0.3");
    let other = second.get(server.url("/api/health")).send().await.unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    assert_eq!(header(other.headers(), "ratelimit-remaining"), "2");
}

async fn real_time_replies_are_limited_per_connection<C: RealtimeClient>() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.rt_messages_per_minute = 2;
    let server = TestServer::start(config).await;
    let mut client = C::connect(server.addr()).await;
    client.chat("rt-1", "one").await;
    client.chat("rt-2", "two").await;
    let ack = client
        .emit_with_ack(
            "stream_chat",
            json!({"conversationId": "rt-3", "message": "three"}),
        )
        .await;
    assert_eq!(ack["error"]["code"], "RATE_LIMIT_EXCEEDED");
    let (name, data) = client.next().await;
    assert_eq!(
        (name.as_str(), &data["code"]),
        ("error", &json!("RATE_LIMIT_EXCEEDED"))
    );
    client
        .emit("regenerate", json!({"conversationId": "rt-1"}))
        .await;
    let (name, data) = client.next().await;
    assert_eq!(
        (name.as_str(), &data["code"]),
        ("error", &json!("RATE_LIMIT_EXCEEDED"))
    );
    // Joining is not limited.
    client.join("rt-4").await;

    let mut other = C::connect(server.addr()).await;
    let events = other.chat("rt-4", "another connection").await;
    assert_eq!(names(&events)[0], "stream_start");
}

#[tokio::test]
async fn real_time_connections_are_limited_per_address() {
    let mut config = test_config();
    config.max_connections_per_ip = 2;
    let server = TestServer::start(config).await;
    let addr = server.addr();
    let first = ws_from(addr, "127.0.0.5").await.expect("first connects");
    let _second = ws_from(addr, "127.0.0.5").await.expect("second connects");
    let (status, body) = ws_from(addr, "127.0.0.5").await.expect_err("third refused");
    assert_eq!(status, 429);
    assert_eq!(body["code"], "RATE_LIMIT_EXCEEDED");
    assert!(ws_from(addr, "127.0.0.6").await.is_ok(), "other addresses");

    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    while ws_from(addr, "127.0.0.5").await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a closed one frees its place"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn message_length_over_real_time_is_limited_at_the_edge<C: RealtimeClient>() {
    let mut config = test_config();
    config.max_message_chars = 10;
    let server = TestServer::start(config).await;
    let mut client = C::connect(server.addr()).await;
    let events = client.chat("edge", &"é".repeat(10)).await;
    assert_eq!(names(&events)[0], "stream_start");
    client
        .emit(
            "stream_chat",
            json!({"conversationId": "edge", "message": "é".repeat(11)}),
        )
        .await;
    let (name, data) = client.next().await;
    assert_eq!(name, "error");
    assert_eq!(data["code"], "INVALID_REQUEST");
}

#[tokio::test]
async fn rename_bodies_are_limited_at_the_edge() {
    let mut config = test_config();
    config.body_limit_bytes = 200;
    let server = TestServer::start(config).await;
    let (_, created) = server.post("/api/chat", json!({"message": "hi"})).await;
    let id = created["conversation"]["id"].as_str().unwrap().to_owned();
    let body_of = |size: usize| {
        let overhead = r#"{"title":""}"#.len();
        format!(r#"{{"title":"{}"}}"#, "t".repeat(size - overhead))
    };
    let rename = |body: String| {
        server
            .http
            .patch(server.url(&format!("/api/conversations/{id}")))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(rename(body_of(200)).await.unwrap().status(), StatusCode::OK);
    let over = rename(body_of(201)).await.unwrap();
    assert_eq!(over.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = over.json().await.unwrap();
    assert_eq!(body["code"], "PAYLOAD_TOO_LARGE");
}

/// The value of the first series of `text` whose line starts with `name` and contains every
/// one of `labels`.
fn series(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|l| line.contains(l)))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn metrics_are_served_in_prometheus_text_format() {
    let (server, model) = TestServer::with_model().await;
    let (status, _) = server.get("/api/conversations/missing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let mut client = server.ws().await;
    client.chat("metered", "count me").await;
    model.set_mode(Mode::Fail);
    client.chat("metered", "fail me").await;

    let response = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(header(response.headers(), "content-type").starts_with("text/plain"));
    let text = response.text().await.unwrap();
    let route = r#"route="/api/conversations/:id""#;
    assert_eq!(
        series(
            &text,
            "http_requests_total{",
            &[route, r#"status="404""#, r#"method="GET""#]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        series(
            &text,
            "http_request_duration_seconds_count{",
            &[route, r#"status="404""#]
        ),
        Some(1.0)
    );
    assert!(text.contains(r#"http_request_duration_seconds_bucket{"#));
    assert!(!text.contains("/api/conversations/missing"), "raw paths");
    assert_eq!(series(&text, "chat_open_connections ", &[]), Some(1.0));
    assert_eq!(series(&text, "chat_active_conversations ", &[]), Some(1.0));
    assert_eq!(series(&text, "chat_replies_in_progress ", &[]), Some(0.0));
    assert_eq!(series(&text, "chat_upstream_errors_total ", &[]), Some(1.0));
    assert_eq!(
        series(&text, "chat_upstream_duration_seconds_count ", &[]),
        Some(2.0)
    );
    let pieces = model.reply_text().split_inclusive(' ').count() as f64;
    assert_eq!(
        series(&text, "chat_tokens_streamed_total ", &[]),
        Some(pieces)
    );
    assert!(text.contains("# HELP chat_tokens_streamed_total"));
}

#[tokio::test]
async fn the_access_log_has_one_line_per_request_and_no_message_content() {
    let logs = crate::support::logs::captured();
    let server = TestServer::start(test_config()).await;
    let http = client_from("127.0.0.4");
    let secret = "my very private words 8472";
    let chat = http
        .post(server.url("/api/chat"))
        .json(&json!({"message": secret}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), StatusCode::OK);
    let size = chat.bytes().await.unwrap().len();
    let missing = http
        .get(server.url("/api/conversations/nope?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("client=127.0.0.4:"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for (line, (method, path, status)) in lines.iter().zip([
        ("POST", "/api/chat", 200),
        ("GET", "/api/conversations/nope", 404),
    ]) {
        assert!(line.contains(" INFO access: request "), "{line}");
        for field in [
            format!("method={method} "),
            format!("path={path} "),
            format!("status={status} "),
            "bytes=".into(),
            "duration_ms=".into(),
        ] {
            assert!(line.contains(&field), "{field} in {line}");
        }
    }
    assert!(lines[0].contains(&format!("bytes={size} ")), "{}", lines[0]);
    assert!(
        !text.contains(secret),
        "message content in the logs: {text}"
    );
}
