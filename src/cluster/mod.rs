//! Cluster mode (`REDIS_URL`): several nodes share the database and one Redis, a client may talk
//! to any of them, and each conversation's actor runs on exactly one node at a time.
//!
//! - [`nodes`]: every node's heartbeat, and which nodes are alive;
//! - [`leases`]: which node owns a conversation; a lease is taken over only from a node that is
//!   no longer alive, and the new owner's claim in the store fences out a node that lost a lease
//!   without knowing it yet (paused, cut off), so it can never overwrite its successor's work;
//! - [`bus`]: the Redis connections, for commands and for the subscriptions that carry calls
//!   between nodes and each conversation's events;
//! - [`calls`]: a request for a conversation another node owns, carried out there and answered;
//! - [`publication`]: an owner publishes each event of a conversation once, numbered, for every
//!   node that relays it;
//! - [`relay`]: on a node with members of a conversation owned elsewhere, the actor that hands
//!   them its events in order and finds the conversation a new owner when its owner dies;
//! - [`rates`]: rate limits counted in Redis, so that they hold across the cluster.
//!
//! Without Redis none of this runs: the registry and the members alone route and fan out, and
//! the actors do not know the difference.

mod bus;
mod calls;
mod leases;
mod nodes;
mod publication;
pub mod rates;
mod relay;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ractor::ActorRef;
use tokio::sync::mpsc;

use crate::actors::{Activation, ConversationKey, Conversations};
use crate::config::ClusterConfig;
use crate::domain::UserId;
use crate::error::ChatError;
use crate::metrics::Metrics;
use bus::{Bus, Heard, Keys};
use calls::{Body, Envelope, Waiting};
use leases::{Holder, Leases};
use nodes::Nodes;
use relay::Relays;

pub use calls::{Answer, Call, CallFailure, Refusal, Relayed};
pub use publication::Publication;
pub use relay::{Home, Relay, RelayArgs, RelayMsg, RelayRunning};

/// A node's name in its cluster: unique to one run of one process.
pub type NodeId = Arc<str>;

/// Why a node could not join its cluster.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach Redis: {0}")]
pub struct JoinError(String);

/// This node's part in the cluster.
pub struct Cluster {
    node: NodeId,
    name: String,
    lease: Duration,
    /// The longest a model may take for a whole reply, which a forwarded one waits for.
    upstream: Duration,
    keys: Keys,
    bus: Bus,
    nodes: Nodes,
    leases: Leases,
    waiting: Waiting,
    relays: Relays,
    metrics: Arc<Metrics>,
    /// Set once the node stops taking conversations, at shutdown.
    leaving: AtomicBool,
}

impl Cluster {
    /// Joins the cluster `config` names: connects to Redis and beats once, so that this node is
    /// alive to the others before it takes any conversation. Heard messages are handled once
    /// [`Cluster::run`] is given the conversations.
    pub async fn join(
        config: &ClusterConfig,
        upstream: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Cluster>, Hearing), JoinError> {
        // The URL is never shown: it may hold a password.
        let (bus, heard) = Bus::connect(&config.redis_url)
            .await
            .map_err(|e| JoinError(e.to_string()))?;
        let node: NodeId = uuid::Uuid::new_v4().simple().to_string()[..12].into();
        let keys = Keys::new(&config.name);
        let lease_ms = config.lease.as_millis().max(1) as u64;
        let cluster = Arc::new(Cluster {
            nodes: Nodes::new(node.clone(), keys.nodes(), lease_ms),
            leases: Leases::new(node.clone(), keys.nodes(), lease_ms),
            node,
            name: config.name.clone(),
            lease: config.lease,
            upstream,
            keys,
            bus,
            waiting: Waiting::default(),
            relays: Relays::default(),
            metrics,
            leaving: AtomicBool::new(false),
        });
        cluster
            .nodes
            .beat(&mut cluster.bus.commands())
            .await
            .map_err(JoinError)?;
        cluster
            .bus
            .subscribe(&cluster.keys.inbox(&cluster.node))
            .await
            .map_err(JoinError)?;
        tracing::info!(node = %cluster.node, cluster = %cluster.name, "joined the cluster");
        Ok((cluster, Hearing(heard)))
    }

    /// Handles what the node hears and keeps it alive, for as long as it runs.
    pub fn run(self: &Arc<Self>, conversations: Conversations, hearing: Hearing) {
        tokio::spawn(self.clone().listen(conversations.clone(), hearing.0));
        tokio::spawn(self.clone().keep_alive(conversations));
    }

    /// This node's name.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The cluster's name (`CLUSTER_NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How long a lease lasts unless renewed.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The nodes alive at the last heartbeat.
    pub fn live_nodes(&self) -> Arc<BTreeSet<NodeId>> {
        self.nodes.live()
    }

    /// How many conversations this node relays for their owners elsewhere.
    pub fn relayed(&self) -> usize {
        self.relays.len()
    }

    /// Whether the node stops taking conversations.
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::SeqCst)
    }

    /// The owner of `key` when another node holds its lease; `None` when this node holds it
    /// (having just taken it, if nobody alive did).
    pub async fn acquire(&self, key: &ConversationKey) -> Result<Option<NodeId>, ChatError> {
        if self.is_leaving() {
            return Err(ChatError::Unavailable("the node is stopping".into()));
        }
        let holders = self
            .leases
            .acquire(&mut self.bus.commands(), &[self.keys.lease(key)])
            .await
            .map_err(ChatError::Unavailable)?;
        match holders.into_iter().next() {
            Some(Holder::Other(node)) => Ok(Some(node)),
            Some(Holder::Me) => {
                self.metrics.lease_taken();
                Ok(None)
            }
            None => Err(ChatError::Unavailable("no lease answer".into())),
        }
    }

    /// The live node other than this one that holds the lease of `key`, if any; `None` too
    /// when Redis cannot tell.
    pub async fn holder(&self, key: &ConversationKey) -> Option<NodeId> {
        let mut redis = self.bus.commands();
        let mut get = redis::cmd("GET");
        get.arg(self.keys.lease(key));
        let holder = bus::bounded(get.query_async::<Option<String>>(&mut redis))
            .await
            .ok()??;
        (holder != *self.node && self.nodes.is_live(&holder)).then(|| holder.into())
    }

    /// The rate limits' counts, shared by the cluster's nodes.
    pub fn rates(&self) -> rates::SharedRates {
        rates::SharedRates::new(self.bus.commands(), self.keys.rates())
    }

    /// The publication of the conversation `key` by its owner here, in `epoch`.
    pub fn publication(self: &Arc<Self>, key: &ConversationKey, epoch: u64) -> Publication {
        Publication::new(self.clone(), self.keys.events(key), epoch)
    }

    /// This node's relay of `key`, if it runs.
    pub fn relay(&self, key: &ConversationKey) -> Option<ActorRef<RelayMsg>> {
        self.relays.get(&self.keys.events(key))
    }

    /// Sends `call` for `key` to `owner` and waits for its answer, or for `owner` to die.
    pub async fn call(
        &self,
        owner: &NodeId,
        key: &ConversationKey,
        call: Call,
    ) -> Result<Answer, CallFailure> {
        let activation = match call {
            Call::Relay { .. } | Call::StreamChat { .. } => Activation::OrNew,
            _ => Activation::Existing,
        };
        let patience = calls::patience(&call, self.upstream);
        let mut pending = self.waiting.start();
        let envelope = Envelope {
            from: self.node.to_string(),
            id: pending.id,
            body: Body::Call {
                owner: key.owner.as_str().to_owned(),
                conversation: key.id.to_string(),
                activation,
                call,
            },
        };
        let payload = serde_json::to_string(&envelope)
            .map_err(|e| CallFailure::Unreachable(e.to_string()))?;
        self.metrics.call_forwarded();
        let receivers = self
            .bus
            .publish_now(&self.keys.inbox(owner), &payload)
            .await
            .map_err(CallFailure::Unreachable)?;
        if receivers == 0 {
            return Err(CallFailure::Unreachable(format!(
                "node {owner} is not listening"
            )));
        }
        let deadline = tokio::time::Instant::now() + patience;
        let check = (self.lease / 2).max(Duration::from_millis(50));
        loop {
            tokio::select! {
                answer = &mut pending.answer => {
                    let answer = answer.map_err(|_| CallFailure::Unreachable("no answer".into()))?;
                    return answer.map_err(CallFailure::from);
                }
                () = tokio::time::sleep(check) => {
                    if !self.nodes.is_live(owner) {
                        return Err(CallFailure::Unreachable(format!("node {owner} died")));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(CallFailure::Unreachable(format!("node {owner} did not answer in time")));
                    }
                }
            }
        }
    }

    /// Stops taking conversations and leaves the cluster, so that the other nodes may take this
    /// node's conversations at once.
    pub async fn leave(&self) {
        self.leaving.store(true, Ordering::SeqCst);
        if let Err(e) = self.nodes.leave(&mut self.bus.commands()).await {
            tracing::warn!(error = %e, "could not leave the cluster; the other nodes wait for this node's leases to lapse");
        }
    }

    /// Handles every message the node hears: calls and answers on its inbox, events for its
    /// relays, and the subscriptions dropping and coming back.
    async fn listen(
        self: Arc<Self>,
        conversations: Conversations,
        mut heard: mpsc::UnboundedReceiver<Heard>,
    ) {
        let inbox = self.keys.inbox(&self.node);
        while let Some(heard) = heard.recv().await {
            match heard {
                Heard::Message { channel, payload } if channel == inbox => {
                    self.clone().answer(&conversations, &payload);
                }
                Heard::Message { channel, payload } => {
                    if let Some(relay) = self.relays.get(&channel) {
                        let _ = relay.send_message(RelayMsg::Heard(payload));
                    }
                }
                Heard::Disconnected => {
                    tracing::warn!("lost the subscriptions to Redis; reconnecting");
                }
                Heard::Resubscribed => {
                    tracing::info!("subscriptions to Redis are back");
                    self.relays.tell_all(|| RelayMsg::Reconnected);
                }
            }
        }
    }

    /// Handles a message of the node's inbox: an answer to one of its calls, or another node's
    /// call, carried out in a task of its own.
    fn answer(self: Arc<Self>, conversations: &Conversations, payload: &str) {
        let envelope: Envelope = match serde_json::from_str(payload) {
            Ok(envelope) => envelope,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable message in the node's inbox");
                return;
            }
        };
        let Envelope { from, id, body } = envelope;
        let (owner, conversation, activation, call) = match body {
            Body::Answer(answer) => return self.waiting.answered(id, answer),
            Body::Call {
                owner,
                conversation,
                activation,
                call,
            } => (owner, conversation, activation, call),
        };
        let conversations = conversations.clone();
        tokio::spawn(async move {
            let key = ConversationKey::new(&UserId::new(owner), &conversation);
            let from: NodeId = from.into();
            let answer = conversations
                .serve(from.clone(), &key, activation, call)
                .await;
            let envelope = Envelope {
                from: self.node.to_string(),
                id,
                body: Body::Answer(answer),
            };
            match serde_json::to_string(&envelope) {
                Ok(payload) => {
                    if let Err(e) = self
                        .bus
                        .publish_now(&self.keys.inbox(&from), &payload)
                        .await
                    {
                        tracing::warn!(error = %e, node = %from, "could not answer a call");
                    }
                }
                Err(e) => tracing::error!(error = %e, "could not encode an answer"),
            }
        });
    }

    /// Beats every third of a lease, learns which nodes died (their conversations' relays look
    /// for new owners), and renews the leases of the conversations running here, stopping
    /// those another node took.
    async fn keep_alive(self: Arc<Self>, conversations: Conversations) {
        let mut ticks = tokio::time::interval(self.lease / 3);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut redis = self.bus.commands();
        loop {
            ticks.tick().await;
            if self.is_leaving() {
                return;
            }
            if let Err(e) = self.bus.check_listener().await {
                tracing::debug!(error = %e, "the subscriptions are not back yet");
            }
            let beat = self.nodes.beat(&mut redis).await;
            let renewed = match beat {
                Ok(beat) => {
                    if beat.lapsed {
                        tracing::warn!(
                            "this node was out of the cluster for longer than a lease; keeping only the conversations nobody took"
                        );
                        self.relays.tell_all(|| RelayMsg::Reconnected);
                    }
                    for node in beat.gone {
                        tracing::info!(%node, "a node left the cluster");
                        self.relays.tell_all(|| RelayMsg::NodeGone(node.clone()));
                    }
                    self.renew(&conversations, &mut redis).await
                }
                Err(e) => Err(e),
            };
            match renewed {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("Redis answers again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot reach Redis; requests that need another node fail until it is back");
                }
                Err(_) => {}
            }
        }
    }

    /// Renews the leases of the conversations running here; stops those another node holds.
    async fn renew(
        &self,
        conversations: &Conversations,
        redis: &mut redis::aio::ConnectionManager,
    ) -> Result<(), String> {
        let running = conversations.running();
        if running.is_empty() {
            return Ok(());
        }
        let leases: Vec<String> = running.iter().map(|key| self.keys.lease(key)).collect();
        let holders = self.leases.acquire(redis, &leases).await?;
        for (key, holder) in running.iter().zip(holders) {
            if let Holder::Other(node) = holder {
                tracing::warn!(conversation = %key.id, %node, "another node took a conversation's lease");
                self.metrics.lease_lost();
                conversations.lease_lost(key);
            }
        }
        Ok(())
    }
}

/// What a node hears from Redis until [`Cluster::run`] handles it.
pub struct Hearing(mpsc::UnboundedReceiver<Heard>);
