//! The user a request is made by.

use crate::domain::UserId;

/// A signed-in user, or the anonymous user when sign-in is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Whose conversations the requests reach.
    pub id: UserId,
    /// The name the user goes by, when the token says.
    pub username: Option<String>,
}

impl User {
    /// The one user every request is when sign-in is off.
    pub fn anonymous() -> User {
        User {
            id: UserId::anonymous(),
            username: None,
        }
    }
}
