//! Local accounts (`AUTH_MODE=local`): registration, sign-in, and password hashing with
//! argon2id. The server signs its own tokens for them, which the [`super::Authenticator`]
//! verifies like any other.
//!
//! A failed sign-in never says whether the user exists: an unknown username costs a hash check
//! as a wrong password does (against a hash made at start-up), and both answer the same.
//! Sign-in attempts are also rate limited per client address.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};

use super::tokens::TokenSigner;
use super::user::User;
use crate::cluster::rates::{Limiter, SharedRates};
use crate::domain::{Timestamp, UserId, new_id};
use crate::store::{Account, AccountStore, StoreError};

/// The longest username, in characters.
const MAX_USERNAME_CHARS: usize = 64;
/// The shortest password, in characters.
const MIN_PASSWORD_CHARS: usize = 8;
/// The longest password, in bytes: hashing is costly enough without megabytes to read.
const MAX_PASSWORD_BYTES: usize = 1024;

/// Why a registration or sign-in did not happen. The text is safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// A username or password that breaks the rules.
    #[error("{0}")]
    Invalid(String),
    /// Another account has that username, ignoring case.
    #[error("That username is taken")]
    Taken,
    /// `REGISTRATION=closed`.
    #[error("Registration is closed")]
    RegistrationClosed,
    /// No such user, or the wrong password: the two are never told apart.
    #[error("invalid username or password")]
    BadCredentials,
    /// Too many sign-in attempts from the client's address.
    #[error("Too many sign-in attempts")]
    TooManyAttempts,
    /// The store or the hashing failed; the text is for logs only.
    #[error("accounts failed: {0}")]
    Failed(String),
}

impl From<StoreError> for AccountError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::AlreadyExists => AccountError::Taken,
            other => AccountError::Failed(other.to_string()),
        }
    }
}

/// A signed-in user and the token that says so.
#[derive(Debug, Clone)]
pub struct SignedIn {
    pub token: String,
    pub user: User,
}

/// The server's own accounts.
pub struct Accounts {
    store: Arc<dyn AccountStore>,
    signer: TokenSigner,
    registration_open: bool,
    /// Sign-in attempts per client address per minute; `None` is no limit.
    attempts: Option<Limiter<IpAddr>>,
    /// Checked when the username is unknown, so that the answer takes as long as for a known one.
    decoy_hash: String,
}

impl Accounts {
    /// The accounts in `store`, signed in with tokens from `signer`. Sign-in attempts are counted
    /// in `shared` when there is one (cluster mode), so that they are limited over every node.
    pub fn new(
        store: Arc<dyn AccountStore>,
        signer: TokenSigner,
        registration_open: bool,
        attempts_per_minute: u32,
        shared: Option<SharedRates>,
    ) -> Result<Accounts, AccountError> {
        let minute = Duration::from_secs(60);
        let attempts = Limiter::new("login", attempts_per_minute, minute, shared);
        Ok(Accounts {
            store,
            signer,
            registration_open,
            attempts,
            decoy_hash: hash(&new_id())?,
        })
    }

    /// Makes an account and signs it in.
    pub async fn register(&self, username: &str, password: &str) -> Result<SignedIn, AccountError> {
        if !self.registration_open {
            return Err(AccountError::RegistrationClosed);
        }
        check_username(username)?;
        check_password(password)?;
        let password = password.to_owned();
        let password_hash = blocking(move || hash(&password)).await?;
        let account = Account {
            id: UserId::new(new_id()),
            username: username.to_owned(),
            password_hash,
            created_at: Timestamp::now(),
        };
        self.store.create_account(&account).await?;
        self.signed_in(account)
    }

    /// Signs in the account named `username` (ignoring case) if `password` is its password.
    pub async fn login(
        &self,
        client: Option<IpAddr>,
        username: &str,
        password: &str,
    ) -> Result<SignedIn, AccountError> {
        if let (Some(limiter), Some(client)) = (&self.attempts, client)
            && !limiter.check(&client).await.allowed()
        {
            return Err(AccountError::TooManyAttempts);
        }
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(AccountError::BadCredentials);
        }
        let account = self.store.find_account(username).await?;
        let stored = account
            .as_ref()
            .map_or_else(|| self.decoy_hash.clone(), |a| a.password_hash.clone());
        let password = password.to_owned();
        let matches = blocking(move || Ok(verify(&password, &stored))).await?;
        match account {
            Some(account) if matches => self.signed_in(account),
            _ => Err(AccountError::BadCredentials),
        }
    }

    fn signed_in(&self, account: Account) -> Result<SignedIn, AccountError> {
        let mut user = User {
            id: account.id,
            username: Some(account.username),
            expires_at: None,
        };
        let (token, expires_at) = self
            .signer
            .sign(&user)
            .map_err(|e| AccountError::Failed(e.to_string()))?;
        user.expires_at = Some(expires_at);
        Ok(SignedIn { token, user })
    }
}

/// Usernames: 1 to 64 characters, none of them a control character, not blank.
fn check_username(username: &str) -> Result<(), AccountError> {
    let length = username.chars().count();
    if username.trim().is_empty()
        || length > MAX_USERNAME_CHARS
        || username.chars().any(char::is_control)
    {
        return Err(AccountError::Invalid(format!(
            "username must be 1 to {MAX_USERNAME_CHARS} characters"
        )));
    }
    Ok(())
}

/// Passwords: at least 8 characters.
fn check_password(password: &str) -> Result<(), AccountError> {
    if password.chars().count() < MIN_PASSWORD_CHARS || password.len() > MAX_PASSWORD_BYTES {
        return Err(AccountError::Invalid(format!(
            "password must be at least {MIN_PASSWORD_CHARS} characters (and at most {MAX_PASSWORD_BYTES} bytes)"
        )));
    }
    Ok(())
}

/// The argon2id hash of `password`, with a fresh salt, as a PHC string.
fn hash(password: &str) -> Result<String, AccountError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| AccountError::Failed(format!("hashing a password: {e}")))
}

/// Whether `password` is the one `stored` is the hash of.
fn verify(password: &str, stored: &str) -> bool {
    PasswordHash::new(stored).is_ok_and(|hash| {
        Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok()
    })
}

/// Runs costly hashing off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AccountError> + Send + 'static,
) -> Result<T, AccountError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| AccountError::Failed(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{AuthConfig, Secret};
    use crate::cluster::rates::testing::{node, unique_prefix};

    #[test]
    fn usernames_and_passwords_are_checked_at_their_edges() {
        assert!(check_username("a").is_ok());
        assert!(check_username(&"é".repeat(64)).is_ok());
        for bad in ["", "   ", &"a".repeat(65), "tab\there"] {
            assert!(check_username(bad).is_err(), "{bad:?}");
        }
        assert!(check_password("12345678").is_ok());
        assert!(check_password("1234567").is_err());
        assert!(check_password(&"x".repeat(1025)).is_err());
    }

    #[test]
    fn hashes_are_argon2id_and_verify_only_their_password() {
        let stored = hash("correct horse").unwrap();
        assert!(stored.starts_with("$argon2id$"), "{stored}");
        assert!(verify("correct horse", &stored));
        assert!(!verify("correct horsf", &stored));
        assert!(!verify("correct horse", "not a hash"));
    }

    #[tokio::test]
    async fn sign_in_attempts_are_limited_per_address_over_every_node() {
        let store = Arc::new(crate::store::MemoryStore::new());
        let cluster = unique_prefix();
        let mut nodes = Vec::new();
        for _ in 0..2 {
            let signer = TokenSigner::hs256(&Secret::new("s".repeat(32)), &AuthConfig::default());
            let shared = Some(node(&cluster).await);
            nodes.push(Accounts::new(store.clone(), signer.unwrap(), true, 3, shared).unwrap());
        }
        let (first, second) = (&nodes[0], &nodes[1]);
        first.register("ann", "correct horse").await.unwrap();
        let client = Some("10.0.0.1".parse().unwrap());
        let wrong = first.login(client, "ann", "wrong horse").await;
        assert_eq!(wrong.unwrap_err(), AccountError::BadCredentials);
        let wrong = second.login(client, "ann", "wrong horse").await;
        assert_eq!(wrong.unwrap_err(), AccountError::BadCredentials);
        assert!(first.login(client, "ann", "correct horse").await.is_ok());
        let refused = second.login(client, "ann", "correct horse").await;
        assert_eq!(refused.unwrap_err(), AccountError::TooManyAttempts);
        let elsewhere = Some("10.0.0.2".parse().unwrap());
        let other = second.login(elsewhere, "ann", "correct horse").await;
        assert!(other.is_ok());
    }
}
