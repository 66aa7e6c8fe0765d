//! The one place where failures become HTTP: every layer's error maps here to the contract's
//! status and `{message, code}` body, for REST answers, real-time `error` events and
//! acknowledgements alike.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Value, json};
use warp::http::StatusCode;

use crate::actors::{ChatEvent, EncodedEvent};
use crate::auth::{AccountError, AuthError};
use crate::error::ChatError;

/// Every failure a client can be told about.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// Bad input: missing or empty fields, wrong JSON types, malformed JSON, a bad id.
    #[error("{0}")]
    InvalidRequest(String),
    /// The request does not say who it is from, or its token is not good: missing, malformed,
    /// expired, not yet valid, signed wrongly, or for another issuer or audience.
    #[error("{0}")]
    Unauthorized(AuthError),
    /// A sign-in with a username or password that is not right; never says which.
    #[error("invalid username or password")]
    BadCredentials,
    /// The request is understood and refused, e.g. a registration while it is closed.
    #[error("{0}")]
    Forbidden(String),
    /// A registration with a username another account has, ignoring case.
    #[error("That username is taken")]
    UsernameTaken,
    /// The conversation does not exist (or was deleted).
    #[error("Conversation not found")]
    ConversationNotFound,
    /// No such route.
    #[error("Route not found")]
    NotFound,
    /// The route exists but not for this method.
    #[error("Method not allowed")]
    MethodNotAllowed,
    /// The body is over the configured limit.
    #[error("Request body is too large")]
    PayloadTooLarge,
    /// Over the per-client rate limit.
    #[error("Too many requests from this IP")]
    RateLimited,
    /// A reply is already being generated in that conversation.
    #[error("A reply is already being generated in this conversation")]
    Conflict,
    /// The user's replies have used their tokens for the day.
    #[error("The daily token budget is used up")]
    QuotaExceeded,
    /// The model provider failed.
    #[error("The model provider failed to answer")]
    Upstream,
    /// The conversation cannot be served now (its node is out of reach); a client may retry.
    #[error("The service is unavailable, please retry")]
    Unavailable,
    /// Anything else; what happened is logged where it is mapped, never sent.
    #[error("Internal server error")]
    Internal,
}

/// The JSON body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// For people; may change.
    pub message: String,
    /// What a client branches on, e.g. `INVALID_REQUEST`.
    #[schema(value_type = String)]
    pub code: &'static str,
}

impl ApiError {
    /// The machine-readable code of the contract.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "INVALID_REQUEST",
            ApiError::Unauthorized(_) | ApiError::BadCredentials => "UNAUTHORIZED",
            ApiError::Forbidden(_) => "FORBIDDEN",
            ApiError::UsernameTaken => "USERNAME_TAKEN",
            ApiError::ConversationNotFound => "CONVERSATION_NOT_FOUND",
            ApiError::NotFound => "NOT_FOUND",
            ApiError::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ApiError::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ApiError::RateLimited => "RATE_LIMIT_EXCEEDED",
            ApiError::Conflict => "CONFLICT",
            ApiError::QuotaExceeded => "QUOTA_EXCEEDED",
            ApiError::Upstream => "UPSTREAM_ERROR",
            ApiError::Unavailable => "UNAVAILABLE",
            ApiError::Internal => "INTERNAL_ERROR",
        }
    }

    /// The HTTP status of the contract.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) | ApiError::BadCredentials => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::UsernameTaken => StatusCode::CONFLICT,
            ApiError::ConversationNotFound | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited | ApiError::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Conflict => StatusCode::CONFLICT,
            ApiError::Upstream => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `{message, code}` body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            message: self.to_string(),
            code: self.code(),
        }
    }

    /// What answers a real-time client event: on failure the `error` event for its sender, and
    /// the acknowledgement, the handler's value or `{error: {message, code}}`.
    pub fn outcome(result: Result<Value, ApiError>) -> (Option<Arc<EncodedEvent>>, Value) {
        match result {
            Ok(value) => (None, value),
            Err(error) => (
                Some(error.event().encode()),
                json!({ "error": error.body() }),
            ),
        }
    }

    /// The real-time `error` event telling one connection about this failure.
    pub fn event(&self) -> ChatEvent {
        let body = self.body();
        ChatEvent::Error {
            message: body.message,
            code: body.code,
        }
    }
}

impl From<ChatError> for ApiError {
    fn from(error: ChatError) -> Self {
        match error {
            ChatError::Invalid(message) => ApiError::InvalidRequest(message),
            ChatError::NotFound => ApiError::ConversationNotFound,
            ChatError::Busy => ApiError::Conflict,
            ChatError::QuotaExceeded => ApiError::QuotaExceeded,
            ChatError::Upstream => ApiError::Upstream,
            ChatError::Unavailable(_) => {
                tracing::warn!(error = %error, "request refused");
                ApiError::Unavailable
            }
            ChatError::Storage(_) | ChatError::Failed(_) => {
                tracing::error!(error = %error, "request failed");
                ApiError::Internal
            }
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        ApiError::Unauthorized(error)
    }
}

impl From<AccountError> for ApiError {
    fn from(error: AccountError) -> Self {
        match error {
            AccountError::Invalid(message) => ApiError::InvalidRequest(message),
            AccountError::Taken => ApiError::UsernameTaken,
            AccountError::RegistrationClosed => ApiError::Forbidden(error.to_string()),
            AccountError::BadCredentials => ApiError::BadCredentials,
            AccountError::TooManyAttempts => ApiError::RateLimited,
            AccountError::Failed(_) => {
                tracing::error!(error = %error, "account request failed");
                ApiError::Internal
            }
        }
    }
}

impl warp::reject::Reject for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_details_never_reach_the_body() {
        let error = ApiError::from(ChatError::Storage("disk on fire at /var/db".into()));
        let body = error.body();
        assert_eq!(body.message, "Internal server error");
        assert_eq!(body.code, "INTERNAL_ERROR");
        assert_eq!(error.status().as_u16(), 500);
    }

    #[test]
    fn domain_errors_map_to_the_contract() {
        let cases = [
            (ChatError::NotFound, 404, "CONVERSATION_NOT_FOUND"),
            (ChatError::Busy, 409, "CONFLICT"),
            (ChatError::Upstream, 502, "UPSTREAM_ERROR"),
            (ChatError::Invalid("bad".into()), 400, "INVALID_REQUEST"),
            (ChatError::Unavailable("redis".into()), 503, "UNAVAILABLE"),
        ];
        for (error, status, code) in cases {
            let error = ApiError::from(error);
            assert_eq!((error.status().as_u16(), error.code()), (status, code));
        }
    }

    #[test]
    fn a_bad_token_is_unauthorized_and_says_why() {
        let error = ApiError::from(AuthError::Expired);
        assert_eq!(error.status().as_u16(), 401);
        assert_eq!(error.code(), "UNAUTHORIZED");
        assert_eq!(error.body().message, "token expired");
    }

    #[test]
    fn rate_limit_message_matches_the_original() {
        assert_eq!(
            ApiError::RateLimited.body().message,
            "Too many requests from this IP"
        );
        assert_eq!(ApiError::RateLimited.status().as_u16(), 429);
    }
}
