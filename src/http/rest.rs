//! The REST routes of the contract, and the extensions for stop, regenerate and rename, each
//! with the OpenAPI description of its request and answers.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

use super::error::{ApiError, ErrorBody};
use super::openapi::{
    ChatReply, ChatRequest, ConversationPath, Credentials, Me, RenameRequest, SignedInAnswer,
};
use super::payload::Payload;
use super::reply;
use super::{ClientAddr, Shared};
use crate::auth::{SignedIn, User};
use crate::cluster::Cluster;
use crate::domain::{Conversation, Timestamp, validate_conversation_id};
use crate::metrics::ClusterGauges;
use crate::store::Page;

// The answers' fields are in alphabetical order, the order these answers have always had.

/// The answer of `GET /api/health`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// Open real-time connections, both transports (extension).
    active_connections: i64,
    /// Conversations held in memory (extension).
    active_conversations: usize,
    /// This node and the live nodes of its cluster, in cluster mode (extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<ClusterHealth>,
    memory: Memory,
    /// Replies being generated (extension).
    replies_in_progress: i64,
    /// Always `OK`.
    #[schema(value_type = String, example = "OK")]
    status: &'static str,
    timestamp: Timestamp,
    /// Seconds since the server started.
    uptime: f64,
    /// The server's version.
    #[schema(value_type = String, example = "0.1.0")]
    version: &'static str,
}

/// A node of a cluster, as its health route tells.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterHealth {
    /// `CLUSTER_NAME`.
    name: String,
    /// This node's name, unique to one run of its process.
    node: String,
    /// The nodes alive at the last heartbeat, this one among them.
    nodes: Vec<String>,
    /// Conversations owned by other nodes whose events this node relays to its members.
    relayed_conversations: usize,
}

impl ClusterHealth {
    fn of(cluster: &Cluster) -> Self {
        ClusterHealth {
            name: cluster.name().to_owned(),
            node: cluster.node().to_string(),
            nodes: cluster.live_nodes().iter().map(|n| n.to_string()).collect(),
            relayed_conversations: cluster.relayed(),
        }
    }
}

/// The server's memory use.
#[derive(Debug, Serialize, ToSchema)]
pub struct Memory {
    /// Resident memory, in bytes.
    rss: u64,
}

/// An answer that is only a message for people.
#[derive(Debug, Serialize, ToSchema)]
pub struct Notice {
    #[schema(value_type = String, example = "Conversation deleted successfully")]
    message: &'static str,
}

/// The answer of `POST /api/conversations/:id/stop`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stopped {
    conversation_id: String,
    #[schema(value_type = String, example = "Generation stopped")]
    message: &'static str,
}

/// A reply: its conversation and its assistant message. The answer of
/// `POST /api/conversations/:id/regenerate`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplyRef {
    conversation_id: String,
    /// The reply's message id.
    message_id: String,
}

/// Whether the server is up, and how busy it is.
#[utoipa::path(get, path = "/api/health", tag = "server",
    responses((status = 200, description = "The server is up", body = Health)))]
pub fn health(shared: &Shared) -> Response {
    let metrics = shared.metrics.snapshot();
    let body = Health {
        active_connections: metrics.open_connections,
        active_conversations: shared.conversations.active(),
        cluster: shared.conversations.cluster().map(|c| ClusterHealth::of(c)),
        memory: Memory {
            rss: crate::metrics::resident_bytes(),
        },
        replies_in_progress: metrics.replies_in_progress,
        status: "OK",
        timestamp: Timestamp::now(),
        uptime: shared.started.elapsed().as_secs_f64(),
        version: env!("CARGO_PKG_VERSION"),
    };
    reply::json(&body).into_response()
}

/// Every series in Prometheus's text format; not rate limited.
#[utoipa::path(get, path = "/metrics", tag = "server",
    responses((status = 200, description = "The metrics", body = String,
        content_type = "text/plain; version=0.0.4; charset=utf-8")))]
pub fn metrics(shared: &Shared) -> Response {
    let cluster = shared.conversations.cluster().map(|c| ClusterGauges {
        cluster: c.name().to_owned(),
        node: c.node().to_string(),
        live_nodes: c.live_nodes().len(),
        relayed: c.relayed(),
    });
    warp::reply::with_header(
        shared.metrics.render(cluster),
        "content-type",
        "text/plain; version=0.0.4; charset=utf-8",
    )
    .into_response()
}

/// Creates a local account (`AUTH_MODE=local`) and signs it in.
#[utoipa::path(post, path = "/api/auth/register", tag = "accounts", request_body = Credentials,
    responses(
        (status = 201, description = "The account, signed in", body = SignedInAnswer),
        (status = 400, description = "`INVALID_REQUEST`: a missing, empty or overlong username, or a password under 8 characters", body = ErrorBody),
        (status = 403, description = "`FORBIDDEN`: registration is closed (`REGISTRATION=closed`)", body = ErrorBody),
        (status = 404, description = "`NOT_FOUND`: accounts are not kept by this server (`AUTH_MODE` is not `local`)", body = ErrorBody),
        (status = 409, description = "`USERNAME_TAKEN`: another account has that username, ignoring case", body = ErrorBody),
        (status = 413, description = "`PAYLOAD_TOO_LARGE`: the body is over `BODY_LIMIT_BYTES`", body = ErrorBody),
    ))]
pub async fn register(shared: Arc<Shared>, body: serde_json::Value) -> Result<Response, ApiError> {
    let accounts = shared.accounts.as_ref().ok_or(ApiError::NotFound)?;
    let payload = Payload::new(&body)?;
    let (username, password) = payload.credentials()?;
    let signed_in = accounts.register(&username, &password).await?;
    Ok(signed_in_answer(signed_in, StatusCode::CREATED))
}

/// Signs in to a local account (`AUTH_MODE=local`): a token for `Authorization: Bearer`.
#[utoipa::path(post, path = "/api/auth/login", tag = "accounts", request_body = Credentials,
    responses(
        (status = 200, description = "Signed in", body = SignedInAnswer),
        (status = 400, description = "`INVALID_REQUEST`: a missing or empty username or password", body = ErrorBody),
        (status = 401, description = "`UNAUTHORIZED`: the username or the password is wrong (never says which)", body = ErrorBody),
        (status = 404, description = "`NOT_FOUND`: accounts are not kept by this server (`AUTH_MODE` is not `local`)", body = ErrorBody),
        (status = 413, description = "`PAYLOAD_TOO_LARGE`: the body is over `BODY_LIMIT_BYTES`", body = ErrorBody),
    ))]
pub async fn login(
    shared: Arc<Shared>,
    client: Option<ClientAddr>,
    body: serde_json::Value,
) -> Result<Response, ApiError> {
    let accounts = shared.accounts.as_ref().ok_or(ApiError::NotFound)?;
    let payload = Payload::new(&body)?;
    let (username, password) = payload.credentials()?;
    let client = client.map(|c| c.0.ip());
    let signed_in = accounts.login(client, &username, &password).await?;
    Ok(signed_in_answer(signed_in, StatusCode::OK))
}

/// `{token, user: {id, username}}`.
fn signed_in_answer(signed_in: SignedIn, status: StatusCode) -> Response {
    let body = json!({
        "token": signed_in.token,
        "user": { "id": signed_in.user.id.as_str(), "username": signed_in.user.username },
    });
    warp::reply::with_status(reply::json(&body), status).into_response()
}

/// Who the caller is, and what they have used today.
#[utoipa::path(get, path = "/api/me", tag = "accounts",
    responses(
        (status = 200, description = "The caller", body = Me),
    ))]
pub async fn me(shared: Arc<Shared>, user: User) -> Result<Response, ApiError> {
    let conversations = &shared.conversations;
    let mut body = json!({
        "id": user.id.as_str(),
        "usage": {
            "tokensToday": conversations.tokens_today(&user.id).await?,
            "dailyTokenLimit": conversations.daily_token_limit(),
        },
    });
    if let Some(username) = user.username {
        body["username"] = username.into();
    }
    Ok(reply::json(&body).into_response())
}

/// Sends a user message and answers, once the model is done, with its whole reply.
#[utoipa::path(post, path = "/api/chat", tag = "chat", request_body = ChatRequest,
    responses(
        (status = 200, description = "The stored reply and the conversation after it", body = ChatReply),
        (status = 400, description = "`INVALID_REQUEST`: the body, `message` or `conversationId`", body = ErrorBody),
        (status = 404, description = "`CONVERSATION_NOT_FOUND`: no conversation has that id", body = ErrorBody),
        (status = 409, description = "`CONFLICT`: a reply is in progress there", body = ErrorBody),
        (status = 413, description = "`PAYLOAD_TOO_LARGE`: the body is over `BODY_LIMIT_BYTES`", body = ErrorBody),
        (status = 502, description = "`UPSTREAM_ERROR`: the model failed or timed out", body = ErrorBody),
    ))]
pub async fn chat(
    shared: Arc<Shared>,
    user: User,
    body: serde_json::Value,
) -> Result<Response, ApiError> {
    let payload = Payload::new(&body)?;
    let message = payload.message(shared.config.max_message_chars)?;
    let id = payload.optional_conversation_id()?;
    let done = shared.conversations.chat(&user.id, id, message).await?;
    Ok(reply::json(&done))
}

/// Query of `GET /api/conversations`: both optional; none answers every conversation.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// At most this many conversations; absent: all.
    // `usize::MAX`, which the attribute takes only as a literal.
    #[param(maximum = 18446744073709551615usize)]
    limit: Option<usize>,
    /// Skip this many first; absent: 0.
    #[param(maximum = 18446744073709551615usize)]
    offset: Option<usize>,
}

/// The stored conversations with their messages, most recently updated first.
#[utoipa::path(get, path = "/api/conversations", tag = "conversations", params(ListQuery),
    responses(
        (status = 200, description = "The conversations", body = Vec<Conversation>),
        (status = 400, description = "`INVALID_REQUEST`: a bad `limit` or `offset`", body = ErrorBody),
    ))]
pub async fn list(shared: Arc<Shared>, user: User, query: ListQuery) -> Result<Response, ApiError> {
    let page = Page {
        limit: query.limit,
        offset: query.offset.unwrap_or(0),
    };
    let conversations = shared.conversations.list(&user.id, page).await?;
    Ok(reply::json(&conversations).into_response())
}

/// One conversation with its messages.
#[utoipa::path(get, path = "/api/conversations/{id}", tag = "conversations", params(ConversationPath),
    responses(
        (status = 200, description = "The conversation", body = Conversation),
        (status = 400, description = "`INVALID_REQUEST`: a bad id", body = ErrorBody),
        (status = 404, description = "`CONVERSATION_NOT_FOUND`", body = ErrorBody),
    ))]
pub async fn get(shared: Arc<Shared>, user: User, id: String) -> Result<Response, ApiError> {
    validate_conversation_id(&id)?;
    let conversation = shared.conversations.get(&user.id, &id).await?;
    Ok(reply::written(conversation.json()))
}

/// Deletes a conversation and its messages; its members get `conversation_deleted`.
#[utoipa::path(delete, path = "/api/conversations/{id}", tag = "conversations", params(ConversationPath),
    responses(
        (status = 200, description = "Deleted", body = Notice),
        (status = 400, description = "`INVALID_REQUEST`: a bad id", body = ErrorBody),
        (status = 404, description = "`CONVERSATION_NOT_FOUND`", body = ErrorBody),
    ))]
pub async fn delete(shared: Arc<Shared>, user: User, id: String) -> Result<Response, ApiError> {
    validate_conversation_id(&id)?;
    shared.conversations.delete(&user.id, &id).await?;
    Ok(reply::json(&Notice {
        message: "Conversation deleted successfully",
    })
    .into_response())
}

/// Renames a conversation (extension); its members get `conversation_updated`.
#[utoipa::path(patch, path = "/api/conversations/{id}", tag = "conversations", params(ConversationPath),
    request_body = RenameRequest,
    responses(
        (status = 200, description = "The renamed conversation", body = Conversation),
        (status = 400, description = "`INVALID_REQUEST`: the body, `title` or id", body = ErrorBody),
        (status = 404, description = "`CONVERSATION_NOT_FOUND`", body = ErrorBody),
        (status = 413, description = "`PAYLOAD_TOO_LARGE`: the body is over `BODY_LIMIT_BYTES`", body = ErrorBody),
    ))]
pub async fn rename(
    shared: Arc<Shared>,
    user: User,
    id: String,
    body: serde_json::Value,
) -> Result<Response, ApiError> {
    validate_conversation_id(&id)?;
    let title = Payload::new(&body)?.title()?;
    let conversation = shared.conversations.rename(&user.id, &id, title).await?;
    Ok(reply::json(&conversation).into_response())
}

/// Stops the reply in progress (extension); success also when there is none.
#[utoipa::path(post, path = "/api/conversations/{id}/stop", tag = "conversations", params(ConversationPath),
    responses(
        (status = 200, description = "Stopped, or nothing was in progress", body = Stopped),
        (status = 400, description = "`INVALID_REQUEST`: a bad id", body = ErrorBody),
        (status = 404, description = "`CONVERSATION_NOT_FOUND`", body = ErrorBody),
    ))]
pub async fn stop(shared: Arc<Shared>, user: User, id: String) -> Result<Response, ApiError> {
    shared.conversations.stop_reply(&user.id, &id).await?;
    Ok(reply::json(&Stopped {
        conversation_id: id,
        message: "Generation stopped",
    })
    .into_response())
}

/// Replaces the last reply with a new one (extension), which streams to the members.
#[utoipa::path(post, path = "/api/conversations/{id}/regenerate", tag = "conversations",
    params(ConversationPath),
    responses(
        (status = 202, description = "The new reply has started", body = ReplyRef),
        (status = 400, description = "`INVALID_REQUEST`: a bad id, or no user message to answer", body = ErrorBody),
        (status = 404, description = "`CONVERSATION_NOT_FOUND`", body = ErrorBody),
        (status = 409, description = "`CONFLICT`: a reply is in progress", body = ErrorBody),
    ))]
pub async fn regenerate(shared: Arc<Shared>, user: User, id: String) -> Result<Response, ApiError> {
    let started = shared.conversations.regenerate(&user.id, &id, None).await?;
    let body = ReplyRef {
        conversation_id: started.conversation_id,
        message_id: started.message_id,
    };
    Ok(warp::reply::with_status(reply::json(&body), StatusCode::ACCEPTED).into_response())
}
