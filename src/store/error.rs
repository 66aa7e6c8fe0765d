//! What can go wrong in a store, in the store's own words.

/// A store operation that did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The conversation does not exist.
    #[error("conversation not found")]
    NotFound,
    /// A conversation or message with that id is already stored.
    #[error("already stored")]
    AlreadyExists,
    /// A newer claim on the conversation stands: this writer is not its writer any more.
    #[error("the conversation was claimed by a newer writer")]
    Fenced,
    /// The database failed or is unreachable; the text says how, for logs only.
    #[error("storage failed: {0}")]
    Storage(String),
    /// `DATABASE_URL` names no store this server knows.
    #[error("unsupported DATABASE_URL: {0}")]
    UnsupportedUrl(String),
}

impl StoreError {
    /// A storage failure described by `detail`.
    pub fn storage(detail: impl std::fmt::Display) -> Self {
        StoreError::Storage(detail.to_string())
    }
}
