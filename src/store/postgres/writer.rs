//! The writer: one connection that commits every write waiting in one transaction (group
//! commit), answers each once committed, and reconnects by itself when its connection breaks.
//!
//! Each write is one prepared statement that checks the writer's claim and answers a refusal
//! (not found, already stored, fenced) as a value rather than an error, so a refused write costs
//! the others nothing. The batch's statements go out together behind `BEGIN` (one round trip),
//! then `COMMIT` (a second). A statement that fails aborts PostgreSQL's transaction: it is rolled
//! back, that write alone answered with its failure, and the batch run again without it.

use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use futures::future::{MaybeDone, maybe_done};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use super::super::group_commit::{MAX_BATCH, Write, WriteJob};
use super::super::{StoreError, Writer, username_key};
use super::server::Server;
use super::{failed, key, saturating};
use crate::domain::{Message, MessageStatus};

/// The first wait before reconnecting once the connection broke; it doubles after each failed
/// attempt, up to [`RECONNECT_MAX`].
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// The claim check that every write of a conversation starts with: `ok` when the writer holds
/// no claim (`$3` is null) or holds the latest one on `$1`'s conversation `$2`.
macro_rules! allowed {
    () => {
        "WITH allowed AS (SELECT $3::bigint IS NULL OR EXISTS (SELECT 1 FROM claims \
         WHERE owner = $1 AND id = $2 AND fence = $3) AS ok)"
    };
}

/// Inserts messages (`$5` to `$11`, one array per column) into `$1`'s conversation `$2` in their
/// order, or replaces the content, status and usage of those already stored in it, once
/// `changed` has a row.
macro_rules! upsert_messages {
    () => {
        ", saved AS (INSERT INTO messages (id, owner, conversation_id, role, content, status, \
         timestamp, prompt_tokens, completion_tokens) \
         SELECT m.id, $1, $2, m.role, m.content, m.status, m.timestamp, m.prompt, m.completion \
         FROM unnest($5::text[], $6::text[], $7::bytea[], $8::text[], $9::bigint[], \
         $10::bigint[], $11::bigint[]) WITH ORDINALITY \
         AS m (id, role, content, status, timestamp, prompt, completion, position) \
         WHERE EXISTS (SELECT 1 FROM changed) ORDER BY m.position \
         ON CONFLICT (id) DO UPDATE SET content = excluded.content, status = excluded.status, \
         prompt_tokens = excluded.prompt_tokens, completion_tokens = excluded.completion_tokens \
         WHERE messages.owner = excluded.owner \
         AND messages.conversation_id = excluded.conversation_id)"
    };
}

/// What a write of a conversation answers: whether the claim held, and the rows it changed.
macro_rules! outcome {
    () => {
        " SELECT ok, (SELECT count(*) FROM changed) FROM allowed"
    };
}

const CLAIM: &str = "WITH next AS (UPDATE fence_sequence SET last = last + 1 RETURNING last) \
     INSERT INTO claims (owner, id, fence) SELECT $1::text, $2::text, last FROM next \
     ON CONFLICT (owner, id) DO UPDATE SET fence = excluded.fence RETURNING fence";
/// `$4` the time of its last update, `$12` its title, `$13` its creation time.
const CREATE: &str = concat!(
    allowed!(),
    ", changed AS (INSERT INTO conversations (owner, id, title, created_at, updated_at) \
     SELECT $1, $2, $12::bytea, $13::bigint, $4::bigint FROM allowed WHERE ok \
     ON CONFLICT DO NOTHING RETURNING 1)",
    upsert_messages!(),
    outcome!()
);
const SAVE: &str = concat!(
    allowed!(),
    ", changed AS (UPDATE conversations SET updated_at = $4::bigint \
     WHERE owner = $1 AND id = $2 AND (SELECT ok FROM allowed) RETURNING 1)",
    upsert_messages!(),
    outcome!()
);
/// `$5` the message's id.
const DELETE_MESSAGE: &str = concat!(
    allowed!(),
    ", changed AS (UPDATE conversations SET updated_at = $4::bigint \
     WHERE owner = $1 AND id = $2 AND (SELECT ok FROM allowed) RETURNING 1), \
     removed AS (DELETE FROM messages WHERE id = $5::text AND owner = $1 \
     AND conversation_id = $2 AND EXISTS (SELECT 1 FROM changed))",
    outcome!()
);
/// `$5` the new title.
const RENAME: &str = concat!(
    allowed!(),
    ", changed AS (UPDATE conversations SET title = $5::bytea, updated_at = $4::bigint \
     WHERE owner = $1 AND id = $2 AND (SELECT ok FROM allowed) RETURNING 1)",
    outcome!()
);
const DELETE_CONVERSATION: &str = concat!(
    allowed!(),
    ", changed AS (DELETE FROM conversations \
     WHERE owner = $1 AND id = $2 AND (SELECT ok FROM allowed) RETURNING 1)",
    outcome!()
);
const MARK_INTERRUPTED_IN: &str = concat!(
    allowed!(),
    ", changed AS (UPDATE messages SET status = 'error' WHERE owner = $1 \
     AND conversation_id = $2 AND status = 'streaming' AND (SELECT ok FROM allowed) RETURNING 1)",
    outcome!()
);
const MARK_INTERRUPTED: &str = "UPDATE messages SET status = 'error' WHERE status = 'streaming'";
/// Tokens add up to at most `i64::MAX`.
const ADD_USAGE: &str = "INSERT INTO daily_usage (owner, day, tokens) VALUES ($1, $2, $3) \
     ON CONFLICT (owner, day) DO UPDATE \
     SET tokens = least(daily_usage.tokens::numeric + excluded.tokens, 9223372036854775807)::bigint";
const CREATE_ACCOUNT: &str = "INSERT INTO accounts \
     (id, username, username_key, password_hash, created_at) VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT DO NOTHING";

/// The writer's connection with its statements, prepared once per connection.
pub(super) struct Connection {
    client: Client,
    claim: Statement,
    create: Statement,
    save: Statement,
    delete_message: Statement,
    rename: Statement,
    delete_conversation: Statement,
    mark_interrupted_in: Statement,
    mark_interrupted: Statement,
    add_usage: Statement,
    create_account: Statement,
}

impl Connection {
    /// Prepares the writer's statements on `client`, all in one round trip.
    pub(super) async fn prepare(client: Client, server: &Server) -> Result<Connection, StoreError> {
        let (
            claim,
            create,
            save,
            delete_message,
            rename,
            delete_conversation,
            mark_interrupted_in,
            mark_interrupted,
            add_usage,
            create_account,
        ) = tokio::try_join!(
            client.prepare(CLAIM),
            client.prepare(CREATE),
            client.prepare(SAVE),
            client.prepare(DELETE_MESSAGE),
            client.prepare(RENAME),
            client.prepare(DELETE_CONVERSATION),
            client.prepare(MARK_INTERRUPTED_IN),
            client.prepare(MARK_INTERRUPTED),
            client.prepare(ADD_USAGE),
            client.prepare(CREATE_ACCOUNT),
        )
        .map_err(|e| server.failed(&e))?;
        Ok(Connection {
            client,
            claim,
            create,
            save,
            delete_message,
            rename,
            delete_conversation,
            mark_interrupted_in,
            mark_interrupted,
            add_usage,
            create_account,
        })
    }
}

/// The writer task: takes every write waiting, commits them in one transaction and answers each.
/// Once its connection breaks, it reconnects with backoff, and the writes that come meanwhile
/// fail at once rather than wait for the outage to end. Ends when the store is dropped.
pub(super) async fn write_loop(
    server: Server,
    connection: Connection,
    mut jobs: mpsc::Receiver<WriteJob>,
) {
    let mut connection = Some(connection);
    let mut backoff = RECONNECT_MIN;
    let mut retry_at = Instant::now();
    loop {
        let Some(live) = &connection else {
            tokio::select! {
                job = jobs.recv() => match job {
                    Some(job) => {
                        let unavailable = StoreError::storage("PostgreSQL unreachable, reconnecting");
                        let _ = job.done.send(Err(unavailable));
                    }
                    None => return,
                },
                () = tokio::time::sleep_until(retry_at) => {
                    match connect(&server).await {
                        Ok(live) => {
                            tracing::info!("the PostgreSQL writer reconnected");
                            connection = Some(live);
                            backoff = RECONNECT_MIN;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the PostgreSQL writer could not reconnect");
                            retry_at = Instant::now() + backoff;
                            backoff = (backoff * 2).min(RECONNECT_MAX);
                        }
                    }
                }
            }
            continue;
        };
        let Some(first) = jobs.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH
            && let Ok(job) = jobs.try_recv()
        {
            batch.push(job);
        }
        let outcomes = commit(live, &batch).await;
        for (job, outcome) in batch.into_iter().zip(outcomes) {
            let _ = job.done.send(outcome);
        }
        if live.client.is_closed() {
            tracing::warn!("the PostgreSQL writer's connection broke, reconnecting");
            connection = None;
            retry_at = Instant::now();
        }
    }
}

/// A new writer connection, with its statements.
async fn connect(server: &Server) -> Result<Connection, StoreError> {
    Connection::prepare(server.connect().await?, server).await
}

/// Commits the writes of `batch` in one transaction; the outcome of each, in order. A write
/// whose statement fails is left out and the others run again, until a transaction commits.
async fn commit(connection: &Connection, batch: &[WriteJob]) -> Vec<Outcome> {
    let mut outcomes: Vec<Outcome> = vec![Ok(0); batch.len()];
    // Claims first: every transaction that takes the fencing counter's lock takes it before any
    // conversation's, so two servers' batches can never wait on each other in a circle.
    let mut pending: Vec<usize> = (0..batch.len()).collect();
    pending.sort_by_key(|&i| !matches!(batch[i].write, Write::Claim(..)));
    while !pending.is_empty() {
        let (begun, ran) = tokio::join!(
            biased;
            connection.client.batch_execute("BEGIN"),
            in_order(pending.iter().map(|&i| run(connection, &batch[i].write))),
        );
        let mut succeeded = Vec::with_capacity(ran.len());
        let mut failure = None;
        for (position, result) in ran.into_iter().enumerate() {
            match result {
                Ok(outcome) => succeeded.push(outcome),
                Err(e) => {
                    // The first failure is that write's own; those after it may only have found
                    // the transaction aborted.
                    failure = Some((position, e));
                    break;
                }
            }
        }
        let ended = if begun.is_ok() && failure.is_none() {
            connection.client.batch_execute("COMMIT").await
        } else {
            connection.client.batch_execute("ROLLBACK").await
        };
        if let Some(e) = begun.err().or(ended.err()) {
            // No transaction to trust, or no commit: every write still pending fails.
            for &i in &pending {
                outcomes[i] = Err(failed(&e));
            }
            break;
        }
        match failure {
            Some((position, e)) => outcomes[pending.remove(position)] = Err(failed(&e)),
            None => {
                for (&i, outcome) in pending.iter().zip(succeeded) {
                    outcomes[i] = outcome;
                }
                break;
            }
        }
    }
    outcomes
}

/// Awaits every future of `futures`, always polling them in their order. A statement goes out
/// when its future is first polled, so the server receives them in this order, one behind the
/// other, without waiting for each answer.
async fn in_order<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<MaybeDone<F>>>> =
        futures.map(|future| Box::pin(maybe_done(future))).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for future in &mut futures {
            done &= future.as_mut().poll(cx).is_ready();
        }
        if done { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    futures
        .iter_mut()
        .filter_map(|future| future.as_mut().take_output())
        .collect()
}

/// What a write answers once its statement has run: the rows it changed (for a claim, its
/// fencing token), or a refusal in the store's words.
type Outcome = Result<u64, StoreError>;

/// The conversation a write touches and the writer's claim on it: `$1` to `$3` of its statement.
struct Target<'a> {
    owner: Option<&'a str>,
    id: Option<&'a str>,
    fence: Option<i64>,
}

impl<'a> Target<'a> {
    fn of(writer: &'a Writer, id: &'a str) -> Self {
        Target {
            owner: key(writer.owner.as_str()),
            id: key(id),
            // A token beyond the sequence's range matches no claim (null would mean no claim).
            fence: writer.fence.map(|fence| i64::try_from(fence).unwrap_or(-1)),
        }
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 3] {
        [&self.owner, &self.id, &self.fence]
    }
}

/// Runs one write in the batch's transaction. Its statement is sent when this is first polled,
/// so the writes of a batch go out together.
async fn run(connection: &Connection, write: &Write) -> Result<Outcome, tokio_postgres::Error> {
    let client = &connection.client;
    match write {
        Write::Claim(owner, id) => {
            let params: [&(dyn ToSql + Sync); 2] = [&key(owner.as_str()), &key(id)];
            let row = client.query_one(&connection.claim, &params).await?;
            let fence: i64 = row.try_get(0)?;
            Ok(Ok(fence.max(0) as u64))
        }
        Write::Create(writer, conversation) => {
            let target = Target::of(writer, &conversation.id);
            let messages = MessageColumns::of(&conversation.messages);
            let updated_at = conversation.updated_at.millis();
            let more: [&(dyn ToSql + Sync); 2] = [
                &conversation.title.as_bytes(),
                &conversation.created_at.millis(),
            ];
            let params = messages.params(&target, &updated_at, &more);
            let row = client.query_one(&connection.create, &params).await?;
            Ok(claimed(&row)?.and_then(|rows| found(rows, StoreError::AlreadyExists)))
        }
        Write::Save(writer, messages, updated_at) => {
            let target = Target::of(writer, &messages[0].conversation_id);
            let messages = MessageColumns::of(messages);
            let updated_at = updated_at.millis();
            let params = messages.params(&target, &updated_at, &[]);
            let row = client.query_one(&connection.save, &params).await?;
            Ok(claimed(&row)?.and_then(|rows| found(rows, StoreError::NotFound)))
        }
        Write::DeleteMessage {
            writer,
            conversation_id,
            message_id,
            updated_at,
        } => {
            let target = Target::of(writer, conversation_id);
            let [owner, id, fence] = target.params();
            let params: [&(dyn ToSql + Sync); 5] =
                [owner, id, fence, &updated_at.millis(), &key(message_id)];
            let row = client
                .query_one(&connection.delete_message, &params)
                .await?;
            Ok(claimed(&row)?.and_then(|rows| found(rows, StoreError::NotFound)))
        }
        Write::Rename {
            writer,
            id,
            title,
            updated_at,
        } => {
            let target = Target::of(writer, id);
            let [owner, id, fence] = target.params();
            let params: [&(dyn ToSql + Sync); 5] =
                [owner, id, fence, &updated_at.millis(), &title.as_bytes()];
            let row = client.query_one(&connection.rename, &params).await?;
            Ok(claimed(&row)?.and_then(|rows| found(rows, StoreError::NotFound)))
        }
        Write::DeleteConversation(writer, id) => {
            let target = Target::of(writer, id);
            let row = client
                .query_one(&connection.delete_conversation, &target.params())
                .await?;
            claimed(&row)
        }
        Write::MarkInterrupted => Ok(Ok(client
            .execute(&connection.mark_interrupted, &[])
            .await?)),
        Write::MarkInterruptedIn(writer, id) => {
            let target = Target::of(writer, id);
            let row = client
                .query_one(&connection.mark_interrupted_in, &target.params())
                .await?;
            claimed(&row)
        }
        Write::AddUsage(owner, day, tokens) => {
            let params: [&(dyn ToSql + Sync); 3] =
                [&key(owner.as_str()), &key(day), &saturating(*tokens)];
            Ok(Ok(client.execute(&connection.add_usage, &params).await?))
        }
        Write::CreateAccount(account) => {
            let username_key = username_key(&account.username);
            let params: [&(dyn ToSql + Sync); 5] = [
                &key(account.id.as_str()),
                &key(&account.username),
                &key(&username_key),
                &account.password_hash,
                &account.created_at.millis(),
            ];
            let rows = client.execute(&connection.create_account, &params).await?;
            Ok(found(rows, StoreError::AlreadyExists))
        }
    }
}

/// The outcome of a write of a conversation: refused when the writer's claim was superseded, else
/// the rows it changed.
fn claimed(row: &Row) -> Result<Outcome, tokio_postgres::Error> {
    let allowed: bool = row.try_get(0)?;
    let rows: i64 = row.try_get(1)?;
    Ok(if allowed {
        Ok(rows.max(0) as u64)
    } else {
        Err(StoreError::Fenced)
    })
}

/// Rows changed, or `refusal` when none were.
fn found(rows: u64, refusal: StoreError) -> Outcome {
    if rows == 0 { Err(refusal) } else { Ok(rows) }
}

/// Messages as one array per column, for [`upsert_messages`]. A message given twice is sent once,
/// in its first place with its last content, status and usage, as saving one after the other
/// would leave it (one statement may not change a row twice).
struct MessageColumns<'a> {
    ids: Vec<&'a str>,
    roles: Vec<&'static str>,
    contents: Vec<&'a [u8]>,
    statuses: Vec<Option<&'static str>>,
    timestamps: Vec<i64>,
    prompt_tokens: Vec<Option<i64>>,
    completion_tokens: Vec<Option<i64>>,
    /// The ids as sent: null for one PostgreSQL text cannot hold, which the insert refuses.
    keys: Vec<Option<&'a str>>,
}

impl<'a> MessageColumns<'a> {
    fn of(messages: &'a [Message]) -> Self {
        let mut columns = MessageColumns {
            ids: Vec::with_capacity(messages.len()),
            roles: Vec::with_capacity(messages.len()),
            contents: Vec::with_capacity(messages.len()),
            statuses: Vec::with_capacity(messages.len()),
            timestamps: Vec::with_capacity(messages.len()),
            prompt_tokens: Vec::with_capacity(messages.len()),
            completion_tokens: Vec::with_capacity(messages.len()),
            keys: Vec::with_capacity(messages.len()),
        };
        for message in messages {
            let status = message.status.map(MessageStatus::as_str);
            let prompt = message.usage.map(|u| saturating(u.prompt_tokens));
            let completion = message.usage.map(|u| saturating(u.completion_tokens));
            if let Some(i) = columns.ids.iter().position(|id| *id == message.id) {
                columns.contents[i] = message.content.as_bytes();
                columns.statuses[i] = status;
                columns.prompt_tokens[i] = prompt;
                columns.completion_tokens[i] = completion;
                continue;
            }
            columns.ids.push(&message.id);
            columns.keys.push(key(&message.id));
            columns.roles.push(message.role.as_str());
            columns.contents.push(message.content.as_bytes());
            columns.statuses.push(status);
            columns.timestamps.push(message.timestamp.millis());
            columns.prompt_tokens.push(prompt);
            columns.completion_tokens.push(completion);
        }
        columns
    }

    /// The parameters of [`CREATE`] or [`SAVE`]: the conversation's (`$1` to `$3`), the time of
    /// its update (`$4`), the messages' (`$5` to `$11`), then `more`.
    fn params<'p>(
        &'p self,
        target: &'p Target,
        updated_at: &'p i64,
        more: &[&'p (dyn ToSql + Sync)],
    ) -> Vec<&'p (dyn ToSql + Sync)> {
        let mut params: Vec<&(dyn ToSql + Sync)> = target.params().to_vec();
        params.extend([
            updated_at as &(dyn ToSql + Sync),
            &self.keys,
            &self.roles,
            &self.contents,
            &self.statuses,
            &self.timestamps,
            &self.prompt_tokens,
            &self.completion_tokens,
        ]);
        params.extend_from_slice(more);
        params
    }
}
