//! Who is asking. Identity is decided once, at the edge: `http/` (and the Socket.IO handshake)
//! hands a request's bearer token to the [`Authenticator`], which answers with a [`User`] as the
//! sign-in mode says; below that, every call carries the user, and a conversation is keyed by
//! (user, id), so another user's conversation is simply not found.
//!
//! - [`mode`]: the sign-in modes and their settings;
//! - [`tokens`]: verifying a JWT, and signing one for a local account;
//! - [`keys`]: the signing keys an identity provider publishes (JWKS);
//! - [`accounts`]: local accounts, their registration, sign-in and password hashes;
//! - [`user`]: the user a request is made by.

pub mod accounts;
pub mod keys;
pub mod mode;
pub mod tokens;
pub mod user;

pub use accounts::{AccountError, Accounts, SignedIn};
pub use mode::{AuthConfig, AuthMode, Secret};
pub use tokens::{AuthError, TokenSigner, TokenVerifier};
pub use user::User;

/// Why sign-in cannot be set up as configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    /// `AUTH_MODE=jwt` without a key to verify tokens with, or `local` without one to sign them.
    #[error("AUTH_MODE=jwt needs JWT_SECRET or JWT_JWKS_URL, AUTH_MODE=local needs JWT_SECRET")]
    MissingKey,
    /// The HTTP client that fetches the published keys cannot be built.
    #[error("cannot build the HTTP client for JWT_JWKS_URL")]
    NoHttpClient,
    /// The key cannot be used.
    #[error("JWT_SECRET cannot be used as a key")]
    UnusableSecret,
}

/// Turns a request's bearer token into the user it is made by.
#[derive(Debug)]
pub struct Authenticator {
    /// `None` when sign-in is off: every request is the anonymous user.
    tokens: Option<TokenVerifier>,
}

impl Authenticator {
    /// The authenticator `config` describes.
    pub fn new(config: &AuthConfig) -> Result<Authenticator, SetupError> {
        let tokens = match config.mode {
            AuthMode::None => None,
            AuthMode::Jwt | AuthMode::Local => Some(TokenVerifier::new(config)?),
        };
        Ok(Authenticator { tokens })
    }

    /// The user whose token this is; with sign-in off, the anonymous user whatever the token.
    pub async fn authenticate(&self, token: Option<&str>) -> Result<User, AuthError> {
        match &self.tokens {
            None => Ok(User::anonymous()),
            Some(verifier) => verifier.verify(token.ok_or(AuthError::Missing)?).await,
        }
    }

    /// The user of a request whose `Authorization` header is `header`: [`bearer_token`], then
    /// [`Authenticator::authenticate`].
    pub async fn authenticate_header(&self, header: Option<&str>) -> Result<User, AuthError> {
        let token = header.map(bearer_token).transpose()?;
        self.authenticate(token).await
    }
}

/// The token of an `Authorization` header's value: `Bearer <token>`, the scheme in any case.
/// A header of another scheme, or none, is a malformed token.
pub fn bearer_token(header: &str) -> Result<&str, AuthError> {
    match header.trim().split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(AuthError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bearer_header_names_its_token() {
        assert_eq!(bearer_token("Bearer abc.def.ghi"), Ok("abc.def.ghi"));
        assert_eq!(bearer_token("bearer  abc "), Ok("abc"));
        for header in ["", "Bearer", "Bearer ", "Basic abc", "abc"] {
            assert_eq!(
                bearer_token(header),
                Err(AuthError::Malformed),
                "{header:?}"
            );
        }
    }
}
