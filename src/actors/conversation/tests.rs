//! The reply's bookkeeping, on an actor's state directly: states no request can reach today
//! must still end a reply whole.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio::time::Instant;

use super::reply::{Ending, Reply};
use super::{ConversationState, Snapshot};
use crate::actors::ConversationKey;
use crate::actors::members::Members;
use crate::actors::tests::{WAIT, ann, context, member, next_event, settings};
use crate::domain::Conversation;
use crate::store::MemoryStore;

#[tokio::test]
async fn a_reply_whose_message_is_gone_still_ends_whole() {
    let (ctx, _scripts) = context(Arc::new(MemoryStore::new()), settings());
    let ctx = Arc::new(ctx);
    let (alive, model_gone) = tokio::sync::oneshot::channel::<()>();
    let model = tokio::spawn(async move {
        let _alive = alive;
        std::future::pending::<()>().await
    });
    let key = ConversationKey::new(&ann(), "c");
    let mut state = ConversationState {
        members: Members::new(key.id.clone(), None),
        conversation: Some(Snapshot::new(Conversation::new(key.id.to_string(), "hi"))),
        writer: crate::store::Writer::unfenced(&key.owner),
        key,
        reply: None,
        orphan: None,
        fenced: false,
        generations: 1,
        idle_timer: false,
        last_activity: Instant::now(),
        ctx: ctx.clone(),
        pending: Arc::new(AtomicUsize::new(0)),
    };
    let (subscriber, mut inbox) = member();
    state.members.add(subscriber);
    let gone = "a-message-not-in-the-conversation".to_owned();
    state.reply = Some(Box::new(Reply::start(
        &ctx,
        1,
        gone,
        model.abort_handle(),
        None,
    )));
    assert_eq!(ctx.metrics.snapshot().replies_in_progress, 1);

    state.end_reply(Ending::Completed(String::new())).await;

    assert!(state.reply.is_none());
    tokio::time::timeout(WAIT, model_gone)
        .await
        .expect("the model's task is aborted")
        .unwrap_err();
    assert_eq!(ctx.metrics.snapshot().replies_in_progress, 0);
    assert!(ctx.replies.is_empty());
    assert_eq!(next_event(&mut inbox).await.0, "stream_complete");
}
