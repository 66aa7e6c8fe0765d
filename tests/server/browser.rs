//! The chat page at `/`: served by the binary with its files, and used in real headless Chromium
//! (Debian's `chromium`, driven by `tests/support/browser/page.mjs` with `playwright-core`)
//! against the real server and the test model server.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::support::{Mode, ModelServer, TestServer, config_for, pieces_of, test_config, words};
use ai_chat_server::auth::{AuthMode, Secret};
use ai_chat_server::config::Config;

/// The longest one scenario may go without a line: it starts a browser and waits for replies.
const SCENARIO_WAIT: Duration = Duration::from_secs(60);

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/browser")
}

/// One scenario of `page.mjs` running in its own Node process and browser.
struct Scenario {
    _child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<Value>,
}

impl Scenario {
    /// Starts `name` against `server`, with `args` added to what the script is given.
    fn start(server: &TestServer, name: &str, args: Value) -> Scenario {
        let dir = browser_dir();
        crate::support::npm::install(&dir, "playwright-core");
        let mut given = json!({"url": format!("http://{}", server.addr()), "scenario": name});
        if let (Some(given), Some(args)) = (given.as_object_mut(), args.as_object()) {
            given.extend(args.clone());
        }
        let mut child = Command::new("node")
            .arg(dir.join("page.mjs"))
            .arg(given.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs (install Node.js)");
        let stdin = child.stdin.take().expect("script stdin");
        let stdout = child.stdout.take().expect("script stdout");
        let (sender, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let value = serde_json::from_str(&line).expect("script lines are JSON");
                if sender.send(value).is_err() {
                    break;
                }
            }
        });
        Scenario {
            _child: child,
            stdin,
            lines,
        }
    }

    async fn next_line(&mut self) -> Value {
        let line = tokio::time::timeout(SCENARIO_WAIT, self.lines.recv())
            .await
            .expect("the browser script answers in time")
            .expect("the browser script runs (is /usr/bin/chromium installed?)");
        if let Some(error) = line.get("error") {
            panic!(
                "browser scenario failed: {}\nproblems: {}",
                error.as_str().unwrap_or_default(),
                line["problems"]
            );
        }
        line
    }

    /// Waits until the scenario reaches step `name`, and returns what it said there.
    async fn step(&mut self, name: &str) -> Value {
        let line = self.next_line().await;
        assert_eq!(line["step"], name, "{line}");
        line
    }

    /// Lets the scenario go on from its step.
    async fn go_on(&mut self) {
        self.stdin
            .write_all(b"{}\n")
            .await
            .expect("the script takes answers");
    }

    /// What the scenario saw; it fails if the page had errors (CSP violations among them) or
    /// opened dialogs it was not asked to.
    async fn result(mut self) -> Value {
        let line = self.next_line().await;
        let result = line["result"].clone();
        assert_eq!(result["problems"], json!([]), "{result:#}");
        result
    }
}

/// Starts `name` and returns what it saw, for scenarios without steps.
async fn run(server: &TestServer, name: &str, args: Value) -> Value {
    Scenario::start(server, name, args).result().await
}

fn texts(value: &Value) -> Vec<String> {
    value
        .as_array()
        .expect("a list")
        .iter()
        .map(|text| text.as_str().expect("a text").to_owned())
        .collect()
}

/// Checks that every text the reply showed on its way was the start of the next one, and that
/// it ended as `last`: nothing doubled, nothing lost.
fn assert_grew_into(seen: &[String], last: &str) {
    assert_eq!(seen.last().map(String::as_str), Some(last), "{seen:#?}");
    for pair in seen.windows(2) {
        assert!(pair[1].starts_with(&pair[0]), "{seen:#?}");
    }
}

/// The reply's words, as the page shows them: markdown paragraphs trim the trailing space.
fn shown(reply: &str) -> String {
    reply.trim_end().to_owned()
}

async fn conversation_ids(server: &TestServer) -> Vec<String> {
    let (_, list) = server.get("/api/conversations").await;
    list.as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn create(server: &TestServer, message: &str) -> String {
    let (status, body) = server.post("/api/chat", json!({"message": message})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["conversation"]["id"].as_str().unwrap().to_owned()
}

// ---- The page over HTTP ----

#[tokio::test]
async fn the_page_and_its_files_are_served_with_types_and_validators() {
    let server = TestServer::start(test_config()).await;
    let page = server.http.get(server.url("/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
    assert_eq!(page.headers()[CACHE_CONTROL], "no-cache");
    assert!(page.headers().contains_key(CONTENT_SECURITY_POLICY));
    let etag = page.headers()[ETAG].clone();
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="/app.js"></script>"#));
    assert_eq!(html.matches("<script").count(), 1, "no inline script");

    let linked = server
        .http
        .get(server.url("/c/some-conversation"))
        .send()
        .await
        .unwrap();
    assert_eq!(linked.status(), StatusCode::OK);
    assert_eq!(linked.text().await.unwrap(), html);

    let files = [
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/markdown.js", "text/javascript; charset=utf-8"),
        ("/app.css", "text/css; charset=utf-8"),
        ("/icon.svg", "image/svg+xml"),
    ];
    for (path, content_type) in files {
        let file = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(file.status(), StatusCode::OK, "{path}");
        assert_eq!(file.headers()[CONTENT_TYPE], content_type, "{path}");
        assert_eq!(file.headers()[CACHE_CONTROL], "no-cache", "{path}");
        assert!(file.headers().contains_key(ETAG), "{path}");
    }

    let revalidated = server
        .http
        .get(server.url("/"))
        .header(IF_NONE_MATCH, etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(revalidated.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(revalidated.headers()[ETAG], etag);
    assert!(revalidated.bytes().await.unwrap().is_empty());

    for path in ["/nothing.js", "/c/a/b", "/app.js/x"] {
        let (status, body) = server.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body["code"], "NOT_FOUND", "{path}");
    }
    let (status, body) = server.post("/", json!({})).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(body["code"], "METHOD_NOT_ALLOWED");
}

#[tokio::test]
async fn web_client_false_leaves_the_api_alone() {
    let server = TestServer::start(Config {
        web_client: false,
        ..test_config()
    })
    .await;
    for path in ["/", "/c/abc", "/app.js", "/app.css"] {
        let (status, body) = server.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body["code"], "NOT_FOUND", "{path}");
        assert!(body["message"].is_string(), "{path}");
    }
    let (status, _) = server.get("/api/health").await;
    assert_eq!(status, StatusCode::OK);
}

// ---- The page in a browser ----

#[tokio::test]
async fn a_message_sent_with_enter_streams_its_reply_into_the_page() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(60), Duration::from_millis(20));
    let result = run(&server, "chat", json!({})).await;

    let received = model.received();
    let sent = received[0]["messages"].as_array().unwrap().last().unwrap();
    assert_eq!(sent["content"], "first line\nsecond line");
    assert_eq!(result["user"], "first line\nsecond line");
    assert_eq!(result["boxAfter"], "");

    let seen = texts(&result["seen"]);
    assert_grew_into(&seen, &shown(&model.reply_text()));
    assert!(seen.len() >= 3, "the reply appeared in pieces: {seen:#?}");

    let ids = conversation_ids(&server).await;
    assert_eq!(ids.len(), 1);
    let path = format!("/c/{}", ids[0]);
    assert_eq!(result["path"], path);
    assert_eq!(result["currentLink"], path);
    assert_eq!(texts(&result["sidebar"]), ["first line\nsecond line"]);
    assert_eq!(result["heading"], "first line second line");
    let reply = server.settled_reply(&ids[0]).await;
    assert_eq!(reply["content"], model.reply_text());
}

#[tokio::test]
async fn markdown_renders_with_copyable_code_and_html_stays_text() {
    let (server, model) = TestServer::with_model().await;
    let reply = "## Result\n\nHere is **the code** with `inline` and a [site](https://example.com/docs) \
        and [bad](javascript:alert(3)):\n\n```rust\nfn main() {\n    println!(\"<b>hi</b>\");\n}\n```\n\n\
        - one\n- two\n\n<img src=x onerror=alert(1)> <script>alert(2)</script>";
    model.set_reply(pieces_of(reply), Duration::from_millis(2));
    let result = run(&server, "markdown", json!({})).await;

    let code = "fn main() {\n    println!(\"<b>hi</b>\");\n}";
    assert_eq!(texts(&result["code"]), [code]);
    assert_eq!(result["copyButtons"], 1);
    assert_eq!(result["clipboard"], code);
    assert_eq!(texts(&result["headings"]), ["Result"]);
    assert_eq!(texts(&result["items"]), ["one", "two"]);
    assert_eq!(texts(&result["inlineCode"]), ["inline"]);
    assert_eq!(texts(&result["strong"]), ["the code"]);
    assert_eq!(texts(&result["links"]), ["https://example.com/docs"]);
    assert_eq!(
        result["elements"], 0,
        "no element came from the model's HTML"
    );
    let text = result["text"].as_str().unwrap();
    assert!(text.contains("<img src=x onerror=alert(1)> <script>alert(2)</script>"));
    assert!(text.contains("[bad](javascript:alert(3))"));
}

#[tokio::test]
async fn stop_ends_the_reply_where_it_is() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(300), Duration::from_millis(20));
    let result = run(&server, "stop", json!({})).await;

    let id = &conversation_ids(&server).await[0];
    let stored = server.settled_reply(id).await;
    assert_eq!(stored["status"], "cancelled");
    assert_eq!(result["text"], shown(stored["content"].as_str().unwrap()));
    assert!(stored["content"].as_str().unwrap().len() < model.reply_text().len());
    assert_eq!(result["note"], "Stopped.");
    assert_eq!(result["regenerate"], 1);
    assert_eq!(result["sendEnabled"], true);
}

#[tokio::test]
async fn regenerate_replaces_the_last_reply() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(pieces_of("The first answer."), Duration::from_millis(2));
    let mut scenario = Scenario::start(&server, "regenerate", json!({}));
    let replied = scenario.step("replied").await;
    assert_eq!(replied["first"], "The first answer.");
    model.set_reply(pieces_of("A better answer."), Duration::from_millis(2));
    scenario.go_on().await;
    let result = scenario.result().await;

    assert_eq!(texts(&result["replies"]), ["A better answer."]);
    assert_eq!(result["users"], 1);
    assert_eq!(result["regenerate"], 1);
    let id = &conversation_ids(&server).await[0];
    let (_, conversation) = server.get(&format!("/api/conversations/{id}")).await;
    let contents: Vec<&str> = conversation["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, ["hello", "A better answer."]);
}

#[tokio::test]
async fn the_sidebar_renames_and_deletes_after_confirmation() {
    let (server, _model) = TestServer::with_model().await;
    let alpha = create(&server, "alpha").await;
    let beta = create(&server, "beta").await;
    let result = run(&server, "sidebar", json!({})).await;

    assert_eq!(texts(&result["initial"]), ["beta", "alpha"], "newest first");
    assert_eq!(texts(&result["afterDecline"]), ["beta", "renamed alpha"]);
    assert_eq!(result["confirms"].as_array().unwrap().len(), 2);
    assert_eq!(texts(&result["final"]), ["renamed alpha"]);
    assert_eq!(result["path"], "/");
    assert_eq!(result["heading"], "New chat");
    let (_, renamed) = server.get(&format!("/api/conversations/{alpha}")).await;
    assert_eq!(renamed["title"], "renamed alpha");
    let (status, _) = server.get(&format!("/api/conversations/{beta}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_reload_mid_reply_catches_up_without_doubling_it() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(200), Duration::from_millis(25));
    let result = run(&server, "reload", json!({})).await;

    let seen = texts(&result["seen"]);
    assert_grew_into(&seen, &shown(&model.reply_text()));
    assert!(seen[0].len() < model.reply_text().len() - 1, "{seen:#?}");
    assert!(
        model
            .reply_text()
            .starts_with(result["before"].as_str().unwrap())
    );
    assert_eq!(result["replies"], 1);
    assert_eq!(texts(&result["users"]), ["long one"]);
    let id = &conversation_ids(&server).await[0];
    assert_eq!(
        server.settled_reply(id).await["content"],
        model.reply_text()
    );
}

#[tokio::test]
async fn a_lost_network_mid_reply_catches_up_when_it_returns() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(200), Duration::from_millis(25));
    let mut scenario = Scenario::start(&server, "offline", json!({}));
    let offline = scenario.step("offline").await;
    let during = offline["during"].as_str().unwrap();
    assert!(!during.is_empty() && model.reply_text().starts_with(during));
    scenario.go_on().await;
    let result = scenario.result().await;

    let seen = texts(&result["seen"]);
    assert!(seen[0].starts_with(during), "{seen:#?}");
    assert_grew_into(&seen, &shown(&model.reply_text()));
    assert_eq!(result["replies"], 1);
}

#[tokio::test]
async fn a_second_tab_sees_the_same_reply_live() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(words(200), Duration::from_millis(25));
    let result = run(&server, "tabs", json!({})).await;

    let full = shown(&model.reply_text());
    let first = texts(&result["seenFirst"]);
    let second = texts(&result["seenSecond"]);
    assert_grew_into(&first, &full);
    assert_grew_into(&second, &full);
    assert!(
        second.len() >= 3,
        "the second tab saw it stream: {second:#?}"
    );
    assert_eq!(texts(&result["secondUser"]), ["for both"]);
}

#[tokio::test]
async fn back_and_forward_move_between_conversations() {
    let (server, _model) = TestServer::with_model().await;
    let first = create(&server, "first question").await;
    let second = create(&server, "second question").await;
    let result = run(&server, "history", json!({"first": first})).await;

    let visited: Vec<(String, String)> = result["visited"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v[0].as_str().unwrap().into(), v[1].as_str().unwrap().into()))
        .collect();
    let at = |id: &str, text: &str| (format!("/c/{id}"), text.to_owned());
    assert_eq!(
        visited,
        [
            at(&first, "first question"),
            at(&second, "second question"),
            at(&first, "first question"),
            at(&second, "second question"),
        ]
    );
}

#[tokio::test]
async fn without_a_websocket_conversations_still_open() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.max_connections_per_ip = 1;
    let server = TestServer::start(config).await;
    let first = create(&server, "first question").await;
    let second = create(&server, "second question").await;
    let _only_connection = server.ws().await;
    let result = run(&server, "socketless", json!({ "first": first })).await;
    assert_eq!(result["path"], format!("/c/{second}"));
    assert_eq!(result["status"], "Reconnecting…");
}

#[tokio::test]
async fn refusals_and_model_failures_show_in_place() {
    let model = ModelServer::start().await;
    let mut config = config_for(&model);
    config.rt_messages_per_minute = 1;
    config.max_message_chars = 20;
    let server = TestServer::start(config).await;
    let mut scenario = Scenario::start(&server, "errors", json!({}));
    scenario.step("rate limited").await;
    model.set_mode(Mode::Fail);
    scenario.go_on().await;
    let result = scenario.result().await;

    let too_long = &result["tooLong"];
    assert_eq!(
        too_long["notice"],
        "Message is too long: at most 20 characters"
    );
    assert_eq!(
        too_long["path"], "/",
        "a refused first message makes no conversation"
    );
    assert_eq!(too_long["box"], "a first message that is too long");
    assert_eq!(too_long["messages"], 0);
    assert_eq!(
        result["rateLimit"],
        "You are sending messages too fast. Wait a moment, then try again."
    );
    assert_eq!(result["boxAfter"], "two", "the refused message is kept");
    assert_eq!(texts(&result["users"]), ["one"]);
    assert_eq!(result["failed"], ai_chat_server::actors::APOLOGY);
    assert_eq!(result["note"], "The model could not finish this reply.");
}

#[tokio::test]
async fn an_address_naming_no_conversation_says_so() {
    let server = TestServer::start(test_config()).await;
    for id in ["never-was", "not%20an%20id"] {
        let result = run(&server, "missing", json!({ "id": id })).await;
        assert_eq!(result["composer"], false, "{id}");
        assert_eq!(result["heading"], "Conversation", "{id}");
    }
}

#[tokio::test]
async fn every_control_is_reached_and_worked_by_keyboard() {
    let (server, _model) = TestServer::with_model().await;
    let id = create(&server, "by keys").await;
    let result = run(&server, "keyboard", json!({ "id": id })).await;
    let order = texts(&result["order"]);
    let expected = [
        "Skip to the message box",
        "New chat",
        "by keys",
        "Rename “by keys”",
        "Delete “by keys”",
        "Regenerate",
        "Message",
        "Send",
    ];
    // Tab goes round: from the first control, then the next ones in order.
    let first = order
        .iter()
        .position(|name| name == expected[0])
        .expect("the first control is reached");
    let reached: Vec<&str> = order[first..]
        .iter()
        .map(String::as_str)
        .filter(|name| expected.contains(name))
        .take(expected.len())
        .collect();
    assert_eq!(reached, expected, "{order:#?}");
    assert_eq!(result["focusedAfterRename"], "typed title");
    let (_, conversation) = server.get(&format!("/api/conversations/{id}")).await;
    assert_eq!(conversation["title"], "typed title");
}

#[tokio::test]
async fn at_phone_width_the_sidebar_folds_away() {
    let (server, _model) = TestServer::with_model().await;
    let id = create(&server, "on the go").await;
    let result = run(&server, "phone", json!({"title": "on the go"})).await;
    assert_eq!(result["hiddenAtFirst"], true);
    assert_eq!(result["expanded"], "false");
    assert_eq!(result["path"], format!("/c/{id}"));
    assert_eq!(result["widthFits"], true);
}

#[tokio::test]
async fn markdown_blocks_and_inlines_become_elements_and_the_rest_text() {
    let server = TestServer::start(test_config()).await;
    let cases = [
        ("# Title\n\nOne\ntwo", "<h2>Title</h2><p>One<br>two</p>"),
        ("#hashtag", "<p>#hashtag</p>"),
        (
            "- a\n- b\n  - c\n\n1. x\n2. y",
            "<ul><li>a</li><li>b<ul><li>c</li></ul></li></ul><ol><li>x</li><li>y</li></ol>",
        ),
        (
            "3. three\n4. four",
            r#"<ol start="3"><li>three</li><li>four</li></ol>"#,
        ),
        (
            "```js\nlet a = '<b>';\n```",
            r#"<div class="code-block"><div class="code-header"><span>js</span><button type="button" class="copy-code" aria-label="Copy code">Copy</button></div><pre><code class="language-js">let a = '&lt;b&gt;';</code></pre></div>"#,
        ),
        (
            "```\nstill streaming",
            r#"<div class="code-block"><div class="code-header"><span>code</span><button type="button" class="copy-code" aria-label="Copy code">Copy</button></div><pre><code>still streaming</code></pre></div>"#,
        ),
        (
            "**bold** *em* _em_ ~~no~~ `co*de*` \\*not em\\*",
            "<p><strong>bold</strong> <em>em</em> <em>em</em> <del>no</del> <code>co*de*</code> *not em*</p>",
        ),
        (
            "[ok](https://a.example/x_(y)) [no](javascript:alert(1)) [data](data:text/html,hi) https://b.example/p.",
            r#"<p><a href="https://a.example/x_(y)" target="_blank" rel="noopener noreferrer">ok</a> [no](javascript:alert(1)) [data](data:text/html,hi) <a href="https://b.example/p" target="_blank" rel="noopener noreferrer">https://b.example/p</a>.</p>"#,
        ),
        (
            "<img src=x onerror=alert(1)><script>alert(2)</script>",
            "<p>&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;alert(2)&lt;/script&gt;</p>",
        ),
        (
            "> quoted\n> more",
            "<blockquote><p>quoted<br>more</p></blockquote>",
        ),
        ("a\n\n---\n\nb", "<p>a</p><hr><p>b</p>"),
        (
            "| a | b |\n|---|--:|\n| `x|y` | 2 |",
            r#"<div class="table-scroll"><table><thead><tr><th>a</th><th style="text-align: right;">b</th></tr></thead><tbody><tr><td><code>x|y</code></td><td style="text-align: right;">2</td></tr></tbody></table></div>"#,
        ),
        ("**unclosed", "<p>**unclosed</p>"),
    ];
    let sources: Vec<&str> = cases.iter().map(|(source, _)| *source).collect();
    let result = run(&server, "render", json!({ "cases": sources })).await;
    let html = texts(&result["html"]);
    for ((source, expected), html) in cases.iter().zip(&html) {
        assert_eq!(html, expected, "{source:?}");
    }
}

/// A server with sign-in on (`AUTH_MODE=local`) whose model is `model`.
fn signing_in_config(model: &ModelServer) -> Config {
    let mut config = config_for(model);
    config.auth.mode = AuthMode::Local;
    config.auth.jwt_secret = Some(Secret::new("the-test-secret-of-at-least-32-bytes"));
    config
}

#[tokio::test]
async fn with_sign_in_on_the_page_registers_signs_in_and_out_and_keeps_users_apart() {
    let model = ModelServer::start().await;
    model.set_reply(words(40), Duration::from_millis(10));
    let server = TestServer::start(signing_in_config(&model)).await;
    let result = run(&server, "accounts", json!({})).await;

    let nothing = json!({"conversations": 0, "messages": 0, "token": null, "chatShown": false});
    assert_eq!(result["atFirst"], nothing, "the form comes first");
    assert_eq!(result["name"], "ann");
    assert_grew_into(&texts(&result["seen"]), &shown(&model.reply_text()));
    assert_eq!(texts(&result["annListed"]), ["hello from ann"]);
    assert_eq!(
        result["nameAfterReload"], "ann",
        "the token lasts the session"
    );
    let mut signed_out = nothing.clone();
    signed_out["path"] = json!("/");
    assert_eq!(result["afterSignOut"], signed_out);
    assert_eq!(result["wrongPassword"], "invalid username or password");
    assert_eq!(result["taken"], "That username is taken");
    assert_eq!(texts(&result["annAgain"]), ["hello from ann"]);
    assert_eq!(result["bob"], json!({"name": "bob", "conversations": 0}));
    let mut ended = nothing;
    ended["message"] = json!("Your session has ended. Sign in again.");
    assert_eq!(result["ended"], ended);
}

#[tokio::test]
async fn a_sign_in_that_expires_while_the_page_is_open_shows_the_form_again() {
    let model = ModelServer::start().await;
    let mut config = signing_in_config(&model);
    config.auth.token_ttl = Duration::from_secs(2);
    config.auth.leeway = Duration::ZERO;
    let server = TestServer::start(config).await;
    let result = run(&server, "expiry", json!({})).await;
    assert_eq!(
        result,
        json!({
            "message": "Your session has ended. Sign in again.",
            "token": null,
            "chatShown": false,
            "refused": [],
            "problems": [],
        }),
        "the error event signed out, with no request refused after signing in"
    );
}

/// Takes the README's screenshot, `docs/page.png`, and phone and dark ones beside the build:
/// `cargo test --test server browser::readme_screenshot -- --ignored`.
#[tokio::test]
#[ignore = "writes docs/page.png"]
async fn readme_screenshot() {
    let (server, model) = TestServer::with_model().await;
    model.set_reply(
        pieces_of("Rust's `Option` says a value may be missing:\n\n- `Some(value)` holds one\n- `None` holds nothing"),
        Duration::ZERO,
    );
    let id = create(&server, "What is an Option in Rust?").await;
    model.set_reply(
        pieces_of("Use `match`, or `if let` for one case:\n\n```rust\nif let Some(name) = user.name {\n    println!(\"Hello, {name}!\");\n}\n```\n\n`unwrap_or` gives a default instead."),
        Duration::ZERO,
    );
    let (status, _) = server
        .post(
            "/api/chat",
            json!({"message": "How do I read one?", "conversationId": id}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    create(&server, "Plan a weekend in Lisbon").await;
    create(&server, "Explain WAL mode in SQLite").await;
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/page.png");
    let beside = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let shots = json!([
        {"path": docs, "width": 1100, "height": 720, "dark": false},
        {"path": beside.join("page-phone.png"), "width": 390, "height": 760, "dark": false},
        {"path": beside.join("page-dark.png"), "width": 1100, "height": 720, "dark": true},
    ]);
    let result = run(
        &server,
        "screenshot",
        json!({"conversation": id, "shots": shots}),
    )
    .await;
    assert_eq!(result["taken"].as_array().unwrap().len(), 3);
}
