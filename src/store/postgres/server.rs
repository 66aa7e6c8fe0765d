//! The server a `postgres://` URL names: how to connect to it, how to name it without its
//! password, and how its schema is brought up to date at start-up.

use std::error::Error as _;
use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use super::super::StoreError;
use super::super::migrations::{self, Migration};

/// How long connecting may take when the URL does not say (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server's sessions are called in `pg_stat_activity` when the URL does not say
/// (`application_name`).
const APPLICATION_NAME: &str = "ai-chat-server";

/// A PostgreSQL server and database, as a URL names them.
pub(super) struct Server {
    config: Config,
    /// `scheme://host:port/database`: what errors and logs may say of the URL, which can hold a
    /// password.
    name: String,
}

impl Server {
    /// The server `url` names (`postgres://user:password@host:port/database?options=...`, as
    /// libpq reads it).
    pub(super) fn parse(url: &str) -> Result<Server, StoreError> {
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        if !matches!(scheme, "postgres" | "postgresql") {
            return Err(StoreError::UnsupportedUrl(
                "expected postgres://host/database".into(),
            ));
        }
        let mut config: Config = url
            .parse()
            .map_err(|e| StoreError::UnsupportedUrl(format!("{scheme} URL: {}", describe(&e))))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name(APPLICATION_NAME);
        }
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
            .map(|(host, port)| match host {
                Host::Tcp(host) => format!("{host}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            })
            .collect();
        let name = format!(
            "{scheme}://{}/{}",
            hosts.join(","),
            config.get_dbname().unwrap_or_default()
        );
        Ok(Server { config, name })
    }

    /// A pool of connections to the server, each made when first needed.
    pub(super) fn pool(&self, size: usize) -> Result<deadpool_postgres::Pool, StoreError> {
        let manager = deadpool_postgres::Manager::from_config(
            self.config.clone(),
            NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        deadpool_postgres::Pool::builder(manager)
            .max_size(size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(self.config.get_connect_timeout().copied())
            .build()
            .map_err(|e| StoreError::storage(format!("{}: {e}", self.name)))
    }

    /// A new connection, served by a task of its own until the client is dropped or the
    /// connection breaks.
    pub(super) async fn connect(&self) -> Result<Client, StoreError> {
        let (client, connection) = self
            .config
            .connect(NoTls)
            .await
            .map_err(|e| self.failed(&e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %describe(&e), "a PostgreSQL connection broke");
            }
        });
        Ok(client)
    }

    /// `scheme://host:port/database`.
    #[cfg(test)]
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// A failure talking to this server, naming it.
    pub(super) fn failed(&self, e: &tokio_postgres::Error) -> StoreError {
        StoreError::storage(format!("{}: {}", self.name, describe(e)))
    }
}

/// What went wrong, on one line: tokio-postgres's own text leaves out the cause.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
    }
    match e.source() {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// Runs the migrations of `migrations` that the database (the first schema of the connection's
/// `search_path`) has not had yet, each in a transaction of its own that records its version in
/// `schema_migrations`. A transaction-scoped advisory lock on that schema makes servers starting
/// together on one database migrate one after the other. A schema newer than the last of
/// `migrations` is refused.
pub(super) async fn migrate(
    client: &mut Client,
    migrations: &[Migration],
) -> Result<(), StoreError> {
    let failed = |e: tokio_postgres::Error| {
        StoreError::storage(format!("migrating the database: {}", describe(&e)))
    };
    loop {
        let tx = client.transaction().await.map_err(failed)?;
        tx.batch_execute(
            "SET LOCAL client_min_messages = warning; \
             SELECT pg_advisory_xact_lock(hashtextextended( \
                 'ai-chat-server migrations of ' || coalesce(current_schema(), ''), 0)); \
             CREATE TABLE IF NOT EXISTS schema_migrations ( \
                 version    integer     PRIMARY KEY, \
                 name       text        NOT NULL, \
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(failed)?;
        let applied: i32 = tx
            .query_one(
                "SELECT coalesce(max(version), 0) FROM schema_migrations",
                &[],
            )
            .await
            .and_then(|row| row.try_get(0))
            .map_err(failed)?;
        let applied = usize::try_from(applied)
            .map_err(|_| StoreError::storage(format!("unknown schema version {applied}")))?;
        let Some(migration) = migrations.get(applied) else {
            if applied > migrations.len() {
                return Err(migrations::newer_than_server(applied, migrations.len()));
            }
            tx.commit().await.map_err(failed)?;
            return Ok(());
        };
        let version = i32::try_from(applied + 1).unwrap_or(i32::MAX);
        let migrated = async {
            tx.batch_execute(migration.sql).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[&version, &migration.name],
            )
            .await?;
            tx.commit().await
        };
        migrated.await.map_err(|e| {
            StoreError::storage(format!("migration {}: {}", migration.name, describe(&e)))
        })?;
        tracing::info!(migration = migration.name, "database migrated");
    }
}
