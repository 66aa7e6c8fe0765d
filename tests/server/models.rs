//! The model provider against servers that speak OpenAI's API each in their own way: minimal
//! chunks, reasoning models that refuse parameters, older servers that know only `max_tokens`,
//! settings left unsent, and a provider that cannot be set up. Black-box: the real server (or
//! the provider through the library's API), the test model server, real clients.

use std::process::Stdio;
use std::time::Duration;

use crate::support::model_server::{OLDER_SERVER, REASONING_MODEL, Refusal};
use crate::support::process;
use crate::support::{ModelServer, RealtimeClient, TestServer, WAIT, config_for, final_content};
use ai_chat_server::config::Config;
use ai_chat_server::domain::{Message, Role};
use ai_chat_server::llm::{ModelProvider, OpenAiProvider, Prompt, Streamed, Usage};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A chat server for `model` whose model is named `name`, with the default settings.
async fn server_for(model: &ModelServer, name: &str) -> TestServer {
    let mut config = config_for(model);
    config.model.model = name.into();
    TestServer::start(config).await
}

/// Streams a reply over `/ws` and checks it is the model's whole reply, stored as complete.
async fn streams_the_reply(server: &TestServer, model: &ModelServer, conversation: &str) {
    let mut client = server.ws().await;
    let events = client.chat(conversation, "Hello").await;
    assert_eq!(final_content(&events), model.reply_text());
    let stored = server.settled_reply(conversation).await;
    assert_eq!(stored["status"], "complete", "{stored}");
    assert_eq!(stored["content"], model.reply_text());
}

/// Asks for a whole reply over REST and checks it is the model's.
async fn completes_the_reply(server: &TestServer, model: &ModelServer) {
    let (status, body) = server.post("/api/chat", json!({"message": "Hello"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["message"]["content"], model.reply_text());
}

/// The optional parameters of a request, for comparing: the token caps, temperature and
/// stream options it carries.
fn optional_parameters(request: &Value) -> Value {
    let keep = [
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "stream_options",
    ];
    keep.iter()
        .filter_map(|name| request.get(*name).map(|v| (name.to_string(), v.clone())))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn usage_chunk() -> Value {
    json!({"include_usage": true})
}

#[tokio::test]
async fn minimal_chunks_stream_a_reply() {
    let model = ModelServer::start().await;
    model.set_minimal(true);
    let server = server_for(&model, "test-model").await;
    streams_the_reply(&server, &model, "minimal").await;
}

#[tokio::test]
async fn a_minimal_whole_answer_completes_a_reply() {
    let model = ModelServer::start().await;
    model.set_minimal(true);
    let server = server_for(&model, "test-model").await;
    completes_the_reply(&server, &model).await;
}

#[tokio::test]
async fn a_reasoning_model_works_with_the_defaults() {
    let model = ModelServer::start().await;
    model.set_refusals(&REASONING_MODEL);
    let server = server_for(&model, "o3-mini").await;
    streams_the_reply(&server, &model, "reasoning").await;
    completes_the_reply(&server, &model).await;

    let sent: Vec<Value> = model.received().iter().map(optional_parameters).collect();
    assert_eq!(
        sent,
        [
            json!({"max_tokens": 2000, "stream_options": usage_chunk()}),
            json!({"max_completion_tokens": 2000, "stream_options": usage_chunk()}),
            json!({"max_completion_tokens": 2000}),
        ],
        "no temperature for a reasoning model; the token cap's field learned once"
    );
}

#[tokio::test]
async fn a_model_not_known_to_reason_is_learned_from_its_refusals() {
    let model = ModelServer::start().await;
    model.set_refusals(&REASONING_MODEL);
    let server = server_for(&model, "test-model").await;
    completes_the_reply(&server, &model).await;
    streams_the_reply(&server, &model, "learned").await;

    let sent: Vec<Value> = model.received().iter().map(optional_parameters).collect();
    assert_eq!(
        sent,
        [
            json!({"max_tokens": 2000, "temperature": 0.7}),
            json!({"max_completion_tokens": 2000, "temperature": 0.7}),
            json!({"max_completion_tokens": 2000}),
            json!({"max_completion_tokens": 2000, "stream_options": usage_chunk()}),
        ]
    );
}

#[tokio::test]
async fn an_older_server_that_knows_only_max_tokens_still_works() {
    let model = ModelServer::start().await;
    model.set_refusals(&OLDER_SERVER);
    let server = server_for(&model, "test-model").await;
    streams_the_reply(&server, &model, "older").await;
    streams_the_reply(&server, &model, "older-again").await;
    completes_the_reply(&server, &model).await;

    let sent: Vec<Value> = model.received().iter().map(optional_parameters).collect();
    let plain = json!({"max_tokens": 2000, "temperature": 0.7});
    assert_eq!(
        sent,
        [
            json!({"max_tokens": 2000, "temperature": 0.7, "stream_options": usage_chunk()}),
            plain.clone(),
            plain.clone(),
            plain,
        ],
        "stream_options is left out once refused"
    );
}

#[tokio::test]
async fn a_parameter_refused_whatever_it_is_called_ends_in_the_apology() {
    let model = ModelServer::start().await;
    model.set_refusals(&[
        Refusal::Unsupported("max_tokens"),
        Refusal::Unsupported("max_completion_tokens"),
    ]);
    let server = server_for(&model, "test-model").await;
    let mut client = server.ws().await;
    client.chat("refused", "Hello").await;
    let stored = server.settled_reply("refused").await;
    assert_eq!(stored["status"], "error", "{stored}");
    let fields: Vec<Value> = model
        .received()
        .iter()
        .map(|r| json!([r.get("max_tokens"), r.get("max_completion_tokens")]))
        .collect();
    assert_eq!(
        fields,
        [
            json!([2000, null]),
            json!([null, 2000]),
            json!([2000, null])
        ],
        "each field is tried again at most once"
    );
}

#[tokio::test]
async fn temperature_and_token_cap_set_off_are_not_sent() {
    let from_env = Config::from_lookup(|name| match name {
        "OPENAI_TEMPERATURE" => Some("off".into()),
        "OPENAI_MAX_TOKENS" => Some(String::new()),
        _ => None,
    })
    .expect("off and empty are valid");
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.model.temperature = from_env.model.temperature;
    config.model.max_tokens = from_env.model.max_tokens;
    let server = TestServer::start(config).await;
    streams_the_reply(&server, &model, "off").await;
    completes_the_reply(&server, &model).await;

    let sent: Vec<Value> = model.received().iter().map(optional_parameters).collect();
    assert_eq!(
        sent,
        [json!({"stream_options": usage_chunk()}), json!({})],
        "neither a temperature nor a token cap"
    );
}

/// The provider for `model`, used directly.
fn provider_for(model: &ModelServer) -> OpenAiProvider {
    OpenAiProvider::new(&config_for(model).model, WAIT).expect("the provider is set up")
}

fn prompt() -> Prompt {
    let question = Message::new("c", Role::User, "Hello".into());
    Prompt::build("You are a test.", &[question], 1000)
}

#[tokio::test]
async fn usage_ends_a_stream_and_comes_with_a_whole_reply() {
    for minimal in [false, true] {
        let model = ModelServer::start().await;
        model.set_minimal(minimal);
        let provider = provider_for(&model);
        let pieces = model.reply_text().split_inclusive(' ').count();
        let expected: Usage = serde_json::from_value(ModelServer::usage(2, pieces)).unwrap();

        let stream = provider.stream(prompt()).await.expect("a stream");
        let items: Vec<Streamed> = tokio::time::timeout(WAIT, stream.collect::<Vec<_>>())
            .await
            .expect("the stream ends in time")
            .into_iter()
            .map(|item| item.expect("no error"))
            .collect();
        let (last, texts) = items.split_last().expect("items");
        assert_eq!(*last, Streamed::Usage(expected), "minimal: {minimal}");
        let text: String = texts
            .iter()
            .map(|item| item.clone().into_text().expect("text before the usage"))
            .collect();
        assert_eq!(text, model.reply_text());
        assert_eq!(model.received()[0]["stream_options"], usage_chunk());

        let whole = provider.complete(prompt()).await.expect("a reply");
        assert_eq!(whole.text, model.reply_text());
        assert_eq!(whole.usage, Some(expected), "minimal: {minimal}");
    }
}

#[tokio::test]
async fn a_model_client_that_cannot_be_built_stops_start_up() {
    let nowhere = tempfile::tempdir().unwrap();
    let no_certificates = nowhere.path().join("none.pem");
    let mut child = process::command(&[
        ("DATABASE_URL", "memory".into()),
        ("OPENAI_API_KEY", "test-key".into()),
        ("SSL_CERT_FILE", no_certificates.display().to_string()),
        ("SSL_CERT_DIR", nowhere.path().display().to_string()),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("server binary starts");
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not stop");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let line = stdout
        .lines()
        .find(|line| line.contains("could not start"))
        .unwrap_or_else(|| panic!("no start-up error in: {stdout}"));
    assert!(
        line.contains("cannot start the model provider")
            && line.contains("HTTP client")
            && line.contains("No CA certificates"),
        "{line}"
    );
    assert!(!stdout.contains("listening on"), "{stdout}");
}
