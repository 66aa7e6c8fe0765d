//! The SQL store on an embedded SQLite database: WAL journal, migrations shipped in the binary
//! (see [`super::migrations`]), every statement through rusqlite.
//!
//! A point read runs in the task that asks for it, on a connection of a small read-only pool; a
//! listing, which may read the whole database, runs on the blocking pool; writes run on one
//! connection on a thread of their own. A statement run in place costs microseconds, while a
//! hand-off to a database thread and back costs more and, under load, waits behind busy threads
//! (2,000 conversations activated at once took seconds that way).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use percent_encoding::percent_decode_str;
use rusqlite::{OpenFlags, OptionalExtension, ffi};
use tokio::sync::mpsc;

use super::group_commit::{GroupCommitted, MAX_BATCH, Write, WriteJob, Writes};
use super::{Account, Page, StoreError, Writer, migrations, username_key};
use crate::domain::{Conversation, Message, MessageStatus, MessageUsage, Role, Timestamp, UserId};

/// Conversations in a SQLite file. Writes go to one writer thread that commits whatever is
/// waiting in one transaction (group commit) and answers each write once it is committed; reads
/// use read-only connections of their own.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writes: Writes,
    readers: Arc<Readers>,
}

/// Read-only connections, each used by one read at a time.
#[derive(Debug)]
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<rusqlite::Connection>>,
}

/// Idle read connections kept open at most.
const MAX_IDLE_READERS: usize = 8;

impl Readers {
    /// Runs `read` in one read transaction (one snapshot), on an idle connection or a new one.
    fn read<T>(
        &self,
        read: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let connection = match idle {
            Some(connection) => connection,
            None => {
                let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
                let connection =
                    rusqlite::Connection::open_with_flags(&self.path, flags).map_err(db_error)?;
                connection.busy_timeout(BUSY_TIMEOUT).map_err(db_error)?;
                connection
            }
        };
        let result = connection.unchecked_transaction().and_then(|tx| {
            let value = read(&tx)?;
            tx.commit()?;
            Ok(value)
        });
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE_READERS {
            idle.push(connection);
        }
        result.map_err(db_error)
    }
}

/// How long a connection waits for another one's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The size the WAL file is cut back to after a checkpoint, in bytes.
const WAL_SIZE_LIMIT: u64 = 64 << 20;
/// The least time between two WAL checkpoints.
const CHECKPOINT_PAUSE: Duration = Duration::from_millis(100);

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

/// A connection that may write, creating the file when missing: WAL journal, and waits for
/// other connections' locks. Foreign keys are not enforced yet, as schema changes want.
fn connect(path: &Path) -> Result<rusqlite::Connection, StoreError> {
    let connection = rusqlite::Connection::open(path).map_err(db_error)?;
    connection.busy_timeout(BUSY_TIMEOUT).map_err(db_error)?;
    connection
        .pragma_update(None, "journal_mode", "WAL")
        .map_err(db_error)?;
    Ok(connection)
}

/// A writing connection (the writer's or the checkpointer's): WAL journal, the chosen
/// durability, foreign keys enforced, and the WAL cut back after checkpoints.
fn open_writer(path: &Path, durability: Durability) -> Result<rusqlite::Connection, StoreError> {
    let connection = connect(path)?;
    let synchronous = match durability {
        Durability::Normal => "NORMAL",
        Durability::Full => "FULL",
    };
    connection
        .execute_batch(&format!(
            "PRAGMA synchronous = {synchronous}; PRAGMA foreign_keys = ON; \
             PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};"
        ))
        .map_err(db_error)?;
    connection.set_prepared_statement_cache_capacity(32);
    Ok(connection)
}

fn db_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::storage(format!("database: {e}"))
}

/// A failed statement in the store's words: a primary key or unique constraint means a
/// conversation already stored, a foreign key one a message for a conversation that is not.
fn statement_error(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error().map(|e| e.extended_code) {
        Some(ffi::SQLITE_CONSTRAINT_PRIMARYKEY | ffi::SQLITE_CONSTRAINT_UNIQUE) => {
            StoreError::AlreadyExists
        }
        Some(ffi::SQLITE_CONSTRAINT_FOREIGNKEY) => StoreError::NotFound,
        _ => db_error(e),
    }
}

/// The file a `sqlite:` URL names: `sqlite://data/chat.db` (relative to the working folder) or
/// `sqlite:///var/lib/chat.db`, `%` escapes decoded.
fn database_path(url: &str) -> Result<PathBuf, StoreError> {
    let unsupported = |why: &str| StoreError::UnsupportedUrl(format!("{url:?}: {why}"));
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| unsupported("expected a `sqlite:` URL"))?;
    if path.contains('?') {
        return Err(unsupported("query parameters are not supported"));
    }
    if path.is_empty() || path == ":memory:" {
        return Err(unsupported(
            "expected the path of a file (DATABASE_URL=memory keeps conversations in memory)",
        ));
    }
    let path = percent_decode_str(path)
        .decode_utf8()
        .map_err(|_| unsupported("the path is not UTF-8"))?;
    Ok(PathBuf::from(path.as_ref()))
}

impl SqliteStore {
    /// Opens (creating when missing, with its folder) the database at `url`
    /// (`sqlite://path/to/file.db`), and brings its schema up to date.
    pub async fn open(url: &str, durability: Durability) -> Result<SqliteStore, StoreError> {
        let path = database_path(url)?;
        if let Some(folder) = path.parent()
            && !folder.as_os_str().is_empty()
        {
            std::fs::create_dir_all(folder).map_err(db_error)?;
        }
        migrations::apply(&mut connect(&path)?, migrations::SQLITE)?;
        let writer = open_writer(&path, durability)?;
        writer
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(db_error)?;
        let checkpointer = open_writer(&path, durability)?;
        let readers = Arc::new(Readers {
            path,
            idle: Mutex::new(Vec::new()),
        });
        let (writes, jobs) = Writes::new("database");
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

    /// Runs SQLite's own consistency check; `ok` when the file is sound.
    pub async fn integrity_check(&self) -> Result<String, StoreError> {
        self.readers
            .read(|db| db.query_row("PRAGMA integrity_check", [], |row| row.get(0)))
    }
}

const CONVERSATION_COLUMNS: &str = "SELECT id, title, created_at, updated_at FROM conversations";
const MESSAGE_COLUMNS: &str = "SELECT id, conversation_id, role, content, status, timestamp, \
     prompt_tokens, completion_tokens FROM messages";
/// One owner's conversations of one page, most recently updated first.
const PAGE: &str = "WHERE owner = ?1 ORDER BY updated_at DESC, id DESC LIMIT ?2 OFFSET ?3";

fn conversation_from(row: &rusqlite::Row) -> rusqlite::Result<Conversation> {
    Ok(Conversation {
        id: row.get(0)?,
        title: row.get(1)?,
        messages: Vec::new(),
        created_at: Timestamp::from_millis(row.get(2)?),
        updated_at: Timestamp::from_millis(row.get(3)?),
    })
}

fn message_from(row: &rusqlite::Row) -> rusqlite::Result<Message> {
    let role: String = row.get(2)?;
    let status: Option<String> = row.get(4)?;
    Ok(Message {
        id: row.get(0)?,
        conversation_id: row.get(1)?,
        role: Role::parse(&role).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                2,
                rusqlite::types::Type::Text,
                format!("unknown role {role}").into(),
            )
        })?,
        content: row.get(3)?,
        status: status.as_deref().and_then(MessageStatus::parse),
        timestamp: Timestamp::from_millis(row.get(5)?),
        usage: match (row.get::<_, Option<i64>>(6)?, row.get::<_, Option<i64>>(7)?) {
            (Some(prompt), Some(completion)) => Some(MessageUsage {
                prompt_tokens: prompt.max(0) as u64,
                completion_tokens: completion.max(0) as u64,
            }),
            _ => None,
        },
    })
}

/// Reads rows of a prepared (and cached) statement.
fn rows<T>(
    db: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
    from: impl FnMut(&rusqlite::Row) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    db.prepare_cached(sql)?.query_map(params, from)?.collect()
}

/// One conversation of `owner` with its messages, if it exists.
fn load(
    db: &rusqlite::Connection,
    owner: &UserId,
    id: &str,
) -> rusqlite::Result<Option<Conversation>> {
    let sql = format!("{CONVERSATION_COLUMNS} WHERE owner = ?1 AND id = ?2");
    let key = (owner.as_str(), id);
    let Some(mut conversation) = db
        .prepare_cached(&sql)?
        .query_row(key, conversation_from)
        .optional()?
    else {
        return Ok(None);
    };
    let sql = format!("{MESSAGE_COLUMNS} WHERE owner = ?1 AND conversation_id = ?2 ORDER BY rowid");
    conversation.messages = rows(db, &sql, key, message_from)?;
    Ok(Some(conversation))
}

/// One page of `owner`'s conversations with their messages.
fn list(
    db: &rusqlite::Connection,
    owner: &UserId,
    limit: i64,
    offset: i64,
) -> rusqlite::Result<Vec<Conversation>> {
    let sql = format!("{CONVERSATION_COLUMNS} {PAGE}");
    let page = (owner.as_str(), limit, offset);
    let mut conversations = rows(db, &sql, page, conversation_from)?;
    let position: HashMap<String, usize> = conversations
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.clone(), i))
        .collect();
    let sql = format!(
        "{MESSAGE_COLUMNS} WHERE owner = ?1 \
         AND conversation_id IN (SELECT id FROM conversations {PAGE}) ORDER BY rowid"
    );
    for message in rows(db, &sql, page, message_from)? {
        if let Some(&i) = position.get(&message.conversation_id) {
            conversations[i].messages.push(message);
        }
    }
    Ok(conversations)
}

const ACCOUNT_COLUMNS: &str =
    "SELECT id, username, password_hash, created_at FROM accounts WHERE username_key = ?1";

fn account_from(row: &rusqlite::Row) -> rusqlite::Result<Account> {
    let id: String = row.get(0)?;
    Ok(Account {
        id: UserId::new(id),
        username: row.get(1)?,
        password_hash: row.get(2)?,
        created_at: Timestamp::from_millis(row.get(3)?),
    })
}

#[async_trait]
impl GroupCommitted for SqliteStore {
    fn writes(&self) -> &Writes {
        &self.writes
    }

    async fn load(&self, owner: &UserId, id: &str) -> Result<Option<Conversation>, StoreError> {
        self.readers.read(|db| load(db, owner, id))
    }

    async fn list(&self, owner: &UserId, page: Page) -> Result<Vec<Conversation>, StoreError> {
        let limit = page.limit.map_or(-1, |l| l.min(i64::MAX as usize) as i64);
        let offset = page.offset.min(i64::MAX as usize) as i64;
        // A listing may read the whole database: it runs on the blocking pool, not in the task.
        let readers = self.readers.clone();
        let owner = owner.clone();
        tokio::task::spawn_blocking(move || readers.read(|db| list(db, &owner, limit, offset)))
            .await
            .map_err(db_error)?
    }

    async fn usage(&self, owner: &UserId, day: &str) -> Result<u64, StoreError> {
        let tokens: Option<i64> = self.readers.read(|db| {
            db.prepare_cached("SELECT tokens FROM daily_usage WHERE owner = ?1 AND day = ?2")?
                .query_row((owner.as_str(), day), |row| row.get(0))
                .optional()
        })?;
        Ok(tokens.map_or(0, |t| t.max(0) as u64))
    }

    async fn account(&self, username: &str) -> Result<Option<Account>, StoreError> {
        let key = username_key(username);
        self.readers.read(|db| {
            db.prepare_cached(ACCOUNT_COLUMNS)?
                .query_row([&key], account_from)
                .optional()
        })
    }
}

/// The writer thread: takes every write waiting, commits them in one transaction, then answers
/// each and asks for a checkpoint. A write that fails is undone alone; a failed commit fails
/// them all.
fn write_loop(
    connection: rusqlite::Connection,
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
        let outcomes = match commit(&connection, &batch) {
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
    connection: &rusqlite::Connection,
    batch: &[WriteJob],
) -> Result<Vec<Result<u64, StoreError>>, StoreError> {
    // Immediate: the write lock is taken (waiting behind another process's, up to the busy
    // timeout) before anything is read, so that a batch never fails on upgrading to it.
    control(connection, "BEGIN IMMEDIATE")?;
    let outcomes = batch
        .iter()
        .map(|job| apply_job(connection, &job.write))
        .collect::<Result<Vec<_>, _>>()
        .and_then(|outcomes| control(connection, "COMMIT").map(|()| outcomes));
    if outcomes.is_err() {
        let _ = control(connection, "ROLLBACK");
    }
    outcomes
}

/// Applies one job's write inside the batch's transaction; the outer error is one that ends the
/// whole batch.
fn apply_job(
    connection: &rusqlite::Connection,
    write: &Write,
) -> Result<Result<u64, StoreError>, StoreError> {
    if !write.is_several_rows() {
        // A single statement, or a first one that either fails alone or makes the rest succeed.
        return Ok(apply(connection, write));
    }
    // Rows that stand or fall together: a savepoint undoes a partial write.
    control(connection, "SAVEPOINT job")?;
    let outcome = apply(connection, write);
    if outcome.is_err() {
        control(connection, "ROLLBACK TO job")?;
    }
    control(connection, "RELEASE job")?;
    Ok(outcome)
}

/// Runs a statement that begins or ends a transaction or savepoint, prepared once per connection
/// (parsed anew for every batch, they cost the writer as much as the batch's rows).
fn control(connection: &rusqlite::Connection, sql: &str) -> Result<(), StoreError> {
    connection
        .prepare_cached(sql)
        .and_then(|mut statement| statement.execute([]))
        .map(drop)
        .map_err(db_error)
}

/// Runs one statement of the writer, prepared once per connection; the number is the rows it
/// changed.
fn run(
    tx: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<u64, StoreError> {
    let mut statement = tx.prepare_cached(sql).map_err(db_error)?;
    let rows = statement.execute(params).map_err(statement_error)?;
    Ok(rows as u64)
}

/// Runs one write inside the batch's transaction, once its writer's claim is checked; the number
/// is the rows it changed (for a claim, its fencing token).
fn apply(tx: &rusqlite::Connection, write: &Write) -> Result<u64, StoreError> {
    if let Some((writer, id)) = write.fenced() {
        check_claim(tx, writer, id)?;
    }
    match write {
        Write::Claim(owner, id) => {
            let fence: i64 = tx
                .prepare_cached("UPDATE fence_sequence SET last = last + 1 RETURNING last")
                .and_then(|mut statement| statement.query_row([], |row| row.get(0)))
                .map_err(db_error)?;
            run(
                tx,
                "INSERT INTO claims (owner, id, fence) VALUES (?, ?, ?) \
                 ON CONFLICT (owner, id) DO UPDATE SET fence = excluded.fence",
                (owner.as_str(), id, fence),
            )?;
            Ok(fence.max(0) as u64)
        }
        Write::Create(writer, conversation) => {
            let owner = &writer.owner;
            run(
                tx,
                "INSERT INTO conversations (owner, id, title, created_at, updated_at) \
                 VALUES (?, ?, ?, ?, ?)",
                (
                    owner.as_str(),
                    &conversation.id,
                    &conversation.title,
                    conversation.created_at.millis(),
                    conversation.updated_at.millis(),
                ),
            )?;
            for message in &conversation.messages {
                upsert_message(tx, owner, message)?;
            }
            Ok(1)
        }
        Write::Save(writer, messages, updated_at) => {
            for message in messages {
                upsert_message(tx, &writer.owner, message)?;
            }
            touch(tx, &writer.owner, &messages[0].conversation_id, *updated_at)
        }
        Write::DeleteMessage {
            writer,
            conversation_id,
            message_id,
            updated_at,
        } => {
            run(
                tx,
                "DELETE FROM messages WHERE id = ? AND owner = ? AND conversation_id = ?",
                (message_id, writer.owner.as_str(), conversation_id),
            )?;
            touch(tx, &writer.owner, conversation_id, *updated_at)
        }
        Write::Rename {
            writer,
            id,
            title,
            updated_at,
        } => found(run(
            tx,
            "UPDATE conversations SET title = ?, updated_at = ? WHERE owner = ? AND id = ?",
            (title, updated_at.millis(), writer.owner.as_str(), id),
        )?),
        Write::DeleteConversation(writer, id) => run(
            tx,
            "DELETE FROM conversations WHERE owner = ? AND id = ?",
            (writer.owner.as_str(), id),
        ),
        Write::MarkInterrupted => run(
            tx,
            "UPDATE messages SET status = 'error' WHERE status = 'streaming'",
            [],
        ),
        Write::MarkInterruptedIn(writer, id) => run(
            tx,
            "UPDATE messages SET status = 'error' \
             WHERE owner = ? AND conversation_id = ? AND status = 'streaming'",
            (writer.owner.as_str(), id),
        ),
        Write::AddUsage(owner, day, tokens) => run(
            tx,
            "INSERT INTO daily_usage (owner, day, tokens) VALUES (?, ?, ?) \
             ON CONFLICT (owner, day) DO UPDATE SET tokens = tokens + excluded.tokens",
            (
                owner.as_str(),
                day,
                i64::try_from(*tokens).unwrap_or(i64::MAX),
            ),
        ),
        Write::CreateAccount(account) => run(
            tx,
            "INSERT INTO accounts (id, username, username_key, password_hash, created_at) \
             VALUES (?, ?, ?, ?, ?)",
            (
                account.id.as_str(),
                &account.username,
                username_key(&account.username),
                &account.password_hash,
                account.created_at.millis(),
            ),
        ),
    }
}

/// Refuses a write whose writer holds a claim on conversation `id` that is not the latest one.
fn check_claim(tx: &rusqlite::Connection, writer: &Writer, id: &str) -> Result<(), StoreError> {
    let Some(fence) = writer.fence else {
        return Ok(());
    };
    let claimed: Option<i64> = tx
        .prepare_cached("SELECT fence FROM claims WHERE owner = ?1 AND id = ?2")
        .and_then(|mut statement| {
            statement
                .query_row((writer.owner.as_str(), id), |row| row.get(0))
                .optional()
        })
        .map_err(db_error)?;
    if claimed.is_some_and(|claimed| claimed as u64 == fence) {
        Ok(())
    } else {
        Err(StoreError::Fenced)
    }
}

/// Rows changed, or not found when none were.
fn found(rows: u64) -> Result<u64, StoreError> {
    if rows == 0 {
        Err(StoreError::NotFound)
    } else {
        Ok(rows)
    }
}

/// Inserts a message of `owner`'s conversation, or replaces the content and status of the
/// stored one (only if it is that conversation's).
fn upsert_message(
    tx: &rusqlite::Connection,
    owner: &UserId,
    message: &Message,
) -> Result<(), StoreError> {
    run(
        tx,
        "INSERT INTO messages (id, owner, conversation_id, role, content, status, timestamp, \
         prompt_tokens, completion_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (id) DO UPDATE SET content = excluded.content, status = excluded.status, \
         prompt_tokens = excluded.prompt_tokens, completion_tokens = excluded.completion_tokens \
         WHERE owner = excluded.owner AND conversation_id = excluded.conversation_id",
        (
            &message.id,
            owner.as_str(),
            &message.conversation_id,
            message.role.as_str(),
            &message.content,
            message.status.map(MessageStatus::as_str),
            message.timestamp.millis(),
            message
                .usage
                .map(|u| i64::try_from(u.prompt_tokens).unwrap_or(i64::MAX)),
            message
                .usage
                .map(|u| i64::try_from(u.completion_tokens).unwrap_or(i64::MAX)),
        ),
    )
    .map(drop)
}

/// Moves a conversation's `updated_at`; not found when it does not exist.
fn touch(
    tx: &rusqlite::Connection,
    owner: &UserId,
    id: &str,
    updated_at: Timestamp,
) -> Result<u64, StoreError> {
    found(run(
        tx,
        "UPDATE conversations SET updated_at = ? WHERE owner = ? AND id = ?",
        (updated_at.millis(), owner.as_str(), id),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ConversationStore;

    #[test]
    fn a_sqlite_url_names_a_file() {
        let path = |url| database_path(url).map(|p| p.display().to_string());
        assert_eq!(path("sqlite://data/chat.db").unwrap(), "data/chat.db");
        assert_eq!(path("sqlite:data/chat.db").unwrap(), "data/chat.db");
        assert_eq!(
            path("sqlite:///var/lib/chat.db").unwrap(),
            "/var/lib/chat.db"
        );
        assert_eq!(
            path("sqlite://my%20data/chat.db").unwrap(),
            "my data/chat.db"
        );
        for url in [
            "sqlite://",
            "sqlite::memory:",
            "sqlite://chat.db?mode=ro",
            "sqlite://%FF",
        ] {
            assert!(
                matches!(database_path(url), Err(StoreError::UnsupportedUrl(_))),
                "{url}"
            );
        }
    }

    #[tokio::test]
    async fn opening_creates_the_database_and_its_folder_with_the_whole_schema() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("new").join("folder").join("chat.db");
        let url = format!("sqlite://{}", file.display());
        let store = SqliteStore::open(&url, Durability::Full).await.unwrap();
        drop(store);
        let store = SqliteStore::open(&url, Durability::Normal).await.unwrap();
        assert_eq!(store.integrity_check().await.unwrap(), "ok");

        let db = rusqlite::Connection::open(&file).unwrap();
        let journal: String = db
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .unwrap();
        assert_eq!(journal, "wal");
        let version: i64 = db
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, migrations::SQLITE.len() as i64);
    }

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
            store
                .create_conversation(&Writer::unfenced(&UserId::anonymous()), &conversation)
                .await
                .unwrap();
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
