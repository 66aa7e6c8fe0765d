//! A database of its own for one test: a fresh schema on the PostgreSQL server that
//! `TEST_DATABASE_URL` names (by default `postgres://root@127.0.0.1:5432/test`), dropped with
//! everything in it when the test is done, even when it fails.
//!
//! The store's own tests and the black-box tests (`tests/support`) share this file.

/// The server of the tests when `TEST_DATABASE_URL` is not set.
const DEFAULT_SERVER: &str = "postgres://root@127.0.0.1:5432/test";

/// A schema of its own on the test server.
pub struct TestDatabase {
    /// A store's URL for the schema: the server's, with the schema as the connections'
    /// `search_path`, and its name as their `application_name`.
    pub url: String,
    server: String,
    schema: String,
}

impl TestDatabase {
    /// Makes a new, empty schema.
    pub async fn create() -> TestDatabase {
        let server =
            std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_SERVER.to_owned());
        let schema = format!("test_{}", uuid::Uuid::new_v4().simple());
        if let Err(e) = execute(&server, &format!("CREATE SCHEMA {schema}")).await {
            panic!("no test database (set TEST_DATABASE_URL to a PostgreSQL server): {e}");
        }
        let separator = if server.contains('?') { '&' } else { '?' };
        let url = format!(
            "{server}{separator}options=-csearch_path%3D{schema}&application_name={schema}"
        );
        TestDatabase {
            url,
            server,
            schema,
        }
    }

    /// Runs `sql` on the schema, as its owner would: the test's way to look behind the store.
    pub async fn execute(&self, sql: &str) -> Result<(), String> {
        execute(&self.url, sql).await
    }

    /// Ends every other connection made with [`TestDatabase::url`], as a restart of the server
    /// would, and waits (up to 5 s each) until they have ended.
    pub async fn disconnect_all(&self) -> Result<(), String> {
        self.execute(&self.disconnect_all_sql(5000)).await
    }

    /// The statement that ends every other connection of the schema, waiting up to `wait_ms`
    /// for each (0: not at all).
    fn disconnect_all_sql(&self, wait_ms: u32) -> String {
        format!(
            "SELECT pg_terminate_backend(pid, {wait_ms}) FROM pg_stat_activity \
             WHERE application_name = '{}' AND pid <> pg_backend_pid()",
            self.schema
        )
    }
}

impl Drop for TestDatabase {
    /// Drops the schema from a thread of its own, as the test's runtime cannot wait here. The
    /// connections still open are ended first: with the test's runtime waiting, they could not
    /// finish a transaction that holds a lock the drop needs. The drop waits for their locks,
    /// not for the connections (a wait for them costs a tenth of a second).
    fn drop(&mut self) {
        let server = self.server.clone();
        let sql = format!(
            "{}; DROP SCHEMA {} CASCADE",
            self.disconnect_all_sql(0),
            self.schema
        );
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(execute(&server, &sql))
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("test schema {} left behind: {e}", self.schema);
        }
    }
}

/// Runs `sql` on a connection of its own to `url`.
async fn execute(url: &str, sql: &str) -> Result<(), String> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let connection = tokio::spawn(connection);
    let done = client
        .batch_execute(sql)
        .await
        .map_err(|e| format!("{e:?}"));
    drop(client);
    let _ = connection.await;
    done
}
