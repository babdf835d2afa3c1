//! `SqliteDecisionLog`: the decision row commits with the SQLite transaction
//! (logging last resource), or in its own transaction otherwise.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use support::{insert, item_names, manager, open, pool_is_clean, BoxError};
use tm_core::testing::{CallLog, Fault, Phase, TestDataManager};
use tm_core::{recover, Backoff, Decision, DecisionLog, Error, MemoryStore, TransactionManager};
use tm_sqlite::{Database, SqliteDecisionLog};

fn manager_with(log: &Arc<SqliteDecisionLog>) -> TransactionManager {
    TransactionManager::builder()
        .explicit(true)
        .backoff(Backoff::None)
        .decision_log(log.clone())
        .build()
}

fn pending_ids(log: &SqliteDecisionLog) -> Vec<tm_core::TxId> {
    log.pending().unwrap().into_iter().map(|d| d.txid).collect()
}

#[test]
fn the_decision_row_is_written_inside_the_joined_sqlite_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log = SqliteDecisionLog::new(&db).unwrap();
    let tm = manager();
    let txn = tm.begin().unwrap();
    insert(&db.join(&txn).unwrap(), "row").unwrap();
    log.record_commit(&Decision::new(txn.id(), vec!["p".into()], BTreeMap::new()))
        .unwrap();
    // Visible to the transaction's own connection...
    let inside: i64 = db
        .join(&txn)
        .unwrap()
        .query_row("SELECT count(*) FROM tm_decisions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(inside, 1);
    // ...not to anyone else until it commits...
    assert!(pending_ids(&log).is_empty());
    // ...and gone with it on abort.
    txn.abort().unwrap();
    assert!(pending_ids(&log).is_empty());
    assert!(item_names(db.path()).is_empty());
}

#[test]
fn a_completed_two_phase_commit_leaves_no_pending_decision() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log = Arc::new(SqliteDecisionLog::new(&db).unwrap());
    let tm = manager_with(&log);
    let store = MemoryStore::<i64>::new();
    tm.run(|txn| {
        insert(&*db.join(txn)?, "row")?;
        store.join(txn)?.put("k", 1)?;
        Ok::<_, BoxError>(())
    })
    .unwrap();
    assert_eq!(item_names(db.path()), ["row"]);
    assert_eq!(store.committed("k"), Some(1));
    assert!(pending_ids(&log).is_empty());
    assert!(pool_is_clean(&db));
}

#[test]
fn a_failure_at_tpc_finish_after_the_decision_leaves_the_row_pending() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log = Arc::new(SqliteDecisionLog::new(&db).unwrap());
    let tm = manager_with(&log);
    let calls = CallLog::new();
    let other = TestDataManager::new("other", &calls).fail_at(Phase::TpcFinish, Fault::Error);
    let txn = tm.begin().unwrap();
    txn.set_user("alice");
    txn.note("transfer");
    insert(&db.join(&txn).unwrap(), "row").unwrap();
    txn.join(other).unwrap();
    assert!(matches!(txn.commit(), Err(Error::Heuristic { .. })));
    txn.abort().unwrap();
    assert_eq!(item_names(db.path()), ["row"]);
    let pending = log.pending().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].txid, txn.id());
    assert_eq!(
        pending[0].metadata.get("user").map(String::as_str),
        Some("alice")
    );
    assert_eq!(
        pending[0].metadata.get("description").map(String::as_str),
        Some("transfer")
    );
    // Durable: a fresh handle on the file sees it too.
    drop(db);
    let reopened =
        SqliteDecisionLog::new(&Database::open(support::db_path(dir.path())).unwrap()).unwrap();
    assert_eq!(pending_ids(&reopened), [txn.id()]);
}

#[test]
fn no_sqlite_commit_means_no_decision_row() {
    let dir = tempfile::tempdir().unwrap();
    let db = support::open_with_deferred_foreign_key(dir.path(), tm_sqlite::Options::default());
    let log = Arc::new(SqliteDecisionLog::new(&db).unwrap());
    let tm = manager_with(&log);
    let store = MemoryStore::<i64>::new();
    let txn = tm.begin().unwrap();
    db.join(&txn)
        .unwrap()
        .execute("INSERT INTO child (parent) VALUES (7)", [])
        .unwrap();
    store.join(&txn).unwrap().put("k", 1).unwrap();
    // The decision row is inserted, then the COMMIT fails on the deferred
    // foreign key: the row goes with it.
    let err = txn.commit().unwrap_err();
    assert_eq!(err.resource_name(), Some(db.name()));
    txn.abort().unwrap();
    assert!(pending_ids(&log).is_empty());
    assert_eq!(store.committed("k"), None);
    assert_eq!(store.prepared_count(), 0);
    assert!(pool_is_clean(&db));
}

#[test]
fn recovery_finishes_a_prepared_store_from_the_sqlite_decision() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log = Arc::new(SqliteDecisionLog::new(&db).unwrap());
    let tm = manager_with(&log);
    let store = MemoryStore::<i64>::named("accounts");
    store.fail_finish(true);
    let txn = tm.begin().unwrap();
    insert(&db.join(&txn).unwrap(), "row").unwrap();
    store.join(&txn).unwrap().put("k", 5).unwrap();
    assert!(matches!(txn.commit(), Err(Error::Heuristic { .. })));
    txn.abort().unwrap();
    assert_eq!(store.prepared_count(), 1);
    assert_eq!(log.pending().unwrap()[0].participants, ["memory:accounts"]);

    store.fail_finish(false);
    let report = recover(&*log, &[&store]).unwrap();
    assert!(report.is_clean());
    assert_eq!(report.committed.len(), 1);
    assert_eq!(store.committed("k"), Some(5));
    assert!(pending_ids(&log).is_empty());
}

#[test]
fn a_log_in_another_database_writes_its_own_durable_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log_db = Database::open(dir.path().join("decisions.db")).unwrap();
    let log = Arc::new(SqliteDecisionLog::new(&log_db).unwrap());
    assert!(!log.is_in(&db));
    let tm = manager_with(&log);
    let calls = CallLog::new();
    let other = TestDataManager::new("other", &calls).fail_at(Phase::TpcFinish, Fault::Error);
    let txn = tm.begin().unwrap();
    insert(&db.join(&txn).unwrap(), "row").unwrap();
    txn.join(other).unwrap();
    assert!(matches!(txn.commit(), Err(Error::Heuristic { .. })));
    txn.abort().unwrap();
    assert_eq!(item_names(db.path()), ["row"]);
    assert_eq!(pending_ids(&log), [txn.id()]);
    log.forget(&txn.id()).unwrap();
    assert!(pending_ids(&log).is_empty());
}

#[test]
fn without_sqlite_joined_the_decision_is_its_own_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log = Arc::new(SqliteDecisionLog::new(&db).unwrap());
    let tm = manager_with(&log);
    let a = MemoryStore::<i64>::named("a");
    let b = MemoryStore::<i64>::named("b");
    b.fail_finish(true);
    let txn = tm.begin().unwrap();
    a.join(&txn).unwrap().put("k", 1).unwrap();
    b.join(&txn).unwrap().put("k", 2).unwrap();
    assert!(matches!(txn.commit(), Err(Error::Heuristic { .. })));
    txn.abort().unwrap();
    assert_eq!(pending_ids(&log), [txn.id()]);
    b.fail_finish(false);
    assert!(recover(&*log, &[&a, &b]).unwrap().is_clean());
    assert_eq!(b.committed("k"), Some(2));
    assert!(pending_ids(&log).is_empty());
}

#[test]
fn completed_decisions_are_deleted_in_batches_not_one_write_each() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log = Arc::new(SqliteDecisionLog::new(&db).unwrap());
    let tm = manager_with(&log);
    let store = MemoryStore::<i64>::new();
    let rows = || -> i64 {
        db.with_connection(|c| c.query_row("SELECT count(*) FROM tm_decisions", [], |r| r.get(0)))
            .unwrap()
    };
    let transfer = |i: i64| {
        tm.run(|txn| {
            insert(&*db.join(txn)?, &format!("row{i}"))?;
            store.join(txn)?.put("k", i)?;
            Ok::<_, BoxError>(())
        })
        .unwrap()
    };
    for i in 0..63 {
        transfer(i);
    }
    // Forgotten, not yet deleted: no extra write per transaction.
    assert_eq!(rows(), 63);
    transfer(63);
    assert_eq!(rows(), 0, "the 64th forget deletes the batch");
    transfer(64);
    assert_eq!(rows(), 1);
    // pending() never reports a forgotten decision.
    assert!(pending_ids(&log).is_empty());
    assert_eq!(rows(), 0);
}
