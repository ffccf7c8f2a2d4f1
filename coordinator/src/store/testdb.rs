//! A database of its own for each test, on the test PostgreSQL server (`.ci/postgres
//! start`, or the server `QUICMESH_TEST_POSTGRES` names), dropped when the test ends.
//! When no server answers, the test fails saying how to start one: nothing is skipped.

use std::sync::atomic::{AtomicU64, Ordering};

/// The server tests use unless `QUICMESH_TEST_POSTGRES` says otherwise (`.ci/postgres`).
pub const DEFAULT_TEST_SERVER: &str = "postgres://postgres@127.0.0.1:54329/postgres";

/// A fresh, empty database; dropped (with its connections) on drop.
#[derive(Debug)]
pub struct TestDb {
    admin: String,
    name: String,
    /// The connection string of the fresh database.
    pub url: String,
}

/// Runs `sql` on `url` from a thread of its own (callers may be inside a runtime).
fn admin_exec(url: &str, sql: &str) -> Result<(), String> {
    let (url, sql) = (url.to_string(), sql.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let (client, conn) = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                tokio_postgres::connect(&url, tokio_postgres::NoTls),
            )
            .await
            .map_err(|_| "connecting timed out".to_string())?
            .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            client.batch_execute(&sql).await.map_err(|e| e.to_string())
        })
    })
    .join()
    .map_err(|_| "admin thread panicked".to_string())?
}

/// `url` with its database name replaced by `db`.
fn with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].rfind('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

impl TestDb {
    /// Makes the database, or panics naming the server and how to start one.
    pub fn new() -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let admin = std::env::var("QUICMESH_TEST_POSTGRES")
            .unwrap_or_else(|_| DEFAULT_TEST_SERVER.to_string());
        let name = format!(
            "qm_test_{}_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        if let Err(e) = admin_exec(&admin, &format!("CREATE DATABASE {name}")) {
            panic!(
                "the PostgreSQL tests need a server: none usable at {admin} ({e}). \
                 Start one with `bash .ci/postgres start` (or set QUICMESH_TEST_POSTGRES)"
            );
        }
        let url = with_db(&admin, &name);
        Self { admin, name, url }
    }
}

/// Empties a test database (drops and re-creates its public schema).
pub fn reset(url: &str) {
    admin_exec(url, "DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
        .unwrap_or_else(|e| panic!("resetting the test database: {e}"));
}

impl Default for TestDb {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = admin_exec(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_database_name_is_replaced_and_the_rest_kept() {
        use super::with_db;
        assert_eq!(
            with_db("postgres://u:p@127.0.0.1:5432/postgres", "x"),
            "postgres://u:p@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_db("postgres://u@h/postgres?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(with_db("postgres://u@h", "x"), "postgres://u@h/x");
    }
}
