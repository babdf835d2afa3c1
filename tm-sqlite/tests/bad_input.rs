//! Bad input and misuse: each is a clear error naming the database, the
//! phase and SQLite's code, and leaves the pool clean.

mod support;

use std::error::Error as _;

use support::{insert, item_names, manager, open, pool_is_clean, BoxError};
use tm_core::{Error, Phase};

/// The tm-sqlite error inside a tm error.
fn sqlite_error(err: &Error) -> &tm_sqlite::Error {
    err.source()
        .and_then(|s| s.downcast_ref::<tm_sqlite::Error>())
        .unwrap_or_else(|| panic!("not a tm-sqlite error: {err:?}"))
}

#[test]
fn a_path_in_a_missing_directory_fails_at_open_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("app.db");
    let err = tm_sqlite::Database::open(&path).unwrap_err();
    assert_eq!(err.path(), path.as_path());
    assert_eq!(err.phase(), Phase::Open);
    assert_eq!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::CannotOpen)
    );
    let text = err.to_string();
    assert!(
        text.contains("no-such-dir") && text.contains("open"),
        "{text}"
    );
    assert!(!err.is_retryable());
}

#[test]
fn a_file_that_is_not_a_database_fails_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, vec![b'x'; 4096]).unwrap();
    let err = tm_sqlite::Database::open(&path).unwrap_err();
    assert_eq!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase)
    );
    assert_eq!(err.extended_code(), Some(26));
    assert!(err.to_string().contains("notes.txt"), "{err}");
}

#[test]
fn a_sql_syntax_error_is_not_retried_and_rolls_the_transaction_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager();
    let mut attempts = 0;
    let err = tm
        .run(|txn| {
            attempts += 1;
            let conn = db.join(txn)?;
            insert(&conn, "before the typo")?;
            conn.execute("INSRT INTO item (name) VALUES ('x')", [])?;
            Ok::<_, BoxError>(())
        })
        .unwrap_err();
    assert_eq!(attempts, 1);
    let sqlite = err
        .downcast_ref::<rusqlite::Error>()
        .expect("the rusqlite error, unchanged");
    assert!(!tm_sqlite::is_retryable(sqlite));
    assert!(err.to_string().contains("syntax error"), "{err}");
    assert!(item_names(db.path()).is_empty());
    assert!(pool_is_clean(&db));
}

#[test]
fn a_constraint_violation_is_not_retried_and_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager();
    tm.run(|txn| Ok::<_, BoxError>(insert(&*db.join(txn)?, "dup")?))
        .unwrap();
    let mut attempts = 0;
    let err = tm
        .run(|txn| {
            attempts += 1;
            let conn = db.join(txn)?;
            insert(&conn, "new")?;
            insert(&conn, "dup")?;
            Ok::<_, BoxError>(())
        })
        .unwrap_err();
    assert_eq!(attempts, 1);
    assert!(!tm.is_retryable(&*err));
    let sqlite = err.downcast_ref::<rusqlite::Error>().unwrap();
    assert_eq!(
        sqlite.sqlite_error_code(),
        Some(rusqlite::ErrorCode::ConstraintViolation)
    );
    assert_eq!(item_names(db.path()), ["dup"]);
}

#[test]
fn a_caught_constraint_violation_leaves_the_transaction_committable() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager();
    let txn = tm.begin().unwrap();
    let conn = db.join(&txn).unwrap();
    insert(&conn, "a").unwrap();
    assert!(insert(&conn, "a").is_err()); // statement rolled back, not the transaction
    insert(&conn, "b").unwrap();
    drop(conn);
    txn.commit().unwrap();
    assert_eq!(item_names(db.path()), ["a", "b"]);
}

#[test]
fn a_deferred_constraint_failing_at_commit_names_the_phase_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let db = support::open_with_deferred_foreign_key(dir.path(), tm_sqlite::Options::default());
    let tm = manager();
    let txn = tm.begin().unwrap();
    db.join(&txn)
        .unwrap()
        .execute("INSERT INTO child (parent) VALUES (42)", [])
        .unwrap();
    let err = txn.commit().unwrap_err();
    let sqlite = sqlite_error(&err);
    assert_eq!(sqlite.phase(), Phase::CommitOnePhase);
    assert!(sqlite.is_constraint_violation());
    assert_eq!(sqlite.extended_code(), Some(787)); // SQLITE_CONSTRAINT_FOREIGNKEY
    let text = tm_core::Report(&err).to_string();
    assert!(
        text.contains("commit_one_phase") && text.contains("787") && text.contains("test.db"),
        "{text}"
    );
    txn.abort().unwrap();
    assert!(pool_is_clean(&db));
}

#[test]
fn join_after_the_transaction_ended_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager();
    let txn = tm.begin().unwrap();
    insert(&db.join(&txn).unwrap(), "a").unwrap();
    txn.commit().unwrap();
    assert!(matches!(db.join(&txn), Err(Error::Closed)));
}

#[test]
fn a_connection_used_after_its_transaction_ended_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager();
    let txn = tm.begin().unwrap();
    let kept = db.join(&txn).unwrap();
    insert(&kept, "a").unwrap();
    txn.commit().unwrap(); // the guard is kept across the commit
    assert_eq!(item_names(db.path()), ["a"]);
    assert!(!kept.is_active());
    let err = kept.try_connection().unwrap_err();
    assert!(matches!(err, tm_sqlite::Error::TransactionEnded { .. }));
    assert!(err.to_string().contains("transaction has ended"), "{err}");
    // Deref panics with the same message rather than run SQL outside any transaction.
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = kept.execute("INSERT INTO item (name) VALUES ('late')", []);
    }))
    .unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.contains("transaction has ended"), "{message}");
    drop(kept);
    assert_eq!(item_names(db.path()), ["a"]);
    assert!(pool_is_clean(&db));
}

/// Joins, inserts "a", lets `by_hand` meddle with the joined connection, then
/// commits (beside a preparable `other` resource when given): the commit
/// must be refused as [`tm_sqlite::Error::EndedOutsideTm`]; the transaction is
/// then aborted, and the pool must be clean. Returns the commit's error.
fn commit_after_by_hand(
    db: &tm_sqlite::Database,
    other: Option<std::sync::Arc<tm_core::testing::TestDataManager>>,
    by_hand: impl FnOnce(&rusqlite::Connection),
) -> Error {
    let tm = manager();
    let txn = tm.begin().unwrap();
    let conn = db.join(&txn).unwrap();
    insert(&conn, "a").unwrap();
    by_hand(&conn);
    drop(conn);
    if let Some(other) = other {
        txn.join(other).unwrap();
    }
    let err = txn.commit().unwrap_err();
    let sqlite = sqlite_error(&err);
    assert!(
        matches!(sqlite, tm_sqlite::Error::EndedOutsideTm { .. }),
        "{sqlite:?}"
    );
    let text = tm_core::Report(&err).to_string();
    assert!(text.contains("ended outside tm"), "{text}");
    txn.abort().unwrap();
    assert!(pool_is_clean(db));
    err
}

#[test]
fn commit_run_by_hand_is_refused_at_the_vote() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let err = commit_after_by_hand(&db, None, |c| c.execute_batch("COMMIT").unwrap());
    assert_eq!(sqlite_error(&err).phase(), Phase::CommitOnePhase);
}

#[test]
fn rollback_run_by_hand_is_refused_at_the_vote() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    commit_after_by_hand(&db, None, |c| c.execute_batch("ROLLBACK").unwrap());
    assert!(item_names(db.path()).is_empty());
}

#[test]
fn commit_and_begin_run_by_hand_are_refused_at_the_vote_and_the_new_work_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    commit_after_by_hand(&db, None, |c| {
        c.execute_batch("COMMIT; BEGIN").unwrap();
        insert(c, "second").unwrap();
    });
    // The hand-run COMMIT did commit "a"; tm committed nothing more.
    assert_eq!(item_names(db.path()), ["a"]);
}

#[test]
fn commit_run_by_hand_beside_another_resource_is_refused_at_tpc_vote_and_the_other_aborted() {
    use tm_core::testing::{CallLog, TestDataManager};
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log = CallLog::new();
    let other = TestDataManager::new("other", &log);
    let err = commit_after_by_hand(&db, Some(other), |c| {
        c.execute_batch("COMMIT; BEGIN").unwrap();
        insert(c, "second").unwrap();
    });
    let sqlite = sqlite_error(&err);
    assert_eq!(sqlite.phase(), Phase::TpcVote);
    assert_eq!(sqlite.path(), db.path());
    assert_eq!(err.resource_name(), Some(db.name()));
    let text = tm_core::Report(&err).to_string();
    assert!(
        text.contains("tpc_vote") && text.contains("test.db"),
        "{text}"
    );
    // SQLite's vote is the decision: refused, the prepared resource is rolled back.
    assert_eq!(
        log.phases_of("other"),
        [
            Phase::TpcBegin,
            Phase::Commit,
            Phase::TpcVote,
            Phase::TpcAbort
        ]
    );
    assert_eq!(item_names(db.path()), ["a"]);
}

#[test]
fn begin_by_hand_inside_a_joined_transaction_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager();
    let txn = tm.begin().unwrap();
    let err = db.join(&txn).unwrap().execute_batch("BEGIN").unwrap_err();
    assert!(err.to_string().contains("within a transaction"), "{err}");
    txn.abort().unwrap();
}

#[test]
fn commit_or_rollback_and_begin_run_by_hand_in_a_deferred_read_only_transaction_are_refused() {
    // No write yet: SQLite's commit and rollback hooks do not fire.
    for by_hand in ["COMMIT; BEGIN", "ROLLBACK; BEGIN"] {
        let dir = tempfile::tempdir().unwrap();
        let db = support::open_with(
            dir.path(),
            tm_sqlite::Options::default().begin(tm_sqlite::Begin::Deferred),
        );
        let tm = manager();
        let txn = tm.begin().unwrap();
        let conn = db.join(&txn).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM item", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
        conn.execute_batch(by_hand).unwrap();
        insert(&conn, "outside tm").unwrap();
        drop(conn);
        let err = txn.commit().unwrap_err();
        let sqlite = sqlite_error(&err);
        assert!(
            matches!(sqlite, tm_sqlite::Error::EndedOutsideTm { .. }),
            "{by_hand}: {sqlite:?}"
        );
        assert_eq!(sqlite.phase(), Phase::CommitOnePhase, "{by_hand}");
        txn.abort().unwrap();
        assert!(item_names(db.path()).is_empty(), "{by_hand}");
        assert!(pool_is_clean(&db), "{by_hand}");
    }
}

#[test]
fn a_deferred_constraint_failing_at_a_deferred_commit_is_a_constraint_violation() {
    let dir = tempfile::tempdir().unwrap();
    let db = support::open_with_deferred_foreign_key(
        dir.path(),
        tm_sqlite::Options::default().begin(tm_sqlite::Begin::Deferred),
    );
    let tm = manager();
    let txn = tm.begin().unwrap();
    db.join(&txn)
        .unwrap()
        .execute("INSERT INTO child (parent) VALUES (42)", [])
        .unwrap();
    let err = txn.commit().unwrap_err();
    let sqlite = sqlite_error(&err);
    assert!(sqlite.is_constraint_violation(), "{sqlite:?}");
    assert_eq!(sqlite.extended_code(), Some(787));
    txn.abort().unwrap();
    assert!(pool_is_clean(&db));
}
