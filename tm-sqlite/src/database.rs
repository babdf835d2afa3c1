//! [`Database`]: a pool of connections to one SQLite file, and the
//! per-transaction data manager that makes SQLite a tm participant.
//!
//! The life of one joined transaction:
//!
//! * `db.join(&txn)` joins a fresh per-transaction resource (so a failing
//!   `BEGIN` is already inside the transaction and is retried like any other
//!   failure), then takes a connection from the pool and runs `BEGIN`.
//! * SQLite cannot prepare, so `can_prepare()` is false: tm votes it last,
//!   after every other vote and the decision, and its `COMMIT` (run at the
//!   vote, or in `commit_one_phase`) *is* the decision.
//! * Every ending gives the connection back to the pool, clean: a pooled
//!   connection never carries an open transaction.

use std::cell::Cell;
use std::fmt;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::lock_api::ArcReentrantMutexGuard;
use parking_lot::{Mutex, RawMutex, RawThreadId, ReentrantMutex};
use rusqlite::{ffi, Connection};
use tm_core::{DataManager, LogId, Phase, ResourceSavepoint, Transaction, TxId, TxIdMap};
use tracing::{error, warn};

use crate::error::{Ending, Error, Result};
use crate::options::Options;

/// A connection owned by the pool, with the count of transaction ends
/// (commits and rollbacks) SQLite reported on it: a change between `BEGIN`
/// and the vote means someone ended the transaction by hand.
struct Pooled {
    conn: Connection,
    ends: Arc<AtomicU64>,
}

pub(crate) struct DbInner {
    path: PathBuf,
    name: String,
    options: Options,
    pool: Mutex<Vec<Pooled>>,
    /// The joined transactions that have not ended yet.
    open: Mutex<TxIdMap<Arc<SqliteTxn>>>,
    /// The id of the `SqliteDecisionLog` created on this pool, if any: its
    /// rows commit inside this pool's transactions.
    hosted_log: OnceLock<LogId>,
    /// What to fsync after a last resource's `COMMIT` (see [`after_commit_syncs`]).
    after_commit: Vec<SyncTarget>,
    /// How many times `sync_after_commit` made a `COMMIT` durable.
    durable_syncs: AtomicU64,
}

/// A file to fsync after a `COMMIT`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SyncTarget {
    /// Its data (and the size): the database, its WAL or its journal.
    File(PathBuf),
    /// A directory: the unlink of a `DELETE`-mode journal is the commit.
    Dir(PathBuf),
}

impl SyncTarget {
    fn path(&self) -> &Path {
        match self {
            SyncTarget::File(p) | SyncTarget::Dir(p) => p,
        }
    }

    fn sync(&self) -> std::io::Result<()> {
        // fsync works on the inode: any descriptor of the file flushes what
        // SQLite's own descriptor wrote.
        match std::fs::File::open(self.path()) {
            Ok(f) => match self {
                SyncTarget::File(_) => f.sync_data(),
                SyncTarget::Dir(_) => f.sync_all(),
            },
            // No such file holds nothing that a power loss could lose or
            // resurrect (a journal already deleted, a WAL checkpointed away).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// What must be fsynced after `COMMIT` returns for that commit to survive a
/// power loss, given the journal mode and `synchronous` level SQLite runs
/// with (SQLite 3.50, `pager_end_transaction`, `zeroJournalHdr`,
/// `sqlite3PagerSetFlags`; sqlite.org/pragma.html#pragma_synchronous):
///
/// * WAL: the WAL is synced at each commit only with FULL or EXTRA; with
///   NORMAL "a transaction committed in WAL mode ... might roll back
///   following a power loss". Below FULL: sync the `-wal` file (its commit
///   frame is checksummed, so syncing after the fact is enough).
/// * DELETE: the commit is the unlink of the journal; only EXTRA syncs the
///   directory after it, otherwise the journal can reappear after a power
///   loss and roll the transaction back as a hot journal. Below EXTRA: sync
///   the directory.
/// * TRUNCATE: the truncated journal is synced only with FULL or EXTRA (the
///   comment there cites exactly this resurrection). Below FULL: sync the
///   `-journal` file.
/// * PERSIST: the zeroed journal header is synced unless OFF.
/// * With OFF, SQLite syncs nothing, not even the database file: sync it
///   first (OFF gives up crash safety anyway; this only adds durability).
///
/// An in-memory or temporary database has nothing to sync.
fn after_commit_syncs(path: &Path, journal_mode: &str, synchronous: i64) -> Vec<SyncTarget> {
    const OFF: i64 = 0;
    const FULL: i64 = 2;
    const EXTRA: i64 = 3;
    if !path.is_file() {
        return Vec::new();
    }
    let sibling = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        SyncTarget::File(PathBuf::from(name))
    };
    let mut out = Vec::new();
    let mode = journal_mode.to_ascii_lowercase();
    if synchronous == OFF && mode != "wal" {
        out.push(SyncTarget::File(path.to_path_buf()));
    }
    match mode.as_str() {
        "wal" if synchronous < FULL => out.push(sibling("-wal")),
        "delete" if synchronous < EXTRA => {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            out.push(SyncTarget::Dir(dir));
        }
        "truncate" if synchronous < FULL => out.push(sibling("-journal")),
        "persist" if synchronous == OFF => out.push(sibling("-journal")),
        _ => {}
    }
    out
}

impl DbInner {
    fn err(&self, phase: Phase, e: rusqlite::Error) -> Error {
        Error::sqlite(&self.path, phase, e)
    }

    fn connect(&self) -> Result<Pooled> {
        let err = |e| self.err(Phase::Open, e);
        let conn = Connection::open(&self.path).map_err(err)?;
        conn.busy_timeout(self.options.busy_timeout).map_err(err)?;
        // Reading the mode back also reads the file header: a file that is
        // not a database fails here, at open, not in the first transaction.
        let wanted = self.options.journal_mode.as_str();
        // Changing the journal mode escalates a read lock to an exclusive
        // one; when another connection does the same at once SQLite answers
        // BUSY at once, without its busy handler (it would deadlock). Retry
        // it within the busy timeout, as the handler would.
        let deadline = std::time::Instant::now() + self.options.busy_timeout;
        let mut pause = std::time::Duration::from_millis(1);
        let mode: String = loop {
            match conn.query_row(&format!("PRAGMA journal_mode = {wanted}"), [], |r| r.get(0)) {
                Err(e)
                    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                        && std::time::Instant::now() + pause < deadline =>
                {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(50));
                }
                other => break other.map_err(err)?,
            }
        };
        if !mode.eq_ignore_ascii_case(wanted) {
            warn!(db = %self.name, wanted, got = %mode, "SQLite did not accept the journal mode");
        }
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {}",
            self.options.synchronous.as_str()
        ))
        .map_err(err)?;
        for setup in &self.options.on_connect {
            setup(&conn).map_err(err)?;
        }
        let ends = Arc::new(AtomicU64::new(0));
        let on_commit = ends.clone();
        conn.commit_hook(Some(move || {
            on_commit.fetch_add(1, Ordering::Relaxed);
            false
        }));
        let on_rollback = ends.clone();
        conn.rollback_hook(Some(move || {
            on_rollback.fetch_add(1, Ordering::Relaxed);
        }));
        Ok(Pooled { conn, ends })
    }

    /// Makes the `COMMIT` that just returned durable (see
    /// [`after_commit_syncs`]): the one place the last resource's extra sync
    /// happens, counted for [`Database::durable_syncs`].
    fn sync_after_commit(&self, phase: Phase) -> Result<()> {
        if self.after_commit.is_empty() {
            return Ok(());
        }
        for target in &self.after_commit {
            target.sync().map_err(|source| Error::NotDurable {
                path: self.path.clone(),
                phase,
                file: target.path().to_path_buf(),
                source,
            })?;
        }
        self.durable_syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn checkout(&self) -> Result<Pooled> {
        if let Some(pooled) = self.pool.lock().pop() {
            return Ok(pooled);
        }
        self.connect()
    }

    /// Gives a connection back, clean: an open transaction is rolled back,
    /// and a connection that cannot be cleaned is closed instead.
    fn checkin(&self, pooled: Pooled) {
        if !pooled.conn.is_autocommit() {
            if let Err(e) = pooled.conn.execute_batch("ROLLBACK") {
                error!(db = %self.name, error = %e, "could not roll back a returned connection; closing it");
                return;
            }
        }
        let mut pool = self.pool.lock();
        if pool.len() < self.options.pool_size {
            pool.push(pooled);
        }
    }
}

fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// An SQLite database file: a pool of connections and the way to join it to
/// tm transactions. `Clone` (a cheap handle; clones share the pool),
/// `Send + Sync`.
///
/// ```
/// use tm_core::TransactionManager;
/// use tm_sqlite::{Database, Options};
///
/// let dir = tempfile::tempdir()?;
/// let db = Database::open_with(
///     dir.path().join("app.db"),
///     Options::default().setup_sql("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT)"),
/// )?;
/// let tm = TransactionManager::explicit();
/// tm.run(|txn| {
///     let conn = db.join(txn)?;
///     conn.execute("INSERT INTO kv VALUES ('a', 'one')", [])?;
///     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
/// })?;
/// let v: String = db.with_connection(|c| c.query_row("SELECT v FROM kv", [], |r| r.get(0)))?;
/// assert_eq!(v, "one");
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// ```
#[derive(Clone)]
pub struct Database {
    inner: Arc<DbInner>,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("path", &self.inner.path)
            .field("options", &self.inner.options)
            .finish()
    }
}

impl Database {
    /// Opens (creating if needed) the database at `path` with the default
    /// [`Options`]. One connection is opened at once, so a missing directory
    /// or a file that is not a database fails here.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let db = tm_sqlite::Database::open(dir.path().join("app.db"))?;
    /// assert!(db.name().starts_with("sqlite:"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, Options::default())
    }

    /// Opens the database at `path` with `options`.
    ///
    /// ```
    /// use tm_sqlite::{Database, Options, Synchronous};
    /// let dir = tempfile::tempdir()?;
    /// let db = Database::open_with(dir.path().join("app.db"), Options::default().synchronous(Synchronous::Full))?;
    /// assert_eq!(db.options().synchronous, Synchronous::Full);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open_with(path: impl AsRef<Path>, options: Options) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut inner = DbInner {
            name: format!("sqlite:{}", path.display()),
            path,
            options,
            pool: Mutex::new(Vec::new()),
            open: Mutex::new(TxIdMap::default()),
            hosted_log: OnceLock::new(),
            after_commit: Vec::new(),
            durable_syncs: AtomicU64::new(0),
        };
        let first = inner.connect()?;
        // What SQLite actually runs with (an `on_connect` may have changed
        // it; an in-memory database refuses WAL).
        let modes = first
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get::<_, String>(0));
        let modes = modes.and_then(|mode| {
            let level = first
                .conn
                .query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0))?;
            Ok((mode, level))
        });
        let (mode, level) = modes.map_err(|e| inner.err(Phase::Open, e))?;
        inner.after_commit = after_commit_syncs(&inner.path, &mode, level);
        inner.checkin(first);
        Ok(Database {
            inner: Arc::new(inner),
        })
    }

    /// The database file's path, as given to `open`.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("app.db");
    /// assert_eq!(tm_sqlite::Database::open(&path)?.path(), path.as_path());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// `sqlite:<path>`: the sort key of its resources, and their name in
    /// errors and logs.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let db = tm_sqlite::Database::open(dir.path().join("app.db"))?;
    /// assert_eq!(db.name(), format!("sqlite:{}", db.path().display()));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The options it was opened with.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let db = tm_sqlite::Database::open(dir.path().join("app.db"))?;
    /// assert_eq!(db.options().begin, tm_sqlite::Begin::Immediate);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn options(&self) -> &Options {
        &self.inner.options
    }

    /// Joins this database to `txn` and returns its connection, inside an
    /// SQLite transaction begun on first use (`BEGIN IMMEDIATE` by default,
    /// see [`Options::begin`]). A second `join` in the same transaction
    /// returns the same connection; transactions on other threads get other
    /// connections.
    ///
    /// The resource is joined *before* `BEGIN` runs, so a `BEGIN` that fails
    /// (`SQLITE_BUSY` after the busy timeout) fails the transaction like any
    /// other retryable error. Errors are [`tm_core::Error::Resource`] with
    /// a [tm-sqlite `Error`](Error) as source; [`tm_core::Error::Closed`] or
    /// [`tm_core::Error::CommitFailed`] when the transaction cannot take a
    /// resource any more.
    ///
    /// Do not keep the returned guard across commit, abort or a savepoint
    /// rollback of the transaction; see [`Conn`].
    ///
    /// ```
    /// use tm_core::TransactionManager;
    /// let dir = tempfile::tempdir()?;
    /// let db = tm_sqlite::Database::open_with(
    ///     dir.path().join("app.db"),
    ///     tm_sqlite::Options::default().setup_sql("CREATE TABLE IF NOT EXISTS t (x INTEGER)"),
    /// )?;
    /// let tm = TransactionManager::explicit();
    /// let txn = tm.begin()?;
    /// db.join(&txn)?.execute("INSERT INTO t VALUES (1)", [])?;
    /// let n: i64 = db.join(&txn)?.query_row("SELECT count(*) FROM t", [], |r| r.get(0))?;
    /// assert_eq!(n, 1); // the same connection: it sees its own insert
    /// txn.abort()?;
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    pub fn join(&self, txn: &Transaction) -> tm_core::Result<Conn> {
        let res = {
            let mut open = self.inner.open.lock();
            match open.get(&txn.id()) {
                Some(res) => res.clone(),
                None => {
                    let res = Arc::new_cyclic(|me| SqliteTxn {
                        me: me.clone(),
                        db: self.inner.clone(),
                        txid: txn.id(),
                        slot: Mutex::new(Slot::NotBegun),
                        savepoints: Mutex::default(),
                    });
                    txn.join(res.clone())?;
                    open.insert(txn.id(), res.clone());
                    res
                }
            }
        };
        let shared = res.acquire().map_err(|e| res.tm_err(e))?;
        Ok(Conn {
            guard: shared.lock_arc(),
        })
    }

    /// Runs `f` on a pooled connection outside any tm transaction (schema
    /// changes, reads, maintenance), in autocommit mode. A transaction `f`
    /// leaves open is rolled back before the connection goes back.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let db = tm_sqlite::Database::open(dir.path().join("app.db"))?;
    /// db.with_connection(|c| c.execute_batch("CREATE TABLE t (x INTEGER)"))?;
    /// let n: i64 = db.with_connection(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)))?;
    /// assert_eq!(n, 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_connection<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        self.with_connection_at(Phase::Work, f)
    }

    /// [`with_connection`](Self::with_connection), with errors naming `phase`.
    pub(crate) fn with_connection_at<T>(
        &self,
        phase: Phase,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let pooled = self.inner.checkout()?;
        let result = f(&pooled.conn);
        if !pooled.conn.is_autocommit() {
            warn!(db = %self.inner.name, "with_connection left a transaction open; rolling it back");
        }
        self.inner.checkin(pooled);
        result.map_err(|e| self.inner.err(phase, e))
    }

    /// How many times a last resource's `COMMIT` on this pool was made
    /// durable by an extra fsync (WAL with `synchronous` below FULL, and the
    /// like: see [`Options::synchronous`]). For tests and benchmarks.
    #[doc(hidden)]
    pub fn durable_syncs(&self) -> u64 {
        self.inner.durable_syncs.load(Ordering::Relaxed)
    }

    /// Records that the decision log `id` lives in this pool (called by
    /// `SqliteDecisionLog::new`).
    pub(crate) fn host_log(&self, id: LogId) {
        let hosted = *self.inner.hosted_log.get_or_init(|| id);
        if hosted != id {
            // The same file always holds the same id; a different one means
            // the table was replaced under us. Keep the first: it is the
            // one earlier transactions were checked against.
            warn!(db = %self.inner.name, %hosted, other = %id, "a second decision log id on one pool");
        }
    }

    /// How many idle connections the pool holds now (all of them are clean).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let db = tm_sqlite::Database::open(dir.path().join("app.db"))?;
    /// assert_eq!(db.idle_connections(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn idle_connections(&self) -> usize {
        self.inner.pool.lock().len()
    }

    /// The joined, not yet ended resource of `txid`, if any.
    pub(crate) fn open_txn(&self, txid: &TxId) -> Option<Arc<SqliteTxn>> {
        self.inner.open.lock().get(txid).cloned()
    }

    pub(crate) fn same_as(&self, other: &Database) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

/// The connection of one joined transaction, as the pool lent it.
pub(crate) struct TxnConn {
    pooled: Option<Pooled>,
    db: Arc<DbInner>,
    ends_at_begin: u64,
    ended: Cell<bool>,
}

impl TxnConn {
    fn conn(&self) -> &Connection {
        &self
            .pooled
            .as_ref()
            .expect("present until the TxnConn is dropped")
            .conn
    }

    fn ended_by_hand(&self) -> bool {
        let pooled = self.pooled.as_ref().expect("present until dropped");
        pooled.conn.is_autocommit() || pooled.ends.load(Ordering::Relaxed) != self.ends_at_begin
    }
}

impl Drop for TxnConn {
    fn drop(&mut self) {
        if let Some(pooled) = self.pooled.take() {
            self.db.checkin(pooled);
        }
    }
}

type SharedConn = Arc<ReentrantMutex<TxnConn>>;

/// The guard [`Database::join`] returns: derefs to the transaction's
/// [`rusqlite::Connection`].
///
/// Dropping it does nothing to the transaction: the connection stays the
/// transaction's, and tm commits or rolls it back. It goes back to the pool
/// (clean) when the transaction has ended *and* no guard is left.
///
/// Do not keep it across commit, abort or a savepoint rollback: commit from
/// another thread waits for it, and once the transaction has ended, using
/// it panics (see [`try_connection`](Self::try_connection) for a checked
/// access). It is not `Send`: it stays on the thread that joined.
///
/// ```
/// use tm_core::TransactionManager;
/// let dir = tempfile::tempdir()?;
/// let db = tm_sqlite::Database::open(dir.path().join("app.db"))?;
/// let tm = TransactionManager::explicit();
/// let txn = tm.begin()?;
/// let conn = db.join(&txn)?;
/// assert!(!conn.is_autocommit()); // inside the joined transaction
/// drop(conn);
/// txn.commit()?;
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// ```
pub struct Conn {
    guard: ArcReentrantMutexGuard<RawMutex, RawThreadId, TxnConn>,
}

impl Conn {
    /// The connection, or [`Error::TransactionEnded`] once the transaction
    /// has been committed or aborted.
    ///
    /// ```
    /// use tm_core::TransactionManager;
    /// let dir = tempfile::tempdir()?;
    /// let db = tm_sqlite::Database::open(dir.path().join("app.db"))?;
    /// let tm = TransactionManager::explicit();
    /// let txn = tm.begin()?;
    /// let conn = db.join(&txn)?;
    /// assert!(conn.try_connection().is_ok());
    /// txn.abort()?;
    /// assert!(matches!(conn.try_connection(), Err(tm_sqlite::Error::TransactionEnded { .. })));
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    pub fn try_connection(&self) -> Result<&Connection> {
        if self.guard.ended.get() {
            return Err(Error::TransactionEnded {
                path: self.guard.db.path.clone(),
                phase: Phase::Work,
            });
        }
        Ok(self.guard.conn())
    }

    /// Whether the transaction this connection belongs to is still open.
    ///
    /// ```
    /// use tm_core::TransactionManager;
    /// let dir = tempfile::tempdir()?;
    /// let db = tm_sqlite::Database::open(dir.path().join("app.db"))?;
    /// let txn = TransactionManager::explicit().begin()?;
    /// let conn = db.join(&txn)?;
    /// assert!(conn.is_active());
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    pub fn is_active(&self) -> bool {
        !self.guard.ended.get()
    }
}

impl Deref for Conn {
    type Target = Connection;

    /// # Panics
    ///
    /// When the transaction has ended: the guard was kept across commit or
    /// abort, and what it would run would belong to no transaction.
    fn deref(&self) -> &Connection {
        match self.try_connection() {
            Ok(conn) => conn,
            Err(err) => panic!("{err}"),
        }
    }
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("db", &self.guard.db.name)
            .field("active", &self.is_active())
            .finish()
    }
}

enum Slot {
    /// Joined; `BEGIN` has not run (or failed).
    NotBegun,
    Active(SharedConn),
    /// Committed at the vote (the last resource); `tpc_finish` ends it.
    Voted,
    Ended(Ending),
}

/// The SQL savepoints on a transaction's connection.
#[derive(Default)]
struct Savepoints {
    /// Oldest first: (id, still wanted).
    stack: Vec<(u64, bool)>,
    /// The last id handed out; ids are never reused, so a handle whose
    /// savepoint was cancelled never matches a later one.
    issued: u64,
}

/// The per-transaction data manager of a [`Database`].
pub(crate) struct SqliteTxn {
    me: Weak<SqliteTxn>,
    db: Arc<DbInner>,
    txid: TxId,
    slot: Mutex<Slot>,
    savepoints: Mutex<Savepoints>,
}

impl SqliteTxn {
    fn tm_err(&self, e: Error) -> tm_core::Error {
        tm_core::Error::resource(self.db.name.clone(), e)
    }

    /// The transaction's connection, beginning the SQLite transaction on
    /// first use.
    fn acquire(&self) -> Result<SharedConn> {
        let mut slot = self.slot.lock();
        match &*slot {
            Slot::Active(shared) => return Ok(shared.clone()),
            Slot::Voted | Slot::Ended(_) => {
                return Err(Error::TransactionEnded {
                    path: self.db.path.clone(),
                    phase: Phase::Work,
                })
            }
            Slot::NotBegun => {}
        }
        let pooled = self.db.checkout()?;
        if let Err(e) = exec_cached(&pooled.conn, self.db.options.begin.sql()) {
            self.db.checkin(pooled);
            return Err(self.db.err(Phase::Work, e));
        }
        let ends_at_begin = pooled.ends.load(Ordering::Relaxed);
        let shared = Arc::new(ReentrantMutex::new(TxnConn {
            pooled: Some(pooled),
            db: self.db.clone(),
            ends_at_begin,
            ended: Cell::new(false),
        }));
        *slot = Slot::Active(shared.clone());
        Ok(shared)
    }

    fn current(&self) -> Option<SharedConn> {
        match &*self.slot.lock() {
            Slot::Active(shared) => Some(shared.clone()),
            _ => None,
        }
    }

    fn already_ended(&self, phase: Phase, ended: Ending) -> Error {
        Error::AlreadyEnded {
            path: self.db.path.clone(),
            phase,
            ended,
        }
    }

    /// Leaves the slot `Ended(provisional)` and the open map, and returns
    /// what the slot held. The caller sets the final state.
    fn take(&self, provisional: Ending) -> Slot {
        let taken = std::mem::replace(&mut *self.slot.lock(), Slot::Ended(provisional));
        self.db.open.lock().remove(&self.txid);
        taken
    }

    /// `COMMIT`s: at the vote of the last resource (made durable, then
    /// `Voted`), at its `tpc_finish` (ending a `Voted` slot, or committing if
    /// the vote was skipped) or in `commit_one_phase`. A slot that has
    /// already ended is an error: each resource has exactly one ending.
    fn commit_now(&self, phase: Phase) -> Result<()> {
        {
            let mut slot = self.slot.lock();
            match &*slot {
                Slot::Ended(ended) => return Err(self.already_ended(phase, *ended)),
                Slot::Voted if phase == Phase::TpcFinish => {
                    *slot = Slot::Ended(Ending::Committed);
                    return Ok(());
                }
                Slot::Voted => return Err(self.already_ended(phase, Ending::Committed)),
                Slot::NotBegun | Slot::Active(_) => {}
            }
        }
        let (ending, outcome) = match self.take(Ending::RolledBack) {
            // Never begun: nothing to commit.
            Slot::NotBegun => (Ending::Committed, Ok(())),
            Slot::Active(shared) => self.commit_conn(&shared, phase),
            Slot::Voted | Slot::Ended(_) => unreachable!("checked above"),
        };
        *self.slot.lock() = match (ending, phase) {
            (Ending::Committed, Phase::TpcVote) if outcome.is_ok() => Slot::Voted,
            (ending, _) => Slot::Ended(ending),
        };
        outcome
    }

    /// Commits the connection (refusing a transaction ended by hand); on
    /// failure rolls back. In the two-phase path (`tpc_vote`/`tpc_finish`)
    /// this `COMMIT` is the decision, so it is made durable before it
    /// returns, whatever the everyday `synchronous` setting: every other
    /// participant is finished after it (`commit_one_phase` needs nothing
    /// more than SQLite's own setting).
    fn commit_conn(&self, shared: &SharedConn, phase: Phase) -> (Ending, Result<()>) {
        let c = shared.lock();
        c.ended.set(true);
        let outcome = if c.ended_by_hand() {
            Err(Error::EndedOutsideTm {
                path: self.db.path.clone(),
                phase,
            })
        } else {
            exec_cached(c.conn(), self.db.options.begin.commit_sql()).map_err(|e| {
                // Only a missing `tm_txn` savepoint makes the commit
                // statement fail with plain SQLITE_ERROR.
                if e.sqlite_error()
                    .is_some_and(|s| s.extended_code == ffi::SQLITE_ERROR)
                {
                    Error::EndedOutsideTm {
                        path: self.db.path.clone(),
                        phase,
                    }
                } else {
                    self.db.err(phase, e)
                }
            })
        };
        if outcome.is_err() {
            if !c.conn().is_autocommit() {
                if let Err(e) = c.conn().execute_batch("ROLLBACK") {
                    error!(db = %self.db.name, error = %e, "ROLLBACK after a failed COMMIT failed");
                }
            }
            return (Ending::RolledBack, outcome);
        }
        if phase == Phase::CommitOnePhase {
            return (Ending::Committed, Ok(()));
        }
        // The COMMIT stands from here on, whether the sync works or not.
        (Ending::Committed, self.db.sync_after_commit(phase))
    }

    fn rollback_now(&self, phase: Phase) -> Result<()> {
        match &*self.slot.lock() {
            // tm aborts a last resource whose own COMMIT failed (and rolled
            // it back): nothing left to do.
            Slot::Ended(Ending::RolledBack) => return Ok(()),
            Slot::Ended(Ending::Committed) | Slot::Voted => {
                return Err(self.already_ended(phase, Ending::Committed))
            }
            Slot::NotBegun | Slot::Active(_) => {}
        }
        let Slot::Active(shared) = self.take(Ending::RolledBack) else {
            return Ok(());
        };
        let c = shared.lock();
        c.ended.set(true);
        if c.conn().is_autocommit() {
            return Ok(());
        }
        exec_cached(c.conn(), "ROLLBACK").map_err(|e| self.db.err(phase, e))
    }

    /// Runs `f` on the open transaction's connection, if it has begun and
    /// not ended (the decision log writes its row this way).
    pub(crate) fn with_open_conn<T>(&self, f: impl FnOnce(&Connection) -> T) -> Option<T> {
        let shared = self.current()?;
        let c = shared.lock();
        if c.ended.get() {
            return None;
        }
        Some(f(c.conn()))
    }
}

impl DataManager for SqliteTxn {
    fn sort_key(&self) -> &str {
        &self.db.name
    }

    fn abort(&self, _txn: &Transaction) -> tm_core::Result<()> {
        self.rollback_now(Phase::Abort).map_err(|e| self.tm_err(e))
    }

    fn tpc_begin(&self, _txn: &Transaction) -> tm_core::Result<()> {
        Ok(())
    }

    fn commit(&self, _txn: &Transaction) -> tm_core::Result<()> {
        Ok(())
    }

    /// The last resource's vote is its `COMMIT`: tm calls it after every
    /// other vote and after the decision log, so this commit is the decision.
    fn tpc_vote(&self, _txn: &Transaction) -> tm_core::Result<()> {
        self.commit_now(Phase::TpcVote).map_err(|e| self.tm_err(e))
    }

    fn tpc_finish(&self, _txn: &Transaction) -> tm_core::Result<()> {
        // Committed (and made durable) at the vote; this ends the slot.
        self.commit_now(Phase::TpcFinish)
            .map_err(|e| self.tm_err(e))
    }

    fn tpc_abort(&self, _txn: &Transaction) -> tm_core::Result<()> {
        self.rollback_now(Phase::TpcAbort)
            .map_err(|e| self.tm_err(e))
    }

    fn commit_one_phase(&self, _txn: &Transaction) -> tm_core::Result<()> {
        self.commit_now(Phase::CommitOnePhase)
            .map_err(|e| self.tm_err(e))
    }

    fn can_prepare(&self) -> bool {
        false
    }

    /// The `SqliteDecisionLog` created on this same pool (clones included,
    /// a second `Database::open` of the file not): its decision rows commit
    /// inside this transaction's `COMMIT`.
    fn hosted_log(&self) -> Option<LogId> {
        self.db.hosted_log.get().copied()
    }

    fn should_retry(&self, err: &(dyn std::error::Error + 'static)) -> bool {
        crate::error::is_retryable(err)
    }

    fn savepoint(&self, _txn: &Transaction) -> tm_core::Result<Box<dyn ResourceSavepoint>> {
        let mut savepoints = self.savepoints.lock();
        let shared = self.acquire().map_err(|e| self.tm_err(e))?;
        savepoints.issued += 1;
        let id = savepoints.issued;
        let c = shared.lock();
        c.conn()
            .execute_batch(&format!("SAVEPOINT tm_sp_{id}"))
            .map_err(|e| self.tm_err(self.db.err(Phase::Savepoint, e)))?;
        savepoints.stack.push((id, true));
        Ok(Box::new(SqliteSavepoint {
            res: self.me.clone(),
            id,
        }))
    }
}

/// An SQL `SAVEPOINT` on the transaction's connection. Rolling back runs
/// `ROLLBACK TO` (the savepoint stays, so it can be rolled back to again);
/// dropping it `RELEASE`s it once no later savepoint is still wanted.
struct SqliteSavepoint {
    res: Weak<SqliteTxn>,
    id: u64,
}

impl ResourceSavepoint for SqliteSavepoint {
    fn rollback(&self) -> tm_core::Result<()> {
        let Some(res) = self.res.upgrade() else {
            return Err(tm_core::Error::InvalidSavepoint);
        };
        let stack = &mut res.savepoints.lock().stack;
        let Some(pos) = stack.iter().position(|(id, _)| *id == self.id) else {
            return Err(tm_core::Error::InvalidSavepoint);
        };
        let Some(shared) = res.current() else {
            return Err(tm_core::Error::InvalidSavepoint);
        };
        let c = shared.lock();
        c.conn()
            .execute_batch(&format!("ROLLBACK TO tm_sp_{}", self.id))
            .map_err(|e| res.tm_err(res.db.err(Phase::Rollback, e)))?;
        // SQLite cancelled every savepoint after this one.
        stack.truncate(pos + 1);
        Ok(())
    }
}

impl Drop for SqliteSavepoint {
    fn drop(&mut self) {
        let Some(res) = self.res.upgrade() else {
            return;
        };
        let stack = &mut res.savepoints.lock().stack;
        let Some(pos) = stack.iter().position(|(id, _)| *id == self.id) else {
            return;
        };
        stack[pos].1 = false;
        // RELEASE X also releases everything after X: only release a run of
        // unwanted savepoints at the top of the stack.
        let keep = stack
            .iter()
            .rposition(|(_, wanted)| *wanted)
            .map_or(0, |i| i + 1);
        if keep == stack.len() {
            return;
        }
        let bottom = stack[keep].0;
        stack.truncate(keep);
        if let Some(shared) = res.current() {
            let c = shared.lock();
            if !c.ended.get() {
                if let Err(e) = c.conn().execute_batch(&format!("RELEASE tm_sp_{bottom}")) {
                    warn!(db = %res.db.name, error = %e, "RELEASE of a savepoint failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tm_core::TransactionManager;

    fn resource(db: &Database, txn: &Transaction) -> Arc<SqliteTxn> {
        db.join(txn)
            .unwrap()
            .execute_batch("CREATE TABLE IF NOT EXISTS t (x INTEGER); INSERT INTO t VALUES (1)")
            .unwrap();
        db.open_txn(&txn.id()).unwrap()
    }

    fn already_ended(err: tm_core::Error, phase: Phase, ended: Ending) {
        let source = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<Error>());
        match source {
            Some(e @ Error::AlreadyEnded { .. }) => {
                assert_eq!(e.phase(), phase, "{e}");
                assert!(
                    matches!(e, Error::AlreadyEnded { ended: got, .. } if *got == ended),
                    "{e}"
                );
                let text = tm_core::Report(&err).to_string();
                assert!(
                    text.contains("sqlite:") && text.contains(&phase.to_string()),
                    "{text}"
                );
            }
            _ => panic!("expected AlreadyEnded at {phase}, got {err:?}"),
        }
    }

    #[test]
    fn finishing_a_slot_that_already_ended_is_an_error_naming_resource_and_phase() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("t.db")).unwrap();
        let tm = TransactionManager::explicit();

        // Committed in one phase, then finished again.
        let txn = tm.begin().unwrap();
        let res = resource(&db, &txn);
        res.commit_one_phase(&txn).unwrap();
        already_ended(
            res.commit_one_phase(&txn).unwrap_err(),
            Phase::CommitOnePhase,
            Ending::Committed,
        );
        already_ended(
            res.tpc_finish(&txn).unwrap_err(),
            Phase::TpcFinish,
            Ending::Committed,
        );
        already_ended(
            res.tpc_abort(&txn).unwrap_err(),
            Phase::TpcAbort,
            Ending::Committed,
        );
        drop(tm.abort());

        // Voted (its COMMIT), finished, finished again.
        let txn = tm.begin().unwrap();
        let res = resource(&db, &txn);
        res.tpc_vote(&txn).unwrap();
        already_ended(
            res.tpc_vote(&txn).unwrap_err(),
            Phase::TpcVote,
            Ending::Committed,
        );
        res.tpc_finish(&txn).unwrap();
        already_ended(
            res.tpc_finish(&txn).unwrap_err(),
            Phase::TpcFinish,
            Ending::Committed,
        );
        drop(tm.abort());

        // Rolled back, then finished.
        let txn = tm.begin().unwrap();
        let res = resource(&db, &txn);
        res.abort(&txn).unwrap();
        res.tpc_abort(&txn).unwrap(); // a second rollback is harmless
        already_ended(
            res.tpc_finish(&txn).unwrap_err(),
            Phase::TpcFinish,
            Ending::RolledBack,
        );
        already_ended(
            res.commit_one_phase(&txn).unwrap_err(),
            Phase::CommitOnePhase,
            Ending::RolledBack,
        );
        drop(tm.abort());

        let n: i64 = db
            .with_connection(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn the_syncs_after_a_commit_follow_the_journal_mode_and_synchronous_level() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        std::fs::write(&path, b"").unwrap();
        let file =
            |suffix: &str| SyncTarget::File(PathBuf::from(format!("{}{suffix}", path.display())));
        let parent = SyncTarget::Dir(dir.path().to_path_buf());
        let db = SyncTarget::File(path.clone());
        assert_eq!(after_commit_syncs(&path, "wal", 1), [file("-wal")]);
        assert_eq!(after_commit_syncs(&path, "wal", 0), [file("-wal")]);
        assert!(after_commit_syncs(&path, "wal", 2).is_empty());
        assert_eq!(
            after_commit_syncs(&path, "delete", 2),
            std::slice::from_ref(&parent)
        );
        assert!(after_commit_syncs(&path, "delete", 3).is_empty());
        assert_eq!(after_commit_syncs(&path, "delete", 0), [db.clone(), parent]);
        assert_eq!(after_commit_syncs(&path, "truncate", 1), [file("-journal")]);
        assert!(after_commit_syncs(&path, "truncate", 2).is_empty());
        assert!(after_commit_syncs(&path, "persist", 1).is_empty());
        assert_eq!(
            after_commit_syncs(&path, "persist", 0),
            [db, file("-journal")]
        );
        assert!(after_commit_syncs(&path, "memory", 1).is_empty());
        assert!(after_commit_syncs(Path::new(":memory:"), "memory", 0).is_empty());
    }
}
