//! tm-sqlite under the recovery contract: the log's identity, the fence
//! (plain INSERTs conflicting on the transaction id), refused set-ups, and
//! the last resource's durable commit.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{
    insert, item_names, manager, open, open_with, pool_is_clean, BoxError, DurablePreparer,
};
use tm_core::{
    recover_with, Backoff, DataManager, Decision, DecisionLog, Error, FileDecisionLog, MemoryStore,
    Outcome, Phase, RecoveryOptions, Transaction, TransactionManager, TxId,
};
use tm_sqlite::{Begin, Database, Options, SqliteDecisionLog, Synchronous};

fn manager_with(log: Arc<dyn DecisionLog>) -> TransactionManager {
    TransactionManager::builder()
        .explicit(true)
        .backoff(Backoff::None)
        .decision_log(log)
        .build()
}

fn commit_rows(db: &Database) -> i64 {
    db.with_connection(|c| {
        c.query_row(
            "SELECT count(*) FROM tm_decisions WHERE outcome = 'commit'",
            [],
            |r| r.get(0),
        )
    })
    .unwrap()
}

/// A preparable resource that notes, at its `tpc_finish`, how many durable
/// syncs the database had made by then.
struct SyncObserver {
    db: Database,
    seen_at_finish: AtomicU64,
}

impl DataManager for SyncObserver {
    fn sort_key(&self) -> &str {
        "aaa-observer" // sorts before sqlite:..., and is finished after it anyway
    }
    fn abort(&self, _: &Transaction) -> tm_core::Result<()> {
        Ok(())
    }
    fn tpc_begin(&self, _: &Transaction) -> tm_core::Result<()> {
        Ok(())
    }
    fn commit(&self, _: &Transaction) -> tm_core::Result<()> {
        Ok(())
    }
    fn tpc_vote(&self, _: &Transaction) -> tm_core::Result<()> {
        Ok(())
    }
    fn tpc_finish(&self, _: &Transaction) -> tm_core::Result<()> {
        self.seen_at_finish
            .store(self.db.durable_syncs() + 1000, Ordering::SeqCst);
        Ok(())
    }
    fn tpc_abort(&self, _: &Transaction) -> tm_core::Result<()> {
        Ok(())
    }
}

fn decision_commit_syncs(options: Options) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let db = open_with(dir.path(), options);
    let log = Arc::new(SqliteDecisionLog::new(&db).unwrap());
    let tm = manager_with(log);
    let observer = Arc::new(SyncObserver {
        db: db.clone(),
        seen_at_finish: AtomicU64::new(0),
    });
    let txn = tm.begin().unwrap();
    insert(&db.join(&txn).unwrap(), "row").unwrap();
    txn.join(observer.clone()).unwrap();
    txn.commit().unwrap();
    assert_eq!(item_names(db.path()), ["row"]);
    let seen = observer.seen_at_finish.load(Ordering::SeqCst);
    assert!(seen >= 1000, "the other resource was never finished");
    (seen - 1000, db.durable_syncs())
}

#[test]
fn the_decision_commit_under_wal_and_normal_is_fsynced_before_the_other_resource_finishes() {
    let (before_other_finish, total) = decision_commit_syncs(Options::default());
    assert_eq!(
        before_other_finish, 1,
        "the WAL was not fsynced before the other tpc_finish"
    );
    assert_eq!(total, 1);
}

#[test]
fn a_commit_already_durable_by_its_setting_costs_no_extra_sync() {
    let (_, total) = decision_commit_syncs(Options::default().synchronous(Synchronous::Full));
    assert_eq!(total, 0);
    // Alone (one phase), SQLite's own setting governs: no extra sync.
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    manager()
        .run(|txn| {
            insert(&*db.join(txn)?, "alone")?;
            Ok::<_, BoxError>(())
        })
        .unwrap();
    assert_eq!(db.durable_syncs(), 0);
}

#[test]
fn an_abort_recorded_first_fences_the_coordinators_commit_and_nothing_commits() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log = Arc::new(SqliteDecisionLog::new(&db).unwrap());
    let tm = manager_with(log.clone());
    let store = MemoryStore::<i64>::new();
    let txn = tm.begin().unwrap();
    let txid = txn.id();
    // Recovery in another process (another pool, another thread) fences the
    // transaction before its coordinator reaches the decision.
    let path = support::db_path(dir.path());
    let outcome = std::thread::spawn(move || {
        let other = SqliteDecisionLog::new(&Database::open(path).unwrap()).unwrap();
        other.record_abort(&txid).unwrap()
    })
    .join()
    .unwrap();
    assert_eq!(outcome, Outcome::Aborted);
    insert(&db.join(&txn).unwrap(), "row").unwrap();
    store.join(&txn).unwrap().put("k", 1).unwrap();
    match txn.commit() {
        Err(Error::Fenced { txid: fenced }) => assert_eq!(fenced, txid),
        other => panic!("expected Fenced, got {other:?}"),
    }
    txn.abort().unwrap();
    assert!(item_names(db.path()).is_empty());
    assert_eq!(store.committed("k"), None);
    assert_eq!(store.prepared_count(), 0);
    assert!(log.pending().unwrap().is_empty());
    // The abort row stays: the fence holds for a later attempt too.
    assert_eq!(log.record_abort(&txid).unwrap(), Outcome::Aborted);
    assert!(pool_is_clean(&db));
}

#[test]
fn record_abort_waiting_on_a_committing_coordinator_learns_it_committed() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log = Arc::new(SqliteDecisionLog::new(&db).unwrap());
    let tm = manager_with(log.clone());
    let store = MemoryStore::<i64>::new();
    let txn = tm.begin().unwrap();
    let txid = txn.id();
    // The coordinator holds SQLite's write lock (BEGIN IMMEDIATE at join).
    insert(&db.join(&txn).unwrap(), "row").unwrap();
    store.join(&txn).unwrap().put("k", 1).unwrap();
    let path = support::db_path(dir.path());
    let recovery = std::thread::spawn(move || {
        let other = SqliteDecisionLog::new(&Database::open(path).unwrap()).unwrap();
        other.record_abort(&txid)
    });
    std::thread::sleep(Duration::from_millis(300)); // recovery is waiting on the lock
    txn.commit().unwrap();
    assert_eq!(recovery.join().unwrap().unwrap(), Outcome::Committed);
    assert_eq!(item_names(db.path()), ["row"]);
    assert_eq!(store.committed("k"), Some(1));
}

#[test]
fn record_abort_behind_a_held_write_lock_past_the_busy_timeout_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log = SqliteDecisionLog::new(&db).unwrap();
    let impatient = Database::open_with(
        support::db_path(dir.path()),
        Options::default().busy_timeout(Duration::from_millis(50)),
    )
    .unwrap();
    let recovery = SqliteDecisionLog::new(&impatient).unwrap();
    let tm = manager();
    let txn = tm.begin().unwrap();
    insert(&db.join(&txn).unwrap(), "row").unwrap();
    let err = recovery.record_abort(&txn.id()).unwrap_err();
    assert!(matches!(err, Error::DecisionLog { .. }), "{err:?}");
    let text = tm_core::Report(&err).to_string();
    assert!(text.contains("recover"), "{text}");
    txn.commit().unwrap();
    // Nothing was recorded: a later pass decides.
    assert_eq!(log.record_abort(&txn.id()).unwrap(), Outcome::Aborted);
}

#[test]
fn a_commit_recorded_first_makes_record_abort_answer_committed_and_commit_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let log = SqliteDecisionLog::new(&db).unwrap();
    let d = Decision::new(TxId::new(), vec!["p".into()], BTreeMap::new());
    log.record_commit(&d).unwrap();
    log.record_commit(&d).unwrap();
    assert_eq!(log.record_abort(&d.txid).unwrap(), Outcome::Committed);
    assert_eq!(log.pending().unwrap(), std::slice::from_ref(&d));
    let fenced = TxId::new();
    assert_eq!(log.record_abort(&fenced).unwrap(), Outcome::Aborted);
    let late = Decision::new(fenced, vec![], BTreeMap::new());
    assert!(matches!(log.record_commit(&late), Err(Error::Fenced { txid }) if txid == fenced));
    // pending lists commits only; forget keeps the abort row.
    assert_eq!(log.pending().unwrap(), std::slice::from_ref(&d));
    log.forget(&fenced).unwrap();
    log.forget(&d.txid).unwrap();
    assert!(log.pending().unwrap().is_empty());
    assert!(matches!(
        log.record_commit(&late),
        Err(Error::Fenced { .. })
    ));
}

#[test]
fn two_pools_creating_the_log_at_once_agree_on_one_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = support::db_path(dir.path());
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let ids: Vec<_> = (0..2)
        .map(|_| {
            let (path, barrier) = (path.clone(), barrier.clone());
            std::thread::spawn(move || {
                // Both open the fresh file at once too (switching it to WAL
                // at once answered BUSY without the busy handler).
                barrier.wait();
                let db = Database::open(&path).unwrap();
                SqliteDecisionLog::new(&db).unwrap().id()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert_eq!(ids[0], ids[1]);
    let again = SqliteDecisionLog::new(&Database::open(&path).unwrap()).unwrap();
    assert_eq!(again.id(), ids[0]);
    let rows: i64 = again
        .database()
        .with_connection(|c| c.query_row("SELECT count(*) FROM tm_log", [], |r| r.get(0)))
        .unwrap();
    assert_eq!(rows, 1);
}

#[test]
fn a_decision_table_of_the_old_schema_is_migrated_keeping_its_commit_rows() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let old = TxId::new();
    db.with_connection(|c| {
        c.execute_batch(
            "CREATE TABLE tm_decisions (txid TEXT PRIMARY KEY, participants TEXT NOT NULL, metadata TEXT NOT NULL)",
        )?;
        c.execute(
            "INSERT INTO tm_decisions VALUES (?1, '[\"memory:a\"]', '{\"user\":\"bob\"}')",
            [old.to_string()],
        )
    })
    .unwrap();
    let log = SqliteDecisionLog::new(&db).unwrap();
    let pending = log.pending().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].txid, old);
    assert_eq!(pending[0].participants, ["memory:a"]);
    assert_eq!(log.record_abort(&old).unwrap(), Outcome::Committed);
    // Opening again does not migrate twice.
    let again = SqliteDecisionLog::new(&db).unwrap();
    assert_eq!(again.id(), log.id());
    assert_eq!(again.pending().unwrap().len(), 1);
}

#[test]
fn sqlite_beside_a_durable_preparer_is_refused_with_the_log_outside_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let outside: Vec<Arc<dyn DecisionLog>> = vec![
        // Another pool on the same file is not "inside" this transaction.
        Arc::new(
            SqliteDecisionLog::new(&Database::open(support::db_path(dir.path())).unwrap()).unwrap(),
        ),
        Arc::new(
            SqliteDecisionLog::new(&Database::open(dir.path().join("log.db")).unwrap()).unwrap(),
        ),
        Arc::new(FileDecisionLog::open(dir.path().join("decisions.log")).unwrap()),
    ];
    for log in outside {
        let tm = manager_with(log);
        let durable = DurablePreparer::new("redis-like");
        let txn = tm.begin().unwrap();
        insert(&db.join(&txn).unwrap(), "row").unwrap();
        txn.join(durable.clone()).unwrap();
        let err = txn.commit().unwrap_err();
        assert!(matches!(err, Error::UnsafeSetup(_)), "{err:?}");
        txn.abort().unwrap();
        assert!(item_names(db.path()).is_empty());
        assert!(!durable
            .calls
            .phases_of("redis-like")
            .contains(&Phase::TpcVote));
    }
    assert!(pool_is_clean(&db));
}

#[test]
fn sqlite_beside_a_durable_preparer_commits_with_the_log_inside_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager_with(Arc::new(SqliteDecisionLog::new(&db.clone()).unwrap()));
    let durable = DurablePreparer::new("redis-like");
    let txn = tm.begin().unwrap();
    insert(&db.join(&txn).unwrap(), "row").unwrap();
    txn.join(durable.clone()).unwrap();
    txn.commit().unwrap();
    assert_eq!(item_names(db.path()), ["row"]);
    assert_eq!(
        durable.calls.phases_of("redis-like"),
        [Phase::TpcVote, Phase::TpcFinish]
    );
    // Forgotten, not yet deleted (batched).
    assert_eq!(commit_rows(&db), 1);
}

#[test]
fn recovery_fences_a_stalled_coordinator_and_its_late_commit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Deferred: the coordinator's SQLite part holds no lock until it writes
    // its decision row, so recovery's abort row can go first.
    let db = open_with(dir.path(), Options::default().begin(Begin::Deferred));
    let log = Arc::new(SqliteDecisionLog::new(&db).unwrap());
    let tm = manager_with(log.clone());
    let store = MemoryStore::<i64>::named("accounts");
    let txn = tm.begin().unwrap();
    let _ = db.join(&txn).unwrap();
    store.join(&txn).unwrap().put("k", 1).unwrap();
    // Recovery runs between the store's vote and the SQLite commit.
    let report = Arc::new(parking_lot::Mutex::new(None));
    let (r, l, s) = (report.clone(), log.clone(), store.clone());
    txn.join(Arc::new(support_hook::VoteHook::new(move || {
        *r.lock() =
            Some(recover_with(&*l, &[&s], &RecoveryOptions::new().grace(Duration::ZERO)).unwrap());
    })))
    .unwrap();
    assert!(matches!(txn.commit(), Err(Error::Fenced { .. })));
    txn.abort().unwrap();
    let report = report.lock().take().unwrap();
    assert_eq!(report.aborted.len(), 1, "{report}");
    assert_eq!(store.committed("k"), None);
    assert_eq!(store.prepared_count(), 0);
    assert!(log.pending().unwrap().is_empty());
    assert!(pool_is_clean(&db));
}

mod support_hook {
    use tm_core::{DataManager, Transaction};

    /// A preparable resource that runs `f` at its vote (sorted after
    /// `memory:`, so the store has voted by then).
    pub struct VoteHook(parking_lot::Mutex<Option<Box<dyn FnOnce() + Send>>>);

    impl VoteHook {
        pub fn new(f: impl FnOnce() + Send + 'static) -> Self {
            VoteHook(parking_lot::Mutex::new(Some(Box::new(f))))
        }
    }

    impl DataManager for VoteHook {
        fn sort_key(&self) -> &str {
            "n-vote-hook"
        }
        fn abort(&self, _: &Transaction) -> tm_core::Result<()> {
            Ok(())
        }
        fn tpc_begin(&self, _: &Transaction) -> tm_core::Result<()> {
            Ok(())
        }
        fn commit(&self, _: &Transaction) -> tm_core::Result<()> {
            Ok(())
        }
        fn tpc_vote(&self, _: &Transaction) -> tm_core::Result<()> {
            if let Some(f) = self.0.lock().take() {
                f();
            }
            Ok(())
        }
        fn tpc_finish(&self, _: &Transaction) -> tm_core::Result<()> {
            Ok(())
        }
        fn tpc_abort(&self, _: &Transaction) -> tm_core::Result<()> {
            Ok(())
        }
    }
}
