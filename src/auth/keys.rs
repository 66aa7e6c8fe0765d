//! The signing keys an OpenID Connect provider publishes at `JWT_JWKS_URL` (a JWK set), for
//! tokens signed with RS256 or ES256. The set is fetched when a token first needs it, kept, and
//! fetched again when a token names a key id the kept set lacks (the provider rotated its keys),
//! at most once per `JWT_JWKS_MIN_REFETCH_SECONDS`, so tokens with made-up key ids cannot make
//! the server hammer the provider.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::tokens::AuthError;

/// One published key and the one algorithm it verifies.
#[derive(Clone)]
struct PublishedKey {
    algorithm: Algorithm,
    key: DecodingKey,
}

/// A JWK set as published; keys this server cannot use are skipped one by one.
#[derive(Deserialize)]
struct PublishedSet {
    keys: Vec<serde_json::Value>,
}

/// The keys published at `JWT_JWKS_URL`, by key id.
pub struct JwksKeys {
    url: String,
    http: reqwest::Client,
    keys: RwLock<HashMap<String, PublishedKey>>,
    /// When the set was last fetched; held while a fetch runs, so that one fetch serves all.
    fetched: Mutex<Option<Instant>>,
    min_refetch: Duration,
}

impl std::fmt::Debug for JwksKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksKeys")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl JwksKeys {
    /// The keys at `url`, fetched within `timeout`, fetched again at most once per
    /// `min_refetch`.
    pub fn new(url: String, timeout: Duration, min_refetch: Duration) -> Option<JwksKeys> {
        let http = reqwest::Client::builder().timeout(timeout).build().ok()?;
        Some(JwksKeys {
            url,
            http,
            keys: RwLock::new(HashMap::new()),
            fetched: Mutex::new(None),
            min_refetch,
        })
    }

    /// The key `kid` for tokens signed with `algorithm`, fetching the set when it is not known.
    pub async fn key(&self, kid: &str, algorithm: Algorithm) -> Result<DecodingKey, AuthError> {
        let published = match self.known(kid) {
            Some(published) => published,
            None => {
                self.refetch().await?;
                self.known(kid).ok_or(AuthError::UnknownKey)?
            }
        };
        // A key verifies its own algorithm only: no RS256 token checked with an EC key, say.
        if published.algorithm != algorithm {
            return Err(AuthError::Algorithm);
        }
        Ok(published.key)
    }

    fn known(&self, kid: &str) -> Option<PublishedKey> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.get(kid).cloned()
    }

    /// Fetches the set again unless it was fetched less than `min_refetch` ago.
    async fn refetch(&self) -> Result<(), AuthError> {
        let mut fetched = self.fetched.lock().await;
        if fetched.is_some_and(|at| at.elapsed() < self.min_refetch) {
            return Ok(());
        }
        *fetched = Some(Instant::now());
        let set = self.fetch().await.map_err(|e| {
            tracing::warn!(url = %self.url, error = %e, "cannot fetch the JWK set");
            AuthError::KeysUnavailable
        })?;
        let keys = usable_keys(set);
        tracing::info!(url = %self.url, keys = keys.len(), "JWK set fetched");
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(())
    }

    async fn fetch(&self) -> Result<PublishedSet, reqwest::Error> {
        self.http
            .get(&self.url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
    }
}

/// The keys of a set this server can verify with, by key id: RSA keys for RS256 and P-256 keys
/// for ES256, each with an id.
fn usable_keys(set: PublishedSet) -> HashMap<String, PublishedKey> {
    set.keys
        .into_iter()
        .filter_map(|value| serde_json::from_value::<Jwk>(value).ok())
        .filter_map(|jwk| {
            let kid = jwk.common.key_id.clone()?;
            let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
                (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                    if ec.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                _ => return None,
            };
            let key = DecodingKey::from_jwk(&jwk).ok()?;
            Some((kid, PublishedKey { algorithm, key }))
        })
        .collect()
}
