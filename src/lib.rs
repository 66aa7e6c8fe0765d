//! An AI chat server: conversations kept by one actor each, replies streamed from any
//! OpenAI-compatible model to every client watching, over REST, WebSocket and Socket.IO.

pub mod actors;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod domain;
pub mod error;
pub mod http;
pub mod llm;
pub mod metrics;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::actors::{ConversationContext, Conversations, Registry, idle_timers};
use crate::auth::{Accounts, AuthConfig, AuthMode, Authenticator, TokenSigner};
use crate::cluster::Cluster;
use crate::cluster::rates::SharedRates;
use crate::config::Config;
use crate::error::ChatError;
use crate::http::Shared;
use crate::http::limits::{ConnectionLimit, ReplyLimiter};
use crate::llm::ModelProvider;
use crate::metrics::Metrics;
use crate::store::Store;

/// How long real-time connections may take to close once replies are over.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the store: {0}")]
    Store(#[from] store::StoreError),
    #[error("cannot start the conversations: {0}")]
    Conversations(#[from] ChatError),
    #[error("cannot start the model provider: {}", .0.0)]
    Provider(llm::ProviderError),
    #[error("cannot set up sign-in: {0}")]
    Auth(#[from] auth::SetupError),
    #[error("cannot set up local accounts: {0}")]
    Accounts(#[from] auth::AccountError),
    #[error("cannot join the cluster: {0}")]
    Cluster(#[from] cluster::JoinError),
}

/// The server's own accounts, when `AUTH_MODE=local`.
fn local_accounts(
    config: &AuthConfig,
    store: Arc<dyn Store>,
    rates: Option<SharedRates>,
) -> Result<Option<Accounts>, StartError> {
    if config.mode != AuthMode::Local {
        return Ok(None);
    }
    let secret = config
        .jwt_secret
        .as_ref()
        .ok_or(auth::SetupError::MissingKey)?;
    let signer = TokenSigner::hs256(secret, config)?;
    let accounts = Accounts::new(
        store,
        signer,
        config.registration_open,
        config.login_attempts_per_minute,
        rates,
    )?;
    Ok(Some(accounts))
}

/// A running server.
pub struct App {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl App {
    /// Starts the whole server as `config` says, on `config.host:config.port`.
    pub async fn start(config: Config) -> Result<App, StartError> {
        let provider = llm::from_config(&config.model, config.conversations.upstream_timeout)
            .map_err(StartError::Provider)?;
        let store = store::open(&config.database_url, config.sqlite_durability).await?;
        if config.cluster.is_some() && !config.database_url.starts_with("postgres") {
            tracing::warn!(
                "cluster mode with a database the nodes cannot share: each node keeps its own \
                 conversations; set DATABASE_URL to a PostgreSQL database"
            );
        }
        App::start_with(config, store, provider).await
    }

    /// Starts the server with a given store and model provider.
    pub async fn start_with(
        config: Config,
        store: Arc<dyn Store>,
        provider: Arc<dyn ModelProvider>,
    ) -> Result<App, StartError> {
        let metrics = Arc::new(Metrics::default());
        let cluster = match &config.cluster {
            Some(cluster) => Some(
                Cluster::join(
                    cluster,
                    config.conversations.upstream_timeout,
                    metrics.clone(),
                )
                .await?,
            ),
            // One node alone: every reply still `streaming` was cut off by its last stop. In a
            // cluster, other nodes' replies are, and an owner ends a dead node's on activation.
            None => {
                let interrupted = store.mark_interrupted().await?;
                if interrupted > 0 {
                    tracing::warn!(
                        count = interrupted,
                        "replies interrupted by the last stop marked as errors"
                    );
                }
                None
            }
        };
        let authenticator = Authenticator::new(&config.auth)?;
        let rates = cluster.as_ref().map(|(cluster, _)| cluster.rates());
        let accounts = local_accounts(&config.auth, store.clone(), rates.clone())?;
        let addr = SocketAddr::new(config.host, config.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?;
        let conversations = Conversations::new(ConversationContext {
            store,
            provider,
            settings: config.conversations.clone(),
            registry: Registry::default(),
            metrics: metrics.clone(),
            replies: TaskTracker::new(),
            cluster: cluster.as_ref().map(|(cluster, _)| cluster.clone()),
            idle_timers: idle_timers(),
        });
        if let Some((cluster, hearing)) = cluster {
            cluster.run(conversations.clone(), hearing);
        }
        let shared = Arc::new(Shared {
            conversations,
            auth: Arc::new(authenticator),
            reply_limiter: ReplyLimiter::new(config.rt_messages_per_minute, rates.clone()),
            rates,
            accounts,
            connection_limit: ConnectionLimit::new(config.max_connections_per_ip),
            config: Arc::new(config),
            metrics,
            started: Instant::now(),
            stop_accepting: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
        });
        let grace = shared.config.shutdown_grace;
        let server = tokio::spawn(http::serve(listener, shared.clone(), grace));
        Ok(App {
            addr,
            shared,
            server,
        })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The conversations, for in-process use.
    pub fn conversations(&self) -> &Conversations {
        &self.shared.conversations
    }

    /// Stops accepting, lets replies in progress finish for up to `grace` and interrupts the
    /// rest, closes real-time connections (waiting briefly until they have sent their last
    /// events and close frame), and lets open requests finish.
    pub async fn shutdown(self, grace: Duration) {
        self.shared.stop_accepting.cancel();
        self.shared.conversations.shutdown(grace).await;
        self.shared.shutdown.cancel();
        let connections = &self.shared.connections;
        connections.close();
        if tokio::time::timeout(CLOSE_TIMEOUT, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = connections.len(),
                "real-time connections still open after closing them"
            );
        }
        let _ = self.server.await;
    }
}
