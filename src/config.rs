//! Configuration from the environment and an optional `.env` file, with the contract's defaults.

use std::fmt::Display;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use crate::store::Durability;

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
    /// The model provider's settings.
    pub model: ModelConfig,
    /// How conversations behave.
    pub conversations: ConversationSettings,
    /// Largest request body in bytes (`BODY_LIMIT_BYTES`).
    pub body_limit_bytes: usize,
    /// Longest chat message in characters (`MAX_MESSAGE_CHARS`).
    pub max_message_chars: usize,
    /// Largest real-time frame in bytes (`WS_MAX_FRAME_BYTES`).
    pub ws_max_frame_bytes: usize,
    /// Packets socketioxide buffers for one Socket.IO connection (`SOCKETIO_BUFFER`); beyond
    /// them, events wait in the connection's outbox.
    pub socketio_buffer: usize,
    /// How many conversations one connection may join (`MAX_JOINED_CONVERSATIONS`).
    pub max_joined_conversations: usize,
    /// `DATABASE_URL`: `memory`, or a SQLite database such as `sqlite://data/chat.db`.
    pub database_url: String,
    /// `SQLITE_SYNCHRONOUS`: `normal` or `full`.
    pub sqlite_durability: Durability,
    /// `SHUTDOWN_GRACE_MS`: how long replies in progress may go on after SIGINT or SIGTERM.
    pub shutdown_grace: Duration,
    /// Events waiting for one connection before the waiting chunks of a reply merge
    /// (`SUBSCRIBER_QUEUE`); a connection whose queue is full of events that cannot merge is
    /// dropped.
    pub subscriber_queue: usize,
    /// How long a real-time connection may take none of the events waiting for it before it is
    /// dropped (`SEND_TIMEOUT_MS`).
    pub send_timeout: Duration,
}

/// Which model answers and how.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// `OPENAI_API_KEY`; unset means the built-in demo model.
    pub api_key: Option<String>,
    /// `OPENAI_BASE_URL`; unset means OpenAI's.
    pub base_url: Option<String>,
    /// `OPENAI_MODEL`.
    pub model: String,
    /// `OPENAI_TEMPERATURE`.
    pub temperature: f32,
    /// `OPENAI_MAX_TOKENS`.
    pub max_tokens: u32,
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
        Ok(Config {
            host: vars.parse("HOST", "127.0.0.1".parse().expect("valid address"))?,
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
            model: ModelConfig {
                api_key,
                base_url: vars.optional("OPENAI_BASE_URL"),
                model: vars.text("OPENAI_MODEL", "gpt-4"),
                temperature: vars.parse("OPENAI_TEMPERATURE", 0.7)?,
                max_tokens: vars.positive("OPENAI_MAX_TOKENS", 2000)?,
                demo_token_delay: Duration::from_millis(vars.parse("DEMO_TOKEN_DELAY_MS", 40)?),
            },
            conversations: ConversationSettings {
                system_prompt: vars.text("SYSTEM_PROMPT", "You are a helpful assistant."),
                context_max_chars: vars.positive("CONTEXT_MAX_CHARS", 48_000)?,
                upstream_timeout: vars.millis("UPSTREAM_TIMEOUT_MS", 120_000)?,
                heartbeat_interval: vars.millis("HEARTBEAT_INTERVAL_MS", 15_000)?,
                checkpoint_interval: vars.millis("CHECKPOINT_INTERVAL_MS", 1_000)?,
                idle_timeout: vars.millis("CONVERSATION_IDLE_MS", 300_000)?,
                fault_trigger: None,
            },
            body_limit_bytes: vars.positive("BODY_LIMIT_BYTES", 10 * 1024 * 1024)?,
            max_message_chars: vars.positive("MAX_MESSAGE_CHARS", 32_000)?,
            ws_max_frame_bytes: vars.positive("WS_MAX_FRAME_BYTES", 1024 * 1024)?,
            socketio_buffer: vars.positive("SOCKETIO_BUFFER", 1024)?,
            max_joined_conversations: vars.positive("MAX_JOINED_CONVERSATIONS", 100)?,
            subscriber_queue: vars.positive("SUBSCRIBER_QUEUE", 1024)?,
            send_timeout: vars.millis("SEND_TIMEOUT_MS", 30_000)?,
            shutdown_grace: vars.millis("SHUTDOWN_GRACE_MS", 10_000)?,
            database_url: vars.text("DATABASE_URL", "sqlite://data/chat.db"),
            sqlite_durability: vars.parse("SQLITE_SYNCHRONOUS", Durability::Normal)?,
        })
    }
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
        assert_eq!(c.model.temperature, 0.7);
        assert_eq!(c.model.max_tokens, 2000);
        assert!(c.model.api_key.is_none());
        assert_eq!(c.body_limit_bytes, 10 * 1024 * 1024);
        assert_eq!(c.rt_messages_per_minute, 30);
        assert_eq!(c.max_connections_per_ip, 64);
        assert_eq!(c.send_timeout, Duration::from_secs(30));
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
        ])
        .unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.model.api_key.as_deref(), Some("sk-test"));
        assert_eq!(c.rate_limit_max_requests, 0);
        assert!(c.log_json);
        assert_eq!(c.rt_messages_per_minute, 0);
        assert_eq!(c.max_connections_per_ip, 2);
    }
}
