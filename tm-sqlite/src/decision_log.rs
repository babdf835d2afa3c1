//! [`SqliteDecisionLog`]: commit decisions in a table of an SQLite database,
//! written inside the last resource's own transaction when it can be
//! ("logging last resource").

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;

use rusqlite::{ffi, params, Connection, TransactionBehavior};
use tm_core::{Decision, DecisionLog, LogId, Outcome, Phase, TxId};

use crate::database::Database;
use crate::error::Error;
use crate::options::Synchronous;

/// `tm_log` holds the log's one id row; `tm_decisions` one row per
/// transaction, keyed by its id: a commit decision, or an abort recorded by
/// recovery (the fence). `at` is the row's time (Unix seconds), for
/// operators.
const CREATE: &str = "CREATE TABLE IF NOT EXISTS tm_log (id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tm_decisions (
    txid TEXT PRIMARY KEY,
    participants TEXT NOT NULL,
    metadata TEXT NOT NULL,
    outcome TEXT NOT NULL DEFAULT 'commit',
    at INTEGER NOT NULL DEFAULT 0
)";
/// Plain `INSERT`s, never `INSERT OR REPLACE`: the primary-key conflict
/// between a commit row and an abort row of one transaction *is* the fence,
/// and SQLite's write lock decides which came first.
const INSERT_COMMIT: &str = "INSERT INTO tm_decisions (txid, participants, metadata, outcome, at)
    VALUES (?1, ?2, ?3, 'commit', CAST(strftime('%s', 'now') AS INTEGER))";
const INSERT_ABORT: &str = "INSERT INTO tm_decisions (txid, participants, metadata, outcome, at)
    VALUES (?1, '[]', '{}', 'abort', CAST(strftime('%s', 'now') AS INTEGER))";
const OUTCOME: &str = "SELECT outcome FROM tm_decisions WHERE txid = ?1";
/// Abort rows are never deleted: they fence a coordinator arriving late.
const DELETE: &str = "DELETE FROM tm_decisions WHERE txid = ?1 AND outcome = 'commit'";

/// Forgotten decisions are deleted in batches of this many: a completed
/// transaction then costs no extra SQLite write of its own. Rows of finished
/// transactions that a crash leaves behind only make `recover` finish them
/// again, which is idempotent.
const FORGET_BATCH: usize = 64;

/// What a row of `tm_decisions` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Row {
    Commit,
    Abort,
}

impl Row {
    fn parse(text: &str) -> rusqlite::Result<Row> {
        match text {
            "commit" => Ok(Row::Commit),
            "abort" => Ok(Row::Abort),
            other => Err(rusqlite::Error::FromSqlConversionFailure(
                0,
                rusqlite::types::Type::Text,
                format!("tm_decisions.outcome is {other:?}, neither 'commit' nor 'abort'").into(),
            )),
        }
    }
}

/// Runs `insert`; on a primary-key conflict, returns the row already there.
/// `None`: inserted.
fn insert_or_existing(
    c: &Connection,
    txid: &str,
    insert: impl FnOnce(&Connection) -> rusqlite::Result<usize>,
) -> rusqlite::Result<Option<Row>> {
    match insert(c) {
        Ok(_) => Ok(None),
        Err(e) if is_key_conflict(&e) => {
            let outcome: String = c.prepare_cached(OUTCOME)?.query_row([txid], |r| r.get(0))?;
            Row::parse(&outcome).map(Some)
        }
        Err(e) => Err(e),
    }
}

fn is_key_conflict(e: &rusqlite::Error) -> bool {
    e.sqlite_error().is_some_and(|s| {
        s.extended_code == ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            || s.extended_code == ffi::SQLITE_CONSTRAINT_UNIQUE
    })
}

/// Creates the tables, migrates a `tm_decisions` of the first schema (no
/// `outcome`: every row was a commit) and returns the log's id, creating it
/// if missing. Run inside one `IMMEDIATE` transaction, so that two
/// processes creating the log at once agree on one id.
fn create_or_read_id(c: &Connection) -> rusqlite::Result<String> {
    c.execute_batch(CREATE)?;
    let columns = c
        .prepare("SELECT name FROM pragma_table_info('tm_decisions')")?
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if !columns.iter().any(|c| c == "outcome") {
        c.execute_batch(
            "ALTER TABLE tm_decisions ADD COLUMN outcome TEXT NOT NULL DEFAULT 'commit'",
        )?;
    }
    if !columns.iter().any(|c| c == "at") {
        c.execute_batch("ALTER TABLE tm_decisions ADD COLUMN at INTEGER NOT NULL DEFAULT 0")?;
    }
    let existing: Option<String> = c
        .query_row("SELECT id FROM tm_log LIMIT 1", [], |r| r.get(0))
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    match existing {
        Some(id) => Ok(id),
        None => {
            let id = LogId::new().to_string();
            c.execute("INSERT INTO tm_log (id) VALUES (?1)", [&id])?;
            Ok(id)
        }
    }
}

/// A [`DecisionLog`] kept in the tables `tm_decisions` and `tm_log` of an
/// SQLite [`Database`] (created if missing; `participants` and `metadata`
/// are JSON, readable with SQLite's JSON functions).
///
/// **Identity.** The log's [`LogId`] is created with the log and kept in the
/// table `tm_log`: every process opening the file shares one log (and the
/// fence keeps that safe).
///
/// **The fence.** A row per transaction says `commit` or `abort`. Commit
/// decisions and recovery's recorded aborts are plain `INSERT`s on the
/// transaction id, so whichever SQLite lets write first wins, and the other
/// learns it: [`record_commit`](DecisionLog::record_commit) after an abort
/// is [`tm_core::Error::Fenced`]; [`record_abort`](DecisionLog::record_abort)
/// after a commit answers [`Outcome::Committed`]. Abort rows are kept.
///
/// Forgetting a finished decision costs nothing per transaction: the rows
/// are deleted 64 at a time (and by [`pending`](DecisionLog::pending) and
/// when the last clone is dropped). A crash may leave rows of finished
/// transactions behind; [`recover`](tm_core::recover) finds nothing in doubt
/// for them and forgets them.
///
/// **Logging last resource.** SQLite cannot prepare, so tm commits it last,
/// after every other vote; its `COMMIT` is the decision. tm records the
/// decision just before that `COMMIT`. When the transaction has *this same*
/// `Database` (or a clone of it) joined, the row is inserted through the
/// transaction's own connection and commits atomically with it: the
/// decision row exists exactly when the SQLite transaction committed (that
/// `COMMIT` is made durable before any other participant is finished,
/// whatever [`Options::synchronous`](crate::Options::synchronous) says).
/// Otherwise the row is written in its own transaction with
/// `synchronous = EXTRA` (durable before `record_commit` returns). Use the
/// same handle: a second `Database` opened on the same file is another pool,
/// and tm refuses it as the log of a transaction that also has durably
/// preparing participants ([`tm_core::Error::UnsafeSetup`]).
///
/// ```
/// use std::sync::Arc;
/// use tm_core::{DecisionLog, MemoryStore, TransactionManager};
/// use tm_sqlite::{Database, SqliteDecisionLog};
///
/// let dir = tempfile::tempdir()?;
/// let db = Database::open(dir.path().join("app.db"))?;
/// db.with_connection(|c| c.execute_batch("CREATE TABLE t (x INTEGER)"))?;
/// let log = Arc::new(SqliteDecisionLog::new(&db)?);
/// let tm = TransactionManager::builder().explicit(true).decision_log(log.clone()).build();
/// let store = MemoryStore::<i64>::new();
///
/// tm.run(|txn| {
///     db.join(txn)?.execute("INSERT INTO t VALUES (1)", [])?;
///     store.join(txn)?.put("x", 1)?;
///     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
/// })?;
/// assert!(log.pending()?.is_empty()); // recorded, then forgotten once all finished
/// assert_eq!(store.committed("x"), Some(1));
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// ```
#[derive(Debug, Clone)]
pub struct SqliteDecisionLog {
    db: Database,
    id: LogId,
    /// Decisions forgotten but not yet deleted (shared by clones).
    forgotten: Arc<Mutex<Vec<String>>>,
}

impl SqliteDecisionLog {
    /// A log in `db`: creates the tables if missing (migrating a
    /// `tm_decisions` table of the first schema, whose rows are all commit
    /// decisions) and the log's id, or reads the id kept there. From now on
    /// `db`'s transactions host this log
    /// ([`DataManager::hosted_log`](tm_core::DataManager::hosted_log)).
    ///
    /// ```
    /// use tm_core::DecisionLog;
    /// let dir = tempfile::tempdir()?;
    /// let db = tm_sqlite::Database::open(dir.path().join("app.db"))?;
    /// let log = tm_sqlite::SqliteDecisionLog::new(&db)?;
    /// assert_eq!(log.database().path(), db.path());
    /// // The id is kept in the file: another pool on it finds the same one.
    /// let again = tm_sqlite::SqliteDecisionLog::new(&tm_sqlite::Database::open(db.path())?)?;
    /// assert_eq!(again.id(), log.id());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(db: &Database) -> Result<Self, Error> {
        let id = db.with_connection_at(Phase::Open, |c| {
            durably(c, db.options().synchronous, create_or_read_id)
        })?;
        let id: LogId = id.parse().map_err(|e: tm_core::Error| Error::Corrupt {
            path: db.path().to_path_buf(),
            phase: Phase::Open,
            detail: format!("tm_log.id: {e}"),
        })?;
        db.host_log(id);
        Ok(SqliteDecisionLog {
            db: db.clone(),
            id,
            forgotten: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// The database holding the log.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let db = tm_sqlite::Database::open(dir.path().join("app.db"))?;
    /// let log = tm_sqlite::SqliteDecisionLog::new(&db)?;
    /// assert_eq!(log.database().name(), db.name());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Whether `db` is this log's database (the same pool): then decisions
    /// of its transactions are written inside them.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let db = tm_sqlite::Database::open(dir.path().join("app.db"))?;
    /// let log = tm_sqlite::SqliteDecisionLog::new(&db)?;
    /// assert!(log.is_in(&db.clone()));
    /// assert!(!log.is_in(&tm_sqlite::Database::open(db.path())?));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_in(&self, db: &Database) -> bool {
        self.db.same_as(db)
    }

    fn log_err(&self, e: Error) -> tm_core::Error {
        tm_core::Error::DecisionLog {
            log: self.db.name().to_owned(),
            source: e.into(),
        }
    }

    fn sqlite_err(&self, phase: Phase, e: rusqlite::Error) -> tm_core::Error {
        self.log_err(Error::sqlite(self.db.path(), phase, e))
    }

    /// Runs `f` in its own `IMMEDIATE` transaction, durable when it returns.
    fn write_durably<T>(
        &self,
        phase: Phase,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> tm_core::Result<T> {
        self.db
            .with_connection_at(phase, |c| durably(c, self.db.options().synchronous, f))
            .map_err(|e| self.log_err(e))
    }

    /// Deletes the forgotten decisions' rows in one transaction; on failure
    /// they stay queued for the next attempt.
    fn flush_forgotten(&self) -> tm_core::Result<()> {
        let batch = std::mem::take(&mut *self.forgotten.lock());
        if batch.is_empty() {
            return Ok(());
        }
        let result = self.db.with_connection_at(Phase::TpcFinish, |c| {
            let tx = c.unchecked_transaction()?;
            {
                let mut stmt = tx.prepare_cached(DELETE)?;
                for key in &batch {
                    stmt.execute([key])?;
                }
            }
            tx.commit()
        });
        if let Err(e) = result {
            self.forgotten.lock().extend(batch);
            return Err(self.log_err(e));
        }
        Ok(())
    }
}

/// Runs `f` in an `IMMEDIATE` transaction on `c` with `synchronous = EXTRA`
/// (restoring `everyday` after). `PRAGMA synchronous` cannot change inside a
/// transaction, hence around it. EXTRA, not FULL: in `journal_mode=DELETE`
/// the commit is the unlink of the journal, and only EXTRA syncs the
/// directory after it (sqlite.org/pragma.html#pragma_synchronous); in WAL
/// mode EXTRA costs the same as FULL (one sync of the WAL at commit,
/// `sqlite3PagerSetFlags` in SQLite 3.50). A failed sync fails SQLite's own
/// `COMMIT`, which then does not count.
fn durably<T>(
    c: &Connection,
    everyday: Synchronous,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let weaker = everyday != Synchronous::Extra;
    if weaker {
        c.execute_batch("PRAGMA synchronous = EXTRA")?;
    }
    let result =
        rusqlite::Transaction::new_unchecked(c, TransactionBehavior::Immediate).and_then(|tx| {
            let value = f(&tx)?;
            tx.commit()?;
            Ok(value)
        });
    if weaker {
        if let Err(e) = c.execute_batch(&format!("PRAGMA synchronous = {}", everyday.as_str())) {
            // Harmless: the connection stays more durable than asked.
            tracing::warn!(error = %e, "could not restore PRAGMA synchronous");
        }
    }
    result
}

impl DecisionLog for SqliteDecisionLog {
    fn id(&self) -> LogId {
        self.id
    }

    fn record_commit(&self, decision: &Decision) -> tm_core::Result<()> {
        let txid = decision.txid.to_string();
        let participants = json_array(&decision.participants);
        let metadata = json_object(&decision.metadata);
        let insert = |c: &Connection| {
            insert_or_existing(c, &txid, |c| {
                c.prepare_cached(INSERT_COMMIT)?
                    .execute(params![txid, participants, metadata])
            })
        };
        // Logging last resource: inside the transaction's own SQLite
        // transaction, which commits right after this returns (a conflict
        // there leaves the transaction open; tm then rolls it back).
        let in_txn = self
            .db
            .open_txn(&decision.txid)
            .and_then(|res| res.with_open_conn(insert));
        let existing = match in_txn {
            Some(result) => result.map_err(|e| self.sqlite_err(Phase::TpcVote, e))?,
            None => self.write_durably(Phase::TpcVote, insert)?,
        };
        match existing {
            None | Some(Row::Commit) => Ok(()),
            Some(Row::Abort) => Err(tm_core::Error::Fenced {
                txid: decision.txid,
            }),
        }
    }

    fn record_abort(&self, txid: &TxId) -> tm_core::Result<Outcome> {
        let key = txid.to_string();
        // Its own transaction, even when this process has the transaction
        // open: the abort must not ride in (and die with) the coordinator's
        // transaction. While the coordinator holds the write lock this waits
        // up to the busy timeout; BUSY is an error and recovery tries again
        // on a later pass.
        let existing = self.write_durably(Phase::Recover, |c| {
            insert_or_existing(c, &key, |c| c.prepare_cached(INSERT_ABORT)?.execute([&key]))
        })?;
        Ok(match existing {
            Some(Row::Commit) => Outcome::Committed,
            None | Some(Row::Abort) => Outcome::Aborted,
        })
    }

    fn forget(&self, txid: &TxId) -> tm_core::Result<()> {
        let key = txid.to_string();
        let delete = |c: &Connection| c.prepare_cached(DELETE)?.execute([&key]).map(|_| ());
        // Still inside the transaction (its last resource failed): delete
        // there, so as not to wait for our own write lock.
        if let Some(res) = self.db.open_txn(txid) {
            if let Some(result) = res.with_open_conn(delete) {
                return result.map_err(|e| self.sqlite_err(Phase::Abort, e));
            }
        }
        let full = {
            let mut queue = self.forgotten.lock();
            queue.push(key);
            queue.len() >= FORGET_BATCH
        };
        if full {
            self.flush_forgotten()?;
        }
        Ok(())
    }

    fn pending(&self) -> tm_core::Result<Vec<Decision>> {
        self.flush_forgotten()?;
        let rows = self
            .db
            .with_connection_at(Phase::Recover, |c| {
                let mut stmt = c.prepare(
                    "SELECT txid, participants, metadata FROM tm_decisions
                     WHERE outcome = 'commit' ORDER BY rowid",
                )?;
                let rows = stmt.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })?;
                let mut out = Vec::new();
                for row in rows {
                    let (txid, participants, metadata) = row?;
                    let participants = c
                        .prepare_cached("SELECT value FROM json_each(?1) ORDER BY key")?
                        .query_map([&participants], |r| r.get::<_, String>(0))?
                        .collect::<rusqlite::Result<Vec<_>>>()?;
                    let metadata = c
                        .prepare_cached("SELECT key, value FROM json_each(?1)")?
                        .query_map([&metadata], |r| {
                            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                        })?
                        .collect::<rusqlite::Result<BTreeMap<_, _>>>()?;
                    out.push((txid, participants, metadata));
                }
                Ok(out)
            })
            .map_err(|e| self.log_err(e))?;
        rows.into_iter()
            .map(|(txid, participants, metadata)| {
                let txid: TxId = txid.parse().map_err(|e| {
                    self.log_err(Error::Corrupt {
                        path: self.db.path().to_path_buf(),
                        phase: Phase::Recover,
                        detail: format!("tm_decisions.txid {txid:?}: {e}"),
                    })
                })?;
                Ok(Decision::new(txid, participants, metadata))
            })
            .collect()
    }
}

impl Drop for SqliteDecisionLog {
    fn drop(&mut self) {
        // The last clone deletes what is still queued (best effort: a row
        // left behind is harmless, see FORGET_BATCH).
        if Arc::strong_count(&self.forgotten) == 1 {
            if let Err(e) = self.flush_forgotten() {
                tracing::warn!(log = self.db.name(), error = %e, "could not delete forgotten decisions");
            }
        }
    }
}

fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_array(items: &[String]) -> String {
    let mut out = String::from("[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(&mut out, item);
    }
    out.push(']');
    out
}

fn json_object(map: &BTreeMap<String, String>) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(&mut out, k);
        out.push(':');
        push_json_string(&mut out, v);
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_round_trip_through_the_table_with_awkward_text() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("log.db")).unwrap();
        let log = SqliteDecisionLog::new(&db).unwrap();
        let mut metadata = BTreeMap::new();
        metadata.insert(
            "description".to_owned(),
            "line\n\"two\"\t\\ é \u{1}".to_owned(),
        );
        metadata.insert("user".to_owned(), "bob".to_owned());
        let d = Decision::new(
            TxId::new(),
            vec!["memory:a".into(), "redis:\"x\"".into()],
            metadata,
        );
        log.record_commit(&d).unwrap();
        assert_eq!(log.pending().unwrap(), vec![d.clone()]);
        log.forget(&d.txid).unwrap();
        assert!(log.pending().unwrap().is_empty());
    }

    #[test]
    fn hosted_log_is_the_log_of_the_same_pool_only() {
        use tm_core::DataManager;
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(dir.path().join("log.db")).unwrap();
        let other_pool = Database::open(db.path()).unwrap();
        let tm = tm_core::TransactionManager::explicit();
        let hosted = |db: &Database| {
            let txn = tm.begin().unwrap();
            drop(db.join(&txn).unwrap());
            let id = db.open_txn(&txn.id()).unwrap().hosted_log();
            txn.abort().unwrap();
            id
        };
        assert_eq!(hosted(&db), None);
        let log = SqliteDecisionLog::new(&db).unwrap();
        assert_eq!(hosted(&db), Some(log.id()));
        assert_eq!(hosted(&db.clone()), Some(log.id()));
        assert_eq!(hosted(&other_pool), None);
    }
}
