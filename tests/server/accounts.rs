//! Local accounts (`AUTH_MODE=local`): registration, sign-in, and the tokens the server signs.

use ai_chat_server::auth::{AuthMode, Secret};
use ai_chat_server::config::Config;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{TestServer, call_with_token, test_config};

const SECRET: &str = "the-test-secret-of-at-least-32-bytes";

fn local_config() -> Config {
    let mut config = test_config();
    config.auth.mode = AuthMode::Local;
    config.auth.jwt_secret = Some(Secret::new(SECRET));
    config
}

async fn register(server: &TestServer, username: &str, password: &str) -> (StatusCode, Value) {
    let body = json!({"username": username, "password": password});
    server.post("/api/auth/register", body).await
}

async fn login(server: &TestServer, username: &str, password: &str) -> (StatusCode, Value) {
    let body = json!({"username": username, "password": password});
    server.post("/api/auth/login", body).await
}

/// The claims of a token, read without checking it.
fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

#[tokio::test]
async fn a_registered_user_signs_in_and_is_who_the_token_says() {
    let server = TestServer::start(local_config()).await;
    let (status, registered) = register(&server, "Ann", "correct horse").await;
    assert_eq!(status, StatusCode::CREATED, "{registered}");
    let id = registered["user"]["id"].as_str().unwrap().to_owned();
    assert_eq!(registered["user"], json!({"id": id, "username": "Ann"}));

    let (status, signed_in) = login(&server, "aNN", "correct horse").await;
    assert_eq!(status, StatusCode::OK, "{signed_in}");
    assert_eq!(signed_in["user"], json!({"id": id, "username": "Ann"}));
    let token = signed_in["token"].as_str().unwrap();
    let claims = claims_of(token);
    assert_eq!(claims["sub"], id.as_str());
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        86_400
    );

    let (status, me) = call_with_token(server.addr(), Some(token), "GET", "/api/me", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["id"], id.as_str());
    assert_eq!(me["username"], "Ann");
    let (status, _) = server.get("/api/conversations").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, listed) = call_with_token(
        server.addr(),
        Some(token),
        "GET",
        "/api/conversations",
        None,
    )
    .await;
    assert_eq!((status, listed), (StatusCode::OK, json!([])));
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_user_get_the_same_answer() {
    let server = TestServer::start(local_config()).await;
    register(&server, "ann", "correct horse").await;
    let wrong_password = login(&server, "ann", "correct horsf").await;
    let unknown_user = login(&server, "nobody", "correct horse").await;
    let refused = (
        StatusCode::UNAUTHORIZED,
        json!({"message": "invalid username or password", "code": "UNAUTHORIZED"}),
    );
    assert_eq!(wrong_password, refused);
    assert_eq!(unknown_user, refused);
}

#[tokio::test]
async fn a_username_taken_in_another_case_is_refused() {
    let server = TestServer::start(local_config()).await;
    let (status, _) = register(&server, "Ann", "correct horse").await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, refused) = register(&server, "aNN", "another horse").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        refused,
        json!({"message": "That username is taken", "code": "USERNAME_TAKEN"})
    );
    // The first account keeps its password.
    assert_eq!(
        login(&server, "ann", "another horse").await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        login(&server, "ann", "correct horse").await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn closed_registration_is_forbidden() {
    let mut config = local_config();
    config.auth.registration_open = false;
    let server = TestServer::start(config).await;
    let (status, refused) = register(&server, "ann", "correct horse").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        refused,
        json!({"message": "Registration is closed", "code": "FORBIDDEN"})
    );
}

#[tokio::test]
async fn usernames_and_passwords_are_checked_at_their_edges() {
    let server = TestServer::start(local_config()).await;
    let longest = "a".repeat(64);
    for (username, password, status) in [
        (longest.as_str(), "12345678", StatusCode::CREATED),
        ("b", "12345678", StatusCode::CREATED),
        (&"c".repeat(65), "12345678", StatusCode::BAD_REQUEST),
        ("", "12345678", StatusCode::BAD_REQUEST),
        ("d", "1234567", StatusCode::BAD_REQUEST),
    ] {
        let (got, answer) = register(&server, username, password).await;
        assert_eq!(got, status, "{username:?} {password:?}: {answer}");
    }
    let (status, answer) = server
        .post("/api/auth/register", json!({"username": "e"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["code"], "INVALID_REQUEST");
}

#[tokio::test]
async fn the_stored_hash_is_argon2id() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chat.db");
    let mut config = local_config();
    config.database_url = format!("sqlite://{}", file.display());
    let server = TestServer::start(config).await;
    register(&server, "Ann", "correct horse").await;
    let db = rusqlite::Connection::open(&file).unwrap();
    let (username, hash): (String, String) = db
        .query_row("SELECT username, password_hash FROM accounts", [], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })
        .unwrap();
    assert_eq!(username, "Ann");
    assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
    assert!(!hash.contains("correct horse"));
}

#[tokio::test]
async fn sign_in_attempts_are_limited_per_address() {
    let mut config = local_config();
    config.auth.login_attempts_per_minute = 3;
    let server = TestServer::start(config).await;
    register(&server, "ann", "correct horse").await;
    for _ in 0..2 {
        assert_eq!(
            login(&server, "ann", "wrong horse").await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        login(&server, "ann", "correct horse").await.0,
        StatusCode::OK
    );
    let (status, refused) = login(&server, "ann", "correct horse").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused["code"], "RATE_LIMIT_EXCEEDED");
}

#[tokio::test]
async fn accounts_routes_exist_only_with_local_accounts() {
    let server = TestServer::start(test_config()).await;
    for path in ["/api/auth/register", "/api/auth/login"] {
        let body = json!({"username": "ann", "password": "correct horse"});
        let (status, answer) = server.post(path, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(answer["code"], "NOT_FOUND");
    }
}
