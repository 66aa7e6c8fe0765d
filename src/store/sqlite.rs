//! The SQL store on an embedded SQLite database: WAL journal, migrations shipped in the binary.
//!
//! Reads and migrations go through sqlx's async pool. Writes go through one rusqlite connection
//! on a thread of its own: a serial writer gains nothing from async, and a statement run in place
//! costs a few microseconds where a hop to sqlx's connection thread costs tens.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row};
use tokio::sync::{mpsc, oneshot};

use super::{ConversationStore, Page};
use crate::domain::{Conversation, Message, MessageStatus, Role, Timestamp};
use crate::error::ApiError;

/// Conversations in a SQLite file. Writes go to one writer thread that commits whatever is
/// waiting in one transaction (group commit) and answers each write once it is committed; reads
/// use a few connections of their own.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writes: mpsc::Sender<WriteJob>,
    readers: SqlitePool,
}

/// How long a connection waits for another one's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The size the WAL file is cut back to after a checkpoint, in bytes.
const WAL_SIZE_LIMIT: u64 = 64 << 20;
/// The least time between two WAL checkpoints.
const CHECKPOINT_PAUSE: Duration = Duration::from_millis(100);

/// Writes committed together at most.
const MAX_BATCH: usize = 256;

/// One change to the database.
#[derive(Debug)]
enum Write {
    Create(Conversation),
    Save(Message, Timestamp),
    DeleteMessage {
        conversation_id: String,
        message_id: String,
        updated_at: Timestamp,
    },
    Rename {
        id: String,
        title: String,
        updated_at: Timestamp,
    },
    DeleteConversation(String),
    MarkInterrupted,
}

/// A write and where its outcome (rows changed) goes once committed.
#[derive(Debug)]
struct WriteJob {
    write: Write,
    done: oneshot::Sender<Result<u64, ApiError>>,
}

/// How hard each commit waits for the disk (`SQLITE_SYNCHRONOUS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Survives a crash or kill of the process; a power cut may lose the last commits.
    Normal,
    /// Survives a power cut too; every commit waits for the disk.
    Full,
}

impl FromStr for Durability {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "normal" => Ok(Durability::Normal),
            "full" => Ok(Durability::Full),
            _ => Err("expected normal or full".into()),
        }
    }
}

/// A writing connection (the writer's or the checkpointer's), with the readers' settings.
fn open_writer(path: &Path, durability: Durability) -> Result<rusqlite::Connection, ApiError> {
    let connection = rusqlite::Connection::open(path).map_err(db_error)?;
    connection.busy_timeout(BUSY_TIMEOUT).map_err(db_error)?;
    let synchronous = match durability {
        Durability::Normal => "NORMAL",
        Durability::Full => "FULL",
    };
    connection
        .execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; \
             PRAGMA foreign_keys = ON; PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};"
        ))
        .map_err(db_error)?;
    connection.set_prepared_statement_cache_capacity(16);
    Ok(connection)
}

fn db_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("database: {e}"))
}

impl SqliteStore {
    /// Opens (creating when missing, with its folder) the database at `url`
    /// (`sqlite://path/to/file.db`), and brings its schema up to date.
    pub async fn open(url: &str, durability: Durability) -> Result<SqliteStore, ApiError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(db_error)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match durability {
                Durability::Normal => SqliteSynchronous::Normal,
                Durability::Full => SqliteSynchronous::Full,
            })
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        if let Some(folder) = Path::new(options.get_filename()).parent()
            && !folder.as_os_str().is_empty()
        {
            std::fs::create_dir_all(folder).map_err(db_error)?;
        }
        let migrator = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(db_error)?;
        sqlx::migrate!("src/store/migrations")
            .run(&migrator)
            .await
            .map_err(db_error)?;
        migrator.close().await;
        let path = options.get_filename();
        let writer = open_writer(path, durability)?;
        writer
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(db_error)?;
        let checkpointer = open_writer(path, durability)?;
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await
            .map_err(db_error)?;
        let (writes, jobs) = mpsc::channel(MAX_BATCH * 4);
        let (checkpoints, requests) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(checkpointer, requests))
            .map_err(db_error)?;
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || write_loop(writer, jobs, checkpoints))
            .map_err(db_error)?;
        Ok(SqliteStore { writes, readers })
    }

    /// Hands a write to the writer thread and waits until it is committed.
    async fn write(&self, write: Write) -> Result<u64, ApiError> {
        let (done, outcome) = oneshot::channel();
        self.writes
            .send(WriteJob { write, done })
            .await
            .map_err(|_| db_error("the writer has stopped"))?;
        outcome
            .await
            .map_err(|_| db_error("the writer has stopped"))?
    }

    /// Runs SQLite's own consistency check; `ok` when the file is sound.
    pub async fn integrity_check(&self) -> Result<String, ApiError> {
        sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&self.readers)
            .await
            .map_err(db_error)
    }

    /// Fills `conversations` with their messages, in order.
    async fn with_messages(
        &self,
        mut conversations: Vec<Conversation>,
    ) -> Result<Vec<Conversation>, ApiError> {
        if conversations.is_empty() {
            return Ok(conversations);
        }
        let mut query = QueryBuilder::new(
            "SELECT id, conversation_id, role, content, status, timestamp FROM messages \
             WHERE conversation_id IN (",
        );
        let mut ids = query.separated(", ");
        for conversation in &conversations {
            ids.push_bind(conversation.id.clone());
        }
        query.push(") ORDER BY rowid");
        let rows = query
            .build()
            .fetch_all(&self.readers)
            .await
            .map_err(db_error)?;
        let position: HashMap<String, usize> = conversations
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.clone(), i))
            .collect();
        for row in rows {
            let message = message_from(&row)?;
            if let Some(&i) = position.get(&message.conversation_id) {
                conversations[i].messages.push(message);
            }
        }
        Ok(conversations)
    }
}

fn conversation_from(row: &SqliteRow) -> Conversation {
    Conversation {
        id: row.get("id"),
        title: row.get("title"),
        messages: Vec::new(),
        created_at: Timestamp::from_millis(row.get("created_at")),
        updated_at: Timestamp::from_millis(row.get("updated_at")),
    }
}

fn message_from(row: &SqliteRow) -> Result<Message, ApiError> {
    let role: String = row.get("role");
    let status: Option<String> = row.get("status");
    Ok(Message {
        id: row.get("id"),
        conversation_id: row.get("conversation_id"),
        role: Role::parse(&role).ok_or_else(|| db_error(format!("unknown role {role}")))?,
        content: row.get("content"),
        status: status.as_deref().and_then(MessageStatus::parse),
        timestamp: Timestamp::from_millis(row.get("timestamp")),
    })
}

#[async_trait]
impl ConversationStore for SqliteStore {
    async fn create_conversation(&self, conversation: &Conversation) -> Result<(), ApiError> {
        self.write(Write::Create(conversation.clone()))
            .await
            .map(drop)
    }

    async fn load_conversation(&self, id: &str) -> Result<Option<Conversation>, ApiError> {
        let row =
            sqlx::query("SELECT id, title, created_at, updated_at FROM conversations WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.readers)
                .await
                .map_err(db_error)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut loaded = self.with_messages(vec![conversation_from(&row)]).await?;
        Ok(loaded.pop())
    }

    async fn list_conversations(&self, page: Page) -> Result<Vec<Conversation>, ApiError> {
        let limit = page.limit.map_or(-1, |l| l.min(i64::MAX as usize) as i64);
        let rows = sqlx::query(
            "SELECT id, title, created_at, updated_at FROM conversations \
             ORDER BY updated_at DESC, id DESC LIMIT ? OFFSET ?",
        )
        .bind(limit)
        .bind(page.offset.min(i64::MAX as usize) as i64)
        .fetch_all(&self.readers)
        .await
        .map_err(db_error)?;
        self.with_messages(rows.iter().map(conversation_from).collect())
            .await
    }

    async fn save_message(&self, message: &Message, updated_at: Timestamp) -> Result<(), ApiError> {
        self.write(Write::Save(message.clone(), updated_at))
            .await
            .map(drop)
    }

    async fn delete_message(
        &self,
        conversation_id: &str,
        message_id: &str,
        updated_at: Timestamp,
    ) -> Result<(), ApiError> {
        self.write(Write::DeleteMessage {
            conversation_id: conversation_id.to_owned(),
            message_id: message_id.to_owned(),
            updated_at,
        })
        .await
        .map(drop)
    }

    async fn rename_conversation(
        &self,
        id: &str,
        title: &str,
        updated_at: Timestamp,
    ) -> Result<(), ApiError> {
        self.write(Write::Rename {
            id: id.to_owned(),
            title: title.to_owned(),
            updated_at,
        })
        .await
        .map(drop)
    }

    async fn delete_conversation(&self, id: &str) -> Result<bool, ApiError> {
        let deleted = self.write(Write::DeleteConversation(id.to_owned())).await?;
        Ok(deleted > 0)
    }

    async fn mark_interrupted(&self) -> Result<u64, ApiError> {
        self.write(Write::MarkInterrupted).await
    }
}

/// The writer thread: takes every write waiting, commits them in one transaction, then answers
/// each and asks for a checkpoint. A write that fails is undone alone; a failed commit fails
/// them all.
fn write_loop(
    mut connection: rusqlite::Connection,
    mut jobs: mpsc::Receiver<WriteJob>,
    checkpoints: std::sync::mpsc::SyncSender<()>,
) {
    while let Some(first) = jobs.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH
            && let Ok(job) = jobs.try_recv()
        {
            batch.push(job);
        }
        let outcomes = match commit(&mut connection, &batch) {
            Ok(outcomes) => outcomes,
            Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
        };
        for (job, outcome) in batch.into_iter().zip(outcomes) {
            let _ = job.done.send(outcome);
        }
        let _ = checkpoints.try_send(());
    }
}

/// The checkpointer thread: copies the WAL's committed pages into the database file while the
/// writer goes on, at most once per [`CHECKPOINT_PAUSE`]. Left to the writer, SQLite's automatic
/// checkpoint would stall every write behind it for tens of milliseconds. Ends with the writer.
fn checkpoint_loop(connection: rusqlite::Connection, requests: std::sync::mpsc::Receiver<()>) {
    while requests.recv().is_ok() {
        if let Err(e) = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
        std::thread::sleep(CHECKPOINT_PAUSE);
    }
}

fn commit(
    connection: &mut rusqlite::Connection,
    batch: &[WriteJob],
) -> Result<Vec<Result<u64, ApiError>>, ApiError> {
    let mut tx = connection.transaction().map_err(db_error)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for job in batch {
        let outcome = match &job.write {
            // Several rows that stand or fall together: a savepoint undoes a partial insert.
            Write::Create(_) => {
                let savepoint = tx.savepoint().map_err(db_error)?;
                let outcome = apply(&savepoint, &job.write);
                if outcome.is_ok() {
                    savepoint.commit().map_err(db_error)?;
                }
                outcome
            }
            // Their first statement either fails alone or makes the rest succeed.
            _ => apply(&tx, &job.write),
        };
        outcomes.push(outcome);
    }
    tx.commit().map_err(db_error)?;
    Ok(outcomes)
}

/// Runs one statement of the writer, prepared once per connection; the number is the rows it
/// changed.
fn run(
    tx: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<u64, ApiError> {
    let mut statement = tx.prepare_cached(sql).map_err(db_error)?;
    let rows = statement.execute(params).map_err(db_error)?;
    Ok(rows as u64)
}

/// Runs one write inside the batch's transaction; the number is the rows it changed.
fn apply(tx: &rusqlite::Connection, write: &Write) -> Result<u64, ApiError> {
    match write {
        Write::Create(conversation) => {
            run(
                tx,
                "INSERT INTO conversations (id, title, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (
                    &conversation.id,
                    &conversation.title,
                    conversation.created_at.millis(),
                    conversation.updated_at.millis(),
                ),
            )?;
            for message in &conversation.messages {
                upsert_message(tx, message)?;
            }
            Ok(1)
        }
        Write::Save(message, updated_at) => {
            upsert_message(tx, message)?;
            touch(tx, &message.conversation_id, *updated_at)
        }
        Write::DeleteMessage {
            conversation_id,
            message_id,
            updated_at,
        } => {
            run(
                tx,
                "DELETE FROM messages WHERE id = ? AND conversation_id = ?",
                (message_id, conversation_id),
            )?;
            touch(tx, conversation_id, *updated_at)
        }
        Write::Rename {
            id,
            title,
            updated_at,
        } => found(run(
            tx,
            "UPDATE conversations SET title = ?, updated_at = ? WHERE id = ?",
            (title, updated_at.millis(), id),
        )?),
        Write::DeleteConversation(id) => run(tx, "DELETE FROM conversations WHERE id = ?", [id]),
        Write::MarkInterrupted => run(
            tx,
            "UPDATE messages SET status = 'error' WHERE status = 'streaming'",
            [],
        ),
    }
}

/// Rows changed, or not found when none were.
fn found(rows: u64) -> Result<u64, ApiError> {
    if rows == 0 {
        Err(ApiError::ConversationNotFound)
    } else {
        Ok(rows)
    }
}

/// Inserts a message, or replaces the content and status of the stored one.
fn upsert_message(tx: &rusqlite::Connection, message: &Message) -> Result<(), ApiError> {
    run(
        tx,
        "INSERT INTO messages (id, conversation_id, role, content, status, timestamp) \
         VALUES (?, ?, ?, ?, ?, ?) \
         ON CONFLICT (id) DO UPDATE SET content = excluded.content, status = excluded.status",
        (
            &message.id,
            &message.conversation_id,
            message.role.as_str(),
            &message.content,
            message.status.map(MessageStatus::as_str),
            message.timestamp.millis(),
        ),
    )
    .map(drop)
}

/// Moves a conversation's `updated_at`; not found when it does not exist.
fn touch(tx: &rusqlite::Connection, id: &str, updated_at: Timestamp) -> Result<u64, ApiError> {
    found(run(
        tx,
        "UPDATE conversations SET updated_at = ? WHERE id = ?",
        (updated_at.millis(), id),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn committed_pages_reach_the_database_file_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("chat.db");
        let url = format!("sqlite://{}", file.display());
        let store = SqliteStore::open(&url, Durability::Normal).await.unwrap();
        let before = std::fs::metadata(&file).unwrap().len();
        for i in 0..200 {
            let mut conversation = Conversation::new(format!("c{i}"), "title");
            conversation.messages.push(Message::new(
                &conversation.id,
                Role::User,
                "y".repeat(1000),
            ));
            store.create_conversation(&conversation).await.unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::metadata(&file).unwrap().len() < before + 200 * 1000 {
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL was never checkpointed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(store.integrity_check().await.unwrap(), "ok");
    }
}
