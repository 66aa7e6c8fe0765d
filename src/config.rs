//! Configuration from the environment and an optional `.env` file, with the contract's defaults.

use std::fmt::Display;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use crate::auth::{AuthConfig, AuthMode, Secret};
use crate::http::client::TrustedProxies;
use crate::store::Durability;

/// The shortest `JWT_SECRET` taken, in bytes: HS256 wants a key of its hash's 256 bits.
const MIN_JWT_SECRET_BYTES: usize = 32;

/// Start-up configuration problem: names the variable and what was wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid configuration: {variable}={value:?}: {reason}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub value: String,
    pub reason: String,
}

/// Everything the server can be told at start-up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on (`HOST`).
    pub host: IpAddr,
    /// Port to listen on (`PORT`); 0 picks a free one.
    pub port: u16,
    /// The one origin allowed by CORS (`FRONTEND_URL`).
    pub frontend_url: String,
    /// Log filter (`LOG_LEVEL`, or `RUST_LOG` when set).
    pub log_level: String,
    /// `LOG_FORMAT=json` for machine-readable logs.
    pub log_json: bool,
    /// Rate-limit window (`RATE_LIMIT_WINDOW_MS`).
    pub rate_limit_window: Duration,
    /// Requests per window per client address on `/api/` (`RATE_LIMIT_MAX_REQUESTS`); 0 is off.
    pub rate_limit_max_requests: u32,
    /// `stream_chat` and `regenerate` events one real-time connection may send per minute
    /// (`RT_MESSAGES_PER_MINUTE`); 0 is off.
    pub rt_messages_per_minute: u32,
    /// Open real-time connections per client address (`MAX_CONNECTIONS_PER_IP`); 0 is off.
    pub max_connections_per_ip: usize,
    /// Reverse proxies whose `X-Forwarded-For` or `Forwarded` names the client
    /// (`TRUSTED_PROXIES`: addresses or CIDR networks, comma-separated); none by default.
    pub trusted_proxies: TrustedProxies,
    /// How long a request head may take from its first byte (`HTTP_HEADER_TIMEOUT_MS`).
    pub http_header_timeout: Duration,
    /// How long a connection with no request in progress may stay silent
    /// (`HTTP_KEEPALIVE_TIMEOUT_MS`).
    pub http_keepalive_timeout: Duration,
    /// The model provider's settings.
    pub model: ModelConfig,
    /// How conversations behave.
    pub conversations: ConversationSettings,
    /// Largest request body in bytes (`BODY_LIMIT_BYTES`).
    pub body_limit_bytes: usize,
    /// How much of a body refused as too large is still read and thrown away, so that the client
    /// gets to read the answer (`BODY_DISCARD_LIMIT_BYTES`); 0 closes the connection at once.
    pub body_discard_limit_bytes: usize,
    /// How long a body refused as too large is still read (`BODY_DISCARD_TIMEOUT_MS`).
    pub body_discard_timeout: Duration,
    /// Longest chat message in characters (`MAX_MESSAGE_CHARS`).
    pub max_message_chars: usize,
    /// Largest real-time frame in bytes (`WS_MAX_FRAME_BYTES`).
    pub ws_max_frame_bytes: usize,
    /// How often a real-time connection is pinged (`WS_PING_INTERVAL_MS`).
    pub ws_ping_interval: Duration,
    /// How long a real-time connection may take to answer a ping before it is closed
    /// (`WS_PING_TIMEOUT_MS`); any frame from the client counts as an answer.
    pub ws_ping_timeout: Duration,
    /// Packets waiting for a Socket.IO long-polling client's next request (`SOCKETIO_BUFFER`);
    /// beyond them, events wait in the connection's outbox.
    pub socketio_buffer: usize,
    /// How many conversations one connection may join (`MAX_JOINED_CONVERSATIONS`).
    pub max_joined_conversations: usize,
    /// `DATABASE_URL`: `memory`, a SQLite database such as `sqlite://data/chat.db`, or a
    /// PostgreSQL database such as `postgres://user:password@host:5432/chat`.
    pub database_url: String,
    /// `SQLITE_SYNCHRONOUS`: `normal` or `full`.
    pub sqlite_durability: Durability,
    /// `SHUTDOWN_GRACE_MS`: how long replies in progress may go on after SIGINT or SIGTERM.
    pub shutdown_grace: Duration,
    /// Events waiting for one connection before the waiting chunks of a reply merge
    /// (`SUBSCRIBER_QUEUE`); a connection whose queue is full of events that cannot merge is
    /// dropped.
    pub subscriber_queue: usize,
    /// `WEB_CLIENT`: serve the chat page at `/`; false leaves the API alone.
    pub web_client: bool,
    /// How long a real-time connection may take none of the events waiting for it before it is
    /// dropped (`SEND_TIMEOUT_MS`).
    pub send_timeout: Duration,
    /// Sign-in: `AUTH_MODE` and what it needs.
    pub auth: AuthConfig,
    /// Cluster mode (`REDIS_URL`): nodes sharing the database and Redis; `None` for one node.
    pub cluster: Option<ClusterConfig>,
}

/// How a node works with the others of its cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `REDIS_URL`, where the nodes meet (`redis://host:6379/0`); it may hold a password, so it
    /// is never logged.
    pub redis_url: String,
    /// `CLUSTER_NAME`: the prefix of every Redis key and channel, so that several clusters (or
    /// test runs) can share one Redis without hearing each other.
    pub name: String,
    /// `CLUSTER_LEASE_MS`: how long a node's leases on its conversations last unless renewed; a
    /// node that stops renewing them (killed, paused, cut off) loses them after this long.
    pub lease: Duration,
}

/// Which model answers and how.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// `OPENAI_API_KEY`; unset means the built-in demo model.
    pub api_key: Option<String>,
    /// `OPENAI_BASE_URL`, an http or https URL; unset means OpenAI's.
    pub base_url: Option<String>,
    /// `OPENAI_MODEL`.
    pub model: String,
    /// `OPENAI_TEMPERATURE`, from 0 to 2; `None` (`off`) sends none.
    pub temperature: Option<f32>,
    /// `OPENAI_MAX_TOKENS`; `None` (`off`) sends no cap.
    pub max_tokens: Option<u32>,
    /// `DEMO_TOKEN_DELAY_MS`: the demo model's pause between pieces.
    pub demo_token_delay: Duration,
}

/// How conversation actors behave.
#[derive(Debug, Clone)]
pub struct ConversationSettings {
    /// `SYSTEM_PROMPT`, sent first in every request.
    pub system_prompt: String,
    /// `CONTEXT_MAX_CHARS`: history beyond this many characters is trimmed, oldest first.
    pub context_max_chars: usize,
    /// `UPSTREAM_TIMEOUT_MS`: the longest a whole reply may take, retries included.
    pub upstream_timeout: Duration,
    /// `HEARTBEAT_INTERVAL_MS`: model silence after which members get `stream_heartbeat`.
    pub heartbeat_interval: Duration,
    /// `CHECKPOINT_INTERVAL_MS`: how often a growing reply is saved.
    pub checkpoint_interval: Duration,
    /// `CONVERSATION_IDLE_MS`: an actor with no members and no reply stops after this long.
    pub idle_timeout: Duration,
    /// `USER_DAILY_TOKENS`: the tokens one user's replies may use per UTC day; 0 is no limit.
    pub daily_tokens: u64,
    /// A user message that makes the actor panic: a fault tests inject; never set from the
    /// environment.
    pub fault_trigger: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config::from_lookup(|_| None).expect("defaults are valid")
    }
}

impl Config {
    /// Reads `.env` (when present, without overriding real variables), then the environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let _ = dotenvy::dotenv();
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds the configuration from any source of variables.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let vars = Vars(&lookup);
        let log_format = vars.text("LOG_FORMAT", "text");
        if log_format != "text" && log_format != "json" {
            return Err(ConfigError {
                variable: "LOG_FORMAT",
                value: log_format,
                reason: "expected text or json".into(),
            });
        }
        let api_key = vars.optional("OPENAI_API_KEY");
        let host = vars.parse("HOST", "127.0.0.1".parse().expect("valid address"))?;
        Ok(Config {
            host,
            auth: auth_config(&vars, host)?,
            port: vars.parse("PORT", 5001)?,
            frontend_url: vars.text("FRONTEND_URL", "http://localhost:8081"),
            log_level: lookup("RUST_LOG")
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(|| vars.text("LOG_LEVEL", "info")),
            log_json: log_format == "json",
            rate_limit_window: vars.millis("RATE_LIMIT_WINDOW_MS", 900_000)?,
            rate_limit_max_requests: vars.parse("RATE_LIMIT_MAX_REQUESTS", 100)?,
            rt_messages_per_minute: vars.parse("RT_MESSAGES_PER_MINUTE", 30)?,
            max_connections_per_ip: vars.parse("MAX_CONNECTIONS_PER_IP", 64)?,
            trusted_proxies: vars.parse("TRUSTED_PROXIES", TrustedProxies::default())?,
            http_header_timeout: vars.millis("HTTP_HEADER_TIMEOUT_MS", 30_000)?,
            http_keepalive_timeout: vars.millis("HTTP_KEEPALIVE_TIMEOUT_MS", 5_000)?,
            model: ModelConfig {
                api_key,
                base_url: vars.url("OPENAI_BASE_URL")?,
                model: vars.text("OPENAI_MODEL", "gpt-4"),
                temperature: vars.unless_off("OPENAI_TEMPERATURE", || {
                    vars.within("OPENAI_TEMPERATURE", 0.7, 0.0..=2.0)
                })?,
                max_tokens: vars.unless_off("OPENAI_MAX_TOKENS", || {
                    vars.positive("OPENAI_MAX_TOKENS", 2000)
                })?,
                demo_token_delay: Duration::from_millis(vars.parse("DEMO_TOKEN_DELAY_MS", 40)?),
            },
            conversations: ConversationSettings {
                system_prompt: vars.text("SYSTEM_PROMPT", "You are a helpful assistant."),
                context_max_chars: vars.positive("CONTEXT_MAX_CHARS", 48_000)?,
                upstream_timeout: vars.millis("UPSTREAM_TIMEOUT_MS", 120_000)?,
                heartbeat_interval: vars.millis("HEARTBEAT_INTERVAL_MS", 15_000)?,
                checkpoint_interval: vars.millis("CHECKPOINT_INTERVAL_MS", 1_000)?,
                idle_timeout: vars.millis("CONVERSATION_IDLE_MS", 300_000)?,
                daily_tokens: vars.parse("USER_DAILY_TOKENS", 0)?,
                fault_trigger: None,
            },
            body_limit_bytes: vars.positive("BODY_LIMIT_BYTES", 10 * 1024 * 1024)?,
            body_discard_limit_bytes: vars.parse("BODY_DISCARD_LIMIT_BYTES", 64 * 1024 * 1024)?,
            body_discard_timeout: vars.millis("BODY_DISCARD_TIMEOUT_MS", 30_000)?,
            max_message_chars: vars.positive("MAX_MESSAGE_CHARS", 32_000)?,
            ws_max_frame_bytes: vars.positive("WS_MAX_FRAME_BYTES", 1024 * 1024)?,
            ws_ping_interval: vars.millis("WS_PING_INTERVAL_MS", 25_000)?,
            ws_ping_timeout: vars.millis("WS_PING_TIMEOUT_MS", 20_000)?,
            socketio_buffer: vars.positive("SOCKETIO_BUFFER", 1024)?,
            max_joined_conversations: vars.positive("MAX_JOINED_CONVERSATIONS", 100)?,
            subscriber_queue: vars.positive("SUBSCRIBER_QUEUE", 1024)?,
            send_timeout: vars.millis("SEND_TIMEOUT_MS", 30_000)?,
            shutdown_grace: vars.millis("SHUTDOWN_GRACE_MS", 10_000)?,
            database_url: vars.text("DATABASE_URL", "sqlite://data/chat.db"),
            sqlite_durability: vars.parse("SQLITE_SYNCHRONOUS", Durability::Normal)?,
            web_client: vars.parse("WEB_CLIENT", true)?,
            cluster: cluster_config(&vars)?,
        })
    }
}

/// Cluster mode, when `REDIS_URL` names a Redis server.
fn cluster_config<F: Fn(&str) -> Option<String>>(
    vars: &Vars<'_, F>,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let Some(redis_url) = vars.optional("REDIS_URL") else {
        return Ok(None);
    };
    let redis_url = redis_url.trim().to_owned();
    let scheme = redis_url.split_once("://").map(|(scheme, _)| scheme);
    if !matches!(scheme, Some("redis" | "rediss" | "unix" | "redis+unix")) {
        return Err(ConfigError {
            variable: "REDIS_URL",
            // Only the scheme is shown: the rest may hold a password.
            value: format!("{}://(hidden)", scheme.unwrap_or("")),
            reason: "expected a redis:// URL".into(),
        });
    }
    let name = vars.text("CLUSTER_NAME", "chat");
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.len() > 64 || !name.chars().all(valid) {
        return Err(ConfigError {
            variable: "CLUSTER_NAME",
            value: name,
            reason: "expected 1 to 64 letters, digits, '-', '_' or '.'".into(),
        });
    }
    Ok(Some(ClusterConfig {
        redis_url,
        name,
        lease: vars.millis("CLUSTER_LEASE_MS", 5_000)?,
    }))
}

/// The sign-in settings. `AUTH_MODE` defaults to `none` only on a loopback `HOST`: a server
/// reachable from the network must be told explicitly to let everyone in (as Redis's protected
/// mode does).
fn auth_config<F: Fn(&str) -> Option<String>>(
    vars: &Vars<'_, F>,
    host: IpAddr,
) -> Result<AuthConfig, ConfigError> {
    let mode = match vars.optional("AUTH_MODE") {
        Some(_) => vars.parse("AUTH_MODE", AuthMode::None)?,
        None if host.is_loopback() => AuthMode::None,
        None => {
            return Err(ConfigError {
                variable: "AUTH_MODE",
                value: String::new(),
                reason: format!(
                    "HOST={host} is reachable from the network: set AUTH_MODE=jwt or \
                     AUTH_MODE=local to require sign-in, or AUTH_MODE=none to let anyone in"
                ),
            });
        }
    };
    let jwt_secret = vars.optional("JWT_SECRET").map(Secret::new);
    let jwks_url = vars.url("JWT_JWKS_URL")?;
    let hidden = |reason: &str| ConfigError {
        variable: "JWT_SECRET",
        value: "(hidden)".into(),
        reason: reason.into(),
    };
    match &jwt_secret {
        Some(secret) if secret.expose().len() < MIN_JWT_SECRET_BYTES => {
            return Err(hidden("must be at least 32 bytes"));
        }
        None if mode == AuthMode::Local => {
            return Err(hidden("required with AUTH_MODE=local"));
        }
        None if mode == AuthMode::Jwt && jwks_url.is_none() => {
            return Err(hidden(
                "required with AUTH_MODE=jwt unless JWT_JWKS_URL is set",
            ));
        }
        _ => {}
    }
    Ok(AuthConfig {
        mode,
        jwt_secret,
        jwks_url,
        jwks_timeout: vars.millis("JWT_JWKS_TIMEOUT_MS", 5_000)?,
        jwks_min_refetch: Duration::from_secs(vars.parse("JWT_JWKS_MIN_REFETCH_SECONDS", 60)?),
        issuer: vars.optional("JWT_ISSUER"),
        audience: vars.optional("JWT_AUDIENCE"),
        leeway: Duration::from_secs(vars.parse("JWT_LEEWAY_SECONDS", 30)?),
        token_ttl: Duration::from_secs(vars.positive("TOKEN_TTL_SECONDS", 86_400)?),
        registration_open: match vars.text("REGISTRATION", "open").trim() {
            "open" => true,
            "closed" => false,
            other => {
                return Err(ConfigError {
                    variable: "REGISTRATION",
                    value: other.into(),
                    reason: "expected open or closed".into(),
                });
            }
        },
        login_attempts_per_minute: vars.parse("LOGIN_ATTEMPTS_PER_MINUTE", 10)?,
    })
}

/// Typed access to one source of variables.
struct Vars<'a, F: Fn(&str) -> Option<String>>(&'a F);

impl<F: Fn(&str) -> Option<String>> Vars<'_, F> {
    fn optional(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|v| !v.trim().is_empty())
    }

    fn text(&self, name: &str, default: &str) -> String {
        self.optional(name).unwrap_or_else(|| default.to_owned())
    }

    fn parse<T>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.optional(name) {
            None => Ok(default),
            Some(value) => value.trim().parse().map_err(|e: T::Err| ConfigError {
                variable: name,
                reason: e.to_string(),
                value,
            }),
        }
    }

    /// A setting that can be left out: empty or `off` is `None`, anything else is `read`.
    fn unless_off<T>(
        &self,
        name: &str,
        read: impl FnOnce() -> Result<T, ConfigError>,
    ) -> Result<Option<T>, ConfigError> {
        match (self.0)(name) {
            Some(v) if v.trim().is_empty() || v.trim().eq_ignore_ascii_case("off") => Ok(None),
            _ => read().map(Some),
        }
    }

    fn within<T>(
        &self,
        name: &'static str,
        default: T,
        range: RangeInclusive<T>,
    ) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + Display,
        T::Err: Display,
    {
        let value = self.parse(name, default)?;
        if !range.contains(&value) {
            return Err(ConfigError {
                variable: name,
                value: value.to_string(),
                reason: format!("expected {} to {}", range.start(), range.end()),
            });
        }
        Ok(value)
    }

    fn url(&self, name: &'static str) -> Result<Option<String>, ConfigError> {
        let Some(value) = self.optional(name) else {
            return Ok(None);
        };
        match reqwest::Url::parse(value.trim()) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(Some(value.trim().into())),
            _ => Err(ConfigError {
                variable: name,
                value,
                reason: "expected an http or https URL".into(),
            }),
        }
    }

    fn millis(&self, name: &'static str, default: u64) -> Result<Duration, ConfigError> {
        Ok(Duration::from_millis(self.positive(name, default)?))
    }

    fn positive<T>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr + Default + PartialEq + Display,
        T::Err: Display,
    {
        let value = self.parse(name, default)?;
        if value == T::default() {
            return Err(ConfigError {
                variable: name,
                value: value.to_string(),
                reason: "must be greater than zero".into(),
            });
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(move |k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = with(&[]).unwrap();
        assert_eq!(c.port, 5001);
        assert_eq!(c.socketio_buffer, 1024);
        assert_eq!(c.host.to_string(), "127.0.0.1");
        assert_eq!(c.frontend_url, "http://localhost:8081");
        assert_eq!(c.rate_limit_window, Duration::from_millis(900_000));
        assert_eq!(c.rate_limit_max_requests, 100);
        assert_eq!(c.model.model, "gpt-4");
        assert_eq!(
            c.conversations.system_prompt,
            "You are a helpful assistant."
        );
        assert_eq!(c.model.temperature, Some(0.7));
        assert_eq!(c.model.max_tokens, Some(2000));
        assert!(c.model.api_key.is_none());
        assert_eq!(c.body_limit_bytes, 10 * 1024 * 1024);
        assert_eq!(c.rt_messages_per_minute, 30);
        assert_eq!(c.max_connections_per_ip, 64);
        assert_eq!(c.ws_ping_interval, Duration::from_secs(25));
        assert_eq!(c.ws_ping_timeout, Duration::from_secs(20));
        assert!(c.web_client);
        assert_eq!(c.trusted_proxies, TrustedProxies::default());
        assert_eq!(c.http_header_timeout, Duration::from_secs(30));
        assert_eq!(c.http_keepalive_timeout, Duration::from_secs(5));
        assert_eq!(c.body_discard_limit_bytes, 64 * 1024 * 1024);
        assert_eq!(c.body_discard_timeout, Duration::from_secs(30));
        assert_eq!(c.send_timeout, Duration::from_secs(30));
        assert_eq!(c.conversations.daily_tokens, 0);
        let c = with(&[("USER_DAILY_TOKENS", "5000")]).unwrap();
        assert_eq!(c.conversations.daily_tokens, 5000);
    }

    #[test]
    fn invalid_values_name_the_variable() {
        let err = with(&[("PORT", "abc")]).unwrap_err();
        assert_eq!(err.variable, "PORT");
        assert!(err.to_string().contains("PORT=\"abc\""));
        assert_eq!(
            with(&[("BODY_LIMIT_BYTES", "0")]).unwrap_err().variable,
            "BODY_LIMIT_BYTES"
        );
        assert_eq!(
            with(&[("LOG_FORMAT", "xml")]).unwrap_err().variable,
            "LOG_FORMAT"
        );
        assert_eq!(
            with(&[("WEB_CLIENT", "maybe")]).unwrap_err().variable,
            "WEB_CLIENT"
        );
        let err = with(&[("TRUSTED_PROXIES", "10.0.0.1, nginx")]).unwrap_err();
        assert_eq!(err.variable, "TRUSTED_PROXIES");
        assert!(err.reason.contains("\"nginx\""), "{err}");
        assert_eq!(
            with(&[("HTTP_HEADER_TIMEOUT_MS", "0")])
                .unwrap_err()
                .variable,
            "HTTP_HEADER_TIMEOUT_MS"
        );
    }

    #[test]
    fn values_are_read() {
        let c = with(&[
            ("PORT", "8080"),
            ("OPENAI_API_KEY", "sk-test"),
            ("RATE_LIMIT_MAX_REQUESTS", "0"),
            ("LOG_FORMAT", "json"),
            ("RT_MESSAGES_PER_MINUTE", "0"),
            ("MAX_CONNECTIONS_PER_IP", "2"),
            ("WS_PING_INTERVAL_MS", "250"),
            ("WS_PING_TIMEOUT_MS", "100"),
            ("WEB_CLIENT", "false"),
            ("TRUSTED_PROXIES", "10.0.0.0/8,::1"),
            ("HTTP_KEEPALIVE_TIMEOUT_MS", "75000"),
            ("BODY_DISCARD_LIMIT_BYTES", "0"),
        ])
        .unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.model.api_key.as_deref(), Some("sk-test"));
        assert_eq!(c.rate_limit_max_requests, 0);
        assert!(c.log_json);
        assert_eq!(c.rt_messages_per_minute, 0);
        assert_eq!(c.max_connections_per_ip, 2);
        assert_eq!(c.ws_ping_interval, Duration::from_millis(250));
        assert_eq!(c.ws_ping_timeout, Duration::from_millis(100));
        assert!(!c.web_client);
        assert_eq!(c.trusted_proxies, "10.0.0.0/8, ::1".parse().unwrap());
        assert_eq!(c.http_keepalive_timeout, Duration::from_secs(75));
        assert_eq!(c.body_discard_limit_bytes, 0);
    }

    #[test]
    fn temperature_and_token_cap_can_be_off() {
        for off in ["off", "OFF", "", " "] {
            let c = with(&[("OPENAI_TEMPERATURE", off), ("OPENAI_MAX_TOKENS", off)]).unwrap();
            assert_eq!(c.model.temperature, None, "{off:?}");
            assert_eq!(c.model.max_tokens, None, "{off:?}");
        }
        let c = with(&[("OPENAI_TEMPERATURE", "0"), ("OPENAI_MAX_TOKENS", "1")]).unwrap();
        assert_eq!(c.model.temperature, Some(0.0));
        assert_eq!(c.model.max_tokens, Some(1));
        assert_eq!(
            with(&[("OPENAI_TEMPERATURE", "2")])
                .unwrap()
                .model
                .temperature,
            Some(2.0)
        );
    }

    #[test]
    fn model_settings_out_of_range_name_the_variable() {
        for bad in ["2.01", "-0.1", "NaN", "inf", "warm"] {
            let err = with(&[("OPENAI_TEMPERATURE", bad)]).unwrap_err();
            assert_eq!(err.variable, "OPENAI_TEMPERATURE", "{bad}");
        }
        for bad in ["0", "-1", "many"] {
            let err = with(&[("OPENAI_MAX_TOKENS", bad)]).unwrap_err();
            assert_eq!(err.variable, "OPENAI_MAX_TOKENS", "{bad}");
        }
        for bad in ["localhost:11434/v1", "ftp://example.com", "not a url"] {
            let err = with(&[("OPENAI_BASE_URL", bad)]).unwrap_err();
            assert_eq!(err.variable, "OPENAI_BASE_URL", "{bad}");
        }
        let c = with(&[("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1")]).unwrap();
        assert_eq!(
            c.model.base_url.as_deref(),
            Some("http://127.0.0.1:11434/v1")
        );
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn sign_in_is_off_by_default_on_a_loopback_host() {
        for host in ["127.0.0.1", "::1"] {
            let c = with(&[("HOST", host)]).unwrap();
            assert_eq!(c.auth.mode, AuthMode::None, "{host}");
        }
        let c = with(&[]).unwrap();
        assert_eq!(c.auth.leeway, Duration::from_secs(30));
        assert!(c.auth.jwt_secret.is_none());
    }

    #[test]
    fn a_host_on_the_network_without_auth_mode_is_refused_naming_auth_mode() {
        for host in ["0.0.0.0", "::", "192.168.1.10"] {
            let err = with(&[("HOST", host)]).unwrap_err();
            assert_eq!(err.variable, "AUTH_MODE", "{host}");
            let line = err.to_string();
            assert!(line.contains("AUTH_MODE") && !line.contains('\n'), "{line}");
        }
        let c = with(&[("HOST", "0.0.0.0"), ("AUTH_MODE", "none")]).unwrap();
        assert_eq!(c.auth.mode, AuthMode::None);
        let c = with(&[
            ("HOST", "0.0.0.0"),
            ("AUTH_MODE", "JWT"),
            ("JWT_SECRET", SECRET),
        ]);
        assert_eq!(c.unwrap().auth.mode, AuthMode::Jwt);
    }

    #[test]
    fn jwt_mode_needs_a_secret_of_at_least_32_bytes_which_is_never_shown() {
        let err = with(&[("AUTH_MODE", "jwt")]).unwrap_err();
        assert_eq!(err.variable, "JWT_SECRET");
        let short = &SECRET[..31];
        let err = with(&[("AUTH_MODE", "jwt"), ("JWT_SECRET", short)]).unwrap_err();
        assert_eq!(err.variable, "JWT_SECRET");
        assert!(!err.to_string().contains(short), "{err}");
        let c = with(&[
            ("AUTH_MODE", "jwt"),
            ("JWT_SECRET", SECRET),
            ("JWT_ISSUER", "https://issuer.example"),
            ("JWT_AUDIENCE", "chat"),
            ("JWT_LEEWAY_SECONDS", "5"),
        ])
        .unwrap();
        assert_eq!(c.auth.jwt_secret.as_ref().map(Secret::expose), Some(SECRET));
        assert!(!format!("{c:?}").contains(SECRET));
        assert_eq!(c.auth.issuer.as_deref(), Some("https://issuer.example"));
        assert_eq!(c.auth.audience.as_deref(), Some("chat"));
        assert_eq!(c.auth.leeway, Duration::from_secs(5));
        assert_eq!(
            with(&[("AUTH_MODE", "ldap")]).unwrap_err().variable,
            "AUTH_MODE"
        );
    }

    #[test]
    fn jwt_mode_takes_published_keys_instead_of_a_secret() {
        let url = "https://idp.example/.well-known/jwks.json";
        let c = with(&[("AUTH_MODE", "jwt"), ("JWT_JWKS_URL", url)]).unwrap();
        assert_eq!(c.auth.jwks_url.as_deref(), Some(url));
        assert_eq!(c.auth.jwks_timeout, Duration::from_secs(5));
        assert_eq!(c.auth.jwks_min_refetch, Duration::from_secs(60));
        let c = with(&[
            ("AUTH_MODE", "jwt"),
            ("JWT_JWKS_URL", url),
            ("JWT_JWKS_TIMEOUT_MS", "100"),
            ("JWT_JWKS_MIN_REFETCH_SECONDS", "0"),
        ])
        .unwrap();
        assert_eq!(c.auth.jwks_timeout, Duration::from_millis(100));
        assert_eq!(c.auth.jwks_min_refetch, Duration::ZERO);
        let err = with(&[("AUTH_MODE", "jwt"), ("JWT_JWKS_URL", "idp.example/keys")]);
        assert_eq!(err.unwrap_err().variable, "JWT_JWKS_URL");
        let err = with(&[("AUTH_MODE", "local"), ("JWT_JWKS_URL", url)]).unwrap_err();
        assert_eq!(err.variable, "JWT_SECRET");
    }

    #[test]
    fn local_accounts_need_a_secret_and_read_their_settings() {
        let err = with(&[("AUTH_MODE", "local")]).unwrap_err();
        assert_eq!(err.variable, "JWT_SECRET");
        let c = with(&[("AUTH_MODE", "local"), ("JWT_SECRET", SECRET)]).unwrap();
        assert_eq!(c.auth.mode, AuthMode::Local);
        assert_eq!(c.auth.token_ttl, Duration::from_secs(86_400));
        assert!(c.auth.registration_open);
        assert_eq!(c.auth.login_attempts_per_minute, 10);
        let c = with(&[
            ("AUTH_MODE", "local"),
            ("JWT_SECRET", SECRET),
            ("TOKEN_TTL_SECONDS", "60"),
            ("REGISTRATION", "closed"),
            ("LOGIN_ATTEMPTS_PER_MINUTE", "0"),
        ])
        .unwrap();
        assert_eq!(c.auth.token_ttl, Duration::from_secs(60));
        assert!(!c.auth.registration_open);
        assert_eq!(c.auth.login_attempts_per_minute, 0);
        for (name, bad) in [("REGISTRATION", "maybe"), ("TOKEN_TTL_SECONDS", "0")] {
            let err = with(&[(name, bad)]).unwrap_err();
            assert_eq!(err.variable, name);
        }
    }

    #[test]
    fn redis_url_turns_cluster_mode_on_and_its_password_is_never_shown() {
        assert!(with(&[]).unwrap().cluster.is_none());
        let c = with(&[("REDIS_URL", "redis://127.0.0.1:6379/0")]).unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.name, "chat");
        assert_eq!(cluster.lease, Duration::from_secs(5));
        let c = with(&[
            ("REDIS_URL", "redis://127.0.0.1:6379"),
            ("CLUSTER_NAME", "eu-1"),
            ("CLUSTER_LEASE_MS", "1500"),
        ])
        .unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(
            (cluster.name.as_str(), cluster.lease),
            ("eu-1", Duration::from_millis(1500))
        );
        let err = with(&[("REDIS_URL", "http://user:hunter2@cache")]).unwrap_err();
        assert_eq!(err.variable, "REDIS_URL");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        for (name, bad) in [("CLUSTER_NAME", "a:b"), ("CLUSTER_LEASE_MS", "0")] {
            let err = with(&[("REDIS_URL", "redis://r"), (name, bad)]).unwrap_err();
            assert_eq!(err.variable, name);
        }
    }
}
