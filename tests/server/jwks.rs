//! Tokens of an identity provider: RS256 and ES256, checked with the keys it publishes at
//! `JWT_JWKS_URL` (served here by a test server, with keys made by the test), fetched again when
//! the provider rotates them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ai_chat_server::auth::AuthMode;
use ai_chat_server::config::Config;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::{RealtimeClient, TestServer, WsClient, call_with_token, test_config};

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A key pair of the provider's, made by the test.
enum Pair {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// A provider's signing key and its id.
struct ProviderKey {
    kid: String,
    pair: Pair,
}

impl ProviderKey {
    fn rsa(kid: &str) -> ProviderKey {
        let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        ProviderKey {
            kid: kid.into(),
            pair: Pair::Rsa(pair),
        }
    }

    fn ec(kid: &str) -> ProviderKey {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        ProviderKey {
            kid: kid.into(),
            pair: Pair::Ec(pair),
        }
    }

    /// The key as the provider publishes it.
    fn jwk(&self) -> Value {
        match &self.pair {
            Pair::Rsa(pair) => {
                let public = pair.public_key();
                json!({
                    "kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
                    "n": b64(public.modulus().big_endian_without_leading_zero()),
                    "e": b64(public.exponent().big_endian_without_leading_zero()),
                })
            }
            Pair::Ec(pair) => {
                let point = pair.public_key().as_ref();
                json!({
                    "kty": "EC", "use": "sig", "alg": "ES256", "crv": "P-256", "kid": self.kid,
                    "x": b64(&point[1..33]), "y": b64(&point[33..65]),
                })
            }
        }
    }

    fn algorithm(&self) -> &'static str {
        match self.pair {
            Pair::Rsa(_) => "RS256",
            Pair::Ec(_) => "ES256",
        }
    }

    /// A token for `sub` signed with this key, its header naming `kid` and `alg`.
    fn sign_as(&self, kid: &str, alg: &str, sub: &str) -> String {
        let header = json!({"alg": alg, "typ": "JWT", "kid": kid});
        let claims = json!({"sub": sub, "exp": chrono::Utc::now().timestamp() + 600});
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let rng = SystemRandom::new();
        let signature = match &self.pair {
            Pair::Rsa(pair) => {
                let mut signature = vec![0; pair.public_modulus_len()];
                pair.sign(&RSA_PKCS1_SHA256, &rng, message.as_bytes(), &mut signature)
                    .unwrap();
                signature
            }
            Pair::Ec(pair) => pair
                .sign(&rng, message.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
        };
        format!("{message}.{}", b64(&signature))
    }

    /// A good token for `sub`.
    fn token(&self, sub: &str) -> String {
        self.sign_as(&self.kid, self.algorithm(), sub)
    }
}

/// A provider's key set endpoint: serves whatever set the test puts, and counts the fetches.
struct JwksServer {
    url: String,
    set: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(keys: &[&ProviderKey]) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let set = Arc::new(Mutex::new(Value::Null));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (served, counted) = (set.clone(), fetches.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = vec![0; 4096];
                let _ = stream.read(&mut request).await;
                counted.fetch_add(1, Ordering::SeqCst);
                let body = served.lock().unwrap().to_string();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        let server = JwksServer { url, set, fetches };
        server.publish(keys);
        server
    }

    /// From now on, the set holds `keys` (and one key of a kind the server skips).
    fn publish(&self, keys: &[&ProviderKey]) {
        let mut published: Vec<Value> = keys.iter().map(|k| k.jwk()).collect();
        published.push(json!({"kty": "oct", "kid": "symmetric", "k": "c2VjcmV0"}));
        *self.set.lock().unwrap() = json!({ "keys": published });
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// Tokens checked with the keys at `jwks`, which may be fetched again every `min_refetch`.
fn jwks_config(jwks: &JwksServer, min_refetch: Duration) -> Config {
    let mut config = test_config();
    config.auth.mode = AuthMode::Jwt;
    config.auth.jwks_url = Some(jwks.url.clone());
    config.auth.jwks_min_refetch = min_refetch;
    config
}

/// `GET /api/me` with `token`: the status, and the id or the error message.
async fn me(server: &TestServer, token: &str) -> (StatusCode, Value) {
    let (status, answer) =
        call_with_token(server.addr(), Some(token), "GET", "/api/me", None).await;
    let said = if status == StatusCode::OK {
        answer["id"].clone()
    } else {
        assert_eq!(answer["code"], "UNAUTHORIZED", "{answer}");
        answer["message"].clone()
    };
    (status, said)
}

#[tokio::test]
async fn tokens_signed_with_published_rs256_and_es256_keys_are_accepted() {
    let (rsa, ec) = (ProviderKey::rsa("rsa-1"), ProviderKey::ec("ec-1"));
    let jwks = JwksServer::start(&[&rsa, &ec]).await;
    let server = TestServer::start(jwks_config(&jwks, Duration::from_secs(3600))).await;
    assert_eq!(
        me(&server, &rsa.token("ann")).await,
        (StatusCode::OK, json!("ann"))
    );
    assert_eq!(
        me(&server, &ec.token("bob")).await,
        (StatusCode::OK, json!("bob"))
    );
    let client = WsClient::connect_as(server.addr(), &ec.token("bob"))
        .await
        .unwrap();
    client.close().await;
    assert_eq!(jwks.fetches(), 1, "the set is kept once fetched");
}

#[tokio::test]
async fn a_rotated_key_is_fetched_when_a_token_names_it() {
    let (old, new) = (ProviderKey::ec("2026-01"), ProviderKey::rsa("2026-02"));
    let jwks = JwksServer::start(&[&old]).await;
    let server = TestServer::start(jwks_config(&jwks, Duration::ZERO)).await;
    assert_eq!(me(&server, &old.token("ann")).await.0, StatusCode::OK);
    assert_eq!(jwks.fetches(), 1);

    jwks.publish(&[&new]);
    let kept = me(&server, &old.token("ann")).await;
    assert_eq!(
        kept.0,
        StatusCode::OK,
        "kept until the set is fetched again"
    );
    assert_eq!(jwks.fetches(), 1);
    assert_eq!(
        me(&server, &new.token("ann")).await,
        (StatusCode::OK, json!("ann"))
    );
    assert_eq!(jwks.fetches(), 2);
    let retired = (StatusCode::UNAUTHORIZED, json!("unknown token key"));
    assert_eq!(me(&server, &old.token("ann")).await, retired);
    assert_eq!(jwks.fetches(), 3);
}

#[tokio::test]
async fn unknown_key_ids_fetch_the_set_at_most_once_per_interval() {
    let (first, second) = (ProviderKey::ec("first"), ProviderKey::ec("second"));
    let jwks = JwksServer::start(&[&first]).await;
    let server = TestServer::start(jwks_config(&jwks, Duration::from_secs(3600))).await;
    assert_eq!(me(&server, &first.token("ann")).await.0, StatusCode::OK);
    jwks.publish(&[&first, &second]);
    for kid in ["second", "made-up-1", "made-up-2"] {
        let (status, said) = me(&server, &second.sign_as(kid, "ES256", "ann")).await;
        assert_eq!(
            (status, said),
            (StatusCode::UNAUTHORIZED, json!("unknown token key"))
        );
    }
    assert_eq!(jwks.fetches(), 1);
}

#[tokio::test]
async fn algorithm_confusion_and_foreign_keys_are_refused() {
    let (rsa, ec) = (ProviderKey::rsa("rsa-1"), ProviderKey::ec("ec-1"));
    let stranger = ProviderKey::rsa("rsa-1");
    let jwks = JwksServer::start(&[&rsa, &ec]).await;
    let server = TestServer::start(jwks_config(&jwks, Duration::from_secs(3600))).await;
    let not_accepted = (
        StatusCode::UNAUTHORIZED,
        json!("token algorithm not accepted"),
    );

    // HS256 keyed with the published RSA key, as an attacker who read the set could make.
    let Value::String(n) = rsa.jwk()["n"].clone() else {
        unreachable!()
    };
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let claims = json!({"sub": "ann", "exp": chrono::Utc::now().timestamp() + 600});
    let key = EncodingKey::from_secret(n.as_bytes()).unwrap();
    let confused = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    assert_eq!(me(&server, &confused).await, not_accepted);
    // An RS256 header naming the EC key, and an ES256 one naming the RSA key.
    assert_eq!(
        me(&server, &rsa.sign_as("ec-1", "RS256", "ann")).await,
        not_accepted
    );
    assert_eq!(
        me(&server, &ec.sign_as("rsa-1", "ES256", "ann")).await,
        not_accepted
    );
    // The published key id, another key.
    let forged = (StatusCode::UNAUTHORIZED, json!("invalid token signature"));
    assert_eq!(me(&server, &stranger.token("ann")).await, forged);
    // The symmetric key in the set is never used.
    let symmetric = ProviderKey::ec("symmetric").token("ann");
    assert_eq!(me(&server, &symmetric).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_provider_out_of_reach_is_unauthorized_not_a_server_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    drop(listener);
    let mut config = test_config();
    config.auth.mode = AuthMode::Jwt;
    config.auth.jwks_url = Some(url);
    let server = TestServer::start(config).await;
    let token = ProviderKey::ec("k").token("ann");
    assert_eq!(
        me(&server, &token).await,
        (StatusCode::UNAUTHORIZED, json!("token keys unavailable"))
    );
}
