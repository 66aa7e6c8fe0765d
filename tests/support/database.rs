//! A fresh database for one test, shared by every node of its cluster.

/// A database of the test's own, gone with it.
pub struct Database {
    url: String,
    _folder: tempfile::TempDir,
}

impl Database {
    /// An empty database.
    pub async fn fresh() -> Database {
        let folder = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/chat.db", folder.path().display());
        Database {
            url,
            _folder: folder,
        }
    }

    /// Its `DATABASE_URL`.
    pub fn url(&self) -> &str {
        &self.url
    }
}
