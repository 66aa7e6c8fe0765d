//! Conversations owned by other nodes of a cluster: requests for them go to their owner as calls,
//! other nodes' calls are carried out here, and members of them join this node's relay (see
//! [`crate::cluster::relay`]), which gets their events from the owner.

use std::sync::Arc;

use ractor::{Actor, ActorRef, SpawnErr};
use tokio::sync::oneshot;

use super::conversation::{Answer as Reply, Request, Resume, Snapshot};
use super::events::Subscriber;
use super::registry::ConversationKey;
use super::supervisor::{Activation, Conversations, ROUTE_ATTEMPTS};
use crate::cluster::{
    Answer, Call, CallFailure, Cluster, Home, NodeId, Refusal, Relay, RelayArgs, RelayMsg,
    RelayRunning,
};
use crate::domain::Conversation;
use crate::error::ChatError;

/// How many nodes a call follows when each says another owns the conversation now.
const HOPS: usize = 3;

impl Conversations {
    fn cluster_or_fail(&self) -> Result<&Arc<Cluster>, ChatError> {
        self.ctx
            .cluster
            .as_ref()
            .ok_or_else(|| ChatError::Failed("another node owns it outside a cluster".into()))
    }

    /// Calls the owner of `key`, following it when it has moved on; a refusal is the domain's.
    async fn call(
        &self,
        owner: NodeId,
        key: &ConversationKey,
        call: Call,
    ) -> Result<Answer, ChatError> {
        let cluster = self.cluster_or_fail()?;
        let mut node = owner;
        for _ in 0..HOPS {
            match cluster.call(&node, key, call.clone()).await {
                Ok(answer) => return Ok(answer),
                Err(CallFailure::Elsewhere(next)) if *next != **cluster.node() => node = next,
                // The lease names this node now, without an actor yet: asked again, the request
                // finds the conversation here.
                Err(CallFailure::Elsewhere(_)) => break,
                Err(CallFailure::Unreachable(why)) => return Err(ChatError::Unavailable(why)),
                Err(CallFailure::Chat(error)) => return Err(error),
            }
        }
        Err(ChatError::Unavailable(format!(
            "conversation {} is moving between nodes",
            key.id
        )))
    }

    /// Carries out on `owner` a request for `key`, answering it there.
    pub(super) async fn forward(&self, owner: NodeId, key: &ConversationKey, request: Request) {
        match request {
            Request::Snapshot(answer) => {
                let _ = answer.send(self.snapshot_from(owner, key).await.map(Snapshot::new));
            }
            Request::Join {
                subscriber,
                resume,
                answer,
            } => {
                let _ = answer.send(self.join_relay(key, subscriber, resume).await);
            }
            Request::Leave {
                subscriber_id,
                answer,
            } => {
                self.leave_relay(key, subscriber_id);
                let _ = answer.send(Ok(()));
            }
            Request::StreamChat {
                content,
                sender,
                answer,
            } => {
                let started = self
                    .start_remotely(owner, key, sender, Call::StreamChat { content })
                    .await;
                let _ = answer.send(started);
            }
            Request::Regenerate { sender, answer } => {
                let started = self
                    .start_remotely(owner, key, sender, Call::Regenerate)
                    .await;
                let _ = answer.send(started);
            }
            Request::Chat {
                content,
                create,
                answer,
            } => {
                let call = Call::Chat { content, create };
                let completed = self.call(owner, key, call).await.and_then(|a| match a {
                    Answer::Completed(completed) => Ok(*completed),
                    other => Err(unexpected(&other)),
                });
                let _ = answer.send(completed);
            }
            Request::Stop(answer) => {
                let _ = answer.send(self.call(owner, key, Call::Stop).await.map(drop));
            }
            Request::Rename { title, answer } => {
                let renamed = self.call(owner, key, Call::Rename { title }).await;
                let _ = answer.send(renamed.and_then(conversation));
            }
            Request::Delete(answer) => {
                let _ = answer.send(self.call(owner, key, Call::Delete).await.map(drop));
            }
            Request::Interrupt(answer) => refuse(answer),
            Request::Relay { answer, .. } => refuse(answer),
            Request::Unrelay { answer, .. } => refuse(answer),
            Request::Since { answer, .. } => refuse(answer),
        }
    }

    /// The conversation as its owner `owner` has it now.
    pub(super) async fn snapshot_from(
        &self,
        owner: NodeId,
        key: &ConversationKey,
    ) -> Result<Conversation, ChatError> {
        self.call(owner, key, Call::Snapshot)
            .await
            .and_then(conversation)
    }

    /// The node that owns `key`, when that is another one: known only in a cluster, and not
    /// while Redis is away.
    pub(super) async fn owner_elsewhere(&self, key: &ConversationKey) -> Option<NodeId> {
        self.ctx.cluster.as_ref()?.holder(key).await
    }

    /// Starts a reply on the owner; `sender` becomes a member here, through the relay, from
    /// the reply's first event on, if and only if it starts.
    async fn start_remotely(
        &self,
        owner: NodeId,
        key: &ConversationKey,
        sender: Option<Subscriber>,
        call: Call,
    ) -> Result<super::StreamStarted, ChatError> {
        let Some(sender) = sender else {
            return self.call(owner, key, call).await.and_then(started);
        };
        // The relay listens first, so that the sender misses none of the reply, and waits for
        // its word on the sender, whatever the owner answers.
        let (relay, owner) = self.ready_relay(key).await?;
        let due = SenderDue { relay, told: false };
        let started = self.call(owner, key, call).await.and_then(started);
        let Some((epoch, from)) = started.as_ref().ok().and_then(|s| s.published) else {
            return started;
        };
        let relay = due.take();
        let member = RelayMsg::Sender {
            subscriber: sender,
            epoch,
            from,
        };
        if relay.send_message(member).is_err() {
            return Err(ChatError::Unavailable("the relay stopped".into()));
        }
        started
    }

    /// This node's relay of `key`, started when there is none.
    async fn relay(&self, key: &ConversationKey) -> Result<ActorRef<RelayMsg>, ChatError> {
        let cluster = self.cluster_or_fail()?;
        for _ in 0..ROUTE_ATTEMPTS {
            if let Some(relay) = cluster.relay(key) {
                return Ok(relay);
            }
            let args = RelayArgs {
                key: key.clone(),
                cluster: cluster.clone(),
                conversations: self.clone(),
            };
            match Actor::spawn(None, Relay, args).await {
                Ok((relay, _)) => return Ok(relay),
                Err(SpawnErr::StartupFailed(error)) if error.is::<RelayRunning>() => continue,
                Err(SpawnErr::StartupFailed(error)) => match error.downcast::<ChatError>() {
                    Ok(error) => return Err(*error),
                    Err(error) => return Err(ChatError::Failed(error.to_string())),
                },
                Err(error) => return Err(ChatError::Failed(error.to_string())),
            }
        }
        Err(ChatError::Failed(format!(
            "relay of {} kept stopping",
            key.id
        )))
    }

    /// Asks this node's relay of `key` something, answered on the returned receiver; tries
    /// again when the relay stopped before answering.
    async fn ask_relay<T>(
        &self,
        key: &ConversationKey,
        ask: impl Fn(oneshot::Sender<Result<T, ChatError>>) -> RelayMsg,
    ) -> Result<(ActorRef<RelayMsg>, T), ChatError> {
        for _ in 0..ROUTE_ATTEMPTS {
            let relay = self.relay(key).await?;
            let (answer, answered) = oneshot::channel();
            if relay.send_message(ask(answer)).is_err() {
                continue;
            }
            if let Ok(result) = answered.await {
                return result.map(|value| (relay, value));
            }
        }
        Err(ChatError::Unavailable(format!(
            "the relay of {} kept stopping",
            key.id
        )))
    }

    /// Makes `subscriber` a member of `key` through this node's relay.
    async fn join_relay(
        &self,
        key: &ConversationKey,
        subscriber: Subscriber,
        resume: Option<Resume>,
    ) -> Result<(), ChatError> {
        let join = |answer| RelayMsg::Join {
            subscriber: subscriber.clone(),
            resume: resume.clone(),
            answer,
        };
        self.ask_relay(key, join).await.map(drop)
    }

    /// This node's relay of `key` once it relays, and the conversation's owner.
    async fn ready_relay(
        &self,
        key: &ConversationKey,
    ) -> Result<(ActorRef<RelayMsg>, NodeId), ChatError> {
        self.ask_relay(key, RelayMsg::Ready).await
    }

    /// Ends `subscriber_id`'s membership through this node's relay of `key`, if any.
    pub(super) fn leave_relay(&self, key: &ConversationKey, subscriber_id: u64) {
        if let Some(relay) = self.ctx.cluster.as_ref().and_then(|c| c.relay(key)) {
            let _ = relay.send_message(RelayMsg::Leave(subscriber_id));
        }
    }

    /// Where `key` lives now, for its relay here, whose members saw up to `resume` and `seen`
    /// of that reply's text: here, or on another node (which answered the relay's first call).
    pub async fn home(
        &self,
        key: &ConversationKey,
        resume: Option<Resume>,
        seen: Option<String>,
    ) -> Result<Home, ChatError> {
        let here = self
            .request_here(key, Activation::OrNew, |answer| Request::Relay {
                node: None,
                resume: resume.clone(),
                seen: seen.clone(),
                answer,
            })
            .await;
        let owner: NodeId = match here {
            Ok(relayed) => return Ok(Home::Here(relayed)),
            Err(Refusal::Elsewhere(owner)) => owner.into(),
            Err(Refusal::Chat(ChatError::NotFound)) => return Ok(Home::Gone),
            Err(Refusal::Chat(error)) => return Err(error),
        };
        match self
            .call(owner.clone(), key, Call::Relay { resume, seen })
            .await
        {
            Ok(Answer::Relayed(relayed)) => Ok(Home::Remote {
                owner,
                relayed: *relayed,
            }),
            Ok(other) => Err(unexpected(&other)),
            Err(ChatError::NotFound) => Ok(Home::Gone),
            Err(error) => Err(error),
        }
    }

    /// Carries out another node's call for a conversation this node owns (activating it here as
    /// `activation` allows); refused with the owner when another node owns it.
    pub async fn serve(
        &self,
        from: NodeId,
        key: &ConversationKey,
        activation: Activation,
        call: Call,
    ) -> Result<Answer, Refusal> {
        let leaving = self.ctx.cluster.as_ref().is_some_and(|c| c.is_leaving());
        if leaving {
            return Err(Refusal::Chat(ChatError::Unavailable(
                "the node is stopping".into(),
            )));
        }
        match call {
            // Only for an actor running here: a relay that asks otherwise looks for the owner.
            Call::Since { epoch, after } => {
                let since = |answer| Request::Since {
                    epoch,
                    after,
                    answer,
                };
                Ok(Answer::Events(
                    self.running_here(key, since).await.flatten(),
                ))
            }
            Call::Unrelay => {
                let unrelay = |answer| Request::Unrelay { node: from, answer };
                self.running_here(key, unrelay).await;
                Ok(Answer::Done)
            }
            Call::Snapshot => self
                .request_here(key, activation, Request::Snapshot)
                .await
                .map(|c| Answer::Conversation(Box::new(c.into_conversation()))),
            Call::Relay { resume, seen } => self
                .request_here(key, activation, |answer| Request::Relay {
                    node: Some(from),
                    resume,
                    seen,
                    answer,
                })
                .await
                .map(|relayed| Answer::Relayed(Box::new(relayed))),
            Call::StreamChat { content } => self
                .request_here(key, activation, |answer| Request::StreamChat {
                    content,
                    sender: None,
                    answer,
                })
                .await
                .map(Answer::Started),
            Call::Regenerate => self
                .request_here(key, activation, |answer| Request::Regenerate {
                    sender: None,
                    answer,
                })
                .await
                .map(Answer::Started),
            Call::Chat { content, create } => self
                .request_here(key, activation, |answer| Request::Chat {
                    content,
                    create,
                    answer,
                })
                .await
                .map(|c| Answer::Completed(Box::new(c))),
            Call::Stop => self
                .request_here(key, activation, Request::Stop)
                .await
                .map(|()| Answer::Done),
            Call::Rename { title } => self
                .request_here(key, activation, |answer| Request::Rename { title, answer })
                .await
                .map(|c| Answer::Conversation(Box::new(c))),
            Call::Delete => self
                .request_here(key, activation, Request::Delete)
                .await
                .map(|()| Answer::Done),
        }
    }

    /// A request to the actor of `key` on this node; refused with the owner when another node
    /// owns the conversation.
    async fn request_here<T>(
        &self,
        key: &ConversationKey,
        activation: Activation,
        build: impl FnOnce(Reply<T>) -> Request,
    ) -> Result<T, Refusal> {
        let (answer, receiver) = oneshot::channel();
        match self.deliver(key, activation, build(answer)).await {
            Ok(Ok(())) => {}
            Ok(Err((_, owner))) => return Err(Refusal::Elsewhere(owner.to_string())),
            Err(error) => return Err(Refusal::Chat(error)),
        }
        receiver
            .await
            .unwrap_or_else(|_| Err(ChatError::Failed(format!("conversation {} failed", key.id))))
            .map_err(Refusal::Chat)
    }

    /// A request to the actor of `key` if it runs on this node; `None` when it does not.
    async fn running_here<T>(
        &self,
        key: &ConversationKey,
        build: impl FnOnce(Reply<T>) -> Request,
    ) -> Option<T> {
        let (answer, receiver) = oneshot::channel();
        self.ctx.registry.send(key, build(answer)).ok()?;
        receiver.await.ok()?.ok()
    }
}

/// The conversation an answer carries.
fn conversation(answer: Answer) -> Result<Conversation, ChatError> {
    match answer {
        Answer::Conversation(conversation) => Ok(*conversation),
        other => Err(unexpected(&other)),
    }
}

/// The started reply an answer carries.
fn started(answer: Answer) -> Result<super::StreamStarted, ChatError> {
    match answer {
        Answer::Started(started) => Ok(started),
        other => Err(unexpected(&other)),
    }
}

fn unexpected(answer: &Answer) -> ChatError {
    ChatError::Failed(format!("unexpected answer from the owner: {answer:?}"))
}

/// A request that only this node's own actors are asked.
fn refuse<T>(answer: Reply<T>) {
    let _ = answer.send(Err(ChatError::Failed(
        "a request for this node's actors alone".into(),
    )));
}

/// A relay that answered `Ready` and waits for word of a sender: told `NoSender` when dropped
/// before [`SenderDue::take`], however the request ended (cancelled too).
struct SenderDue {
    relay: ActorRef<RelayMsg>,
    told: bool,
}

impl SenderDue {
    /// The relay, to be sent the sender itself.
    fn take(mut self) -> ActorRef<RelayMsg> {
        self.told = true;
        self.relay.clone()
    }
}

impl Drop for SenderDue {
    fn drop(&mut self) {
        if !self.told {
            let _ = self.relay.send_message(RelayMsg::NoSender);
        }
    }
}
