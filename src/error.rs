//! The one error type of the API: every route and event handler returns it, and its mapping to an
//! HTTP status and a `{message, code}` body lives here.

use serde::Serialize;
use serde_json::Value;
use warp::http::StatusCode;

/// Every failure a client can be told about.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// Bad input: missing or empty fields, wrong JSON types, malformed JSON, a bad id.
    #[error("{0}")]
    InvalidRequest(String),
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
    /// The model provider failed.
    #[error("The model provider failed to answer")]
    Upstream,
    /// Anything else; the text is logged, never sent.
    #[error("Internal server error")]
    Internal(String),
}

/// The JSON body of every error answer.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub message: String,
    pub code: &'static str,
}

impl ApiError {
    /// The machine-readable code of the contract.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "INVALID_REQUEST",
            ApiError::ConversationNotFound => "CONVERSATION_NOT_FOUND",
            ApiError::NotFound => "NOT_FOUND",
            ApiError::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ApiError::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ApiError::RateLimited => "RATE_LIMIT_EXCEEDED",
            ApiError::Conflict => "CONFLICT",
            ApiError::Upstream => "UPSTREAM_ERROR",
            ApiError::Internal(_) => "INTERNAL_ERROR",
        }
    }

    /// The HTTP status of the contract.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::ConversationNotFound | ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Conflict => StatusCode::CONFLICT,
            ApiError::Upstream => StatusCode::BAD_GATEWAY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `{message, code}` body; internal details stay out of it.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            message: self.to_string(),
            code: self.code(),
        }
    }

    /// The body as a JSON value, for real-time `error` events and acknowledgements.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.body()).unwrap_or(Value::Null)
    }

    /// An internal error, logged where it is made.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        let detail = detail.to_string();
        tracing::error!(%detail, "internal error");
        ApiError::Internal(detail)
    }
}

impl warp::reject::Reject for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_details_never_reach_the_body() {
        let body = ApiError::Internal("disk on fire at /var/db".into()).body();
        assert_eq!(body.message, "Internal server error");
        assert_eq!(body.code, "INTERNAL_ERROR");
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
