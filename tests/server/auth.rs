//! Sign-in with `AUTH_MODE=jwt`: tokens are checked at the edge of every transport, and a user
//! reaches only their own conversations; another user's behave exactly as if they did not exist.

use std::process::Stdio;
use std::time::Duration;

use ai_chat_server::auth::{AuthMode, Secret};
use ai_chat_server::config::Config;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::process::{self, ServerProcess};
use crate::support::{
    ModelServer, RealtimeClient, TestServer, WAIT, WsClient, call_with_token, config_for, deltas,
    final_content, over_every_transport, seqs, words,
};

const SECRET: &str = "the-test-secret-of-at-least-32-bytes";
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "chat";

/// A configuration that requires tokens signed with [`SECRET`] for [`ISSUER`] and [`AUDIENCE`].
fn jwt_config(model: &ModelServer) -> Config {
    let mut config = config_for(model);
    config.auth.mode = AuthMode::Jwt;
    config.auth.jwt_secret = Some(Secret::new(SECRET));
    config.auth.issuer = Some(ISSUER.into());
    config.auth.audience = Some(AUDIENCE.into());
    config
}

async fn jwt_server() -> (TestServer, ModelServer) {
    let model = ModelServer::start().await;
    (TestServer::start(jwt_config(&model)).await, model)
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Good claims for `sub`, valid for ten minutes.
fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 600, "iss": ISSUER, "aud": AUDIENCE})
}

/// `claims` signed with `secret` by `algorithm`.
fn signed(claims: &Value, algorithm: Algorithm, secret: &str) -> String {
    let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
    jsonwebtoken::encode(&Header::new(algorithm), claims, &key).unwrap()
}

/// A good token for `sub`.
fn token(sub: &str) -> String {
    signed(&claims(sub), Algorithm::HS256, SECRET)
}

/// `claims` changed by `change`, signed well.
fn token_with(change: impl FnOnce(&mut Value)) -> String {
    let mut claims = claims("ann");
    change(&mut claims);
    signed(&claims, Algorithm::HS256, SECRET)
}

/// Tokens that must be refused, each with the reason the client is told.
fn bad_tokens() -> Vec<(&'static str, String, &'static str)> {
    let ann = token("ann");
    let bob = token("bob");
    let parts = |t: &str| t.split('.').map(str::to_owned).collect::<Vec<_>>();
    let (ann, bob) = (parts(&ann), parts(&bob));
    let unsigned_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    vec![
        (
            "expired",
            token_with(|c| c["exp"] = json!(now() - 120)),
            "token expired",
        ),
        (
            "not yet valid",
            token_with(|c| c["nbf"] = json!(now() + 120)),
            "token not yet valid",
        ),
        (
            "forged: bob's claims under ann's signature",
            format!("{}.{}.{}", ann[0], bob[1], ann[2]),
            "invalid token signature",
        ),
        (
            "alg none",
            format!("{unsigned_header}.{}.", ann[1]),
            "malformed token",
        ),
        (
            "signed with another key",
            signed(
                &claims("ann"),
                Algorithm::HS256,
                "another-secret-of-at-least-32-bytes!",
            ),
            "invalid token signature",
        ),
        (
            "another algorithm with the same key",
            signed(&claims("ann"), Algorithm::HS512, SECRET),
            "token algorithm not accepted",
        ),
        (
            "wrong issuer",
            token_with(|c| c["iss"] = json!("https://elsewhere.test")),
            "wrong token issuer",
        ),
        (
            "wrong audience",
            token_with(|c| c["aud"] = json!("another-app")),
            "wrong token audience",
        ),
        (
            "no exp",
            token_with(|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            "malformed token",
        ),
        (
            "an empty sub",
            token_with(|c| c["sub"] = json!("")),
            "malformed token",
        ),
        ("not a JWT", "not-a-token".into(), "malformed token"),
    ]
}

/// A request with `Authorization: Bearer <token>`.
async fn call_as(
    server: &TestServer,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    call_with_token(server.addr(), Some(token), method, path, body).await
}

#[tokio::test]
async fn health_is_open_and_every_other_api_route_needs_a_token() {
    let (server, _model) = jwt_server().await;
    let (status, _) = server.get("/api/health").await;
    assert_eq!(status, StatusCode::OK);
    let routes = [
        ("GET", "/api/me", None),
        ("GET", "/api/conversations", None),
        ("POST", "/api/chat", Some(json!({"message": "hi"}))),
        ("GET", "/api/conversations/c1", None),
        ("DELETE", "/api/conversations/c1", None),
        (
            "PATCH",
            "/api/conversations/c1",
            Some(json!({"title": "t"})),
        ),
        ("POST", "/api/conversations/c1/stop", None),
        ("POST", "/api/conversations/c1/regenerate", None),
    ];
    for (method, path, body) in routes {
        let (status, answer) = server.call(method, path, body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_eq!(
            answer,
            json!({"message": "missing token", "code": "UNAUTHORIZED"})
        );
    }
    let (status, answer) = call_with_token(server.addr(), None, "GET", "/api/nowhere", None).await;
    assert_eq!(
        (status, answer["code"].clone()),
        (StatusCode::NOT_FOUND, json!("NOT_FOUND"))
    );
}

#[tokio::test]
async fn me_answers_who_the_token_says() {
    let (server, _model) = jwt_server().await;
    let (status, me) =
        call_with_token(server.addr(), Some(&token("ann")), "GET", "/api/me", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        me,
        json!({"id": "ann", "usage": {"tokensToday": 0, "dailyTokenLimit": 0}})
    );
    let named = token_with(|c| c["preferred_username"] = json!("Ann"));
    let (_, me) = call_with_token(server.addr(), Some(&named), "GET", "/api/me", None).await;
    assert_eq!(me["username"], "Ann");
}

#[tokio::test]
async fn bad_tokens_are_unauthorized_never_a_server_error() {
    let (server, _model) = jwt_server().await;
    for (case, bad, reason) in bad_tokens() {
        let (status, answer) =
            call_with_token(server.addr(), Some(&bad), "GET", "/api/conversations", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}");
        assert_eq!(
            answer,
            json!({"message": reason, "code": "UNAUTHORIZED"}),
            "{case}"
        );
    }
    let basic = reqwest::Client::new()
        .get(server.url("/api/conversations"))
        .basic_auth("ann", Some("password"))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_clock_leeway_is_thirty_seconds() {
    let (server, _model) = jwt_server().await;
    let just_expired = token_with(|c| c["exp"] = json!(now() - 20));
    let (status, _) =
        call_with_token(server.addr(), Some(&just_expired), "GET", "/api/me", None).await;
    assert_eq!(status, StatusCode::OK);
    let expired = token_with(|c| c["exp"] = json!(now() - 40));
    let (status, _) = call_with_token(server.addr(), Some(&expired), "GET", "/api/me", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let nearly_valid = token_with(|c| c["nbf"] = json!(now() + 20));
    let (status, _) =
        call_with_token(server.addr(), Some(&nearly_valid), "GET", "/api/me", None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_websocket_handshake_without_a_good_token_is_refused_before_the_upgrade() {
    let (server, _model) = jwt_server().await;
    let handshake = |token: Option<String>| {
        let mut request = reqwest::Client::new()
            .get(server.url("/ws"))
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let refused = handshake(None).await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        body,
        json!({"message": "missing token", "code": "UNAUTHORIZED"})
    );
    let expired = token_with(|c| c["exp"] = json!(now() - 120));
    let refused = handshake(Some(expired)).await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    // The header works as well as the query.
    let accepted = handshake(Some(token("ann"))).await.unwrap();
    assert_eq!(accepted.status(), StatusCode::SWITCHING_PROTOCOLS);
}

#[tokio::test]
async fn another_users_conversation_does_not_exist_for_them_over_rest() {
    let (server, _model) = jwt_server().await;
    let (ann, bob) = (token("ann"), token("bob"));
    let (status, made) = call_as(
        &server,
        &ann,
        "POST",
        "/api/chat",
        Some(json!({"message": "mine"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let id = made["conversation"]["id"].as_str().unwrap().to_owned();
    let path = format!("/api/conversations/{id}");

    let (_, listed) = call_as(&server, &bob, "GET", "/api/conversations", None).await;
    assert_eq!(listed, json!([]));
    let not_found = json!({"message": "Conversation not found", "code": "CONVERSATION_NOT_FOUND"});
    let attempts = [
        ("GET", path.clone(), None),
        ("DELETE", path.clone(), None),
        ("PATCH", path.clone(), Some(json!({"title": "taken"}))),
        ("POST", format!("{path}/stop"), None),
        ("POST", format!("{path}/regenerate"), None),
        (
            "POST",
            "/api/chat".into(),
            Some(json!({"conversationId": id, "message": "let me in"})),
        ),
    ];
    for (method, path, body) in attempts {
        let (status, answer) = call_as(&server, &bob, method, &path, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
        assert_eq!(answer, not_found, "{method} {path}");
    }

    let (status, kept) = call_as(&server, &ann, "GET", &path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(kept, made["conversation"]);
    let (_, listed) = call_as(&server, &ann, "GET", "/api/conversations", None).await;
    assert_eq!(listed, json!([made["conversation"]]));
}

/// Each bad token is refused as the connection opens: 401 for `/ws`, a `connect_error` whose
/// message begins with the code for Socket.IO.
async fn bad_tokens_are_refused_as_the_connection_opens<C: RealtimeClient>() {
    let (server, _model) = jwt_server().await;
    for (case, bad, reason) in bad_tokens() {
        let Err(refusal) = C::connect_as(server.addr(), &bad).await else {
            panic!("{case}: connected");
        };
        assert!(
            refusal == "401 Unauthorized" || refusal == format!("UNAUTHORIZED: {reason}"),
            "{case}: {refusal}"
        );
    }
    let client = C::connect_as(server.addr(), &token("ann")).await.unwrap();
    client.close().await;
}

/// Bob tries Ann's conversation every way a connection can: it behaves as if it did not exist,
/// and the same id becomes a conversation of his own that Ann never hears of.
async fn another_users_conversation_does_not_exist_for_them<C: RealtimeClient>() {
    let (server, model) = jwt_server().await;
    let (ann_token, bob_token) = (token("ann"), token("bob"));
    let mut ann = C::connect_as(server.addr(), &ann_token).await.unwrap();
    let mut bob = C::connect_as(server.addr(), &bob_token).await.unwrap();
    ann.chat("shared-name", "ann's question").await;

    bob.join("shared-name").await;
    for event in ["stop_generation", "regenerate"] {
        let ack = bob
            .emit_with_ack(event, json!({"conversationId": "shared-name"}))
            .await;
        assert_eq!(
            ack["error"]["code"], "CONVERSATION_NOT_FOUND",
            "{event}: {ack}"
        );
        let (name, error) = bob.next().await;
        assert_eq!(
            (name.as_str(), &error["code"]),
            ("error", &json!("CONVERSATION_NOT_FOUND"))
        );
    }
    ann.chat("shared-name", "ann again").await;
    assert_eq!(bob.try_next(Duration::from_millis(300)).await, None);

    let bobs = bob.chat("shared-name", "bob's question").await;
    assert_eq!(bobs.last().unwrap().0, "stream_complete");
    assert_eq!(ann.try_next(Duration::from_millis(300)).await, None);

    let contents = |c: &Value| -> Vec<String> {
        c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap().to_owned())
            .collect()
    };
    let reply = model.reply_text();
    let path = "/api/conversations/shared-name";
    let anns = call_as(&server, &ann_token, "GET", path, None).await.1;
    assert_eq!(
        contents(&anns),
        ["ann's question", &reply, "ann again", &reply]
    );
    let bobs = call_as(&server, &bob_token, "GET", path, None).await.1;
    assert_eq!(contents(&bobs), ["bob's question", &reply]);
    ann.close().await;
    bob.close().await;
}

/// A connection whose token expires mid-reply gets an `error` event and is closed; connecting
/// again with a fresh token, the client catches up from the last chunk it saw.
/// The pieces of the reply that outlives its connection's token.
const PIECES: usize = 80;

async fn a_connection_whose_token_expires_is_closed_and_catches_up_with_a_fresh_one<
    C: RealtimeClient,
>() {
    let (server, model) = jwt_server().await;
    // Long enough that a busy machine still connects and starts the reply before the token
    // expires, and the reply still runs when it does.
    let pieces = words(PIECES);
    model.set_reply(pieces.clone(), Duration::from_millis(100));
    let short = token_with(|c| c["exp"] = json!(now() + 5));
    let mut client = C::connect_as(server.addr(), &short).await.unwrap();
    client
        .emit(
            "stream_chat",
            json!({"conversationId": "c", "message": "hello"}),
        )
        .await;
    let (mut message_id, mut seq) = (Value::Null, 0);
    loop {
        let (name, data) = client.next().await;
        match name.as_str() {
            "stream_start" => message_id = data["messageId"].clone(),
            "stream_chunk" => seq = data["seq"].as_u64().unwrap(),
            "error" => {
                assert_eq!(
                    data,
                    json!({"message": "token expired", "code": "UNAUTHORIZED"})
                );
                break;
            }
            other => panic!("unexpected {other}: {data}"),
        }
    }
    assert_eq!(
        client.try_next(WAIT).await,
        None,
        "the connection is closed"
    );
    assert!(seq < PIECES as u64, "the reply was still going: {seq}");

    let mut client = C::connect_as(server.addr(), &token("ann")).await.unwrap();
    client
        .join_from(json!({"conversationId": "c", "messageId": message_id, "seq": seq}))
        .await;
    let rest = client.until_complete().await;
    // What was missed comes first (as one chunk when several were), then the rest, once each.
    let got = seqs(&rest);
    assert!(
        got[0] > seq && got.windows(2).all(|w| w[0] < w[1]),
        "{got:?}"
    );
    assert_eq!(got.last(), Some(&(PIECES as u64 + 1)));
    assert_eq!(deltas(&rest), pieces[seq as usize..].concat());
    assert_eq!(final_content(&rest), pieces.concat());
    client.close().await;
}

/// Replies asked for count per user over all their connections, not per connection.
async fn replies_asked_for_count_per_user_over_all_their_connections<C: RealtimeClient>() {
    let model = ModelServer::start().await;
    let mut config = jwt_config(&model);
    config.rt_messages_per_minute = 2;
    let server = TestServer::start(config).await;
    let (ann, bob) = (token("ann"), token("bob"));
    let mut first = C::connect_as(server.addr(), &ann).await.unwrap();
    let mut second = C::connect_as(server.addr(), &ann).await.unwrap();
    first.chat("a", "one").await;
    second.chat("b", "two").await;
    let ack = first
        .emit_with_ack(
            "stream_chat",
            json!({"conversationId": "c", "message": "three"}),
        )
        .await;
    assert_eq!(ack["error"]["code"], "RATE_LIMIT_EXCEEDED", "{ack}");
    let mut other = C::connect_as(server.addr(), &bob).await.unwrap();
    let events = other.chat("a", "one").await;
    assert_eq!(events.last().unwrap().0, "stream_complete");
    for client in [first, second, other] {
        client.close().await;
    }
}

over_every_transport!(
    replies_asked_for_count_per_user_over_all_their_connections,
    bad_tokens_are_refused_as_the_connection_opens,
    another_users_conversation_does_not_exist_for_them,
    a_connection_whose_token_expires_is_closed_and_catches_up_with_a_fresh_one,
);

#[test]
fn a_host_on_the_network_without_auth_mode_refuses_to_start_naming_it() {
    let output = process::command(&[("HOST", "0.0.0.0".into())])
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("AUTH_MODE"), "{stderr}");
}

/// The usage the test model reports for a first reply of five pieces: two prompt messages (the
/// system prompt and the question) and five pieces.
const FIRST_REPLY_TOKENS: u64 = 7;

#[tokio::test]
async fn a_reply_that_reaches_the_daily_budget_is_the_last_of_the_day() {
    let model = ModelServer::start().await;
    model.set_reply(words(5), Duration::from_millis(1));
    let mut config = jwt_config(&model);
    config.conversations.daily_tokens = FIRST_REPLY_TOKENS;
    let server = TestServer::start(config).await;
    let (ann, bob) = (token("ann"), token("bob"));

    let (status, first) = call_as(
        &server,
        &ann,
        "POST",
        "/api/chat",
        Some(json!({"message": "hi"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(
        first["message"]["usage"],
        json!({"promptTokens": 2, "completionTokens": 5})
    );
    let (_, me) = call_as(&server, &ann, "GET", "/api/me", None).await;
    assert_eq!(me["usage"], json!({"tokensToday": 7, "dailyTokenLimit": 7}));

    let asked = model.received().len();
    let over = json!({"message": "The daily token budget is used up", "code": "QUOTA_EXCEEDED"});
    let id = first["conversation"]["id"].as_str().unwrap();
    for (path, body) in [
        ("/api/chat".to_owned(), json!({"message": "again"})),
        (
            "/api/chat".to_owned(),
            json!({"message": "again", "conversationId": id}),
        ),
        (format!("/api/conversations/{id}/regenerate"), json!({})),
    ] {
        let (status, refused) = call_as(&server, &ann, "POST", &path, Some(body)).await;
        assert_eq!(
            (status, refused),
            (StatusCode::TOO_MANY_REQUESTS, over.clone()),
            "{path}"
        );
    }
    let mut client = WsClient::connect_as(server.addr(), &ann).await.unwrap();
    for (event, data) in [
        (
            "stream_chat",
            json!({"message": "again", "conversationId": id}),
        ),
        ("regenerate", json!({"conversationId": id})),
    ] {
        let ack = client.emit_with_ack(event, data).await;
        assert_eq!(ack, json!({"error": over}), "{event}");
        assert_eq!(client.next().await, ("error".to_owned(), over.clone()));
    }
    assert_eq!(
        model.received().len(),
        asked,
        "refused before any model call"
    );

    // Another user has a budget of their own; a streamed reply counts as a whole one does.
    let mut client = WsClient::connect_as(server.addr(), &bob).await.unwrap();
    let events = client.chat("bobs", "hi").await;
    assert_eq!(events.last().unwrap().0, "stream_complete");
    let stored = call_as(&server, &bob, "GET", "/api/conversations/bobs", None)
        .await
        .1;
    assert_eq!(
        stored["messages"][1]["usage"],
        json!({"promptTokens": 2, "completionTokens": 5})
    );
    let (_, me) = call_as(&server, &bob, "GET", "/api/me", None).await;
    assert_eq!(me["usage"]["tokensToday"], 7);
}

#[tokio::test]
async fn tokens_never_reach_the_log() {
    let mut server = ServerProcess::spawn(&[
        ("DATABASE_URL", "memory".into()),
        ("AUTH_MODE", "jwt".into()),
        ("JWT_SECRET", SECRET.into()),
    ]);
    let addr = server.addr;
    let good = token("ann");
    let expired = token_with(|c| c["exp"] = json!(now() - 120));
    let client = WsClient::connect_as(addr, &good).await.unwrap();
    client.close().await;
    assert!(WsClient::connect_as(addr, &expired).await.is_err());
    let (status, _) = call_with_token(addr, Some(&good), "GET", "/api/me", None).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let log: Vec<String> = server.logged.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("path=/ws")), "{log:#?}");
    for line in &log {
        for token in [&good, &expired] {
            assert!(!line.contains(token.as_str()), "a token in the log: {line}");
        }
        assert!(!line.contains(SECRET), "the secret in the log: {line}");
    }
}

#[tokio::test]
async fn the_request_rate_counts_per_user_and_per_address_without_one() {
    let model = ModelServer::start().await;
    let mut config = jwt_config(&model);
    config.rate_limit_max_requests = 3;
    let server = TestServer::start(config).await;
    let (ann, bob) = (token("ann"), token("bob"));
    for _ in 0..3 {
        assert_eq!(
            call_as(&server, &ann, "GET", "/api/me", None).await.0,
            StatusCode::OK
        );
    }
    let (status, refused) = call_as(&server, &ann, "GET", "/api/me", None).await;
    assert_eq!(
        (status, &refused["code"]),
        (StatusCode::TOO_MANY_REQUESTS, &json!("RATE_LIMIT_EXCEEDED"))
    );
    // Another user at the same address has an allowance of their own, and so has the address.
    assert_eq!(
        call_as(&server, &bob, "GET", "/api/me", None).await.0,
        StatusCode::OK
    );
    for _ in 0..3 {
        assert_eq!(server.get("/api/me").await.0, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(server.get("/api/me").await.0, StatusCode::TOO_MANY_REQUESTS);
    // A bad token counts against the address, not the user it names.
    let expired = token_with(|c| c["exp"] = json!(now() - 120));
    assert_eq!(
        call_as(&server, &expired, "GET", "/api/me", None).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
}
