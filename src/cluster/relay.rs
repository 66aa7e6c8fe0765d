//! On a node with members of a conversation that another node owns, one relay actor stands for
//! the conversation. Members join it; it takes the events the owner publishes, in order, fetches
//! from the owner what it missed, and hands them to its members encoded once. It keeps its own
//! view of the reply in progress, so a member joining late gets what it missed without asking
//! the owner. When the owner stops or dies, the relay finds the conversation a new owner (which
//! may be this node) and its members get the end of the reply the old owner left unfinished.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;

use super::calls::{Answer, Call, CallFailure, Relayed};
use super::publication::Published;
use super::{Cluster, NodeId};
use crate::actors::events::{EncodedEvent, Subscriber};
use crate::actors::members::Members;
use crate::actors::progress::Progress;
use crate::actors::{ConversationKey, Conversations, Resume};
use crate::error::ChatError;

/// A join waiting for the relay to relay: the member, where it stood, and who waits for it.
type WaitingJoin = (
    Subscriber,
    Option<Resume>,
    oneshot::Sender<Result<(), ChatError>>,
);

/// Events kept after delivery, for a member whose own request started a reply that the relay
/// delivered before it heard the answer.
const RECENT_EVENTS: usize = 64;
/// How long a relay waits before it looks for its conversation's owner again.
const HOMING_RETRY: Duration = Duration::from_millis(250);

/// Where a relayed conversation lives now.
pub enum Home {
    /// Another node owns it; the relay starts from what it answered.
    Remote { owner: NodeId, relayed: Relayed },
    /// This node owns it: the members get what they missed, then go to its actor.
    Here(Relayed),
    /// It does not exist any more.
    Gone,
}

/// What a relay is told.
pub enum RelayMsg {
    /// Make `subscriber` a member, after what it missed since `resume`.
    Join {
        subscriber: Subscriber,
        resume: Option<Resume>,
        answer: oneshot::Sender<Result<(), ChatError>>,
    },
    /// Answer with the owner once relaying, so that a request can go to it.
    Ready(oneshot::Sender<Result<NodeId, ChatError>>),
    /// Make `subscriber` a member from event `from` of `epoch` on: its own request started a
    /// reply there.
    Sender {
        subscriber: Subscriber,
        epoch: u64,
        from: u64,
    },
    /// A request that was answered `Ready` started no reply: no sender comes of it.
    NoSender,
    /// The connection `id` leaves.
    Leave(u64),
    /// A message of the conversation's channel.
    Heard(String),
    /// Where the conversation lives, as looked for.
    Homed(Result<Home, ChatError>),
    /// The events asked of the owner after a gap, as published; `None` when it does not have
    /// them all any more.
    Fetched(Result<Option<Vec<String>>, CallFailure>),
    /// Node `node` died: if it owned the conversation, find another owner.
    NodeGone(NodeId),
    /// The subscriptions came back after Redis was away: fetch what was missed.
    Reconnected,
}

/// The running relays of this node, by their conversation's channel.
#[derive(Default)]
pub(super) struct Relays {
    by_channel: RwLock<HashMap<String, ActorRef<RelayMsg>>>,
}

impl Relays {
    /// The relay of the conversation whose channel is `channel`.
    pub(super) fn get(&self, channel: &str) -> Option<ActorRef<RelayMsg>> {
        self.by_channel
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(channel)
            .cloned()
    }

    fn register(&self, channel: String, relay: ActorRef<RelayMsg>) -> bool {
        let mut relays = self.by_channel.write().unwrap_or_else(|e| e.into_inner());
        if relays.contains_key(&channel) {
            return false;
        }
        relays.insert(channel, relay);
        true
    }

    fn remove(&self, channel: &str, relay: &ActorRef<RelayMsg>) {
        let mut relays = self.by_channel.write().unwrap_or_else(|e| e.into_inner());
        if relays
            .get(channel)
            .is_some_and(|r| r.get_id() == relay.get_id())
        {
            relays.remove(channel);
        }
    }

    /// Tells every relay.
    pub(super) fn tell_all(&self, message: impl Fn() -> RelayMsg) {
        let relays: Vec<_> = self
            .by_channel
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for relay in relays {
            let _ = relay.send_message(message());
        }
    }

    /// How many conversations this node relays.
    pub(super) fn len(&self) -> usize {
        self.by_channel
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// Why a relay did not start: another one already runs for its conversation.
#[derive(Debug, thiserror::Error)]
#[error("the conversation already has a relay")]
pub struct RelayRunning;

/// The relay actor.
pub struct Relay;

/// Starts a relay.
pub struct RelayArgs {
    pub key: ConversationKey,
    pub cluster: Arc<Cluster>,
    pub conversations: Conversations,
}

/// Where a relay is in following its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Looking for the owner, or waiting for its first answer.
    Homing,
    /// Delivering events as they come.
    Live,
    /// Waiting for the events missed in a gap.
    Fetching,
}

/// A relay's data.
pub struct RelayState {
    key: ConversationKey,
    channel: String,
    cluster: Arc<Cluster>,
    conversations: Conversations,
    members: Members,
    phase: Phase,
    owner: Option<NodeId>,
    epoch: u64,
    /// The number of the last event delivered.
    seq: u64,
    /// The streamed reply in progress, as relayed, and its text so far.
    reply: Option<(Progress, String)>,
    /// Joins and requests waiting for the relay to be live.
    joins: Vec<WaitingJoin>,
    readies: Vec<oneshot::Sender<Result<NodeId, ChatError>>>,
    /// Requests answered `Ready` whose `Sender` or `NoSender` has not come yet: the relay stays
    /// for them even without members, or a reply that ends at once would find it stopped.
    senders_due: usize,
    /// Events heard ahead of those delivered, by epoch and number.
    ahead: BTreeMap<(u64, u64), String>,
    /// The last events delivered.
    recent: VecDeque<(u64, Arc<EncodedEvent>)>,
}

impl Actor for Relay {
    type Msg = RelayMsg;
    type State = RelayState;
    type Arguments = RelayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RelayMsg>,
        args: RelayArgs,
    ) -> Result<RelayState, ActorProcessingErr> {
        let RelayArgs {
            key,
            cluster,
            conversations,
        } = args;
        let channel = cluster.keys.events(&key);
        if !cluster.relays.register(channel.clone(), myself.clone()) {
            return Err(Box::new(RelayRunning));
        }
        // Listening before the owner is asked, so that no event falls between its answer and
        // the subscription.
        if let Err(e) = cluster.bus.subscribe(&channel).await {
            cluster.relays.remove(&channel, &myself);
            return Err(Box::new(ChatError::Unavailable(e)));
        }
        let state = RelayState {
            members: Members::new(key.id.clone(), None),
            key,
            channel,
            cluster,
            conversations,
            phase: Phase::Homing,
            owner: None,
            epoch: 0,
            seq: 0,
            reply: None,
            joins: Vec::new(),
            readies: Vec::new(),
            senders_due: 0,
            ahead: BTreeMap::new(),
            recent: VecDeque::new(),
        };
        state.look_for_home(&myself, Duration::ZERO);
        Ok(state)
    }

    async fn post_stop(
        &self,
        myself: ActorRef<RelayMsg>,
        state: &mut RelayState,
    ) -> Result<(), ActorProcessingErr> {
        state.cluster.relays.remove(&state.channel, &myself);
        let cluster = state.cluster.clone();
        let channel = state.channel.clone();
        let key = state.key.clone();
        let owner = state.owner.take();
        tokio::spawn(async move {
            let _ = cluster.bus.unsubscribe(&channel).await;
            if let Some(owner) = owner {
                let call = cluster.call(&owner, &key, Call::Unrelay);
                let _ = call.await;
            }
        });
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<RelayMsg>,
        message: RelayMsg,
        state: &mut RelayState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RelayMsg::Join {
                subscriber,
                resume,
                answer,
            } => {
                if state.phase == Phase::Homing {
                    state.joins.push((subscriber, resume, answer));
                } else {
                    state.join(subscriber, resume.as_ref());
                    let _ = answer.send(Ok(()));
                }
            }
            RelayMsg::Ready(answer) => match (&state.owner, state.phase) {
                (Some(owner), Phase::Live | Phase::Fetching) => {
                    state.senders_due += 1;
                    let _ = answer.send(Ok(owner.clone()));
                }
                _ => state.readies.push(answer),
            },
            RelayMsg::Sender {
                subscriber,
                epoch,
                from,
            } => {
                state.senders_due = state.senders_due.saturating_sub(1);
                state.add_sender(subscriber, epoch, from);
            }
            RelayMsg::NoSender => state.senders_due = state.senders_due.saturating_sub(1),
            RelayMsg::Leave(id) => state.members.remove(id),
            RelayMsg::Heard(payload) => state.heard(&myself, payload),
            RelayMsg::Homed(home) => state.homed(&myself, home),
            RelayMsg::Fetched(events) => state.fetched(&myself, events),
            RelayMsg::NodeGone(node) => {
                if state.owner.as_ref() == Some(&node) {
                    state.rehome(&myself);
                }
            }
            RelayMsg::Reconnected => {
                if state.phase == Phase::Live {
                    state.fetch(&myself);
                }
            }
        }
        if state.is_unused() {
            myself.stop(None);
        }
        Ok(())
    }
}

impl RelayState {
    /// No members, and nothing waiting to become one.
    fn is_unused(&self) -> bool {
        self.members.is_empty_here()
            && self.joins.is_empty()
            && self.readies.is_empty()
            && self.senders_due == 0
    }

    /// Where the members stand: the reply relayed so far, and its text.
    fn position(&self) -> (Option<Resume>, Option<String>) {
        match &self.reply {
            Some((progress, text)) => (
                Some(Resume {
                    message_id: progress.message_id().to_owned(),
                    seq: progress.seq(),
                }),
                Some(text.clone()),
            ),
            None => (None, None),
        }
    }

    /// Looks for the conversation's owner after `delay`, answered with [`RelayMsg::Homed`].
    fn look_for_home(&self, myself: &ActorRef<RelayMsg>, delay: Duration) {
        let conversations = self.conversations.clone();
        let key = self.key.clone();
        let (resume, seen) = self.position();
        let relay = myself.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let home = conversations.home(&key, resume, seen).await;
            let _ = relay.send_message(RelayMsg::Homed(home));
        });
    }

    /// The owner is gone or stopped: find the conversation another.
    fn rehome(&mut self, myself: &ActorRef<RelayMsg>) {
        if self.phase != Phase::Homing {
            self.phase = Phase::Homing;
            self.look_for_home(myself, Duration::ZERO);
        }
    }

    fn homed(&mut self, myself: &ActorRef<RelayMsg>, home: Result<Home, ChatError>) {
        match home {
            Ok(Home::Remote { owner, relayed }) => self.relay_from(myself, owner, relayed),
            Ok(Home::Here(relayed)) => self.hand_over(relayed),
            Ok(Home::Gone) => {
                for (_, _, answer) in self.joins.drain(..) {
                    let _ = answer.send(Err(ChatError::NotFound));
                }
                for ready in self.readies.drain(..) {
                    let _ = ready.send(Err(ChatError::NotFound));
                }
                self.members.remove_all();
            }
            Err(error) => {
                // Joins and requests fail now rather than wait on Redis; the members stay and
                // get the events once the owner is found again.
                for (_, _, answer) in self.joins.drain(..) {
                    let _ = answer.send(Err(error.clone()));
                }
                for ready in self.readies.drain(..) {
                    let _ = ready.send(Err(error.clone()));
                }
                if !self.members.is_empty_here() {
                    self.look_for_home(myself, HOMING_RETRY);
                }
            }
        }
    }

    /// Starts relaying from `owner`'s answer: the members get what they missed since the
    /// relay's last event, then the events heard meanwhile follow.
    fn relay_from(&mut self, myself: &ActorRef<RelayMsg>, owner: NodeId, relayed: Relayed) {
        let Relayed {
            epoch,
            seq,
            reply,
            missed,
        } = relayed;
        for frame in missed {
            if let Some(event) = EncodedEvent::decode(frame) {
                self.members.deliver(&event);
            }
        }
        self.owner = Some(owner.clone());
        self.epoch = epoch;
        self.seq = seq;
        self.reply = reply;
        self.recent.clear();
        self.ahead.retain(|(e, s), _| *e == epoch && *s > seq);
        self.phase = Phase::Live;
        self.deliver_ahead(myself);
        for (subscriber, resume, answer) in std::mem::take(&mut self.joins) {
            self.join(subscriber, resume.as_ref());
            let _ = answer.send(Ok(()));
        }
        self.senders_due += self.readies.len();
        for ready in self.readies.drain(..) {
            let _ = ready.send(Ok(owner.clone()));
        }
    }

    /// This node owns the conversation now: its members get what they missed, then they, and
    /// those waiting to be members, join the actor here.
    fn hand_over(&mut self, relayed: Relayed) {
        for frame in relayed.missed {
            if let Some(event) = EncodedEvent::decode(frame) {
                self.members.deliver(&event);
            }
        }
        let mut joining: Vec<(Subscriber, Option<Resume>, _)> = self
            .members
            .take_all()
            .into_iter()
            .map(|subscriber| (subscriber, None, None))
            .collect();
        joining.extend(
            self.joins
                .drain(..)
                .map(|(subscriber, resume, answer)| (subscriber, resume, Some(answer))),
        );
        for ready in self.readies.drain(..) {
            // Asked again, the request finds the conversation here.
            let _ = ready.send(Err(ChatError::Unavailable("moved here".into())));
        }
        let conversations = self.conversations.clone();
        let key = self.key.clone();
        tokio::spawn(async move {
            for (subscriber, resume, answer) in joining {
                let joined = conversations
                    .join(&key.owner, &key.id, subscriber, resume)
                    .await;
                if let Some(answer) = answer {
                    let _ = answer.send(joined);
                }
            }
        });
    }

    /// Makes `subscriber` a member after what it missed of the reply in progress.
    fn join(&mut self, subscriber: Subscriber, resume: Option<&Resume>) {
        if let Some((progress, content)) = &self.reply {
            for event in progress.missed(&self.key.id, content, resume) {
                let _ = subscriber.deliver(&event.encode());
            }
        }
        self.members.add(subscriber);
    }

    /// Adds a member from event `from` of `epoch` on, with what the relay already delivered of
    /// it.
    fn add_sender(&mut self, subscriber: Subscriber, epoch: u64, from: u64) {
        if epoch == self.epoch {
            for (_, event) in self.recent.iter().filter(|(seq, _)| *seq >= from) {
                let _ = subscriber.deliver(event);
            }
        }
        self.members.add(subscriber);
    }

    fn heard(&mut self, myself: &ActorRef<RelayMsg>, payload: String) {
        let (epoch, seq) = match Published::parse(&payload) {
            Some(Published::Event { epoch, seq, .. }) => (epoch, seq),
            Some(Published::Lost { epoch }) => {
                if epoch >= self.epoch {
                    self.rehome(myself);
                }
                return;
            }
            None => {
                tracing::warn!(conversation = %self.key.id, "unreadable event on the bus");
                return;
            }
        };
        if epoch < self.epoch || (epoch == self.epoch && seq <= self.seq) {
            return;
        }
        self.ahead.insert((epoch, seq), payload);
        match self.phase {
            Phase::Live if epoch > self.epoch => self.rehome(myself),
            Phase::Live => self.deliver_ahead(myself),
            Phase::Homing | Phase::Fetching => {}
        }
    }

    /// Delivers the events heard ahead that follow on from the last one; at a gap, asks the
    /// owner for what is missing.
    fn deliver_ahead(&mut self, myself: &ActorRef<RelayMsg>) {
        while let Some(entry) = self.ahead.first_entry() {
            let (epoch, seq) = *entry.key();
            if epoch != self.epoch || seq != self.seq + 1 {
                break;
            }
            let payload = entry.remove();
            self.deliver(seq, &payload);
        }
        if self.has_gap() {
            self.fetch(myself);
        }
    }

    /// Whether events of the owner's epoch wait behind one not heard.
    fn has_gap(&self) -> bool {
        self.ahead.keys().any(|(epoch, _)| *epoch == self.epoch)
    }

    /// Asks the owner for the events after the last one delivered.
    fn fetch(&mut self, myself: &ActorRef<RelayMsg>) {
        let Some(owner) = self.owner.clone() else {
            return;
        };
        self.phase = Phase::Fetching;
        let cluster = self.cluster.clone();
        let key = self.key.clone();
        let call = Call::Since {
            epoch: self.epoch,
            after: self.seq,
        };
        let relay = myself.clone();
        tokio::spawn(async move {
            let fetched = match cluster.call(&owner, &key, call).await {
                Ok(Answer::Events(events)) => Ok(events),
                Ok(_) => Ok(None),
                Err(failure) => Err(failure),
            };
            let _ = relay.send_message(RelayMsg::Fetched(fetched));
        });
    }

    fn fetched(
        &mut self,
        myself: &ActorRef<RelayMsg>,
        fetched: Result<Option<Vec<String>>, CallFailure>,
    ) {
        if self.phase != Phase::Fetching {
            return;
        }
        match fetched {
            Ok(Some(events)) if !events.is_empty() || !self.has_gap() => {
                self.phase = Phase::Live;
                for payload in events {
                    if let Some(Published::Event { epoch, seq, .. }) = Published::parse(&payload)
                        && epoch == self.epoch
                        && seq > self.seq
                    {
                        self.ahead.insert((epoch, seq), payload);
                    }
                }
                self.deliver_ahead(myself);
            }
            // The owner no longer has them (or has nothing to fill the gap with), or is gone:
            // start again from wherever the conversation lives.
            Ok(_) | Err(_) => {
                self.phase = Phase::Live;
                self.rehome(myself);
            }
        }
    }

    /// Delivers event `seq` to the members and follows the reply it belongs to.
    fn deliver(&mut self, seq: u64, payload: &str) {
        self.seq = seq;
        let Some(Published::Event { frame, .. }) = Published::parse(payload) else {
            return;
        };
        let Some(event) = EncodedEvent::decode(frame.to_owned()) else {
            tracing::warn!(conversation = %self.key.id, "unreadable event on the bus");
            return;
        };
        self.follow(&event);
        self.members.deliver(&event);
        self.recent.push_back((seq, event.clone()));
        if self.recent.len() > RECENT_EVENTS {
            self.recent.pop_front();
        }
        if event.name == "conversation_deleted" {
            self.members.remove_all();
        }
    }

    /// Keeps the relay's view of the reply in progress up to date with `event`.
    fn follow(&mut self, event: &EncodedEvent) {
        match event.name {
            "stream_start" => {
                if let Some(message_id) = event.message_id() {
                    self.reply = Some((Progress::new(message_id), String::new()));
                }
            }
            "stream_chunk" => {
                if let (Some((progress, content)), Some(text)) =
                    (self.reply.as_mut(), event.chunk_content())
                {
                    *content = text;
                    progress.advance(content.len());
                }
            }
            "stream_complete" => self.reply = None,
            _ => {}
        }
    }
}
