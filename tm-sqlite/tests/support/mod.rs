//! Shared helpers of the tm-sqlite integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use tm_core::{Backoff, TransactionManager};
use tm_sqlite::{Database, Options};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub const SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS item (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
     CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL);
     INSERT OR IGNORE INTO counter VALUES (1, 0);";

/// A database file in `dir` with the test schema.
pub fn open(dir: &Path) -> Database {
    open_with(dir, Options::default())
}

pub fn open_with(dir: &Path, options: Options) -> Database {
    let db = Database::open_with(db_path(dir), options).expect("open test database");
    db.with_connection(|c| c.execute_batch(SCHEMA))
        .expect("create the test schema");
    db
}

/// A test database whose connections enforce foreign keys, with a table
/// `child` whose `parent` references `item(id)` through a *deferred*
/// foreign key: a dangling parent fails only at `COMMIT`.
pub fn open_with_deferred_foreign_key(dir: &Path, options: Options) -> Database {
    let db = open_with(dir, options.setup_sql("PRAGMA foreign_keys = ON"));
    db.with_connection(|c| {
        c.execute_batch(
            "CREATE TABLE child (id INTEGER PRIMARY KEY,
                parent INTEGER REFERENCES item(id) DEFERRABLE INITIALLY DEFERRED)",
        )
    })
    .expect("create the child table");
    db
}

pub fn db_path(dir: &Path) -> PathBuf {
    dir.join("test.db")
}

/// An explicit manager without backoff pauses; independent, since tests
/// interleave several managers' transactions on one thread.
pub fn manager() -> TransactionManager {
    TransactionManager::builder()
        .explicit(true)
        .backoff(Backoff::None)
        .independent(true)
        .build()
}

/// Reads through a second, independent connection (not the pool's).
pub fn independent(path: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(path).expect("independent connection")
}

pub fn item_names(path: &Path) -> Vec<String> {
    let conn = independent(path);
    let mut stmt = conn.prepare("SELECT name FROM item ORDER BY id").unwrap();
    let names = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<Vec<String>>>()
        .unwrap();
    names
}

pub fn counter(path: &Path) -> i64 {
    independent(path)
        .query_row("SELECT n FROM counter WHERE id = 1", [], |r| r.get(0))
        .unwrap()
}

pub fn insert(conn: &rusqlite::Connection, name: &str) -> rusqlite::Result<()> {
    conn.execute("INSERT INTO item (name) VALUES (?1)", [name])
        .map(|_| ())
}

/// Every idle connection of the pool is outside any transaction. They are
/// all checked out at once (nested `with_connection`s), so each one is
/// looked at, not the most recently pooled one again and again.
pub fn pool_is_clean(db: &Database) -> bool {
    fn check(db: &Database, left: usize) -> bool {
        left == 0
            || db
                .with_connection(|c| Ok(c.is_autocommit() && check(db, left - 1)))
                .unwrap()
    }
    check(db, db.idle_connections().max(1))
}

/// The environment variable that tells a re-spawned test binary to play a
/// child's part (sled's crash-test pattern).
pub const CHILD_ENV: &str = "TM_SQLITE_TEST_CHILD";

/// The database path a child should use, when this process is one.
pub fn child_role() -> Option<PathBuf> {
    std::env::var_os(CHILD_ENV).map(PathBuf::from)
}

/// This test binary, re-run as a child executing only `test_name`.
pub fn child(test_name: &str, db_path: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, db_path);
    cmd
}

/// `n` increments of the counter, each its own transaction through `tm.run`.
pub fn increment(db: &Database, tm: &TransactionManager, n: usize) {
    for _ in 0..n {
        tm.run(|txn| {
            let conn = db.join(txn)?;
            let v: i64 = conn.query_row("SELECT n FROM counter WHERE id = 1", [], |r| r.get(0))?;
            conn.execute("UPDATE counter SET n = ?1 WHERE id = 1", [v + 1])?;
            Ok::<_, BoxError>(())
        })
        .expect("an increment failed after every retry");
    }
}

/// A preparable resource whose prepare survives a crash
/// (`prepares_durably()`), as tm-redis's does; it records what it sees.
pub struct DurablePreparer {
    pub name: String,
    pub calls: tm_core::testing::CallLog,
}

impl DurablePreparer {
    pub fn new(name: &str) -> std::sync::Arc<Self> {
        std::sync::Arc::new(DurablePreparer {
            name: name.to_owned(),
            calls: tm_core::testing::CallLog::new(),
        })
    }
}

impl tm_core::DataManager for DurablePreparer {
    fn sort_key(&self) -> &str {
        &self.name
    }
    fn abort(&self, _: &tm_core::Transaction) -> tm_core::Result<()> {
        self.calls.record(&self.name, tm_core::Phase::Abort);
        Ok(())
    }
    fn tpc_begin(&self, _: &tm_core::Transaction) -> tm_core::Result<()> {
        Ok(())
    }
    fn commit(&self, _: &tm_core::Transaction) -> tm_core::Result<()> {
        Ok(())
    }
    fn tpc_vote(&self, _: &tm_core::Transaction) -> tm_core::Result<()> {
        self.calls.record(&self.name, tm_core::Phase::TpcVote);
        Ok(())
    }
    fn tpc_finish(&self, _: &tm_core::Transaction) -> tm_core::Result<()> {
        self.calls.record(&self.name, tm_core::Phase::TpcFinish);
        Ok(())
    }
    fn tpc_abort(&self, _: &tm_core::Transaction) -> tm_core::Result<()> {
        self.calls.record(&self.name, tm_core::Phase::TpcAbort);
        Ok(())
    }
    fn recovery_id(&self) -> Option<String> {
        Some(format!("durable:{}", self.name))
    }
}
