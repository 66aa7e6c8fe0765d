//! The node's Redis connections: one for commands and publishing, and one that carries its
//! subscriptions (the node's inbox of calls, and the events of the conversations it relays).
//! Both reconnect by themselves; the subscriptions come back after a reconnection, and the node
//! hears of it, so that its relays can fetch what they missed meanwhile.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind, RedisError, Value};
use tokio::sync::mpsc;

use crate::actors::ConversationKey;

/// The longest one Redis operation may take before it counts as failed: a node must not hang on
/// a Redis that has gone away, it answers 503 instead.
pub(super) const OPERATION_TIMEOUT: Duration = Duration::from_secs(2);
/// Events published together at most, in one round trip.
const MAX_BATCH: usize = 512;

/// The names of a cluster's keys and channels, all under `CLUSTER_NAME`, so that several
/// clusters (or test runs) can share one Redis without hearing each other.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(cluster: &str) -> Self {
        Keys {
            prefix: format!("{cluster}:"),
        }
    }

    /// The sorted set of nodes by the time of their last heartbeat.
    pub(super) fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    /// The channel of calls and answers for `node`.
    pub(super) fn inbox(&self, node: &str) -> String {
        format!("{}inbox:{node}", self.prefix)
    }

    /// The prefix of the rate limits' keys.
    pub(super) fn rates(&self) -> String {
        format!("{}rate:", self.prefix)
    }

    /// The lease of a conversation, naming the node that owns it.
    pub(super) fn lease(&self, key: &ConversationKey) -> String {
        format!("{}lease:{}", self.prefix, conversation(key))
    }

    /// The channel of a conversation's events.
    pub(super) fn events(&self, key: &ConversationKey) -> String {
        format!("{}events:{}", self.prefix, conversation(key))
    }
}

/// A conversation's part of a key: its id's length first, so that no id and owner (which may
/// hold any character) can spell another conversation's key.
fn conversation(key: &ConversationKey) -> String {
    format!("{}:{}:{}", key.id.len(), key.id, key.owner.as_str())
}

/// What the subscriptions bring.
#[derive(Debug)]
pub(super) enum Heard {
    /// A message on one of the node's channels.
    Message { channel: String, payload: String },
    /// The subscription connection dropped; messages sent meanwhile are lost.
    Disconnected,
    /// It is back, with every subscription.
    Resubscribed,
}

/// The node's connections to Redis.
pub(super) struct Bus {
    commands: ConnectionManager,
    listener: ConnectionManager,
    outgoing: mpsc::UnboundedSender<(Arc<str>, String)>,
}

impl Bus {
    /// Connects to the Redis at `url`; the heard messages come out of the receiver.
    pub(super) async fn connect(
        url: &str,
    ) -> Result<(Bus, mpsc::UnboundedReceiver<Heard>), RedisError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OPERATION_TIMEOUT))
            .set_response_timeout(Some(OPERATION_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let info = url.into_connection_info()?;
        let commands = redis::Client::open(info.clone())?;
        let commands = ConnectionManager::new_with_config(commands, config.clone()).await?;
        // RESP3 lets the library restore the subscriptions after a reconnection by itself.
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let listener = redis::Client::open(info.set_redis_settings(resp3))?;
        let (pushes, heard) = mpsc::unbounded_channel();
        let listener = ConnectionManager::new_with_config(
            listener,
            config
                .set_push_sender(Pushes::new(pushes))
                .set_automatic_resubscription(),
        )
        .await?;
        let (outgoing, queue) = mpsc::unbounded_channel();
        tokio::spawn(publish_batches(commands.clone(), queue));
        Ok((
            Bus {
                commands,
                listener,
                outgoing,
            },
            heard,
        ))
    }

    /// A connection for commands.
    pub(super) fn commands(&self) -> ConnectionManager {
        self.commands.clone()
    }

    /// Publishes `payload` on `channel` after everything published before it, without waiting;
    /// lost if Redis is away (the listeners notice the gap).
    pub(super) fn publish(&self, channel: Arc<str>, payload: String) {
        let _ = self.outgoing.send((channel, payload));
    }

    /// Publishes `payload` on `channel` now; the number of subscribers that received it.
    pub(super) async fn publish_now(&self, channel: &str, payload: &str) -> Result<u64, String> {
        let mut connection = self.commands.clone();
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(channel).arg(payload);
        bounded(publish.query_async(&mut connection)).await
    }

    /// Subscribes to `channel`; kept across reconnections until unsubscribed.
    pub(super) async fn subscribe(&self, channel: &str) -> Result<(), String> {
        let mut listener = self.listener.clone();
        bounded(async move { listener.subscribe(channel).await }).await
    }

    /// Makes sure the subscription connection is up: a connection the library lost while Redis
    /// was away comes back only when something is sent on it.
    pub(super) async fn check_listener(&self) -> Result<(), String> {
        let mut listener = self.listener.clone();
        bounded(redis::cmd("PING").query_async::<()>(&mut listener)).await
    }

    /// Stops listening to `channel`.
    pub(super) async fn unsubscribe(&self, channel: &str) -> Result<(), String> {
        let mut listener = self.listener.clone();
        bounded(async move { listener.unsubscribe(channel).await }).await
    }
}

/// Runs a Redis operation for at most [`OPERATION_TIMEOUT`]; a failure is described for logs.
pub(super) async fn bounded<T>(
    operation: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, String> {
    match tokio::time::timeout(OPERATION_TIMEOUT, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("Redis did not answer in time".into()),
    }
}

/// Sends what is queued for publishing in batches, one round trip each, in order.
async fn publish_batches(
    mut connection: ConnectionManager,
    mut queue: mpsc::UnboundedReceiver<(Arc<str>, String)>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut failing = false;
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut pipe = redis::pipe();
        for (channel, payload) in batch.drain(..) {
            pipe.cmd("PUBLISH").arg(&*channel).arg(payload).ignore();
        }
        match bounded(pipe.query_async::<()>(&mut connection)).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("publishing events to Redis again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot publish events to Redis; other nodes will fetch them");
            }
            Err(_) => {}
        }
    }
}

/// Turns the listener's pushes into what the node hears.
struct Pushes {
    heard: mpsc::UnboundedSender<Heard>,
    disconnected: std::sync::atomic::AtomicBool,
}

impl Pushes {
    fn new(heard: mpsc::UnboundedSender<Heard>) -> Self {
        Pushes {
            heard,
            disconnected: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn hear(&self, push: PushInfo) -> Option<Heard> {
        use std::sync::atomic::Ordering;
        match push.kind {
            PushKind::Message => {
                let mut data = push.data.into_iter();
                let channel = text(data.next()?)?;
                let payload = text(data.next()?)?;
                Some(Heard::Message { channel, payload })
            }
            PushKind::Disconnection => {
                self.disconnected.store(true, Ordering::SeqCst);
                Some(Heard::Disconnected)
            }
            PushKind::Subscribe if self.disconnected.swap(false, Ordering::SeqCst) => {
                Some(Heard::Resubscribed)
            }
            _ => None,
        }
    }
}

impl redis::aio::AsyncPushSender for Pushes {
    fn send(&self, push: PushInfo) -> Result<(), redis::aio::SendError> {
        if let Some(heard) = self.hear(push) {
            self.heard.send(heard).map_err(|_| redis::aio::SendError)?;
        }
        Ok(())
    }
}

/// A push's text, if it is text.
fn text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        _ => None,
    }
}
