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
use std::sync::{Arc, Weak};

use parking_lot::lock_api::ArcReentrantMutexGuard;
use parking_lot::{Mutex, RawMutex, RawThreadId, ReentrantMutex};
use rusqlite::{ffi, Connection};
use tm_core::{DataManager, Phase, ResourceSavepoint, Transaction, TxId, TxIdMap};
use tracing::{error, warn};

use crate::error::{Error, Result};
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
        let mode: String = conn
            .query_row(&format!("PRAGMA journal_mode = {wanted}"), [], |r| r.get(0))
            .map_err(err)?;
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
        let inner = DbInner {
            name: format!("sqlite:{}", path.display()),
            path,
            options,
            pool: Mutex::new(Vec::new()),
            open: Mutex::new(TxIdMap::default()),
        };
        let first = inner.connect()?;
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
        let pooled = self.inner.checkout()?;
        let result = f(&pooled.conn);
        if !pooled.conn.is_autocommit() {
            warn!(db = %self.inner.name, "with_connection left a transaction open; rolling it back");
        }
        self.inner.checkin(pooled);
        result.map_err(|e| self.inner.err(Phase::Work, e))
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
    Ended,
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
            Slot::Ended => {
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

    /// Ends this resource: no further use; returns the connection if it had
    /// begun.
    fn take(&self) -> Option<SharedConn> {
        let taken = std::mem::replace(&mut *self.slot.lock(), Slot::Ended);
        self.db.open.lock().remove(&self.txid);
        match taken {
            Slot::Active(shared) => Some(shared),
            _ => None,
        }
    }

    /// `COMMIT`s (refusing a transaction ended by hand); on failure rolls back.
    fn commit_now(&self, phase: Phase) -> Result<()> {
        let Some(shared) = self.take() else {
            return Ok(()); // never begun: nothing to commit
        };
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
        if outcome.is_err() && !c.conn().is_autocommit() {
            if let Err(e) = c.conn().execute_batch("ROLLBACK") {
                error!(db = %self.db.name, error = %e, "ROLLBACK after a failed COMMIT failed");
            }
        }
        outcome
    }

    fn rollback_now(&self, phase: Phase) -> Result<()> {
        let Some(shared) = self.take() else {
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
        // Committed at the vote; a no-op unless tpc_vote was skipped.
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
