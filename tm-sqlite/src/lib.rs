//! # tm-sqlite: SQLite as a tm transaction participant
//!
//! [`Database`] owns a small pool of connections to one SQLite file.
//! [`Database::join`] joins it to a [`tm_core::Transaction`] and hands back
//! the transaction's connection (a [`Conn`] guard that derefs to
//! [`rusqlite::Connection`]), inside an SQLite transaction begun on first
//! use. tm then ends it with the rest of the transaction:
//!
//! * alone, `COMMIT` is the one-phase commit;
//! * with other resources, SQLite cannot prepare (`can_prepare() == false`),
//!   so tm commits it *last*, after every other resource voted: its `COMMIT`
//!   is the decision, and the whole transaction is atomic (last-resource
//!   commit). With a [`SqliteDecisionLog`] in the same database the decision
//!   row is written inside that same `COMMIT` (logging last resource);
//! * on abort, `ROLLBACK`; the connection goes back to the pool clean.
//!
//! tm savepoints are SQL `SAVEPOINT`s, so nested
//! [`atomic`](tm_core::TransactionManager::atomic) blocks and
//! [`Savepoint::rollback`](tm_core::Savepoint::rollback) work across SQLite
//! and the other resources. `SQLITE_BUSY` (including `BUSY_SNAPSHOT`) and
//! `SQLITE_LOCKED` are retryable: [`TransactionManager::run`] retries them,
//! also when the closure wraps the rusqlite error in its own error type.
//!
//! ```
//! use tm_core::TransactionManager;
//! use tm_sqlite::{Database, Options};
//!
//! let dir = tempfile::tempdir()?;
//! let db = Database::open_with(
//!     dir.path().join("bank.db"),
//!     Options::default().setup_sql(
//!         "CREATE TABLE IF NOT EXISTS account (name TEXT PRIMARY KEY, balance INTEGER NOT NULL)",
//!     ),
//! )?;
//! let tm = TransactionManager::explicit();
//!
//! tm.run(|txn| {
//!     let conn = db.join(txn)?;
//!     conn.execute("INSERT INTO account VALUES ('alice', 100), ('bob', 0)", [])?;
//!     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
//! })?;
//!
//! // A nested atomic block is a savepoint: its failure undoes only itself.
//! tm.atomic(|txn| {
//!     db.join(txn)?.execute("UPDATE account SET balance = balance - 10 WHERE name = 'alice'", [])?;
//!     let inner: Result<(), Box<dyn std::error::Error + Send + Sync>> = tm.atomic(|txn| {
//!         db.join(txn)?.execute("UPDATE account SET balance = 1000 WHERE name = 'bob'", [])?;
//!         Err("changed my mind".into())
//!     });
//!     assert!(inner.is_err());
//!     db.join(txn)?.execute("UPDATE account SET balance = balance + 10 WHERE name = 'bob'", [])?;
//!     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
//! })?;
//!
//! let bob: i64 = db.with_connection(|c| {
//!     c.query_row("SELECT balance FROM account WHERE name = 'bob'", [], |r| r.get(0))
//! })?;
//! assert_eq!(bob, 10);
//! # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
//! ```
//!
//! ## Limits
//!
//! * Share one [`Database`] (clone it) per file. Two `Database`s opened
//!   separately on one file are two pools: in one transaction they wait on
//!   each other's write lock until the busy timeout.
//! * SQLite cannot prepare: with more than one SQLite database in a
//!   transaction, a failure of the second `COMMIT` after the first is a
//!   heuristic outcome ([`tm_core::Error::Heuristic`]), never silent.
//!
//! [`TransactionManager::run`]: tm_core::TransactionManager::run

#![warn(missing_docs)]

mod database;
mod decision_log;
mod error;
mod options;

pub use database::{Conn, Database};
pub use decision_log::SqliteDecisionLog;
pub use error::{is_retryable, Ending, Error, Result};
pub use options::{Begin, JournalMode, OnConnect, Options, Synchronous};

/// The `rusqlite` tm-sqlite was built with: use it instead of adding your
/// own, so that one native SQLite is linked (two `rusqlite` versions
/// clash over the `links = "sqlite3"` key).
pub use rusqlite;
