//! The API described where tools can read it: an OpenAPI 3.1 document generated from the REST
//! handlers' annotations and the types they answer (`GET /api/openapi.json`), with the real-time
//! events among its schemas, and a browsable reference of it built into the binary
//! (`GET /api/docs`, a page and its script, which render the document in the browser).
//!
//! The types here are schemas only: of the payloads that [`Payload`](super::payload::Payload)
//! reads field by field, of the answer `POST /api/chat` builds with `json!`, and of the
//! real-time events, which are encoded elsewhere.

use std::sync::LazyLock;

use serde_json::{Map, Value, json};
use utoipa::{IntoParams, OpenApi, ToSchema};
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

use super::error::ErrorBody;
use super::rest::{self, ReplyRef};
use crate::domain::{Conversation, Message, Timestamp};

/// The body of `POST /api/chat`, and the payload of the real-time `stream_chat`.
#[derive(Debug, ToSchema)]
#[schema(rename_all = "camelCase")]
pub struct ChatRequest {
    /// The user message: not empty or whitespace only, at most `MAX_MESSAGE_CHARS` characters.
    // Whitespace is what Rust's `trim` removes.
    #[schema(
        pattern = r"[^\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
    )]
    pub message: String,
    /// A conversation's id: an existing one (`stream_chat` also creates one with an unknown id);
    /// absent or `null`: a new conversation.
    #[schema(pattern = r"^[A-Za-z0-9_-]{1,128}$")]
    pub conversation_id: Option<String>,
}

/// The answer of `POST /api/chat`.
#[derive(ToSchema)]
pub struct ChatReply {
    /// The whole conversation after the reply.
    pub conversation: Conversation,
    /// The stored assistant reply.
    pub message: Message,
}

/// The body of `PATCH /api/conversations/:id`.
#[derive(Debug, ToSchema)]
pub struct RenameRequest {
    /// The new title: 1 to 200 characters once leading and trailing whitespace is removed.
    // Whitespace is what Rust's `trim` removes.
    #[schema(
        pattern = r"^[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*[^\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000](?:[\s\S]{0,198}[^\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000])?[\t\n\v\f\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$"
    )]
    pub title: String,
}

/// A conversation id in a path: 1 to 128 letters, digits, `-` and `_`.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ConversationPath {
    #[param(pattern = r"^[A-Za-z0-9_-]{1,128}$")]
    pub id: String,
}

/// One text frame of `/ws`, either way.
#[derive(ToSchema)]
pub struct Frame {
    /// The event's name, e.g. `stream_chat`.
    pub event: String,
    /// The event's payload, a JSON object.
    #[schema(value_type = Object)]
    pub data: Value,
    /// On a client frame, an acknowledgement id (a string or a number); the server answers the
    /// frame, once handled, with an `ack` frame carrying the same `id` and, as `data`, what the
    /// Socket.IO acknowledgement carries.
    pub id: Option<Value>,
}

/// The payload of `join_conversation`: `messageId` and `seq` go together, and name the last
/// chunk a reconnecting client saw.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
pub struct JoinConversation {
    pub conversation_id: String,
    /// The reply the client was following.
    pub message_id: Option<String>,
    /// The last chunk of it the client saw.
    pub seq: Option<u64>,
}

/// A conversation, by its id.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
pub struct ConversationRef {
    pub conversation_id: String,
}

/// The payload of `stream_chunk`.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
pub struct StreamChunk {
    pub message_id: String,
    pub conversation_id: String,
    /// The whole reply so far.
    pub content: String,
    /// The text new in this chunk.
    pub delta: String,
    /// Whether this is the reply's last chunk.
    pub is_complete: bool,
    /// The chunk's number within the reply, from 1.
    pub seq: u64,
}

/// The payload of `conversation_updated`.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
pub struct ConversationUpdated {
    pub conversation_id: String,
    pub title: String,
    pub updated_at: Timestamp,
}

/// The acknowledgement of a Socket.IO client event that failed.
#[derive(ToSchema)]
pub struct AckError {
    pub error: ErrorBody,
}

/// The body of `POST /api/auth/register` and `POST /api/auth/login`.
#[derive(ToSchema)]
pub struct Credentials {
    /// 1 to 64 characters, unique ignoring case.
    #[schema(min_length = 1, max_length = 64)]
    pub username: String,
    /// At least 8 characters.
    #[schema(min_length = 8)]
    pub password: String,
}

/// A local account as its owner sees it.
#[derive(ToSchema)]
pub struct Account {
    pub id: String,
    pub username: String,
}

/// A signed-in local account: the token goes in `Authorization: Bearer`.
#[derive(ToSchema)]
pub struct SignedInAnswer {
    pub token: String,
    pub user: Account,
}

/// What a user has spent today (UTC) of the tokens their replies may use; 0 is no limit.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
pub struct Usage {
    pub tokens_today: u64,
    pub daily_token_limit: u64,
}

/// The caller of `GET /api/me`.
#[derive(ToSchema)]
pub struct Me {
    pub id: String,
    /// Set for local accounts, and where the token names one.
    pub username: Option<String>,
    pub usage: Usage,
}

/// The document as the annotations make it; [`document`] adds what every route shares.
#[derive(OpenApi)]
#[openapi(
    info(title = "ai-chat-server", description = include_str!("docs/description.md")),
    paths(
        rest::health,
        rest::register,
        rest::login,
        rest::me,
        rest::chat,
        rest::list,
        rest::get,
        rest::delete,
        rest::rename,
        rest::stop,
        rest::regenerate,
        rest::metrics,
        openapi_json,
        docs_page,
        docs_script,
    ),
    components(schemas(
        Frame,
        JoinConversation,
        ConversationRef,
        ChatRequest,
        ReplyRef,
        StreamChunk,
        ConversationUpdated,
        ErrorBody,
        AckError,
    )),
    tags(
        (name = "accounts", description = "Local accounts and the caller (`AUTH_MODE`)"),
        (name = "chat", description = "Asking the model"),
        (name = "conversations", description = "Stored conversations"),
        (name = "real time", description = "The plain WebSocket; Socket.IO is at `/socket.io/`"),
        (name = "server", description = "Health and metrics"),
        (name = "reference", description = "This document and its browsable page"),
    ),
)]
struct ApiDoc;

/// The routes that need no token when sign-in is on.
const OPEN_ROUTES: [&str; 6] = [
    "/api/health",
    "/api/auth/register",
    "/api/auth/login",
    "/api/openapi.json",
    "/api/docs",
    "/api/docs/docs.js",
];

/// The served document, built once.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| document().to_string());

/// A reference to a schema of the document.
fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// An error answer with the `{message, code}` body.
fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": schema("ErrorBody") } },
    })
}

/// A header of integer seconds or counts.
fn integer_header(description: &str) -> Value {
    json!({ "description": description, "schema": { "type": "integer", "minimum": 0 } })
}

/// The rate-limit headers on every answer under `/api/` while the limit is on.
fn rate_limit_headers() -> Map<String, Value> {
    let policy = json!({
        "description": "`LIMIT;w=WINDOW_SECONDS`, e.g. `100;w=900`",
        "schema": { "type": "string" },
    });
    Map::from_iter([
        ("RateLimit-Policy".to_owned(), policy),
        (
            "RateLimit-Limit".to_owned(),
            integer_header("`RATE_LIMIT_MAX_REQUESTS`"),
        ),
        (
            "RateLimit-Remaining".to_owned(),
            integer_header("Requests the client may still send right now"),
        ),
        (
            "RateLimit-Reset".to_owned(),
            integer_header("Seconds until the whole allowance is back"),
        ),
    ])
}

/// A required header of the WebSocket handshake.
fn handshake_header(name: &str, description: &str, example: &str) -> Value {
    json!({
        "name": name,
        "in": "header",
        "required": true,
        "description": description,
        "schema": { "type": "string" },
        "example": example,
    })
}

/// `/ws`, which is not a REST handler but answers plain HTTP until it upgrades.
fn websocket_path() -> Value {
    json!({ "get": {
        "tags": ["real time"],
        "operationId": "websocket",
        "summary": "The plain WebSocket",
        "description": "Upgrades to a WebSocket whose text frames are `Frame`s, each carrying one \
            of the events listed in `x-realtime`. Not rate limited.",
        "parameters": [
            handshake_header("Connection", "Names `Upgrade`", "Upgrade"),
            handshake_header("Upgrade", "Names `websocket`", "websocket"),
            handshake_header("Sec-WebSocket-Version", "`13`", "13"),
            handshake_header("Sec-WebSocket-Key", "The client's nonce", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        "responses": {
            "101": { "description": "Switching Protocols: the connection is a WebSocket" },
            "400": error_response("`INVALID_REQUEST`: not a WebSocket upgrade"),
            "429": error_response(
                "`RATE_LIMIT_EXCEEDED`: the client address has `MAX_CONNECTIONS_PER_IP` \
                 connections open"),
        },
    }})
}

/// The real-time events and their payloads, for tools: `x-realtime`.
fn realtime() -> Value {
    json!({
        "websocket": { "path": "/ws", "frame": schema("Frame") },
        "socketio": { "path": "/socket.io/", "namespace": "/", "protocol": 5 },
        "clientEvents": {
            "join_conversation": schema("JoinConversation"),
            "leave_conversation": schema("ConversationRef"),
            "stream_chat": schema("ChatRequest"),
            "stop_generation": schema("ConversationRef"),
            "regenerate": schema("ConversationRef"),
        },
        "serverEvents": {
            "stream_start": schema("ReplyRef"),
            "stream_chunk": schema("StreamChunk"),
            "stream_heartbeat": schema("ReplyRef"),
            "stream_complete": schema("ReplyRef"),
            "conversation_updated": schema("ConversationUpdated"),
            "conversation_deleted": schema("ConversationRef"),
            "error": schema("ErrorBody"),
            "ack": schema("Frame"),
        },
        "acknowledgements": {
            "join_conversation": schema("ConversationRef"),
            "leave_conversation": schema("ConversationRef"),
            "stream_chat": schema("ReplyRef"),
            "stop_generation": schema("ConversationRef"),
            "regenerate": schema("ReplyRef"),
            "failure": schema("AckError"),
        },
    })
}

/// The whole document: the annotations' paths and schemas, with the answers every route under
/// `/api/` may give (429, 500; 503 for a conversation in a cluster) and its rate-limit headers, `/ws`, the answers for paths and
/// methods no route serves (404, 405), and `x-realtime`.
fn document() -> Value {
    let mut document = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let headers = rate_limit_headers();
    if let Some(paths) = document["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            if !path.starts_with("/api/") {
                continue;
            }
            let operations = item
                .as_object_mut()
                .into_iter()
                .flat_map(|o| o.values_mut());
            for operation in operations {
                let protected = !OPEN_ROUTES.contains(&path.as_str());
                if protected {
                    // A bearer token when sign-in is on; none needed when it is off.
                    operation["security"] = json!([{ "bearer": [] }, {}]);
                }
                let Some(responses) = operation["responses"].as_object_mut() else {
                    continue;
                };
                let mut too_many = error_response(
                    "`RATE_LIMIT_EXCEEDED`: over `RATE_LIMIT_MAX_REQUESTS` per \
                     `RATE_LIMIT_WINDOW_MS`; or, where a reply would start, \
                     `QUOTA_EXCEEDED`: the user's `USER_DAILY_TOKENS` for today are used",
                );
                too_many["headers"] = json!({ "Retry-After":
                    integer_header("Seconds until the next request is allowed") });
                responses.insert("429".into(), too_many);
                responses.insert(
                    "500".into(),
                    error_response("`INTERNAL_ERROR`: the store or a conversation failed"),
                );
                if path.starts_with("/api/chat") || path.starts_with("/api/conversations/") {
                    responses.insert(
                        "503".into(),
                        error_response(
                            "`UNAVAILABLE`: in a cluster (`REDIS_URL`), the node that owns the \
                             conversation cannot be reached, or Redis is away; a client may retry",
                        ),
                    );
                }
                if protected {
                    responses.insert(
                        "401".into(),
                        error_response(
                            "`UNAUTHORIZED`: sign-in is on (`AUTH_MODE` `jwt` or `local`) and \
                             the bearer token is missing or not good",
                        ),
                    );
                }
                for response in responses.values_mut() {
                    let answer_headers = response
                        .as_object_mut()
                        .map(|r| r.entry("headers").or_insert_with(|| json!({})));
                    if let Some(Value::Object(answer_headers)) = answer_headers {
                        answer_headers.extend(headers.clone());
                    }
                }
            }
        }
        paths.insert("/ws".into(), websocket_path());
    }
    document["components"]["responses"] = json!({
        "NotFound": error_response("`NOT_FOUND`: no route has this path"),
        "MethodNotAllowed": error_response(
            "`METHOD_NOT_ALLOWED`: a route has this path, but not for this method"),
    });
    document["components"]["securitySchemes"] = json!({
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "With `AUTH_MODE=jwt`, a JWT from the identity provider; with \
                `AUTH_MODE=local`, the token of `POST /api/auth/login`. On `/ws` it may go in \
                `?token=` instead; on Socket.IO in the handshake's `auth: {token}`.",
        }
    });
    document["x-realtime"] = realtime();
    document
}

/// A static answer of the browsable reference.
fn asset(body: &'static str, content_type: &'static str) -> Response {
    warp::reply::with_header(body, "content-type", content_type).into_response()
}

/// This document.
#[utoipa::path(get, path = "/api/openapi.json", tag = "reference",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
fn openapi_json() -> Response {
    asset(DOCUMENT.as_str(), "application/json")
}

/// A browsable reference of this document.
#[utoipa::path(get, path = "/api/docs", tag = "reference",
    responses((status = 200, description = "The page", body = String,
        content_type = "text/html; charset=utf-8")))]
fn docs_page() -> Response {
    asset(include_str!("docs/index.html"), "text/html; charset=utf-8")
}

/// The script of the browsable reference, which fetches this document and renders it.
#[utoipa::path(get, path = "/api/docs/docs.js", tag = "reference",
    responses((status = 200, description = "The script", body = String,
        content_type = "text/javascript; charset=utf-8")))]
fn docs_script() -> Response {
    asset(
        include_str!("docs/docs.js"),
        "text/javascript; charset=utf-8",
    )
}

/// `GET /api/openapi.json`, `GET /api/docs` and the page's script.
pub fn routes() -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let document = warp::path!("api" / "openapi.json")
        .and(warp::get())
        .map(openapi_json);
    let page = warp::path!("api" / "docs").and(warp::get()).map(docs_page);
    let script = warp::path!("api" / "docs" / "docs.js")
        .and(warp::get())
        .map(docs_script);
    document.or(page).unify().or(script).unify()
}
