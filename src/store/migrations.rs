//! The schema's migrations for each SQL store, shipped in the binary, and how a SQLite database is
//! brought up to date with them at start-up (PostgreSQL's are applied by
//! [`super::postgres`]).
//!
//! A database records how many migrations it has had in its `user_version` header field. Each
//! pending migration runs once, in order, in a transaction of its own that also moves that
//! number, so a migration is either applied and recorded or not there at all. A database made by
//! the releases that applied their migrations with sqlx lists them in a `_sqlx_migrations` table
//! instead, with the same numbers: it carries on from the last one listed. That table is left in
//! place, so such a release can still open the file as long as the schema has not moved on.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::StoreError;

/// One change to the schema; its version is its place in the list, from 1.
#[derive(Debug, Clone, Copy)]
pub(super) struct Migration {
    /// The name of its file, which starts with its version.
    pub name: &'static str,
    /// The statements it runs.
    pub sql: &'static str,
}

/// Every migration of the SQLite schema, in order.
pub(super) const SQLITE: &[Migration] = &[
    Migration {
        name: "0001_conversations",
        sql: include_str!("migrations/sqlite/0001_conversations.sql"),
    },
    Migration {
        name: "0002_conversation_owners",
        sql: include_str!("migrations/sqlite/0002_conversation_owners.sql"),
    },
    Migration {
        name: "0003_accounts",
        sql: include_str!("migrations/sqlite/0003_accounts.sql"),
    },
    Migration {
        name: "0004_usage",
        sql: include_str!("migrations/sqlite/0004_usage.sql"),
    },
    Migration {
        name: "0005_claims",
        sql: include_str!("migrations/sqlite/0005_claims.sql"),
    },
];

/// Every migration of the PostgreSQL schema, in order.
pub(super) const POSTGRES: &[Migration] = &[Migration {
    name: "0001_schema",
    sql: include_str!("migrations/postgres/0001_schema.sql"),
}];

/// The refusal of a database whose schema has had `applied` migrations, more than the `known`
/// ones of this server: an older server would misread a newer schema.
pub(super) fn newer_than_server(applied: usize, known: usize) -> StoreError {
    StoreError::storage(format!(
        "the database's schema is at version {applied}, newer than this server's {known}"
    ))
}

/// Runs the migrations of `migrations` that the database on `connection` has not had yet. A
/// database whose schema is newer than the last of them is refused.
pub(super) fn apply(
    connection: &mut Connection,
    migrations: &[Migration],
) -> Result<(), StoreError> {
    loop {
        // Immediate: of two servers starting on one file, one migrates while the other waits.
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(failed)?;
        let applied = applied(&tx)?;
        let Some(migration) = migrations.get(applied) else {
            if applied > migrations.len() {
                return Err(newer_than_server(applied, migrations.len()));
            }
            tx.commit().map_err(failed)?;
            return Ok(());
        };
        tx.execute_batch(migration.sql)
            .and_then(|()| tx.pragma_update(None, "user_version", applied as i64 + 1))
            .and_then(|()| tx.commit())
            .map_err(|e| StoreError::storage(format!("migration {}: {e}", migration.name)))?;
        tracing::info!(migration = migration.name, "database migrated");
    }
}

/// How many migrations the database has had: its `user_version`, or for a database sqlx
/// migrated, the last version sqlx lists as applied, which is then recorded as its
/// `user_version`.
fn applied(db: &Connection) -> Result<usize, StoreError> {
    let mut version: i64 = db
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(failed)?;
    if version == 0 && made_by_sqlx(db)? {
        version = db
            .query_row(
                "SELECT coalesce(max(version), 0) FROM _sqlx_migrations WHERE success",
                [],
                |row| row.get(0),
            )
            .map_err(failed)?;
        db.pragma_update(None, "user_version", version)
            .map_err(failed)?;
    }
    usize::try_from(version)
        .map_err(|_| StoreError::storage(format!("unknown schema version {version}")))
}

/// Whether sqlx migrated the database (it has sqlx's table of migrations).
fn made_by_sqlx(db: &Connection) -> Result<bool, StoreError> {
    db.query_row(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        [],
        |_| Ok(()),
    )
    .optional()
    .map(|found| found.is_some())
    .map_err(failed)
}

fn failed(e: rusqlite::Error) -> StoreError {
    StoreError::storage(format!("migrating the database: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_version(db: &Connection) -> i64 {
        db.pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap()
    }

    fn tables(db: &Connection) -> Vec<String> {
        let mut statement = db
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap();
        statement
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    const FIRST: Migration = Migration {
        name: "0001_first",
        sql: "CREATE TABLE first (id INTEGER PRIMARY KEY);",
    };
    const SECOND: Migration = Migration {
        name: "0002_second",
        sql: "CREATE TABLE second (id INTEGER PRIMARY KEY); INSERT INTO first VALUES (1);",
    };

    #[test]
    fn every_file_is_named_after_its_version() {
        for migrations in [SQLITE, POSTGRES] {
            for (index, migration) in migrations.iter().enumerate() {
                assert!(
                    migration.name.starts_with(&format!("{:04}_", index + 1)),
                    "{}",
                    migration.name
                );
            }
        }
    }

    #[test]
    fn each_migration_runs_once_in_order() {
        let mut db = Connection::open_in_memory().unwrap();
        apply(&mut db, &[FIRST]).unwrap();
        assert_eq!(user_version(&db), 1);
        apply(&mut db, &[FIRST, SECOND]).unwrap();
        apply(&mut db, &[FIRST, SECOND]).unwrap();
        assert_eq!(user_version(&db), 2);
        assert_eq!(tables(&db), ["first", "second"]);
        let rows: i64 = db
            .query_row("SELECT count(*) FROM first", [], |row| row.get(0))
            .unwrap();
        assert_eq!(rows, 1);
    }

    #[test]
    fn a_failed_migration_leaves_no_trace() {
        let mut db = Connection::open_in_memory().unwrap();
        let broken = Migration {
            name: "0002_broken",
            sql: "CREATE TABLE second (id INTEGER PRIMARY KEY); INSERT INTO nowhere VALUES (1);",
        };
        let error = apply(&mut db, &[FIRST, broken]).unwrap_err();
        assert!(
            matches!(&error, StoreError::Storage(text) if text.contains("0002_broken")),
            "{error:?}"
        );
        assert_eq!(user_version(&db), 1);
        assert_eq!(tables(&db), ["first"]);
    }

    #[test]
    fn a_schema_newer_than_the_server_is_refused() {
        let mut db = Connection::open_in_memory().unwrap();
        apply(&mut db, &[FIRST, SECOND]).unwrap();
        let error = apply(&mut db, &[FIRST]).unwrap_err();
        assert!(
            matches!(&error, StoreError::Storage(text) if text.contains("version 2")),
            "{error:?}"
        );
        db.pragma_update(None, "user_version", -1).unwrap();
        assert!(apply(&mut db, &[FIRST]).is_err());
    }

    #[test]
    fn a_database_sqlx_migrated_carries_on_after_its_last_migration() {
        let mut db = Connection::open_in_memory().unwrap();
        db.execute_batch(FIRST.sql).unwrap();
        db.execute_batch(
            "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
             installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL, \
             checksum BLOB NOT NULL, execution_time BIGINT NOT NULL); \
             INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (1, 'first', TRUE, x'00', 1);",
        )
        .unwrap();
        apply(&mut db, &[FIRST]).unwrap();
        assert_eq!(user_version(&db), 1);
        apply(&mut db, &[FIRST, SECOND]).unwrap();
        assert_eq!(user_version(&db), 2);
        assert_eq!(tables(&db), ["_sqlx_migrations", "first", "second"]);
    }

    #[test]
    fn conversations_stored_before_owners_belong_to_the_anonymous_user() {
        let mut db = Connection::open_in_memory().unwrap();
        apply(&mut db, &SQLITE[..1]).unwrap();
        db.execute_batch(
            "INSERT INTO conversations VALUES ('c', 'old', 1, 2); \
             INSERT INTO messages VALUES ('m2', 'c', 'user', 'first', NULL, 1); \
             INSERT INTO messages VALUES ('m1', 'c', 'assistant', 'second', 'complete', 2);",
        )
        .unwrap();
        apply(&mut db, &SQLITE[..2]).unwrap();
        let owner: String = db
            .query_row(
                "SELECT owner FROM conversations WHERE id = 'c'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(owner, "");
        let mut statement = db
            .prepare("SELECT id, owner FROM messages WHERE conversation_id = 'c' ORDER BY rowid")
            .unwrap();
        let messages: Vec<(String, String)> = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            messages,
            [("m2".into(), "".into()), ("m1".into(), "".into())]
        );

        // The same id under another owner is another conversation, and deleting one takes its
        // messages alone.
        db.execute_batch(
            "PRAGMA foreign_keys = ON; \
             INSERT INTO conversations VALUES ('ann', 'c', 'ann''s', 3, 3); \
             INSERT INTO messages VALUES ('m3', 'ann', 'c', 'user', 'hers', NULL, 3); \
             DELETE FROM conversations WHERE owner = '' AND id = 'c';",
        )
        .unwrap();
        let left: Vec<String> = db
            .prepare("SELECT id FROM messages")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(left, ["m3"]);
    }
}
