//! The sign-in modes (`AUTH_MODE`) and what each needs.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How requests say who they are (`AUTH_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// No sign-in: every request is the anonymous user.
    None,
    /// Every `/api/` route but health, and every real-time connection, needs a JWT whose `sub`
    /// is the user's id.
    Jwt,
    /// As `Jwt`, with accounts kept by the server, which signs their tokens itself.
    Local,
}

impl FromStr for AuthMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(AuthMode::None),
            "jwt" => Ok(AuthMode::Jwt),
            "local" => Ok(AuthMode::Local),
            _ => Err("expected none, jwt or local".into()),
        }
    }
}

/// A secret setting, such as a signing key: never shown in logs or debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Keeps `value` as a secret.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The sign-in settings.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// `AUTH_MODE`.
    pub mode: AuthMode,
    /// `JWT_SECRET`: the HS256 key tokens are verified (and, for local accounts, signed) with;
    /// required in the `jwt` and `local` modes.
    pub jwt_secret: Option<Secret>,
    /// `JWT_JWKS_URL`: where an identity provider publishes the keys of its RS256 and ES256
    /// tokens.
    pub jwks_url: Option<String>,
    /// `JWT_JWKS_TIMEOUT_MS`: the longest a fetch of the published keys may take.
    pub jwks_timeout: Duration,
    /// `JWT_JWKS_MIN_REFETCH_SECONDS`: the least time between two fetches of the published keys.
    pub jwks_min_refetch: Duration,
    /// `JWT_ISSUER`: when set, a token's `iss` must be this.
    pub issuer: Option<String>,
    /// `JWT_AUDIENCE`: when set, a token's `aud` must name this.
    pub audience: Option<String>,
    /// `JWT_LEEWAY_SECONDS`: how far apart the clocks of the token's issuer and this server may
    /// be when `exp` and `nbf` are checked.
    pub leeway: Duration,
    /// `TOKEN_TTL_SECONDS`: how long a token the server signs for a local account is valid.
    pub token_ttl: Duration,
    /// `REGISTRATION`: whether anyone may make a local account (`open`) or not (`closed`).
    pub registration_open: bool,
    /// `LOGIN_ATTEMPTS_PER_MINUTE`: sign-in attempts per client address per minute; 0 is off.
    pub login_attempts_per_minute: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::None,
            jwt_secret: None,
            jwks_url: None,
            jwks_timeout: Duration::from_secs(5),
            jwks_min_refetch: Duration::from_secs(60),
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
            token_ttl: Duration::from_secs(86_400),
            registration_open: true,
            login_attempts_per_minute: 10,
        }
    }
}
