//! The chat domain's failures, in its own words: what a conversation or the supervisor answers
//! when a request cannot be carried out. `http/` maps them to statuses and `{message, code}`.

use crate::store::StoreError;

/// Why a request to a conversation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ChatError {
    /// The request itself is wrong: a bad id, an empty or overlong title, nothing to reply to.
    #[error("{0}")]
    Invalid(String),
    /// The conversation does not exist (or was deleted).
    #[error("conversation not found")]
    NotFound,
    /// A reply is already being generated in that conversation.
    #[error("a reply is already being generated")]
    Busy,
    /// The user's replies have used their tokens for the day (`USER_DAILY_TOKENS`).
    #[error("the daily token budget is used up")]
    QuotaExceeded,
    /// The model failed to answer.
    #[error("the model failed to answer")]
    Upstream,
    /// The conversation cannot be served now: its owner is another node that cannot be reached,
    /// or the cluster's coordination (Redis) is down; the text is for logs only.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The store failed; the text is for logs only.
    #[error("storage failed: {0}")]
    Storage(String),
    /// The conversation's actor failed or could not be started; the text is for logs only.
    #[error("conversation failed: {0}")]
    Failed(String),
}

impl From<StoreError> for ChatError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => ChatError::NotFound,
            StoreError::Fenced => {
                ChatError::Unavailable("the conversation moved to another node".into())
            }
            StoreError::Storage(detail) => ChatError::Storage(detail),
            other => ChatError::Storage(other.to_string()),
        }
    }
}
