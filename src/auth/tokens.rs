//! Verifying a JWT: its signature, `exp` (required), `nbf`, and `iss` and `aud` when the server
//! is told which to expect. Only the algorithm the key is for is accepted, so `alg: none` and
//! algorithm confusion (a token that names another algorithm than its key's) are refused. And,
//! for local accounts, signing the server's own tokens.

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::SetupError;
use super::keys::JwksKeys;
use super::mode::{AuthConfig, Secret};
use super::user::User;
use crate::domain::UserId;

/// Why a request's token does not say who it is from. The text is safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token came with the request.
    #[error("missing token")]
    Missing,
    /// Not a JWT, or one without a usable `sub`, or not a bearer token.
    #[error("malformed token")]
    Malformed,
    /// Its `exp` has passed.
    #[error("token expired")]
    Expired,
    /// Its `nbf` has not come yet.
    #[error("token not yet valid")]
    NotYetValid,
    /// The signature does not match the key (a forged token, or another key's).
    #[error("invalid token signature")]
    BadSignature,
    /// It is signed with an algorithm the server does not take for its key.
    #[error("token algorithm not accepted")]
    Algorithm,
    /// Its `iss` is not `JWT_ISSUER`.
    #[error("wrong token issuer")]
    Issuer,
    /// Its `aud` does not name `JWT_AUDIENCE`.
    #[error("wrong token audience")]
    Audience,
    /// It names a key the provider does not publish (or no key at all).
    #[error("unknown token key")]
    UnknownKey,
    /// The provider's keys could not be fetched.
    #[error("token keys unavailable")]
    KeysUnavailable,
}

impl From<jsonwebtoken::errors::Error> for AuthError {
    fn from(error: jsonwebtoken::errors::Error) -> Self {
        match error.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm
            | ErrorKind::InvalidAlgorithmName
            | ErrorKind::UnsupportedAlgorithm => AuthError::Algorithm,
            ErrorKind::InvalidIssuer => AuthError::Issuer,
            ErrorKind::InvalidAudience => AuthError::Audience,
            _ => AuthError::Malformed,
        }
    }
}

/// The claims the server reads; `exp`, `nbf`, `iss` and `aud` are checked by the validation.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    /// The name OpenID Connect providers give the user.
    #[serde(default)]
    preferred_username: Option<String>,
}

/// Checks tokens signed with the server's HS256 key (`JWT_SECRET`), or with RS256 or ES256 and
/// a key the provider publishes (`JWT_JWKS_URL`).
pub struct TokenVerifier {
    secret: Option<DecodingKey>,
    published: Option<JwksKeys>,
    /// The checks of every token; its algorithm is set per token, to the one its key is for.
    validation: Validation,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier").finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// A verifier of tokens signed with the keys of `config`, checked for its issuer, audience
    /// and leeway.
    pub fn new(config: &AuthConfig) -> Result<TokenVerifier, SetupError> {
        let secret = config
            .jwt_secret
            .as_ref()
            .map(|secret| DecodingKey::from_secret(secret.expose().as_bytes()))
            .transpose()
            .map_err(|_| SetupError::UnusableSecret)?;
        let published = config
            .jwks_url
            .as_ref()
            .map(|url| {
                JwksKeys::new(url.clone(), config.jwks_timeout, config.jwks_min_refetch)
                    .ok_or(SetupError::NoHttpClient)
            })
            .transpose()?;
        if secret.is_none() && published.is_none() {
            return Err(SetupError::MissingKey);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = config.leeway.as_secs();
        if let Some(issuer) = &config.issuer {
            validation.set_issuer(&[issuer]);
        }
        match &config.audience {
            Some(audience) => validation.set_audience(&[audience]),
            // No audience expected: a token may name any.
            None => validation.validate_aud = false,
        }
        Ok(TokenVerifier {
            secret,
            published,
            validation,
        })
    }

    /// The user `token` is from, once its signature and claims check out. HS256 tokens are
    /// checked with the secret, RS256 and ES256 ones with the published key they name; any other
    /// algorithm, or one without its kind of key configured, is refused.
    pub async fn verify(&self, token: &str) -> Result<User, AuthError> {
        let header = jsonwebtoken::decode_header(token)?;
        let key = match header.alg {
            Algorithm::HS256 => self.secret.clone().ok_or(AuthError::Algorithm)?,
            Algorithm::RS256 | Algorithm::ES256 => {
                let published = self.published.as_ref().ok_or(AuthError::Algorithm)?;
                let kid = header.kid.as_deref().ok_or(AuthError::UnknownKey)?;
                published.key(kid, header.alg).await?
            }
            _ => return Err(AuthError::Algorithm),
        };
        let mut validation = self.validation.clone();
        validation.algorithms = vec![header.alg];
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)?.claims;
        // The anonymous user's id is empty: no token may stand for it. An id is stored as text,
        // which some stores cannot hold with control characters (PostgreSQL's with U+0000).
        if claims.sub.is_empty() || claims.sub.chars().any(char::is_control) {
            return Err(AuthError::Malformed);
        }
        Ok(User {
            id: UserId::new(claims.sub),
            username: claims.preferred_username,
            expires_at: Some(claims.exp),
        })
    }
}

/// The claims of a token the server signs.
#[derive(Debug, Serialize)]
struct Issued<'a> {
    sub: &'a str,
    preferred_username: Option<&'a str>,
    iat: i64,
    exp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Signs the tokens of local accounts with the server's HS256 key, for `TOKEN_TTL_SECONDS`, with
/// the issuer and audience the verifier expects.
pub struct TokenSigner {
    key: EncodingKey,
    lifetime: Duration,
    issuer: Option<String>,
    audience: Option<String>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner").finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// A signer with `secret`, for the lifetime, issuer and audience of `config`.
    pub fn hs256(secret: &Secret, config: &AuthConfig) -> Result<TokenSigner, SetupError> {
        let key = EncodingKey::from_secret(secret.expose().as_bytes())
            .map_err(|_| SetupError::UnusableSecret)?;
        Ok(TokenSigner {
            key,
            lifetime: config.token_ttl,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
        })
    }

    /// A token saying it is `user`, valid from now for the signer's lifetime, and when it
    /// expires (seconds since the Unix epoch).
    pub fn sign(&self, user: &User) -> Result<(String, i64), jsonwebtoken::errors::Error> {
        let now = chrono::Utc::now().timestamp();
        let lifetime = i64::try_from(self.lifetime.as_secs()).unwrap_or(i64::MAX);
        let claims = Issued {
            sub: user.id.as_str(),
            preferred_username: user.username.as_deref(),
            iat: now,
            exp: now.saturating_add(lifetime),
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)?;
        Ok((token, claims.exp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_subject_that_is_empty_or_holds_a_control_character_is_refused() {
        let secret = Secret::new("a secret long enough for HS256 tokens");
        let config = AuthConfig {
            jwt_secret: Some(secret.clone()),
            ..AuthConfig::default()
        };
        let verifier = TokenVerifier::new(&config).unwrap();
        let key = EncodingKey::from_secret(secret.expose().as_bytes()).unwrap();
        let token = |sub: &str| {
            let claims =
                serde_json::json!({"sub": sub, "exp": chrono::Utc::now().timestamp() + 600});
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
        };
        let user = verifier.verify(&token("ann 🦀")).await.unwrap();
        assert_eq!(user.id, UserId::new("ann 🦀"));
        for sub in [
            "",
            "ann\u{0}",
            "\u{0}",
            "ann\nbob",
            "tab\there",
            "del\u{7f}",
            "c1\u{85}",
        ] {
            assert_eq!(
                verifier.verify(&token(sub)).await.map(|user| user.id),
                Err(AuthError::Malformed),
                "{sub:?}"
            );
        }
    }
}
