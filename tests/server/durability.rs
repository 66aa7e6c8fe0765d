//! Conversations that outlive the process: restart, SIGKILL mid-stream, passivation, and an
//! actor that panics.

use std::time::Duration;

use ai_chat_server::store::{Durability, SqliteStore};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::postgres::TestDatabase;
use crate::support::process::ServerProcess;
use crate::support::{
    ModelServer, RealtimeClient, TestServer, WsClient, call_at, config_for, final_content, names,
    pieces_of,
};

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}/chat.db", dir.path().join("data").display())
}

#[tokio::test]
async fn a_restart_keeps_every_conversation() {
    let dir = tempfile::tempdir().unwrap();
    keeps_every_conversation_across_a_restart(sqlite_url(&dir)).await;
}

#[tokio::test]
async fn a_restart_keeps_every_conversation_in_postgres() {
    let database = TestDatabase::create().await;
    keeps_every_conversation_across_a_restart(database.url.clone()).await;
}

/// Client text of any kind: U+0000 (which PostgreSQL's text cannot hold), an emoji and a lone
/// combining mark.
const ANY_TEXT: &str = "over REST, with \u{0}, \u{1F980} and a lone \u{301}";

/// The server binary on the store `database_url` names, stopped (SIGTERM) and started again,
/// serves every conversation as it did, and sends the model their whole history.
async fn keeps_every_conversation_across_a_restart(database_url: String) {
    let model = ModelServer::start().await;
    let env = [
        ("DATABASE_URL", database_url),
        ("OPENAI_API_KEY", "test".to_owned()),
        ("OPENAI_BASE_URL", model.base_url()),
        ("SHUTDOWN_GRACE_MS", "1000".to_owned()),
    ];
    let get = |addr, path: String| async move { call_at(addr, "GET", &path, None).await.1 };

    let server = ServerProcess::spawn(&env);
    let (_, first) = call_at(
        server.addr,
        "POST",
        "/api/chat",
        Some(json!({"message": ANY_TEXT})),
    )
    .await;
    let rest_id = first["conversation"]["id"].as_str().unwrap().to_owned();
    call_at(
        server.addr,
        "POST",
        "/api/chat",
        Some(json!({"message": "and again", "conversationId": rest_id})),
    )
    .await;
    let mut client = WsClient::connect(server.addr).await;
    client.chat("over-ws", "streamed").await;
    let list_before = get(server.addr, "/api/conversations".into()).await;
    let rest_before = get(server.addr, format!("/api/conversations/{rest_id}")).await;
    let ws_before = get(server.addr, "/api/conversations/over-ws".into()).await;
    assert_eq!(rest_before["messages"][0]["content"], ANY_TEXT);
    client.close().await;
    stop(server);

    let server = ServerProcess::spawn(&env);
    let list_after = get(server.addr, "/api/conversations".into()).await;
    assert_eq!(list_after, list_before);
    assert_eq!(list_after.as_array().unwrap().len(), 2);
    assert_eq!(
        get(server.addr, format!("/api/conversations/{rest_id}")).await,
        rest_before
    );
    assert_eq!(
        get(server.addr, "/api/conversations/over-ws".into()).await,
        ws_before
    );

    let mut client = WsClient::connect(server.addr).await;
    client.chat(&rest_id, "after the restart").await;
    let sent = model.received().last().unwrap()["messages"].clone();
    let contents: Vec<&str> = sent
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    let reply = model.reply_text();
    assert_eq!(
        contents,
        [
            "You are a helpful assistant.",
            ANY_TEXT,
            &reply,
            "and again",
            &reply,
            "after the restart"
        ]
    );
}

/// Stops the server as an operator would (SIGTERM), and waits until it has.
fn stop(mut server: ServerProcess) {
    let pid = Pid::from_raw(server.child.id() as i32);
    signal::kill(pid, Signal::SIGTERM).unwrap();
    assert!(server.child.wait().unwrap().success());
}

#[tokio::test]
async fn sigkill_mid_stream_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let model = ModelServer::start().await;
    let env = [
        ("DATABASE_URL", sqlite_url(&dir)),
        ("OPENAI_API_KEY", "test".to_owned()),
        ("OPENAI_BASE_URL", model.base_url()),
        ("CHECKPOINT_INTERVAL_MS", "50".to_owned()),
    ];
    let server = ServerProcess::spawn(&env);
    let mut client = WsClient::connect(server.addr).await;
    client.chat("crash", "before the crash").await;

    let words: Vec<String> = (0..60).map(|i| format!("word{i} ")).collect();
    model.set_reply(words, Duration::from_millis(40));
    client
        .emit(
            "stream_chat",
            json!({"conversationId": "crash", "message": "during the crash"}),
        )
        .await;
    let (name, start) = client.next().await;
    assert_eq!(name, "stream_start");
    let mut streamed = String::new();
    for _ in 0..10 {
        let (name, chunk) = client.next().await;
        assert_eq!(name, "stream_chunk");
        streamed = chunk["content"].as_str().unwrap().to_owned();
    }
    tokio::time::sleep(Duration::from_millis(120)).await;
    server.kill();

    let store = SqliteStore::open(&sqlite_url(&dir), Durability::Normal)
        .await
        .unwrap();
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
    drop(store);

    let server = ServerProcess::spawn(&env);
    let (status, conversation) =
        call_at(server.addr, "GET", "/api/conversations/crash", None).await;
    assert_eq!(status, StatusCode::OK);
    let messages = conversation["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4, "{conversation}");
    assert_eq!(messages[0]["content"], "before the crash");
    assert_eq!(messages[1]["status"], "complete");
    assert_eq!(messages[2]["content"], "during the crash");
    let partial = &messages[3];
    assert_eq!(partial["id"], start["messageId"]);
    assert_eq!(partial["status"], "error");
    let saved = partial["content"].as_str().unwrap();
    assert!(
        saved.len() >= streamed.len(),
        "saved {saved:?}, streamed {streamed:?}"
    );
    assert!(model.reply_text().starts_with(saved));

    model.set_reply(pieces_of("fine again"), Duration::ZERO);
    let mut client = WsClient::connect(server.addr).await;
    let events = client.chat("crash", "after the crash").await;
    assert_eq!(final_content(&events), "fine again");
}

#[tokio::test]
async fn idle_conversations_leave_memory_and_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.database_url = sqlite_url(&dir);
    config.conversations.idle_timeout = Duration::from_millis(150);
    let server = TestServer::start(config).await;

    let mut client = server.ws().await;
    for id in ["p1", "p2", "p3"] {
        client.chat(id, "hello").await;
    }
    let health = server.get("/api/health").await.1;
    assert_eq!(health["activeConversations"], 3);
    client
        .emit("leave_conversation", json!({"conversationId": "p1"}))
        .await;
    client
        .emit("leave_conversation", json!({"conversationId": "p2"}))
        .await;
    server
        .wait_for_health(|h| h["activeConversations"] == 1)
        .await;

    let (status, p1) = server.get("/api/conversations/p1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(p1["messages"].as_array().unwrap().len(), 2);
    assert_eq!(server.get("/api/health").await.1["activeConversations"], 1);

    let events = client.chat("p1", "back again").await;
    assert_eq!(final_content(&events), model.reply_text());
    assert_eq!(
        model.received().last().unwrap()["messages"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    client.close().await;
    server
        .wait_for_health(|h| h["activeConversations"] == 0)
        .await;
}

#[tokio::test]
async fn a_panicking_actor_restarts_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.database_url = sqlite_url(&dir);
    config.conversations.fault_trigger = Some("panic now".into());
    let server = TestServer::start(config).await;

    let mut sender = server.ws().await;
    let mut watcher = server.ws().await;
    watcher.join("fragile").await;
    sender.chat("fragile", "hello").await;
    watcher.until_complete().await;

    let bystander = tokio::spawn({
        let addr = server.addr();
        let model = model.clone();
        async move {
            let mut client = WsClient::connect(addr).await;
            model.set_reply(
                pieces_of("a steady reply in many small words"),
                Duration::from_millis(20),
            );
            client.chat("steady", "keep going").await
        }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;

    sender
        .emit(
            "stream_chat",
            json!({"conversationId": "fragile", "message": "panic now"}),
        )
        .await;
    let (name, error) = sender.next().await;
    assert_eq!(name, "error");
    assert_eq!(error["code"], "INTERNAL_ERROR");

    let events = sender.chat("fragile", "still there?").await;
    assert_eq!(names(&events)[0], "stream_start");
    let seen = watcher.until_complete().await;
    assert_eq!(seen, events, "the watcher was kept across the restart");

    let (_, conversation) = server.get("/api/conversations/fragile").await;
    let texts: Vec<&str> = conversation["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 4);
    assert_eq!(texts[0], "hello");
    assert_eq!(texts[2], "still there?");

    let steady = bystander.await.unwrap();
    assert_eq!(final_content(&steady), "a steady reply in many small words");

    let (status, body) = server
        .post(
            "/api/chat",
            json!({"conversationId": "fragile", "message": "panic now"}),
        )
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["code"], "INTERNAL_ERROR");
    let (status, _) = server
        .post(
            "/api/chat",
            json!({"conversationId": "fragile", "message": "fine"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn deleting_tells_the_members_and_frees_the_id() {
    let dir = tempfile::tempdir().unwrap();
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.database_url = sqlite_url(&dir);
    let server = TestServer::start(config).await;
    let mut member = server.ws().await;
    member.chat("doomed", "hello").await;
    let (status, _) = server
        .call("DELETE", "/api/conversations/doomed", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (name, data) = member.next().await;
    assert_eq!(name, "conversation_deleted");
    assert_eq!(data, json!({"conversationId": "doomed"}));
    for path in ["/api/conversations/doomed"] {
        let (status, body) = server.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["code"], "CONVERSATION_NOT_FOUND");
    }
    let (_, list) = server.get("/api/conversations").await;
    assert_eq!(list, Value::Array(vec![]));
    let store = SqliteStore::open(&sqlite_url(&dir), Durability::Normal)
        .await
        .unwrap();
    use ai_chat_server::store::ConversationStore;
    let anonymous = ai_chat_server::domain::UserId::anonymous();
    let stored = store.load_conversation(&anonymous, "doomed").await;
    assert!(stored.unwrap().is_none());
}

/// The database file of a release that applied its migrations with sqlx: the schema of migration
/// 1, and sqlx's table listing it.
const SQLX_RELEASE_SCHEMA: &str = "
CREATE TABLE conversations (
    id         TEXT    PRIMARY KEY NOT NULL,
    title      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX conversations_by_update ON conversations (updated_at DESC, id DESC);
CREATE TABLE messages (
    id              TEXT    NOT NULL UNIQUE,
    conversation_id TEXT    NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role            TEXT    NOT NULL,
    content         TEXT    NOT NULL,
    status          TEXT,
    timestamp       INTEGER NOT NULL
);
CREATE INDEX messages_by_conversation ON messages (conversation_id);
CREATE INDEX messages_streaming ON messages (status) WHERE status = 'streaming';
CREATE TABLE _sqlx_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    success BOOLEAN NOT NULL,
    checksum BLOB NOT NULL,
    execution_time BIGINT NOT NULL
);
INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
VALUES (1, 'conversations', TRUE, randomblob(48), 1834000);
";

#[tokio::test]
async fn a_database_of_the_sqlx_release_opens_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let file = dir.path().join("data").join("chat.db");
    let db = rusqlite::Connection::open(&file).unwrap();
    db.pragma_update(None, "journal_mode", "WAL").unwrap();
    db.execute_batch(SQLX_RELEASE_SCHEMA).unwrap();
    db.execute_batch(
        "INSERT INTO conversations VALUES ('kept', 'An old one', 1700000000000, 1700000002000);
         INSERT INTO messages VALUES ('m1', 'kept', 'user', 'old question', NULL, 1700000001000);
         INSERT INTO messages VALUES ('m2', 'kept', 'assistant', 'old answer', 'complete', 1700000002000);
         INSERT INTO conversations VALUES ('cut', 'Cut short', 1600000000000, 1600000000000);
         INSERT INTO messages VALUES ('m3', 'cut', 'user', 'and then', NULL, 1600000000000);
         INSERT INTO messages VALUES ('m4', 'cut', 'assistant', 'half of', 'streaming', 1600000000000);",
    )
    .unwrap();
    drop(db);

    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.database_url = sqlite_url(&dir);
    let server = TestServer::start(config.clone()).await;
    let (status, kept) = server.get("/api/conversations/kept").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        kept,
        json!({
            "id": "kept",
            "title": "An old one",
            "createdAt": "2023-11-14T22:13:20.000Z",
            "updatedAt": "2023-11-14T22:13:22.000Z",
            "messages": [
                {"id": "m1", "conversationId": "kept", "role": "user", "content": "old question",
                 "timestamp": "2023-11-14T22:13:21.000Z"},
                {"id": "m2", "conversationId": "kept", "role": "assistant", "content": "old answer",
                 "status": "complete", "timestamp": "2023-11-14T22:13:22.000Z"},
            ],
        })
    );
    let (_, list) = server.get("/api/conversations").await;
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["kept", "cut"]);
    let (_, cut) = server.get("/api/conversations/cut").await;
    assert_eq!(cut["messages"][1]["content"], "half of");
    assert_eq!(cut["messages"][1]["status"], "error");

    let (status, _) = server
        .post(
            "/api/chat",
            json!({"conversationId": "kept", "message": "new question"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let sent = model.received().last().unwrap()["messages"].clone();
    assert_eq!(sent[1]["content"], "old question");
    assert_eq!(sent[3]["content"], "new question");
    server.app.shutdown(Duration::from_secs(1)).await;

    let server = TestServer::start(config).await;
    let (_, kept) = server.get("/api/conversations/kept").await;
    assert_eq!(kept["messages"].as_array().unwrap().len(), 4);
    let db = rusqlite::Connection::open(&file).unwrap();
    let sqlx_versions: i64 = db
        .query_row("SELECT count(*) FROM _sqlx_migrations", [], |row| {
            row.get(0)
        })
        .unwrap();
    assert_eq!(sqlx_versions, 1, "left for the sqlx release to open");
}
