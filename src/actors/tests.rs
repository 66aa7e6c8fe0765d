//! The actor core's invariants, in-process and without a network: the memory store (steered
//! where a test needs it to fail or wait) and a scripted model whose pieces each test releases
//! one by one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::{
    ConversationContext, Conversations, Registry, Resume, Snapshot, Subscriber, SubscriberInbox,
    idle_timers,
};
use crate::config::{Config, ConversationSettings};
use crate::domain::{Conversation, Message, MessageStatus, Role, Timestamp, UserId};
use crate::error::ChatError;
use crate::llm::{Completion, ModelProvider, Prompt, ProviderError, Streamed, TokenStream};
use crate::metrics::Metrics;
use crate::store::{ConversationStore, MemoryStore, Page, StoreError, Writer};

/// How long a test waits for any one thing before it fails.
pub(crate) const WAIT: Duration = Duration::from_secs(15);

/// One reply the scripted model is writing: the test sends its pieces, and ends it by
/// dropping the script (or sending an error).
pub(crate) struct Script {
    pub(crate) pieces: mpsc::UnboundedSender<Result<String, ProviderError>>,
}

impl Script {
    /// Releases one piece of the reply.
    pub(crate) fn piece(&self, text: &str) {
        let _ = self.pieces.send(Ok(text.to_owned()));
    }
}

/// A model that hands every reply it is asked for to the test as a [`Script`].
pub(crate) struct ScriptedModel {
    scripts: mpsc::UnboundedSender<Script>,
}

impl ScriptedModel {
    pub(crate) fn new() -> (Arc<ScriptedModel>, mpsc::UnboundedReceiver<Script>) {
        let (scripts, receiver) = mpsc::unbounded_channel();
        (Arc::new(ScriptedModel { scripts }), receiver)
    }

    fn script(&self) -> mpsc::UnboundedReceiver<Result<String, ProviderError>> {
        let (pieces, receiver) = mpsc::unbounded_channel();
        let _ = self.scripts.send(Script { pieces });
        receiver
    }
}

#[async_trait]
impl ModelProvider for ScriptedModel {
    async fn stream(&self, _prompt: Prompt) -> Result<TokenStream, ProviderError> {
        let pieces = self.script();
        Ok(Box::pin(futures::stream::unfold(
            pieces,
            |mut pieces| async move {
                let piece = pieces.recv().await?;
                Some((piece.map(Streamed::Text), pieces))
            },
        )))
    }

    async fn complete(&self, _prompt: Prompt) -> Result<Completion, ProviderError> {
        let mut pieces = self.script();
        let mut text = String::new();
        while let Some(piece) = pieces.recv().await {
            text.push_str(&piece?);
        }
        Ok(Completion { text, usage: None })
    }
}

/// The memory store, made to fail or hold up the reads and writes a test picks.
#[derive(Default)]
pub(crate) struct SteeredStore {
    inner: MemoryStore,
    fail_next_load: AtomicBool,
    fail_next_mark: AtomicBool,
    /// The next load reads, says so on the first sender, then waits for the second to fire.
    held_load: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
}

impl SteeredStore {
    /// Holds up the next load after it has read: the first receiver fires once it has read,
    /// and it answers once the returned sender fires.
    fn hold_next_load(&self) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (read, has_read) = oneshot::channel();
        let (release, released) = oneshot::channel();
        *self.held_load.lock().unwrap() = Some((read, released));
        (has_read, release)
    }
}

#[async_trait]
impl ConversationStore for SteeredStore {
    async fn claim(&self, owner: &UserId, id: &str) -> Result<u64, StoreError> {
        self.inner.claim(owner, id).await
    }

    async fn create_conversation(
        &self,
        writer: &Writer,
        conversation: &Conversation,
    ) -> Result<(), StoreError> {
        self.inner.create_conversation(writer, conversation).await
    }

    async fn load_conversation(
        &self,
        owner: &UserId,
        id: &str,
    ) -> Result<Option<Conversation>, StoreError> {
        if self.fail_next_load.swap(false, Ordering::SeqCst) {
            return Err(StoreError::storage("the disk is unwell"));
        }
        let loaded = self.inner.load_conversation(owner, id).await;
        let held = self.held_load.lock().unwrap().take();
        if let Some((read, released)) = held {
            let _ = read.send(());
            let _ = released.await;
        }
        loaded
    }

    async fn list_conversations(
        &self,
        owner: &UserId,
        page: Page,
    ) -> Result<Vec<Conversation>, StoreError> {
        self.inner.list_conversations(owner, page).await
    }

    async fn save_messages(
        &self,
        writer: &Writer,
        messages: &[Message],
        updated_at: Timestamp,
    ) -> Result<(), StoreError> {
        self.inner.save_messages(writer, messages, updated_at).await
    }

    async fn delete_message(
        &self,
        writer: &Writer,
        conversation_id: &str,
        message_id: &str,
        updated_at: Timestamp,
    ) -> Result<(), StoreError> {
        self.inner
            .delete_message(writer, conversation_id, message_id, updated_at)
            .await
    }

    async fn rename_conversation(
        &self,
        writer: &Writer,
        id: &str,
        title: &str,
        updated_at: Timestamp,
    ) -> Result<(), StoreError> {
        self.inner
            .rename_conversation(writer, id, title, updated_at)
            .await
    }

    async fn delete_conversation(&self, writer: &Writer, id: &str) -> Result<bool, StoreError> {
        self.inner.delete_conversation(writer, id).await
    }

    async fn add_usage(&self, owner: &UserId, day: &str, tokens: u64) -> Result<(), StoreError> {
        self.inner.add_usage(owner, day, tokens).await
    }

    async fn usage_on(&self, owner: &UserId, day: &str) -> Result<u64, StoreError> {
        self.inner.usage_on(owner, day).await
    }

    async fn mark_interrupted(&self) -> Result<u64, StoreError> {
        self.inner.mark_interrupted().await
    }

    async fn mark_interrupted_in(
        &self,
        writer: &Writer,
        conversation_id: &str,
    ) -> Result<u64, StoreError> {
        if self.fail_next_mark.swap(false, Ordering::SeqCst) {
            return Err(StoreError::storage("the disk is unwell"));
        }
        self.inner
            .mark_interrupted_in(writer, conversation_id)
            .await
    }
}

/// The user the tests' conversations belong to.
pub(crate) fn ann() -> UserId {
    UserId::new("ann")
}

/// Settings for the tests: no heartbeats, checkpoints or passivation unless a test asks.
pub(crate) fn settings() -> ConversationSettings {
    let mut settings = Config::default().conversations;
    settings.heartbeat_interval = Duration::from_secs(3600);
    settings.checkpoint_interval = Duration::from_secs(3600);
    settings.idle_timeout = Duration::from_secs(3600);
    settings
}

/// The context of conversations on `store` with the scripted model, and the model's scripts.
pub(crate) fn context(
    store: Arc<dyn ConversationStore>,
    settings: ConversationSettings,
) -> (ConversationContext, mpsc::UnboundedReceiver<Script>) {
    let (model, scripts) = ScriptedModel::new();
    let ctx = ConversationContext {
        store,
        provider: model,
        settings,
        registry: Registry::default(),
        metrics: Arc::new(Metrics::default()),
        replies: TaskTracker::new(),
        cluster: None,
        idle_timers: idle_timers(),
    };
    (ctx, scripts)
}

/// Running conversations on a steered memory store, with the scripted model.
pub(crate) struct Harness {
    pub(crate) conversations: Conversations,
    pub(crate) scripts: mpsc::UnboundedReceiver<Script>,
    pub(crate) store: Arc<SteeredStore>,
    pub(crate) metrics: Arc<Metrics>,
}

impl Harness {
    pub(crate) async fn start(settings: ConversationSettings) -> Harness {
        let store = Arc::new(SteeredStore::default());
        let (ctx, scripts) = context(store.clone(), settings);
        let metrics = ctx.metrics.clone();
        let conversations = Conversations::new(ctx);
        Harness {
            conversations,
            scripts,
            store,
            metrics,
        }
    }

    /// The script of the next reply the model is asked for.
    pub(crate) async fn next_script(&mut self) -> Script {
        tokio::time::timeout(WAIT, self.scripts.recv())
            .await
            .expect("the model is asked in time")
            .expect("the model is there")
    }

    /// Streams a reply to `message` in `id`, written by the test.
    pub(crate) async fn start_reply(
        &mut self,
        id: &str,
        message: &str,
        sender: Option<Subscriber>,
    ) -> (String, Script) {
        let started = self
            .conversations
            .stream_chat(&ann(), Some(id.into()), message.into(), sender)
            .await
            .unwrap();
        (started.message_id, self.next_script().await)
    }

    /// The stored conversation `id`.
    pub(crate) async fn stored(&self, id: &str) -> Conversation {
        self.store
            .load_conversation(&ann(), id)
            .await
            .unwrap()
            .unwrap()
    }
}

/// A connection, as the actors see it, and its side.
pub(crate) fn member() -> (Subscriber, SubscriberInbox) {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    Subscriber::new(NEXT.fetch_add(1, Ordering::Relaxed), 64)
}

/// The next event queued for a member, as (name, data).
pub(crate) async fn next_event(inbox: &mut SubscriberInbox) -> (String, Value) {
    let event = tokio::time::timeout(WAIT, inbox.events.recv())
        .await
        .expect("an event in time");
    (
        event.name.to_owned(),
        serde_json::from_str(event.data.get()).unwrap(),
    )
}

/// Every event already queued for a member.
pub(crate) fn queued_events(inbox: &mut SubscriberInbox) -> Vec<(String, Value)> {
    let mut events = Vec::new();
    while let Some(event) = inbox.events.try_recv() {
        events.push((
            event.name.to_owned(),
            serde_json::from_str(event.data.get()).unwrap(),
        ));
    }
    events
}

/// Events up to and including `stream_complete`.
pub(crate) async fn until_complete(inbox: &mut SubscriberInbox) -> Vec<(String, Value)> {
    let mut events = Vec::new();
    loop {
        let event = next_event(inbox).await;
        let done = event.0 == "stream_complete";
        events.push(event);
        if done {
            return events;
        }
    }
}

/// A chunk's (delta, content, seq, isComplete).
fn chunk(event: &(String, Value)) -> (&str, &str, u64, bool) {
    assert_eq!(event.0, "stream_chunk", "{event:?}");
    let data = &event.1;
    (
        data["delta"].as_str().unwrap(),
        data["content"].as_str().unwrap(),
        data["seq"].as_u64().unwrap(),
        data["isComplete"].as_bool().unwrap(),
    )
}

#[tokio::test]
async fn a_member_joining_mid_reply_gets_exactly_what_it_missed() {
    let mut h = Harness::start(settings()).await;
    let (sender, mut sender_inbox) = member();
    let (message_id, script) = h.start_reply("c", "hi", Some(sender)).await;
    assert_eq!(next_event(&mut sender_inbox).await.0, "stream_start");
    script.piece("Hel");
    assert_eq!(
        chunk(&next_event(&mut sender_inbox).await),
        ("Hel", "Hel", 1, false)
    );
    script.piece("lo");
    assert_eq!(
        chunk(&next_event(&mut sender_inbox).await),
        ("lo", "Hello", 2, false)
    );

    let resume = |seq| {
        Some(Resume {
            message_id: message_id.clone(),
            seq,
        })
    };
    let (fresh, mut fresh_inbox) = member();
    let (resumed, mut resumed_inbox) = member();
    let (current, mut current_inbox) = member();
    let (elsewhere, mut elsewhere_inbox) = member();
    let stale = Some(Resume {
        message_id: "an-older-reply".into(),
        seq: 7,
    });
    for (subscriber, resume) in [
        (fresh, None),
        (resumed, resume(1)),
        (current, resume(2)),
        (elsewhere, stale),
    ] {
        h.conversations
            .join(&ann(), "c", subscriber, resume)
            .await
            .unwrap();
    }
    for inbox in [&mut fresh_inbox, &mut elsewhere_inbox] {
        let missed = queued_events(inbox);
        assert_eq!(missed.len(), 2, "{missed:?}");
        assert_eq!(missed[0].0, "stream_start");
        assert_eq!(missed[0].1["messageId"], message_id.as_str());
        assert_eq!(chunk(&missed[1]), ("Hello", "Hello", 2, false));
    }
    let missed = queued_events(&mut resumed_inbox);
    assert_eq!(missed.len(), 1, "{missed:?}");
    assert_eq!(chunk(&missed[0]), ("lo", "Hello", 2, false));
    assert!(queued_events(&mut current_inbox).is_empty());

    script.piece(" world");
    drop(script);
    for inbox in [
        &mut sender_inbox,
        &mut fresh_inbox,
        &mut resumed_inbox,
        &mut current_inbox,
        &mut elsewhere_inbox,
    ] {
        let rest = until_complete(inbox).await;
        assert_eq!(rest.len(), 3, "{rest:?}");
        assert_eq!(chunk(&rest[0]), (" world", "Hello world", 3, false));
        assert_eq!(chunk(&rest[1]), ("", "Hello world", 4, true));
    }
}

#[tokio::test]
async fn two_users_with_the_same_conversation_id_never_meet() {
    let mut h = Harness::start(settings()).await;
    let (ann_member, mut ann_inbox) = member();
    let (_, script) = h.start_reply("c", "ann's question", Some(ann_member)).await;
    assert_eq!(next_event(&mut ann_inbox).await.0, "stream_start");

    let bob = UserId::new("bob");
    let (bob_member, mut bob_inbox) = member();
    h.conversations
        .join(&bob, "c", bob_member.clone(), None)
        .await
        .unwrap();
    let c = Some("c".to_owned());
    assert_eq!(
        h.conversations
            .get(&bob, "c")
            .await
            .map(Snapshot::into_conversation),
        Err(ChatError::NotFound)
    );
    assert_eq!(
        h.conversations.stop_reply(&bob, "c").await,
        Err(ChatError::NotFound)
    );
    assert_eq!(
        h.conversations.regenerate(&bob, "c", None).await,
        Err(ChatError::NotFound)
    );
    assert_eq!(
        h.conversations.rename(&bob, "c", "mine".into()).await.err(),
        Some(ChatError::NotFound)
    );
    assert_eq!(
        h.conversations.delete(&bob, "c").await,
        Err(ChatError::NotFound)
    );
    assert_eq!(
        h.conversations
            .chat(&bob, c.clone(), "hi".into())
            .await
            .err(),
        Some(ChatError::NotFound)
    );
    assert!(
        h.conversations
            .list(&bob, Page::default())
            .await
            .unwrap()
            .is_empty()
    );

    script.piece("for ann");
    drop(script);
    assert_eq!(until_complete(&mut ann_inbox).await.len(), 3);
    assert!(queued_events(&mut bob_inbox).is_empty());

    // Bob's first message makes a conversation "c" of his own, and Ann hears nothing of it.
    let started = h
        .conversations
        .stream_chat(&bob, c, "bob's question".into(), Some(bob_member))
        .await
        .unwrap();
    assert_eq!(started.conversation_id, "c");
    let script = h.next_script().await;
    script.piece("for bob");
    drop(script);
    assert_eq!(until_complete(&mut bob_inbox).await.len(), 4);
    assert!(queued_events(&mut ann_inbox).is_empty());
    let anns = h.conversations.get(&ann(), "c").await.unwrap();
    let bobs = h.conversations.get(&bob, "c").await.unwrap();
    assert_eq!(anns.messages[0].content, "ann's question");
    assert_eq!(anns.messages[1].content, "for ann");
    assert_eq!(bobs.messages[0].content, "bob's question");
    assert_eq!(bobs.messages[1].content, "for bob");
    let listed = h.conversations.list(&ann(), Page::default()).await.unwrap();
    assert_eq!(listed, [anns.into_conversation()]);
}

#[tokio::test]
async fn a_stop_racing_the_last_piece_ends_the_reply_once_as_stored() {
    let mut h = Harness::start(settings()).await;
    for round in 0..20 {
        let id = format!("race-{round}");
        let (sender, mut inbox) = member();
        let (message_id, script) = h.start_reply(&id, "hi", Some(sender)).await;
        script.piece("a");
        assert_eq!(chunk(&until_chunk(&mut inbox).await), ("a", "a", 1, false));
        script.piece("b");
        drop(script);
        if round % 2 == 0 {
            tokio::task::yield_now().await;
        }
        h.conversations.stop_reply(&ann(), &id).await.unwrap();
        // Asked after the stop, the snapshot is answered after any news the model sent before it.
        h.conversations.get(&ann(), &id).await.unwrap();

        let events = queued_events(&mut inbox);
        let completes = events.iter().filter(|e| e.0 == "stream_complete").count();
        assert_eq!(completes, 1, "{events:?}");
        assert_eq!(events.last().unwrap().0, "stream_complete", "{events:?}");
        let last_chunk = events.iter().rev().find(|e| e.0 == "stream_chunk").unwrap();
        let (_, content, _, complete) = chunk(last_chunk);
        assert!(complete, "{events:?}");
        let stored = h.stored(&id).await.messages.pop().unwrap();
        assert_eq!(stored.id, message_id);
        assert_eq!(stored.content, content);
        match stored.status {
            Some(MessageStatus::Complete) => assert_eq!(stored.content, "ab"),
            Some(MessageStatus::Cancelled) => {}
            other => panic!("reply stored as {other:?}"),
        }
    }
    assert_eq!(h.metrics.snapshot().replies_in_progress, 0);
}

/// The next chunk, skipping `stream_start`.
async fn until_chunk(inbox: &mut SubscriberInbox) -> (String, Value) {
    loop {
        let event = next_event(inbox).await;
        if event.0 == "stream_chunk" {
            return event;
        }
    }
}

#[tokio::test]
async fn a_join_racing_passivation_is_never_lost() {
    let mut quick = settings();
    quick.idle_timeout = Duration::from_millis(1);
    let mut h = Harness::start(quick).await;
    let (first, mut first_inbox) = member();
    let first_id = first.id();
    let (_, script) = h.start_reply("c", "hi", Some(first)).await;
    drop(script);
    until_complete(&mut first_inbox).await;
    h.conversations.leave(&ann(), "c", first_id).await;
    for round in 0..30 {
        // The actor passivates a millisecond after each round; the join lands before, during or
        // after that.
        for _ in 0..round * 40 {
            tokio::task::yield_now().await;
        }
        let (subscriber, mut inbox) = member();
        let id = subscriber.id();
        h.conversations
            .join(&ann(), "c", subscriber, None)
            .await
            .unwrap();
        let (message_id, script) = h.start_reply("c", "again", None).await;
        script.piece("yes");
        drop(script);
        let events = until_complete(&mut inbox).await;
        assert_eq!(events[0].0, "stream_start", "{events:?}");
        assert_eq!(events[0].1["messageId"], message_id.as_str());
        assert_eq!(chunk(&events[1]), ("yes", "yes", 1, false));
        h.conversations.leave(&ann(), "c", id).await;
    }
}

#[tokio::test]
async fn a_failed_activation_answers_an_error_and_the_next_one_works() {
    let h = Harness::start(settings()).await;
    let mut conversation = Conversation::new("c".into(), "hi");
    conversation
        .messages
        .push(Message::new("c", Role::User, "hi".into()));
    let mut cut_off = Message::new("c", Role::Assistant, "par".into());
    cut_off.status = Some(MessageStatus::Streaming);
    conversation.messages.push(cut_off);
    h.store
        .create_conversation(&Writer::unfenced(&ann()), &conversation)
        .await
        .unwrap();

    for failure in [&h.store.fail_next_load, &h.store.fail_next_mark] {
        failure.store(true, Ordering::SeqCst);
        let refused = h.conversations.rename(&ann(), "c", "renamed".into()).await;
        assert!(matches!(refused, Err(ChatError::Storage(_))), "{refused:?}");
        assert_eq!(h.conversations.active(), 0);
    }
    let renamed = h
        .conversations
        .rename(&ann(), "c", "renamed".into())
        .await
        .unwrap();
    assert_eq!(renamed.title, "renamed");
    assert_eq!(renamed.messages[1].status, Some(MessageStatus::Error));
    let stored = h.stored("c").await;
    assert_eq!(stored.title, "renamed");
    assert_eq!(stored.messages[1].status, Some(MessageStatus::Error));
    assert_eq!(stored.messages[1].content, "par");
}

#[tokio::test]
async fn requests_racing_an_activation_reach_the_one_actor_it_starts() {
    let mut h = Harness::start(settings()).await;
    let mut conversation = Conversation::new("c".into(), "hi");
    let question = Message::new("c", Role::User, "hi".into());
    conversation.messages.push(question.clone());
    let mut cut_off = Message::new("c", Role::Assistant, "stale".into());
    cut_off.status = Some(MessageStatus::Streaming);
    conversation.messages.push(cut_off);
    h.store
        .create_conversation(&Writer::unfenced(&ann()), &conversation)
        .await
        .unwrap();

    // The first activation registers its actor, then reads the conversation and waits; a
    // second request meanwhile finds that actor and waits in its mailbox.
    let (has_read, release) = h.store.hold_next_load();
    let conversations = h.conversations.clone();
    let (late, mut late_inbox) = member();
    let joining = tokio::spawn(async move { conversations.join(&ann(), "c", late, None).await });
    tokio::time::timeout(WAIT, has_read).await.unwrap().unwrap();
    let conversations = h.conversations.clone();
    let (sender, mut inbox) = member();
    let regenerating =
        tokio::spawn(async move { conversations.regenerate(&ann(), "c", Some(sender)).await });
    tokio::task::yield_now().await;
    let _ = release.send(());
    tokio::time::timeout(WAIT, joining)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let started = tokio::time::timeout(WAIT, regenerating)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let script = h.next_script().await;
    script.piece("fresh");
    drop(script);
    until_complete(&mut inbox).await;
    // The joiner is a member of the same actor, and saw the reply too.
    let seen = until_complete(&mut late_inbox).await;
    assert_eq!(seen[0].1["messageId"], started.message_id.as_str());

    let stored = h.stored("c").await;
    assert_eq!(stored.messages.len(), 2, "{:?}", stored.messages);
    assert_eq!(stored.messages[0], question);
    assert_eq!(stored.messages[1].id, started.message_id);
    assert_eq!(stored.messages[1].content, "fresh");
    assert_eq!(stored.messages[1].status, Some(MessageStatus::Complete));
    let got = h.conversations.get(&ann(), "c").await.unwrap();
    assert_eq!(got.into_conversation(), stored);
    assert_eq!(h.metrics.snapshot().active_conversations, 1);
}

#[tokio::test]
async fn shutdown_waits_for_a_reply_in_progress_only_until_it_ends() {
    let mut h = Harness::start(settings()).await;
    let (sender, mut inbox) = member();
    let (_, script) = h.start_reply("c", "hi", Some(sender)).await;
    let conversations = h.conversations.clone();
    let shutdown =
        tokio::spawn(async move { conversations.shutdown(Duration::from_secs(24 * 3600)).await });
    script.piece("done");
    drop(script);
    let events = until_complete(&mut inbox).await;
    assert_eq!(chunk(&events[events.len() - 2]), ("", "done", 2, true));
    tokio::time::timeout(WAIT, shutdown)
        .await
        .expect("shutdown ends once the reply has")
        .unwrap();
    let stored = h.stored("c").await.messages.pop().unwrap();
    assert_eq!(stored.status, Some(MessageStatus::Complete));
    assert_eq!(h.metrics.snapshot().replies_in_progress, 0);
}
