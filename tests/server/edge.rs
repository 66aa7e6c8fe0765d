//! The HTTP edge, black-box: a body refused while the client is still sending it, the client's
//! address behind trusted reverse proxies, and the time limits on request heads and on idle
//! connections (which upgraded and long-polling connections are not subject to).

use crate::support::RealtimeClient;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::socketio::SioClient;
use crate::support::{ModelServer, TestServer, WAIT, config_for, names, test_config, words};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// One HTTP answer read off a raw connection.
struct Answer {
    status: u16,
    head: String,
    body: Value,
}

/// Reads one answer (its body by `Content-Length`) from `stream`; fails if the connection ends
/// or errs first.
async fn read_answer(stream: &mut TcpStream) -> Answer {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let mut read_more = async |data: &mut Vec<u8>| {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("the answer can be read");
        assert!(
            n > 0,
            "closed before the answer: {:?}",
            String::from_utf8_lossy(data)
        );
        data.extend_from_slice(&buf[..n]);
    };
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read_more(&mut data).await;
    };
    let head = String::from_utf8(data[..head_end].to_vec()).unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while data.len() < head_end + length {
        read_more(&mut data).await;
    }
    Answer {
        status: head[9..12].parse().unwrap(),
        body: serde_json::from_slice(&data[head_end..head_end + length]).unwrap_or(Value::Null),
        head: head.to_ascii_lowercase(),
    }
}

/// Whether the server closed `stream` within `wait` (anything it sends first is skipped).
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

async fn connect(server: &TestServer) -> TcpStream {
    TcpStream::connect(server.addr()).await.unwrap()
}

/// Writes all of `bytes`, failing if the server stops reading them.
async fn send(stream: &mut TcpStream, bytes: &[u8]) {
    tokio::time::timeout(WAIT, stream.write_all(bytes))
        .await
        .expect("sent in time")
        .expect("the server reads everything sent");
}

fn post_head(length: usize) -> String {
    format!(
        "POST /api/chat HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n\
         Content-Length: {length}\r\n\r\n"
    )
}

fn assert_too_large(answer: &Answer) {
    assert_eq!(answer.status, 413, "{}", answer.head);
    assert_eq!(answer.body["code"], "PAYLOAD_TOO_LARGE");
    assert!(answer.body["message"].is_string(), "{}", answer.body);
    assert!(answer.head.contains("connection: close"), "{}", answer.head);
}

#[tokio::test]
async fn a_client_sending_a_body_over_the_limit_reads_the_413_every_time() {
    let server = TestServer::start(test_config()).await;
    let body = vec![b'x'; 11 * 1024 * 1024];
    for _ in 0..3 {
        let mut stream = connect(&server).await;
        send(&mut stream, post_head(body.len()).as_bytes()).await;
        send(&mut stream, &body).await;
        assert_too_large(&read_answer(&mut stream).await);
        assert!(closed_within(&mut stream, WAIT).await, "closed after");
    }
    let (status, _) = server.get("/api/health").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_read_to_its_end_too() {
    let mut config = test_config();
    config.body_limit_bytes = 64 * 1024;
    let server = TestServer::start(config).await;
    let chunk = vec![b'x'; 32 * 1024];
    let mut chunked = format!("{:x}\r\n", chunk.len()).into_bytes();
    chunked.extend_from_slice(&chunk);
    chunked.extend_from_slice(b"\r\n");
    for _ in 0..3 {
        let mut stream = connect(&server).await;
        let head = "POST /api/chat HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n\
                    Transfer-Encoding: chunked\r\n\r\n";
        send(&mut stream, head.as_bytes()).await;
        for _ in 0..128 {
            send(&mut stream, &chunked).await;
        }
        send(&mut stream, b"0\r\n\r\n").await;
        assert_too_large(&read_answer(&mut stream).await);
        assert!(closed_within(&mut stream, WAIT).await, "closed after");
    }
}

#[tokio::test]
async fn a_refused_body_is_read_up_to_the_discard_limit() {
    let mut config = test_config();
    config.body_limit_bytes = 1024;
    let discard = 8 * 1024 * 1024;
    config.body_discard_limit_bytes = discard;
    let server = TestServer::start(config).await;
    for _ in 0..3 {
        let mut stream = connect(&server).await;
        send(&mut stream, post_head(discard).as_bytes()).await;
        send(&mut stream, &vec![b'x'; discard]).await;
        assert_too_large(&read_answer(&mut stream).await);
    }

    // Far over it, the body is not read: the server closes and the client's sending fails.
    let mut stream = connect(&server).await;
    let length = 4 * discard;
    send(&mut stream, post_head(length).as_bytes()).await;
    let sent = tokio::time::timeout(WAIT, stream.write_all(&vec![b'x'; length]))
        .await
        .expect("the server closes in time");
    assert!(
        sent.is_err(),
        "the server read a body over the discard limit"
    );
}

#[tokio::test]
async fn a_refused_body_is_read_for_the_discard_time_then_the_connection_closes() {
    let mut config = test_config();
    config.body_limit_bytes = 1024;
    config.body_discard_timeout = Duration::from_millis(1500);
    let server = TestServer::start(config).await;
    let mut stream = connect(&server).await;
    let started = Instant::now();
    send(&mut stream, post_head(64 * 1024).as_bytes()).await;
    send(&mut stream, &[b'x'; 100]).await;
    assert_too_large(&read_answer(&mut stream).await);
    // The client may still be sending: the server keeps reading for the discard time.
    assert!(!closed_within(&mut stream, Duration::from_millis(300)).await);
    send(&mut stream, &[b'x'; 100]).await;
    assert!(closed_within(&mut stream, WAIT).await, "closed in time");
    assert!(started.elapsed() >= Duration::from_millis(1500));
}

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

#[tokio::test]
async fn the_access_log_names_the_client_behind_a_trusted_proxy() {
    let logs = crate::support::logs::captured();
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

/// A server whose head and idle time limits are `header` and `keep_alive`.
async fn with_timeouts(header: Duration, keep_alive: Duration) -> TestServer {
    let mut config = test_config();
    config.http_header_timeout = header;
    config.http_keepalive_timeout = keep_alive;
    TestServer::start(config).await
}

#[tokio::test]
async fn a_request_head_that_stops_halfway_is_closed_after_the_header_timeout() {
    let header = Duration::from_millis(500);
    let server = with_timeouts(header, Duration::from_secs(60)).await;
    let mut stream = connect(&server).await;
    let started = Instant::now();
    send(&mut stream, b"GET /api/health HTTP/1.1\r\nHost: edge\r\n").await;
    assert!(closed_within(&mut stream, WAIT).await, "closed in time");
    assert!(started.elapsed() >= header);

    // A head shorter than HTTP/2's preface, which decides the protocol, is no different.
    let mut stream = connect(&server).await;
    send(&mut stream, b"PRI * HTTP/2.0\r\n").await;
    assert!(closed_within(&mut stream, WAIT).await, "closed in time");
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_keep_alive_timeout() {
    let keep_alive = Duration::from_millis(500);
    let server = with_timeouts(Duration::from_secs(60), keep_alive).await;
    let mut stream = connect(&server).await;
    let request = b"GET /api/health HTTP/1.1\r\nHost: edge\r\n\r\n";
    for _ in 0..2 {
        send(&mut stream, request).await;
        assert_eq!(read_answer(&mut stream).await.status, 200);
    }
    let answered = Instant::now();
    assert!(closed_within(&mut stream, WAIT).await, "closed in time");
    assert!(answered.elapsed() >= keep_alive);

    // A connection that never sends anything is idle too.
    let mut silent = connect(&server).await;
    assert!(closed_within(&mut silent, WAIT).await, "closed in time");
}

#[tokio::test]
async fn requests_and_connections_outlasting_both_timeouts_are_not_cut() {
    let short = Duration::from_millis(300);
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.http_header_timeout = short;
    config.http_keepalive_timeout = short;
    let server = TestServer::start(config).await;

    // A REST reply that takes longer than both.
    model.set_reply(words(3), short * 3);
    let started = Instant::now();
    let (status, reply) = server.post("/api/chat", json!({"message": "hi"})).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert!(started.elapsed() > short * 2);
    model.set_reply(words(3), Duration::ZERO);

    // A WebSocket, and Socket.IO over long-polling and over a websocket, idle for longer.
    let mut ws = server.ws().await;
    let mut polling =
        SioClient::connect_with(server.addr(), json!({"transports": ["polling"]})).await;
    let mut websocket =
        SioClient::connect_with(server.addr(), json!({"transports": ["websocket"]})).await;
    tokio::time::sleep(short * 4).await;
    let events = ws.chat("idle-ws", "still there?").await;
    assert_eq!(names(&events)[0], "stream_start");
    for client in [&mut polling, &mut websocket] {
        let events = client.chat("idle-sio", "still there?").await;
        assert_eq!(names(&events)[0], "stream_start");
        assert_eq!(client.disconnect_reason, None);
    }
}
