//! The SQL store on a PostgreSQL server (`DATABASE_URL=postgres://...`), through tokio-postgres.
//!
//! The schema is brought up to date at start-up ([`server::migrate`]). Writes go to one writer
//! connection that commits whatever is waiting in one transaction (group commit, see
//! [`writer`]); reads run on a pool of connections, each read one statement, so one snapshot.
//!
//! PostgreSQL's text cannot hold U+0000: titles and contents, which are any text a client sends,
//! are stored as UTF-8 in bytea. Ids, owners and usernames stay text; one holding U+0000 names
//! nothing stored, so a read of it finds nothing, and a write that would store it fails.

mod server;
#[cfg(test)]
pub(super) mod test_database;
mod writer;

use async_trait::async_trait;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::group_commit::{GroupCommitted, Writes};
use super::{Account, Page, StoreError, migrations, username_key};
use crate::domain::{Conversation, Message, MessageStatus, MessageUsage, Role, Timestamp, UserId};
use server::{Server, describe};

/// Pooled read connections at most.
const POOL_SIZE: usize = 8;

/// Conversations and accounts in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    writes: Writes,
    readers: deadpool_postgres::Pool,
}

impl PostgresStore {
    /// Connects to the database `url` names (`postgres://user:password@host:port/database`;
    /// `?options=-csearch_path%3Dname` puts the store in schema `name`), and brings its schema
    /// up to date. Errors name the server by scheme, host and database alone, never the password.
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let server = Server::parse(url)?;
        let mut client = server.connect().await?;
        server::migrate(&mut client, migrations::POSTGRES).await?;
        let connection = writer::Connection::prepare(client, &server).await?;
        let readers = server.pool(POOL_SIZE)?;
        let (writes, jobs) = Writes::new("PostgreSQL");
        tokio::spawn(writer::write_loop(server, connection, jobs));
        Ok(PostgresStore { writes, readers })
    }

    /// The rows of one read, on a pooled connection, its statement prepared once per connection.
    async fn read(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.readers.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => failed(&e),
            e => StoreError::storage(format!("PostgreSQL: {e}")),
        })?;
        let statement = client.prepare_cached(sql).await.map_err(|e| failed(&e))?;
        client
            .query(&statement, params)
            .await
            .map_err(|e| failed(&e))
    }
}

/// A failed statement, in the store's words.
fn failed(e: &tokio_postgres::Error) -> StoreError {
    StoreError::storage(format!("PostgreSQL: {}", describe(e)))
}

/// `text` as a parameter: null when PostgreSQL's text cannot hold it (it has U+0000), so it
/// matches nothing stored and cannot be stored.
fn key(text: &str) -> Option<&str> {
    (!text.contains('\0')).then_some(text)
}

/// A count of tokens as a bigint, at most `i64::MAX`.
fn saturating(tokens: u64) -> i64 {
    i64::try_from(tokens).unwrap_or(i64::MAX)
}

/// The columns of a read of conversations: a conversation's and one of its messages' (null for a
/// conversation without any), one row per message.
macro_rules! conversation_rows {
    () => {
        "SELECT c.id, c.title, c.created_at, c.updated_at, m.id, m.role, m.content, m.status, \
         m.timestamp, m.prompt_tokens, m.completion_tokens"
    };
}

/// `$1`'s conversation `$2` with its messages in order.
const LOAD: &str = concat!(
    conversation_rows!(),
    " FROM conversations c \
     LEFT JOIN messages m ON m.owner = c.owner AND m.conversation_id = c.id \
     WHERE c.owner = $1 AND c.id = $2 ORDER BY m.seq"
);
/// A page of `$1`'s conversations (`$2` at most, null for all; `$3` skipped), most recently
/// updated first, each with its messages in order: one statement, however long the page.
const LIST: &str = concat!(
    "WITH c AS (SELECT owner, id, title, created_at, updated_at FROM conversations \
     WHERE owner = $1 ORDER BY updated_at DESC, id DESC LIMIT $2 OFFSET $3) ",
    conversation_rows!(),
    " FROM c LEFT JOIN messages m ON m.owner = c.owner AND m.conversation_id = c.id \
     ORDER BY c.updated_at DESC, c.id DESC, m.seq"
);
const USAGE: &str = "SELECT tokens FROM daily_usage WHERE owner = $1 AND day = $2";
const ACCOUNT: &str = "SELECT id, username, password_hash, created_at FROM accounts \
     WHERE username_key = $1";

/// The conversations of rows of [`conversation_rows`], in the rows' order: a conversation's rows
/// come one after the other.
fn conversations_from(rows: &[Row]) -> Result<Vec<Conversation>, StoreError> {
    let mut conversations: Vec<Conversation> = Vec::new();
    for row in rows {
        let id: &str = row.try_get(0).map_err(|e| failed(&e))?;
        if conversations.last().is_none_or(|c| c.id != id) {
            conversations.push(Conversation {
                id: id.to_owned(),
                title: text(row, 1)?,
                messages: Vec::new(),
                created_at: Timestamp::from_millis(row.try_get(2).map_err(|e| failed(&e))?),
                updated_at: Timestamp::from_millis(row.try_get(3).map_err(|e| failed(&e))?),
            });
        }
        let message_id: Option<String> = row.try_get(4).map_err(|e| failed(&e))?;
        if let (Some(message_id), Some(conversation)) = (message_id, conversations.last_mut()) {
            let message = message_from(row, message_id, &conversation.id)?;
            conversation.messages.push(message);
        }
    }
    Ok(conversations)
}

/// The message `id` of conversation `conversation_id` in a row of [`conversation_rows`].
fn message_from(row: &Row, id: String, conversation_id: &str) -> Result<Message, StoreError> {
    let column = |e: tokio_postgres::Error| failed(&e);
    let role: &str = row.try_get(5).map_err(column)?;
    let status: Option<&str> = row.try_get(7).map_err(column)?;
    let prompt: Option<i64> = row.try_get(9).map_err(column)?;
    let completion: Option<i64> = row.try_get(10).map_err(column)?;
    Ok(Message {
        id,
        conversation_id: conversation_id.to_owned(),
        role: Role::parse(role)
            .ok_or_else(|| StoreError::storage(format!("PostgreSQL: unknown role {role:?}")))?,
        content: text(row, 6)?,
        status: status.and_then(MessageStatus::parse),
        timestamp: Timestamp::from_millis(row.try_get(8).map_err(column)?),
        usage: prompt
            .zip(completion)
            .map(|(prompt, completion)| MessageUsage {
                prompt_tokens: prompt.max(0) as u64,
                completion_tokens: completion.max(0) as u64,
            }),
    })
}

/// The text stored as UTF-8 bytes in column `index`.
fn text(row: &Row, index: usize) -> Result<String, StoreError> {
    let bytes: Vec<u8> = row.try_get(index).map_err(|e| failed(&e))?;
    String::from_utf8(bytes)
        .map_err(|_| StoreError::storage("PostgreSQL: stored text is not UTF-8"))
}

#[async_trait]
impl GroupCommitted for PostgresStore {
    fn writes(&self) -> &Writes {
        &self.writes
    }

    async fn load(&self, owner: &UserId, id: &str) -> Result<Option<Conversation>, StoreError> {
        let rows = self.read(LOAD, &[&key(owner.as_str()), &key(id)]).await?;
        Ok(conversations_from(&rows)?.into_iter().next())
    }

    async fn list(&self, owner: &UserId, page: Page) -> Result<Vec<Conversation>, StoreError> {
        let limit = page
            .limit
            .map(|limit| i64::try_from(limit).unwrap_or(i64::MAX));
        let offset = i64::try_from(page.offset).unwrap_or(i64::MAX);
        let rows = self
            .read(LIST, &[&key(owner.as_str()), &limit, &offset])
            .await?;
        conversations_from(&rows)
    }

    async fn usage(&self, owner: &UserId, day: &str) -> Result<u64, StoreError> {
        let rows = self.read(USAGE, &[&key(owner.as_str()), &key(day)]).await?;
        let tokens: Option<i64> = match rows.first() {
            Some(row) => Some(row.try_get(0).map_err(|e| failed(&e))?),
            None => None,
        };
        Ok(tokens.map_or(0, |tokens| tokens.max(0) as u64))
    }

    async fn account(&self, username: &str) -> Result<Option<Account>, StoreError> {
        let username_key = username_key(username);
        let rows = self.read(ACCOUNT, &[&key(&username_key)]).await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let column = |e: tokio_postgres::Error| failed(&e);
        Ok(Some(Account {
            id: UserId::new(row.try_get::<_, &str>(0).map_err(column)?),
            username: row.try_get(1).map_err(column)?,
            password_hash: row.try_get(2).map_err(column)?,
            created_at: Timestamp::from_millis(row.try_get(3).map_err(column)?),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::test_database::TestDatabase;
    use super::*;
    use crate::store::{ConversationStore, Writer};

    fn ann() -> Writer {
        Writer::unfenced(&UserId::new("ann"))
    }

    #[test]
    fn a_server_is_named_by_scheme_host_and_database_alone() {
        let name = |url| Server::parse(url).map(|server| server.name().to_owned());
        assert_eq!(
            name("postgres://admin:hunter2@db.internal:6432/chat?options=-csearch_path%3Dx"),
            Ok("postgres://db.internal:6432/chat".into())
        );
        assert_eq!(
            name("postgresql://admin@db/chat"),
            Ok("postgresql://db:5432/chat".into())
        );
        for url in [
            "postgres:chat",
            "postgres://admin:hunter2@db:port/chat",
            "postgres://admin:hunter2@db/chat?unknown=hunter2",
        ] {
            let refused = Server::parse(url).map(|server| server.name().to_owned());
            assert!(
                matches!(&refused, Err(StoreError::UnsupportedUrl(text)) if !text.contains("hunter2")),
                "{url}: {refused:?}"
            );
        }
    }

    /// The versions the schema of `database` records.
    async fn versions(database: &TestDatabase) -> Vec<i32> {
        let server = Server::parse(&database.url).unwrap();
        let client = server.connect().await.unwrap();
        client
            .query(
                "SELECT version FROM schema_migrations ORDER BY version",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    #[tokio::test]
    async fn servers_starting_together_migrate_once() {
        let database = TestDatabase::create().await;
        let opened =
            futures::future::join_all((0..4).map(|_| PostgresStore::open(&database.url))).await;
        assert!(opened.iter().all(Result::is_ok), "{opened:?}");
        let expected: Vec<i32> = (1..=migrations::POSTGRES.len() as i32).collect();
        assert_eq!(versions(&database).await, expected);
        PostgresStore::open(&database.url).await.unwrap();
        assert_eq!(versions(&database).await, expected);
    }

    #[tokio::test]
    async fn a_schema_newer_than_the_server_is_refused() {
        let database = TestDatabase::create().await;
        PostgresStore::open(&database.url).await.unwrap();
        database
            .execute("INSERT INTO schema_migrations (version, name) VALUES (999, '0999_future')")
            .await
            .unwrap();
        let refused = PostgresStore::open(&database.url).await.unwrap_err();
        assert!(
            matches!(&refused, StoreError::Storage(text) if text.contains("version 999")),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn a_failed_migration_leaves_no_trace() {
        let database = TestDatabase::create().await;
        let server = Server::parse(&database.url).unwrap();
        let mut client = server.connect().await.unwrap();
        let first = migrations::Migration {
            name: "0001_first",
            sql: "CREATE TABLE first (id integer)",
        };
        let broken = migrations::Migration {
            name: "0002_broken",
            sql: "CREATE TABLE second (id integer); INSERT INTO nowhere VALUES (1)",
        };
        let refused = server::migrate(&mut client, &[first, broken])
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, StoreError::Storage(text) if text.contains("0002_broken")),
            "{refused:?}"
        );
        assert_eq!(versions(&database).await, [1]);
        let tables: Vec<String> = client
            .query(
                "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema() \
                 ORDER BY tablename",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(tables, ["first", "schema_migrations"]);
    }

    #[tokio::test]
    async fn a_write_that_fails_fails_alone_in_its_batch() {
        let database = TestDatabase::create().await;
        let store = PostgresStore::open(&database.url).await.unwrap();
        let a = Conversation::new("a".into(), "first");
        let b = Conversation::new("b".into(), "second");
        // A claim cannot store an id holding U+0000: its statement fails, aborting the
        // transaction the writes sent with it share.
        let writer = ann();
        let (created, refused, other) = tokio::join!(
            store.create_conversation(&writer, &a),
            store.claim(&writer.owner, "c\u{0}"),
            store.create_conversation(&writer, &b),
        );
        assert_eq!(created, Ok(()));
        assert!(
            matches!(refused, Err(StoreError::Storage(_))),
            "{refused:?}"
        );
        assert_eq!(other, Ok(()));
        let listed = store
            .list_conversations(&ann().owner, Page::default())
            .await
            .unwrap();
        assert_eq!(listed.len(), 2);
    }

    #[tokio::test]
    async fn two_servers_on_one_database_fence_each_other() {
        let database = TestDatabase::create().await;
        let first = PostgresStore::open(&database.url).await.unwrap();
        let second = PostgresStore::open(&database.url).await.unwrap();
        let owner = UserId::new("ann");
        let old = first.claim(&owner, "a").await.unwrap();
        let writer = Writer {
            owner: owner.clone(),
            fence: Some(old),
        };
        first
            .create_conversation(&writer, &Conversation::new("a".into(), "first"))
            .await
            .unwrap();
        let new = second.claim(&owner, "a").await.unwrap();
        assert!(new > old);
        assert_eq!(
            first
                .rename_conversation(&writer, "a", "stale", Timestamp::now())
                .await,
            Err(StoreError::Fenced)
        );
        let writer = Writer {
            owner: owner.clone(),
            fence: Some(new),
        };
        second
            .rename_conversation(&writer, "a", "renamed", Timestamp::now())
            .await
            .unwrap();
        let loaded = first.load_conversation(&owner, "a").await.unwrap();
        assert_eq!(loaded.unwrap().title, "renamed");
    }

    #[tokio::test]
    async fn the_writer_reconnects_after_its_connection_breaks() {
        let database = TestDatabase::create().await;
        let store = PostgresStore::open(&database.url).await.unwrap();
        let a = Conversation::new("a".into(), "first");
        store.create_conversation(&ann(), &a).await.unwrap();

        // As a restart of PostgreSQL would: every connection of the store ends.
        database.disconnect_all().await.unwrap();
        let writer = ann();
        let renamed = |title| store.rename_conversation(&writer, "a", title, a.updated_at);
        let in_flight = renamed("lost").await;
        assert!(
            matches!(&in_flight, Err(StoreError::Storage(_))),
            "{in_flight:?}"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while renamed("renamed").await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "never reconnected");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let loaded = store.load_conversation(&ann().owner, "a").await.unwrap();
        assert_eq!(loaded.unwrap().title, "renamed");
    }
}
