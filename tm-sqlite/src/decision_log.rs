//! [`SqliteDecisionLog`]: commit decisions in a table of an SQLite database,
//! written inside the last resource's own transaction when it can be
//! ("logging last resource").

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;

use rusqlite::{params, Connection};
use tm_core::{Decision, DecisionLog, Phase, TxId};

use crate::database::Database;
use crate::error::Error;
use crate::options::Synchronous;

const CREATE: &str = "CREATE TABLE IF NOT EXISTS tm_decisions (
    txid TEXT PRIMARY KEY,
    participants TEXT NOT NULL,
    metadata TEXT NOT NULL
)";
const INSERT: &str =
    "INSERT OR REPLACE INTO tm_decisions (txid, participants, metadata) VALUES (?1, ?2, ?3)";
const DELETE: &str = "DELETE FROM tm_decisions WHERE txid = ?1";

/// Forgotten decisions are deleted in batches of this many: a completed
/// transaction then costs no extra SQLite write of its own. Rows of finished
/// transactions that a crash leaves behind only make `recover` finish them
/// again, which is idempotent.
const FORGET_BATCH: usize = 64;

/// A [`DecisionLog`] kept in the table `tm_decisions` of an SQLite
/// [`Database`] (the table is created if missing; `participants` and
/// `metadata` are JSON, readable with SQLite's JSON functions).
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
/// decision row exists exactly when the SQLite transaction committed, and
/// no extra write or fsync is made. Otherwise the row is written in its own
/// transaction with `synchronous = FULL` (durable before `record_commit`
/// returns). Use the same handle: a second `Database` opened on the same
/// file is another pool, and its open write transaction would make the log
/// wait for the busy timeout.
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
///     store.join(txn)?.put("x", 1);
///     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
/// })?;
/// assert!(log.pending()?.is_empty()); // recorded, then forgotten once all finished
/// assert_eq!(store.committed("x"), Some(1));
/// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
/// ```
#[derive(Debug, Clone)]
pub struct SqliteDecisionLog {
    db: Database,
    /// Decisions forgotten but not yet deleted (shared by clones).
    forgotten: Arc<Mutex<Vec<String>>>,
}

impl SqliteDecisionLog {
    /// A log in `db` (creating the `tm_decisions` table if missing).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let db = tm_sqlite::Database::open(dir.path().join("app.db"))?;
    /// let log = tm_sqlite::SqliteDecisionLog::new(&db)?;
    /// assert_eq!(log.database().path(), db.path());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(db: &Database) -> Result<Self, Error> {
        db.with_connection(|c| c.execute_batch(CREATE))?;
        Ok(SqliteDecisionLog {
            db: db.clone(),
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

    fn log_err(&self, e: impl Into<tm_core::BoxError>) -> tm_core::Error {
        tm_core::Error::DecisionLog {
            log: self.db.name().to_owned(),
            source: e.into(),
        }
    }

    /// Deletes the forgotten decisions' rows in one transaction; on failure
    /// they stay queued for the next attempt.
    fn flush_forgotten(&self) -> tm_core::Result<()> {
        let batch = std::mem::take(&mut *self.forgotten.lock());
        if batch.is_empty() {
            return Ok(());
        }
        let result = self.db.with_connection(|c| {
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

    fn sqlite_err(&self, phase: Phase, e: rusqlite::Error) -> tm_core::Error {
        self.log_err(Error::sqlite(self.db.path(), phase, e))
    }
}

impl DecisionLog for SqliteDecisionLog {
    fn record_commit(&self, decision: &Decision) -> tm_core::Result<()> {
        let txid = decision.txid.to_string();
        let participants = json_array(&decision.participants);
        let metadata = json_object(&decision.metadata);
        let insert = |c: &Connection| {
            c.prepare_cached(INSERT)?
                .execute(params![txid, participants, metadata])
                .map(|_| ())
        };
        // Logging last resource: inside the transaction's own SQLite
        // transaction, which commits right after this returns.
        if let Some(res) = self.db.open_txn(&decision.txid) {
            if let Some(result) = res.with_open_conn(insert) {
                return result.map_err(|e| self.sqlite_err(Phase::TpcVote, e));
            }
        }
        let weaker = matches!(
            self.db.options().synchronous,
            Synchronous::Off | Synchronous::Normal
        );
        self.db
            .with_connection(|c| {
                if weaker {
                    c.execute_batch("PRAGMA synchronous = FULL")?;
                }
                let result = insert(c);
                if weaker {
                    c.execute_batch(&format!(
                        "PRAGMA synchronous = {}",
                        self.db.options().synchronous.as_str()
                    ))?;
                }
                result
            })
            .map_err(|e| self.log_err(e))
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
            .with_connection(|c| {
                let mut stmt = c.prepare(
                    "SELECT txid, participants, metadata FROM tm_decisions ORDER BY rowid",
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
                let txid: TxId = txid.parse().map_err(|e| self.log_err(e))?;
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
}
