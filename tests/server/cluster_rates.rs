//! Cluster mode's rate limits: nodes sharing one Redis count each client once over all of them.
//! They need Redis at `TEST_REDIS_URL` (by default `redis://127.0.0.1:6379`); every test is a
//! cluster of its own name, so that tests and runs never share a count.

use std::time::Duration;

use ai_chat_server::App;
use ai_chat_server::auth::{AuthMode, Secret};
use ai_chat_server::config::{ClusterConfig, Config};
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{TestServer, test_config};

/// The configuration of a node of a new cluster, on the tests' Redis.
fn cluster_config() -> Config {
    let mut config = test_config();
    config.cluster = Some(ClusterConfig {
        redis_url: std::env::var("TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()),
        name: format!("test-{}", uuid::Uuid::new_v4()),
        lease: Duration::from_secs(5),
    });
    config
}

/// Two nodes of one cluster.
async fn two_nodes(config: Config) -> [TestServer; 2] {
    [
        TestServer::start(config.clone()).await,
        TestServer::start(config).await,
    ]
}

#[tokio::test]
async fn api_requests_are_limited_per_client_over_every_node() {
    let mut config = cluster_config();
    config.rate_limit_max_requests = 3;
    config.rate_limit_window = Duration::from_secs(60);
    let nodes = two_nodes(config).await;
    let http = reqwest::Client::new();
    for (node, remaining) in nodes.iter().cycle().zip(["2", "1", "0"]) {
        let response = http.get(node.url("/api/health")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["ratelimit-remaining"], remaining);
        assert_eq!(response.headers()["ratelimit-policy"], "3;w=60");
    }
    let over = http.get(nodes[1].url("/api/health")).send().await.unwrap();
    assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = over.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    let body: serde_json::Value = over.json().await.unwrap();
    assert_eq!(body["code"], "RATE_LIMIT_EXCEEDED");
}

#[tokio::test]
async fn sign_in_attempts_are_limited_per_address_over_every_node() {
    let mut config = cluster_config();
    config.auth.mode = AuthMode::Local;
    config.auth.jwt_secret = Some(Secret::new("the-test-secret-of-at-least-32-bytes"));
    config.auth.login_attempts_per_minute = 2;
    let nodes = two_nodes(config).await;
    let body = json!({"username": "ann", "password": "wrong horse"});
    for (node, status) in nodes.iter().cycle().zip([
        StatusCode::UNAUTHORIZED,
        StatusCode::UNAUTHORIZED,
        StatusCode::TOO_MANY_REQUESTS,
    ]) {
        let (answer, _) = node.post("/api/auth/login", body.clone()).await;
        assert_eq!(answer, status);
    }
}

#[tokio::test]
async fn a_node_that_cannot_reach_redis_does_not_start_and_keeps_the_password_to_itself() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap()
        .port();
    let mut config = cluster_config();
    if let Some(cluster) = &mut config.cluster {
        cluster.redis_url = format!("redis://:hunter2@127.0.0.1:{port}/0");
    }
    let Err(error) = App::start(config).await else {
        panic!("started without Redis");
    };
    let error = error.to_string();
    assert!(
        error.starts_with("cannot join the cluster: cannot reach Redis"),
        "{error}"
    );
    assert!(
        !error.contains("hunter2") && !error.contains('\n'),
        "{error}"
    );
}
