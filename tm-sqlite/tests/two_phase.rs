//! SQLite as the last resource beside a preparable one
//! (`tm_core::testing::TestDataManager`) failing at every phase.

mod support;

use support::{insert, item_names, manager, open, pool_is_clean, BoxError};
use tm_core::testing::{CallLog, Fault, Phase, TestDataManager};
use tm_core::Error;

fn write_with(
    other_fails_at: Option<Phase>,
) -> (
    tempfile::TempDir,
    tm_sqlite::Database,
    CallLog,
    Result<(), Error>,
) {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log = CallLog::new();
    let mut other = TestDataManager::new("other", &log);
    if let Some(phase) = other_fails_at {
        other = other.fail_at(phase, Fault::Error);
    }
    let tm = manager();
    let txn = tm.begin().unwrap();
    insert(&db.join(&txn).unwrap(), "row").unwrap();
    txn.join(other).unwrap();
    let result = txn.commit();
    if result.is_err() {
        txn.abort().unwrap();
    }
    (dir, db, log, result)
}

#[test]
fn sqlite_commits_after_the_other_resource_voted_and_before_it_finished() {
    let (_dir, db, log, result) = write_with(None);
    result.unwrap();
    assert_eq!(item_names(db.path()), ["row"]);
    assert_eq!(
        log.phases_of("other"),
        [
            Phase::TpcBegin,
            Phase::Commit,
            Phase::TpcVote,
            Phase::TpcFinish
        ]
    );
    assert!(pool_is_clean(&db));
}

#[test]
fn the_other_resource_failing_before_the_decision_leaves_no_sqlite_row() {
    for phase in [Phase::TpcBegin, Phase::Commit, Phase::TpcVote] {
        let (_dir, db, log, result) = write_with(Some(phase));
        let err = result.unwrap_err();
        assert_eq!(err.resource_name(), Some("other"), "{phase}: {err}");
        assert!(item_names(db.path()).is_empty(), "{phase}");
        assert!(log.phases_of("other").contains(&Phase::TpcAbort), "{phase}");
        assert!(pool_is_clean(&db), "{phase}");
    }
}

#[test]
fn sqlite_cannot_prepare_so_it_commits_last_even_when_it_sorts_first() {
    // "zzz" sorts after "sqlite:...": in sort order SQLite would vote
    // first. It cannot prepare, so tm votes it (its COMMIT) after the other
    // resource's vote; a refused vote there leaves no SQLite row.
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log = CallLog::new();
    let other = TestDataManager::new("zzz", &log).fail_at(Phase::TpcVote, Fault::Error);
    assert!(db.name() < "zzz");
    let tm = manager();
    let txn = tm.begin().unwrap();
    insert(&db.join(&txn).unwrap(), "row").unwrap();
    txn.join(other).unwrap();
    let err = txn.commit().unwrap_err();
    assert_eq!(err.resource_name(), Some("zzz"), "{err}");
    txn.abort().unwrap();
    assert!(item_names(db.path()).is_empty());
    assert!(log.phases_of("zzz").contains(&Phase::TpcAbort));
    assert!(pool_is_clean(&db));
}

#[test]
fn the_other_resource_failing_at_tpc_finish_after_sqlite_committed_is_heuristic_naming_both() {
    let (_dir, db, log, result) = write_with(Some(Phase::TpcFinish));
    match result.unwrap_err() {
        Error::Heuristic {
            committed,
            rolled_back,
            in_doubt,
        } => {
            assert_eq!(committed, [db.name().to_owned()]);
            assert!(rolled_back.is_empty(), "{rolled_back:?}");
            assert_eq!(in_doubt, ["other".to_owned()]);
        }
        other => panic!("expected Heuristic, got {other:?}"),
    }
    assert_eq!(item_names(db.path()), ["row"]);
    // Never rolled back after the decision.
    assert!(!log.phases_of("other").contains(&Phase::TpcAbort));
    assert!(pool_is_clean(&db));
}

#[test]
fn the_other_resource_panicking_at_its_vote_leaves_no_sqlite_row() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log = CallLog::new();
    let other = TestDataManager::new("other", &log).fail_at(Phase::TpcVote, Fault::Panic);
    let tm = manager();
    let err = tm
        .run(|txn| {
            insert(&*db.join(txn)?, "row")?;
            txn.join(other.clone())?;
            Ok::<_, BoxError>(())
        })
        .unwrap_err();
    assert!(err.to_string().contains("panicked"), "{err}");
    assert!(item_names(db.path()).is_empty());
    assert!(pool_is_clean(&db));
}

#[test]
fn a_conflict_at_the_other_resources_vote_is_retried_and_commits_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log = CallLog::new();
    let other = TestDataManager::new("other", &log).fail_times(Phase::TpcVote, Fault::Conflict, 2);
    let tm = manager();
    let mut attempts = 0;
    tm.run(|txn| {
        attempts += 1;
        db.join(txn)?.execute("UPDATE counter SET n = n + 1", [])?;
        txn.join(other.clone())?;
        Ok::<_, BoxError>(())
    })
    .unwrap();
    assert_eq!(attempts, 3);
    assert_eq!(support::counter(db.path()), 1);
}

#[test]
fn the_other_resource_failing_at_abort_still_rolls_sqlite_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log = CallLog::new();
    let other = TestDataManager::new("other", &log).fail_at(Phase::Abort, Fault::Error);
    let tm = manager();
    let txn = tm.begin().unwrap();
    insert(&db.join(&txn).unwrap(), "row").unwrap();
    txn.join(other).unwrap();
    assert!(txn.abort().is_err());
    assert!(item_names(db.path()).is_empty());
    assert!(pool_is_clean(&db));
}

#[test]
fn sqlite_failing_at_its_own_commit_aborts_the_prepared_other_resource() {
    let dir = tempfile::tempdir().unwrap();
    let db = support::open_with_deferred_foreign_key(dir.path(), tm_sqlite::Options::default());
    let log = CallLog::new();
    let other = TestDataManager::new("other", &log);
    let tm = manager();
    let txn = tm.begin().unwrap();
    let conn = db.join(&txn).unwrap();
    insert(&conn, "row").unwrap();
    conn.execute("INSERT INTO child (parent) VALUES (999)", [])
        .unwrap();
    drop(conn);
    txn.join(other).unwrap();
    let err = txn.commit().unwrap_err();
    assert_eq!(err.resource_name(), Some(db.name()));
    assert_eq!(
        log.phases_of("other"),
        [
            Phase::TpcBegin,
            Phase::Commit,
            Phase::TpcVote,
            Phase::TpcAbort
        ]
    );
    txn.abort().unwrap();
    assert!(item_names(db.path()).is_empty());
}
