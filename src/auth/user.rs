//! The user a request is made by.

use std::time::Duration;

use crate::domain::UserId;

/// A signed-in user, or the anonymous user when sign-in is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Whose conversations the requests reach.
    pub id: UserId,
    /// The name the user goes by, when the token says.
    pub username: Option<String>,
    /// When the token the user came with expires (its `exp`, in seconds since the Unix epoch);
    /// `None` without a token.
    pub expires_at: Option<i64>,
}

impl User {
    /// The one user every request is when sign-in is off.
    pub fn anonymous() -> User {
        User {
            id: UserId::anonymous(),
            username: None,
            expires_at: None,
        }
    }

    /// How long the user's token stays valid from now (zero once it has expired); `None` when
    /// there is no token to expire.
    pub fn token_lifetime(&self) -> Option<Duration> {
        let left = self.expires_at? - chrono::Utc::now().timestamp();
        Some(Duration::from_secs(u64::try_from(left).unwrap_or(0)))
    }
}
