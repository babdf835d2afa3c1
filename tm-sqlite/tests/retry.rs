//! Retry classification: BUSY, LOCKED and BUSY_SNAPSHOT are retryable, also
//! wrapped in the caller's own error type; other errors are not.

mod support;

use std::time::Duration;

use support::{counter, independent, manager, open_with, BoxError};
use tm_sqlite::{Begin, Options};

/// An application's own error type wrapping rusqlite's.
#[derive(Debug)]
enum AppError {
    Db(rusqlite::Error),
    Tm(tm_core::Error),
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppError::Db(e) => write!(f, "database: {e}"),
            AppError::Tm(e) => write!(f, "transaction: {e}"),
        }
    }
}

impl std::error::Error for AppError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AppError::Db(e) => Some(e),
            AppError::Tm(e) => Some(e),
        }
    }
}

impl From<rusqlite::Error> for AppError {
    fn from(e: rusqlite::Error) -> Self {
        AppError::Db(e)
    }
}

impl From<tm_core::Error> for AppError {
    fn from(e: tm_core::Error) -> Self {
        AppError::Tm(e)
    }
}

tm_core::tx_error!(AppError);

#[test]
fn a_busy_begin_is_retried_and_the_next_attempt_commits() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_with(
        dir.path(),
        Options::default().busy_timeout(Duration::from_millis(1)),
    );
    let blocker = independent(db.path());
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let tm = manager();
    let mut attempts = 0;
    tm.run(|txn| {
        attempts += 1;
        let conn = match db.join(txn) {
            Ok(conn) => conn,
            Err(err) => {
                // Let the next attempt through.
                blocker.execute_batch("ROLLBACK").unwrap();
                return Err(err.into());
            }
        };
        conn.execute("UPDATE counter SET n = n + 1", [])?;
        Ok::<_, BoxError>(())
    })
    .unwrap();
    assert_eq!(attempts, 2);
    assert_eq!(counter(db.path()), 1);
}

#[test]
fn busy_snapshot_in_a_deferred_transaction_is_retryable_in_the_callers_error_type() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_with(dir.path(), Options::default().begin(Begin::Deferred));
    let (tm1, tm2) = (manager(), manager());
    let t1 = tm1.begin().unwrap();
    let c1 = db.join(&t1).unwrap();
    let _: i64 = c1
        .query_row("SELECT n FROM counter", [], |r| r.get(0))
        .unwrap();
    // Another transaction commits a write after t1's snapshot.
    let t2 = tm2.begin().unwrap();
    db.join(&t2)
        .unwrap()
        .execute("UPDATE counter SET n = 10", [])
        .unwrap();
    t2.commit().unwrap();
    let err: AppError = c1
        .execute("UPDATE counter SET n = n + 1", [])
        .unwrap_err()
        .into();
    let AppError::Db(inner) = &err else { panic!() };
    assert_eq!(inner.sqlite_error().unwrap().extended_code, 517); // BUSY_SNAPSHOT
    assert!(tm1.is_retryable(&err));
    assert!(tm_sqlite::is_retryable(&err));
    drop(c1);
    t1.abort().unwrap();
}

#[test]
fn run_retries_busy_snapshot_wrapped_in_the_callers_error_type() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_with(dir.path(), Options::default().begin(Begin::Deferred));
    let tm = manager();
    let other = manager();
    let mut attempts = 0;
    let result: Result<(), AppError> = tm.run(|txn| {
        attempts += 1;
        let conn = db.join(txn)?;
        let n: i64 = conn.query_row("SELECT n FROM counter", [], |r| r.get(0))?;
        if attempts == 1 {
            // Someone else commits between our read and our write.
            std::thread::scope(|s| {
                s.spawn(|| {
                    let t = other.begin().unwrap();
                    db.join(&t)
                        .unwrap()
                        .execute("UPDATE counter SET n = n + 100", [])
                        .unwrap();
                    t.commit().unwrap();
                });
            });
        }
        conn.execute("UPDATE counter SET n = ?1", [n + 1])?;
        Ok(())
    });
    result.unwrap();
    assert_eq!(attempts, 2);
    assert_eq!(counter(db.path()), 101);
}

#[test]
fn locked_and_busy_are_retryable_while_sql_and_constraint_errors_are_not() {
    use rusqlite::ffi;
    let fail = |code| rusqlite::Error::SqliteFailure(ffi::Error::new(code), None);
    assert!(tm_sqlite::is_retryable(&fail(ffi::SQLITE_BUSY)));
    assert!(tm_sqlite::is_retryable(&fail(ffi::SQLITE_LOCKED)));
    assert!(tm_sqlite::is_retryable(&fail(517)));
    assert!(!tm_sqlite::is_retryable(&fail(ffi::SQLITE_ERROR)));
    assert!(!tm_sqlite::is_retryable(&fail(ffi::SQLITE_CONSTRAINT)));
    assert!(!tm_sqlite::is_retryable(
        &rusqlite::Error::QueryReturnedNoRows
    ));
    // Wrapped twice, in tm's error and in the caller's.
    let wrapped = AppError::Tm(tm_core::Error::resource("sqlite:x", fail(ffi::SQLITE_BUSY)));
    assert!(tm_sqlite::is_retryable(&wrapped));
    // LOCKED and its extended codes, wrapped in the caller's error type.
    assert!(tm_sqlite::is_retryable(&AppError::Db(fail(
        ffi::SQLITE_LOCKED
    ))));
    assert!(tm_sqlite::is_retryable(&AppError::Db(fail(262)))); // LOCKED_SHAREDCACHE
    assert!(tm_sqlite::is_retryable(&AppError::Tm(
        tm_core::Error::resource("sqlite:x", fail(ffi::SQLITE_LOCKED))
    )));
    assert!(!tm_sqlite::is_retryable(&AppError::Db(fail(
        ffi::SQLITE_CONSTRAINT
    ))));
}
