//! The REST routes of the contract, and the extensions for stop, regenerate and rename.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};

use super::error::ApiError;
use super::payload::Payload;
use super::{ClientAddr, Shared};
use crate::auth::{SignedIn, User};
use crate::domain::{Timestamp, validate_conversation_id};
use crate::store::Page;

/// `GET /api/health`.
pub fn health(shared: &Shared) -> Response {
    let metrics = shared.metrics.snapshot();
    let body = json!({
        "status": "OK",
        "timestamp": Timestamp::now(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime": shared.started.elapsed().as_secs_f64(),
        "memory": { "rss": crate::metrics::resident_bytes() },
        "activeConnections": metrics.open_connections,
        "activeConversations": shared.conversations.active(),
        "repliesInProgress": metrics.replies_in_progress,
    });
    warp::reply::json(&body).into_response()
}

/// `GET /metrics`: every series in Prometheus's text format.
pub fn metrics(shared: &Shared) -> Response {
    warp::reply::with_header(
        shared.metrics.render(),
        "content-type",
        "text/plain; version=0.0.4; charset=utf-8",
    )
    .into_response()
}

/// `POST /api/auth/register` `{username, password}`: a new local account, signed in.
pub async fn register(shared: Arc<Shared>, body: serde_json::Value) -> Result<Response, ApiError> {
    let accounts = shared.accounts.as_ref().ok_or(ApiError::NotFound)?;
    let payload = Payload::new(&body)?;
    let (username, password) = payload.credentials()?;
    let signed_in = accounts.register(&username, &password).await?;
    Ok(signed_in_answer(signed_in, StatusCode::CREATED))
}

/// `POST /api/auth/login` `{username, password}`: a token for a local account.
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
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

/// `GET /api/me`: who the token says the caller is, and what they have used today.
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
    Ok(warp::reply::json(&body).into_response())
}

/// `POST /api/chat`: the user message and the model's whole reply.
pub async fn chat(
    shared: Arc<Shared>,
    user: User,
    body: serde_json::Value,
) -> Result<Response, ApiError> {
    let payload = Payload::new(&body)?;
    let message = payload.message(shared.config.max_message_chars)?;
    let id = payload.optional_conversation_id()?;
    let done = shared.conversations.chat(&user.id, id, message).await?;
    Ok(warp::reply::json(&json!({
        "message": done.message,
        "conversation": done.conversation,
    }))
    .into_response())
}

/// Query of `GET /api/conversations`: both optional; none answers every conversation.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    limit: Option<usize>,
    offset: Option<usize>,
}

/// `GET /api/conversations`.
pub async fn list(shared: Arc<Shared>, user: User, query: ListQuery) -> Result<Response, ApiError> {
    let page = Page {
        limit: query.limit,
        offset: query.offset.unwrap_or(0),
    };
    let conversations = shared.conversations.list(&user.id, page).await?;
    Ok(warp::reply::json(&conversations).into_response())
}

/// `GET /api/conversations/:id`.
pub async fn get(shared: Arc<Shared>, user: User, id: String) -> Result<Response, ApiError> {
    validate_conversation_id(&id)?;
    let conversation = shared.conversations.get(&user.id, &id).await?;
    Ok(warp::reply::json(&conversation).into_response())
}

/// `DELETE /api/conversations/:id`.
pub async fn delete(shared: Arc<Shared>, user: User, id: String) -> Result<Response, ApiError> {
    validate_conversation_id(&id)?;
    shared.conversations.delete(&user.id, &id).await?;
    Ok(
        warp::reply::json(&json!({ "message": "Conversation deleted successfully" }))
            .into_response(),
    )
}

/// `PATCH /api/conversations/:id` `{title}`.
pub async fn rename(
    shared: Arc<Shared>,
    user: User,
    id: String,
    body: serde_json::Value,
) -> Result<Response, ApiError> {
    validate_conversation_id(&id)?;
    let title = Payload::new(&body)?.title()?;
    let conversation = shared.conversations.rename(&user.id, &id, title).await?;
    Ok(warp::reply::json(&conversation).into_response())
}

/// `POST /api/conversations/:id/stop`.
pub async fn stop(shared: Arc<Shared>, user: User, id: String) -> Result<Response, ApiError> {
    shared.conversations.stop_reply(&user.id, &id).await?;
    Ok(
        warp::reply::json(&json!({ "message": "Generation stopped", "conversationId": id }))
            .into_response(),
    )
}

/// `POST /api/conversations/:id/regenerate`: the new reply streams to the members.
pub async fn regenerate(shared: Arc<Shared>, user: User, id: String) -> Result<Response, ApiError> {
    let started = shared.conversations.regenerate(&user.id, &id, None).await?;
    let body = json!({
        "conversationId": started.conversation_id,
        "messageId": started.message_id,
    });
    Ok(warp::reply::with_status(warp::reply::json(&body), StatusCode::ACCEPTED).into_response())
}
