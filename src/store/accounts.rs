//! The accounts of `AUTH_MODE=local`: users the server keeps itself, with their password hashes.

use async_trait::async_trait;

use super::StoreError;
use crate::domain::{Timestamp, UserId};

/// A user account kept by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: UserId,
    /// The name as the user chose it; unique ignoring case.
    pub username: String,
    /// The password's argon2id hash, as a PHC string (`$argon2id$v=19$...`).
    pub password_hash: String,
    pub created_at: Timestamp,
}

/// The form of a username that is unique: two names equal ignoring case are one.
pub fn username_key(username: &str) -> String {
    username.to_lowercase()
}

/// Where accounts live. Every write returns once it is durable for that store.
#[async_trait]
pub trait AccountStore: Send + Sync {
    /// Stores a new account; [`StoreError::AlreadyExists`] when its username, ignoring case, or
    /// its id is taken.
    async fn create_account(&self, account: &Account) -> Result<(), StoreError>;
    /// The account named `username`, ignoring case, if any.
    async fn find_account(&self, username: &str) -> Result<Option<Account>, StoreError>;
}
