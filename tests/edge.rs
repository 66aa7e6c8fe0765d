//! The HTTP edge, black-box: the client's address behind trusted reverse proxies.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use reqwest::StatusCode;
use support::{TestServer, WAIT, test_config};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A server behind a trusted proxy at 127.0.0.1 (where the tests connect from), allowing each
/// client `limit` requests.
async fn behind_a_proxy(limit: u32, proxies: &str) -> TestServer {
    let mut config = test_config();
    config.rate_limit_max_requests = limit;
    config.rate_limit_window = Duration::from_secs(60);
    config.trusted_proxies = proxies.parse().unwrap();
    TestServer::start(config).await
}

/// `GET /api/health` with the header `name: value`: the status.
async fn health_with(server: &TestServer, name: &str, value: &str) -> StatusCode {
    let request = server.http.get(server.url("/api/health"));
    let request = if name.is_empty() {
        request
    } else {
        request.header(name, value)
    };
    tokio::time::timeout(WAIT, request.send())
        .await
        .expect("an answer in time")
        .unwrap()
        .status()
}

#[tokio::test]
async fn clients_behind_a_trusted_proxy_are_counted_apart() {
    let server = behind_a_proxy(2, "10.0.0.0/8, 127.0.0.1").await;
    let xff = "x-forwarded-for";
    assert_eq!(
        health_with(&server, xff, "203.0.113.1").await,
        StatusCode::OK
    );
    assert_eq!(
        health_with(&server, xff, "203.0.113.1, 10.0.0.3").await,
        StatusCode::OK
    );
    assert_eq!(
        health_with(&server, xff, "203.0.113.1").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // What the client itself wrote stays to the left of what the proxy appended.
    assert_eq!(
        health_with(&server, xff, "198.51.100.7, 203.0.113.1").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        health_with(&server, xff, "203.0.113.2").await,
        StatusCode::OK
    );
    let forwarded = "for=\"[2001:db8:cafe::17]:4711\";proto=https";
    assert_eq!(
        health_with(&server, "forwarded", forwarded).await,
        StatusCode::OK
    );
    assert_eq!(health_with(&server, "", "").await, StatusCode::OK);
}

#[tokio::test]
async fn a_client_that_is_not_a_trusted_proxy_cannot_choose_its_address() {
    for proxies in ["", "10.0.0.0/8"] {
        let server = behind_a_proxy(2, proxies).await;
        assert_eq!(
            health_with(&server, "x-forwarded-for", "203.0.113.1").await,
            StatusCode::OK
        );
        assert_eq!(
            health_with(&server, "forwarded", "for=203.0.113.2").await,
            StatusCode::OK
        );
        assert_eq!(
            health_with(&server, "x-forwarded-for", "203.0.113.3").await,
            StatusCode::TOO_MANY_REQUESTS,
            "TRUSTED_PROXIES={proxies:?}"
        );
    }
}

#[tokio::test]
async fn malformed_forwarding_headers_count_as_the_proxy_itself() {
    let server = behind_a_proxy(4, "127.0.0.1").await;
    for (name, value) in [
        ("x-forwarded-for", "garbage"),
        ("x-forwarded-for", "203.0.113.1, "),
        ("forwarded", "for=unknown"),
        ("x-forwarded-for", "999.0.0.1"),
    ] {
        assert_eq!(
            health_with(&server, name, value).await,
            StatusCode::OK,
            "{value}"
        );
    }
    assert_eq!(
        health_with(&server, "", "").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        health_with(&server, "x-forwarded-for", "203.0.113.1").await,
        StatusCode::OK
    );
}

/// A WebSocket handshake to `/ws` with `X-Forwarded-For: client`: whether it was accepted.
async fn ws_for(addr: SocketAddr, client: &str) -> Result<impl Sized, u16> {
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-forwarded-for", client.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

#[tokio::test]
async fn the_connection_cap_counts_each_client_behind_a_trusted_proxy() {
    let mut config = test_config();
    config.max_connections_per_ip = 1;
    config.trusted_proxies = "127.0.0.1".parse().unwrap();
    let server = TestServer::start(config).await;
    let _first = ws_for(server.addr(), "203.0.113.1").await.expect("first");
    assert_eq!(ws_for(server.addr(), "203.0.113.1").await.err(), Some(429));
    let _other = ws_for(server.addr(), "203.0.113.2")
        .await
        .expect("another client");
}

/// Everything the server logs in this test binary, captured once.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogSink(sink.clone()))
            .init();
        logs
    })
    .clone()
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_access_log_names_the_client_behind_a_trusted_proxy() {
    let logs = captured_logs();
    let server = behind_a_proxy(0, "127.0.0.1").await;
    let forwarded = "198.51.100.99, 203.0.113.77";
    assert_eq!(
        health_with(&server, "x-forwarded-for", forwarded).await,
        StatusCode::OK
    );
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|line| line.contains("client=203.0.113.77"))
        .unwrap_or_else(|| panic!("no line for the client: {text}"));
    assert!(line.contains("path=/api/health "), "{line}");
    assert!(!text.contains("198.51.100.99"), "{text}");
}
