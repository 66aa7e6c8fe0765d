//! The tasks that ask the model for a reply. Each runs on its own, so the actor never waits on
//! the model, and reports to the actor's mailbox under its reply's generation number; news from
//! a reply that has already ended is ignored there. Aborting the task stops the model.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::task::AbortHandle;

use super::{ConversationContext, ConversationMsg};
use crate::actors::mailbox::Mailbox;
use crate::llm::{Completion, ModelProvider, Prompt, ProviderError, Streamed, Usage};

/// What a generation task reports.
pub enum GenerationEvent {
    /// New text of a streamed reply.
    Piece(String),
    /// The model has been silent for the heartbeat interval.
    Silent,
    /// The streamed reply ended, with what it cost when the model said.
    Finished(Result<Option<Usage>, ProviderError>),
    /// A reply generated in one piece.
    Whole(Result<Completion, ProviderError>),
}

/// Starts the task that streams reply `generation` from the model into the actor's mailbox.
pub(super) fn spawn_streamed(
    ctx: Arc<ConversationContext>,
    actor: Mailbox<ConversationMsg>,
    generation: u64,
    prompt: Prompt,
) -> AbortHandle {
    tokio::spawn(async move {
        let report = |event| {
            actor
                .send(ConversationMsg::Generated { generation, event })
                .is_ok()
        };
        let heartbeat = ctx.settings.heartbeat_interval;
        let reading = read_stream(&*ctx.provider, prompt, heartbeat, &report);
        let result = within(&ctx, reading).await;
        report(GenerationEvent::Finished(result));
    })
    .abort_handle()
}

/// Starts the task that asks the model for reply `generation` in one piece.
pub(super) fn spawn_whole(
    ctx: Arc<ConversationContext>,
    actor: Mailbox<ConversationMsg>,
    generation: u64,
    prompt: Prompt,
) -> AbortHandle {
    tokio::spawn(async move {
        let whole = ctx.provider.complete(prompt);
        let result = within(&ctx, whole).await;
        let event = GenerationEvent::Whole(result);
        let _ = actor.send(ConversationMsg::Generated { generation, event });
    })
    .abort_handle()
}

/// Runs the model's `work` for at most the upstream timeout (running out of time is a provider
/// failure), and records how long it took and whether it failed.
async fn within<T>(
    ctx: &ConversationContext,
    work: impl Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(ctx.settings.upstream_timeout, work)
        .await
        .unwrap_or_else(|_| Err(ProviderError("the model did not finish in time".into())));
    ctx.metrics
        .upstream_finished(started.elapsed(), result.is_err());
    result
}

/// Reads the model's stream, merging pieces that are already waiting into one, and reports
/// silence longer than `heartbeat`; the usage the model reports at the end is the result.
/// Returns early when the actor is gone.
async fn read_stream(
    provider: &dyn ModelProvider,
    prompt: Prompt,
    heartbeat: Duration,
    report: &impl Fn(GenerationEvent) -> bool,
) -> Result<Option<Usage>, ProviderError> {
    let mut stream = with_heartbeat(provider.stream(prompt), heartbeat, report).await?;
    let mut usage = None;
    loop {
        let mut text = String::new();
        let mut end = None;
        let first = with_heartbeat(stream.next(), heartbeat, report).await;
        let mut next = Some(first);
        // The first item waited for, then every item already waiting, merged into one piece.
        while let Some(item) = next.take() {
            match item {
                Some(Ok(Streamed::Text(more))) => text.push_str(&more),
                Some(Ok(Streamed::Usage(reported))) => usage = Some(reported),
                Some(Err(e)) => {
                    end = Some(Err(e));
                    break;
                }
                None => {
                    end = Some(Ok(usage));
                    break;
                }
            }
            next = stream.next().now_or_never();
        }
        if !text.is_empty() && !report(GenerationEvent::Piece(text)) {
            return Ok(usage);
        }
        if let Some(end) = end {
            return end;
        }
    }
}

/// Awaits `work`, reporting `Silent` every `interval` it takes.
async fn with_heartbeat<T>(
    work: impl Future<Output = T>,
    interval: Duration,
    report: &impl Fn(GenerationEvent) -> bool,
) -> T {
    let mut work = std::pin::pin!(work);
    loop {
        match tokio::time::timeout(interval, &mut work).await {
            Ok(value) => return value,
            Err(_) => {
                report(GenerationEvent::Silent);
            }
        }
    }
}
