//! How a [`Database`](crate::Database) opens and sets up its connections.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

/// A setup step run on every new connection (pragmas, schema, functions).
pub type OnConnect = Arc<dyn Fn(&Connection) -> rusqlite::Result<()> + Send + Sync>;

/// SQLite's `journal_mode`.
///
/// ```
/// assert_eq!(tm_sqlite::JournalMode::Wal.as_str(), "WAL");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum JournalMode {
    /// Write-ahead log: readers do not block the writer (the default).
    #[default]
    Wal,
    /// Rollback journal, deleted at each commit.
    Delete,
    /// Rollback journal, truncated at each commit.
    Truncate,
    /// Rollback journal, header zeroed at each commit.
    Persist,
    /// Rollback journal in memory (a crash can corrupt the database).
    Memory,
    /// No journal (no rollback, no atomic commit).
    Off,
}

impl JournalMode {
    /// The pragma's value.
    ///
    /// ```
    /// assert_eq!(tm_sqlite::JournalMode::Delete.as_str(), "DELETE");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            JournalMode::Wal => "WAL",
            JournalMode::Delete => "DELETE",
            JournalMode::Truncate => "TRUNCATE",
            JournalMode::Persist => "PERSIST",
            JournalMode::Memory => "MEMORY",
            JournalMode::Off => "OFF",
        }
    }
}

/// SQLite's `synchronous` setting.
///
/// ```
/// assert_eq!(tm_sqlite::Synchronous::Normal.as_str(), "NORMAL");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Synchronous {
    /// No fsync at all.
    Off,
    /// In WAL mode: fsync at checkpoints only; a commit survives a process
    /// crash, and may be lost (never corrupted) on power loss. The default.
    #[default]
    Normal,
    /// fsync at every commit: survives power loss.
    Full,
    /// Like `Full`, plus the directory after unlinking a journal.
    Extra,
}

impl Synchronous {
    /// The pragma's value.
    ///
    /// ```
    /// assert_eq!(tm_sqlite::Synchronous::Full.as_str(), "FULL");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Synchronous::Off => "OFF",
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
        }
    }
}

/// How a joined transaction begins.
///
/// ```
/// assert_eq!(tm_sqlite::Begin::default(), tm_sqlite::Begin::Immediate);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Begin {
    /// `BEGIN IMMEDIATE`: takes the write lock at once (waiting up to the
    /// busy timeout), so a read-then-write transaction cannot fail later
    /// with `BUSY_SNAPSHOT`. The default.
    #[default]
    Immediate,
    /// A deferred transaction (`BEGIN DEFERRED`): for read-mostly work; a
    /// transaction that writes after another one committed fails with
    /// `SQLITE_BUSY_SNAPSHOT`, which is retryable. It is begun as the
    /// savepoint `tm_txn` (SQLite begins a deferred transaction for it) and
    /// committed by `RELEASE tm_txn`, so that a `COMMIT` / `ROLLBACK` run by
    /// hand is found at the vote even in a transaction that has not written
    /// (SQLite's commit and rollback hooks only see write transactions).
    Deferred,
    /// `BEGIN EXCLUSIVE` (in WAL mode the same as `Immediate`).
    Exclusive,
}

impl Begin {
    /// The statement that begins a joined transaction.
    pub(crate) fn sql(self) -> &'static str {
        match self {
            Begin::Immediate => "BEGIN IMMEDIATE",
            Begin::Deferred => "SAVEPOINT tm_txn",
            Begin::Exclusive => "BEGIN EXCLUSIVE",
        }
    }

    /// The statement that commits it. `RELEASE tm_txn` fails with
    /// `SQLITE_ERROR` ("no such savepoint") when the transaction `sql()`
    /// began is no longer the connection's.
    pub(crate) fn commit_sql(self) -> &'static str {
        match self {
            Begin::Deferred => "RELEASE tm_txn",
            Begin::Immediate | Begin::Exclusive => "COMMIT",
        }
    }
}

/// Settings of a [`Database`](crate::Database). Fields are public; each has a
/// chaining setter of the same name.
///
/// ```
/// use std::time::Duration;
/// use tm_sqlite::{Begin, Options, Synchronous};
///
/// let options = Options::default()
///     .synchronous(Synchronous::Full)
///     .busy_timeout(Duration::from_secs(1))
///     .begin(Begin::Deferred)
///     .setup_sql("CREATE TABLE IF NOT EXISTS t (x INTEGER)");
/// assert_eq!(options.synchronous, Synchronous::Full);
///
/// let mut options = Options::default();
/// options.pool_size = 8;
/// ```
#[derive(Clone)]
// Not `#[non_exhaustive]`, on purpose: struct-update syntax
// (`Options { field, ..Options::default() }`) must work outside the crate.
// New fields always get a default, so that syntax stays compatible.
pub struct Options {
    /// `PRAGMA journal_mode` (default [`JournalMode::Wal`]).
    pub journal_mode: JournalMode,
    /// `PRAGMA synchronous` (default [`Synchronous::Normal`]): the
    /// everyday durability. Whatever it says, a `COMMIT` that is a two-phase
    /// transaction's decision (SQLite as the last resource beside others) is
    /// made durable (an extra fsync where this level would not sync) before
    /// any other participant is finished.
    pub synchronous: Synchronous,
    /// How long a connection waits for a lock before `SQLITE_BUSY`
    /// (default 5 s).
    pub busy_timeout: Duration,
    /// How joined transactions begin (default [`Begin::Immediate`]).
    pub begin: Begin,
    /// How many idle connections the pool keeps (default 4). More are opened
    /// when more transactions run at once; the extra ones are closed when
    /// they come back.
    pub pool_size: usize,
    /// Run on every new connection, in order, after the pragmas.
    pub on_connect: Vec<OnConnect>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            journal_mode: JournalMode::Wal,
            synchronous: Synchronous::Normal,
            busy_timeout: Duration::from_secs(5),
            begin: Begin::Immediate,
            pool_size: 4,
            on_connect: Vec::new(),
        }
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("journal_mode", &self.journal_mode)
            .field("synchronous", &self.synchronous)
            .field("busy_timeout", &self.busy_timeout)
            .field("begin", &self.begin)
            .field("pool_size", &self.pool_size)
            .field("on_connect", &self.on_connect.len())
            .finish()
    }
}

impl Options {
    /// Sets [`journal_mode`](Self::journal_mode).
    ///
    /// ```
    /// let o = tm_sqlite::Options::default().journal_mode(tm_sqlite::JournalMode::Delete);
    /// assert_eq!(o.journal_mode, tm_sqlite::JournalMode::Delete);
    /// ```
    #[must_use]
    pub fn journal_mode(mut self, mode: JournalMode) -> Self {
        self.journal_mode = mode;
        self
    }

    /// Sets [`synchronous`](Self::synchronous).
    ///
    /// ```
    /// let o = tm_sqlite::Options::default().synchronous(tm_sqlite::Synchronous::Full);
    /// assert_eq!(o.synchronous, tm_sqlite::Synchronous::Full);
    /// ```
    #[must_use]
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// Sets [`busy_timeout`](Self::busy_timeout).
    ///
    /// ```
    /// let o = tm_sqlite::Options::default().busy_timeout(std::time::Duration::from_millis(50));
    /// assert_eq!(o.busy_timeout.as_millis(), 50);
    /// ```
    #[must_use]
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Sets [`begin`](Self::begin).
    ///
    /// ```
    /// let o = tm_sqlite::Options::default().begin(tm_sqlite::Begin::Deferred);
    /// assert_eq!(o.begin, tm_sqlite::Begin::Deferred);
    /// ```
    #[must_use]
    pub fn begin(mut self, begin: Begin) -> Self {
        self.begin = begin;
        self
    }

    /// Sets [`pool_size`](Self::pool_size).
    ///
    /// ```
    /// let o = tm_sqlite::Options::default().pool_size(1);
    /// assert_eq!(o.pool_size, 1);
    /// ```
    #[must_use]
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// Adds a setup step run on every new connection.
    ///
    /// ```
    /// let o = tm_sqlite::Options::default()
    ///     .on_connect(|conn| conn.execute_batch("PRAGMA foreign_keys = ON"));
    /// assert_eq!(o.on_connect.len(), 1);
    /// ```
    #[must_use]
    pub fn on_connect(
        mut self,
        f: impl Fn(&Connection) -> rusqlite::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.on_connect.push(Arc::new(f));
        self
    }

    /// Adds setup SQL (one or more statements) run on every new connection,
    /// e.g. `CREATE TABLE IF NOT EXISTS ...`.
    ///
    /// ```
    /// let o = tm_sqlite::Options::default().setup_sql("PRAGMA foreign_keys = ON");
    /// assert_eq!(o.on_connect.len(), 1);
    /// ```
    #[must_use]
    pub fn setup_sql(self, sql: impl Into<String>) -> Self {
        let sql = sql.into();
        self.on_connect(move |conn| conn.execute_batch(&sql))
    }
}
