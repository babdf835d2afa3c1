//! Recovery that cannot hurt: ownership, grace, the fence, "a missing
//! record is never success", refused set-ups and the recovery service, on
//! `MemoryStore`s and `FileDecisionLog`s.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tm_core::testing::{CallLog, TestDataManager};
use tm_core::{
    recover, recover_with, resolve, Decision, DecisionLog, Error, FileDecisionLog, LogId,
    MemoryStore, Outcome, Phase, Recoverable, RecoveryOptions, RecoveryService, Resolution, Status,
    TransactionManager, TxId,
};

fn now() -> RecoveryOptions {
    RecoveryOptions::new().grace(Duration::ZERO)
}

fn manager(log: Arc<dyn DecisionLog>) -> TransactionManager {
    TransactionManager::builder()
        .explicit(true)
        .backoff(tm_core::Backoff::None)
        .decision_log(log)
        .build()
}

struct Setup {
    _dir: tempfile::TempDir,
    log: Arc<FileDecisionLog>,
    x: MemoryStore<i64>,
    y: MemoryStore<i64>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(FileDecisionLog::open(dir.path().join("decisions")).unwrap());
    Setup {
        _dir: dir,
        log,
        x: MemoryStore::named("x"),
        y: MemoryStore::named("y"),
    }
}

/// Commits `x=k, y=k` through `tm` with y's finish failing: y stays
/// prepared with a logged decision (or, without a log, none).
fn leave_y_in_doubt(s: &Setup, tm: &TransactionManager, k: i64) -> TxId {
    s.y.fail_finish(true);
    let txn = tm.begin().unwrap();
    s.x.join(&txn).unwrap().put("k", k).unwrap();
    s.y.join(&txn).unwrap().put("k", k).unwrap();
    let err = txn.commit().unwrap_err();
    assert!(err.is_heuristic(), "{err}");
    tm.abort().unwrap();
    s.y.fail_finish(false);
    txn.id()
}

/// A decision log that holds `record_commit` until released: a coordinator
/// stalled between its votes and its decision.
struct StallingLog {
    inner: Arc<FileDecisionLog>,
    reached: parking_lot::Mutex<Option<mpsc::Sender<()>>>,
    release: parking_lot::Mutex<Option<mpsc::Receiver<()>>>,
}

impl DecisionLog for StallingLog {
    fn id(&self) -> LogId {
        self.inner.id()
    }
    fn record_commit(&self, decision: &Decision) -> tm_core::Result<()> {
        if let Some(reached) = self.reached.lock().take() {
            reached.send(()).unwrap();
            let release = self.release.lock().take().unwrap();
            release.recv().unwrap();
        }
        self.inner.record_commit(decision)
    }
    fn record_abort(&self, txid: &TxId) -> tm_core::Result<Outcome> {
        self.inner.record_abort(txid)
    }
    fn forget(&self, txid: &TxId) -> tm_core::Result<()> {
        self.inner.forget(txid)
    }
    fn pending(&self) -> tm_core::Result<Vec<Decision>> {
        self.inner.pending()
    }
}

#[test]
fn records_of_another_log_are_left_alone_and_reported_foreign_with_their_log_and_age() {
    let s = setup();
    let tm = manager(s.log.clone());
    let txid = leave_y_in_doubt(&s, &tm, 7);
    let listed = s.y.in_doubt().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].txid, txid);
    assert_eq!(listed[0].log, Some(s.log.id()));

    // Another process's log (or a wrong path): nothing is touched.
    let dir = tempfile::tempdir().unwrap();
    let other = FileDecisionLog::open(dir.path().join("other")).unwrap();
    let report = recover_with(&other, &[&s.x, &s.y], &now()).unwrap();
    assert!(
        report.committed.is_empty() && report.aborted.is_empty(),
        "{report:?}"
    );
    assert_eq!(report.foreign.len(), 1);
    let (rid, record) = &report.foreign[0];
    assert_eq!(rid, "memory:y");
    assert_eq!(record.txid, txid);
    assert_eq!(record.log, Some(s.log.id()));
    assert!(!report.nothing_in_doubt());
    assert_eq!(s.y.prepared_count(), 1);
    assert_eq!(s.y.committed("k"), None);

    // The right log then commits it.
    let report = recover(&*s.log, &[&s.x, &s.y]).unwrap();
    assert_eq!(report.committed, [("memory:y".to_owned(), txid)]);
    assert_eq!(report.forgotten, [txid]);
    assert_eq!(s.y.committed("k"), Some(7));
}

#[test]
fn a_fresh_empty_log_never_aborts_a_decided_transaction() {
    let s = setup();
    let tm = manager(s.log.clone());
    let txid = leave_y_in_doubt(&s, &tm, 3);
    let dir = tempfile::tempdir().unwrap();
    let fresh = FileDecisionLog::open(dir.path().join("fresh")).unwrap();
    for _ in 0..3 {
        let report = recover_with(&fresh, &[&s.x, &s.y], &now()).unwrap();
        assert!(report.aborted.is_empty(), "{report:?}");
    }
    assert_eq!(s.y.in_doubt().unwrap()[0].txid, txid);
    recover(&*s.log, &[&s.y]).unwrap();
    assert_eq!(s.y.committed("k"), Some(3));
    assert_eq!(s.x.committed("k"), Some(3));
}

#[test]
fn an_undecided_record_younger_than_the_grace_period_is_deferred_then_fenced_and_aborted() {
    let s = setup();
    let tm = manager(s.log.clone());
    let (reached_tx, reached_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let stalling = Arc::new(StallingLog {
        inner: s.log.clone(),
        reached: parking_lot::Mutex::new(Some(reached_tx)),
        release: parking_lot::Mutex::new(Some(release_rx)),
    });
    drop(tm);
    let tm = manager(stalling.clone());
    let (x, y) = (s.x.clone(), s.y.clone());
    let coordinator = std::thread::spawn(move || {
        let txn = tm.begin().unwrap();
        x.join(&txn).unwrap().put("k", 1).unwrap();
        y.join(&txn).unwrap().put("k", 1).unwrap();
        let result = txn.commit();
        (txn.id(), txn.status(), result)
    });
    reached_rx.recv().unwrap(); // both voted; the decision is not made

    // A normal pass leaves live work alone.
    let report = recover(&*s.log, &[&s.x, &s.y]).unwrap();
    assert_eq!(report.deferred.len(), 2, "{report:?}");
    assert!(report.aborted.is_empty());
    assert_eq!(s.y.prepared_count(), 1);

    // Past the grace period: the fence, then the abort.
    let report = recover_with(&*s.log, &[&s.x, &s.y], &now()).unwrap();
    assert_eq!(report.aborted.len(), 2, "{report:?}");
    release_tx.send(()).unwrap();
    let (txid, status, result) = coordinator.join().unwrap();
    match result {
        Err(Error::Fenced { txid: fenced }) => assert_eq!(fenced, txid),
        other => panic!("the stalled coordinator must be fenced, got {other:?}"),
    }
    assert_eq!(status, Status::CommitFailed);
    assert_eq!(s.x.committed("k"), None);
    assert_eq!(s.y.committed("k"), None);
    assert_eq!(s.x.prepared_count() + s.y.prepared_count(), 0);
    assert!(s.log.pending().unwrap().is_empty());
    assert!(Error::Fenced { txid }.is_retryable());
}

#[test]
fn a_coordinator_whose_decision_came_first_is_committed_by_recovery_never_aborted() {
    let s = setup();
    let tm = manager(s.log.clone());
    let txid = leave_y_in_doubt(&s, &tm, 9);
    // The fence answers "committed": recovery commits.
    assert_eq!(s.log.record_abort(&txid).unwrap(), Outcome::Committed);
    let report = recover_with(&*s.log, &[&s.x, &s.y], &now()).unwrap();
    assert_eq!(report.committed, [("memory:y".to_owned(), txid)]);
    assert!(report.aborted.is_empty());
    // x had finished before: it holds a receipt.
    assert_eq!(report.already_finished, [("memory:x".to_owned(), txid)]);
    assert_eq!(s.y.committed("k"), Some(9));
}

#[test]
fn a_decided_transaction_whose_record_is_gone_is_reported_lost_and_its_decision_kept() {
    let s = setup();
    let tm = manager(s.log.clone());
    let txid = leave_y_in_doubt(&s, &tm, 5);
    // Something outside the protocol removed y's prepare (an operator, a
    // failover): y holds a tombstone, no receipt.
    s.y.abort_prepared(&txid).unwrap();
    let report = recover_with(&*s.log, &[&s.x, &s.y], &now()).unwrap();
    assert_eq!(report.lost, [("memory:y".to_owned(), txid)], "{report:?}");
    assert!(!report.is_clean());
    assert!(report.forgotten.is_empty());
    assert_eq!(s.log.pending().unwrap().len(), 1, "the decision is kept");
    match s.y.commit_prepared(&txid).unwrap_err() {
        Error::RecordMissing {
            resource,
            txid: t,
            missing,
        } => {
            assert_eq!(resource, "y");
            assert_eq!(t, txid);
            assert_eq!(missing, tm_core::Missing::Aborted);
        }
        other => panic!("{other:?}"),
    }
    // Never seen at all: lost.
    let err = s.y.commit_prepared(&TxId::new()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::RecordMissing {
                missing: tm_core::Missing::Lost,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn finishing_a_record_that_recovery_aborted_is_heuristic_never_ok() {
    // The coordinator decided, but y's record was aborted before its finish
    // (an operator's take-over of a coordinator wrongly believed dead).
    let s = setup();
    struct AbortAfterDecision {
        inner: Arc<FileDecisionLog>,
        y: MemoryStore<i64>,
    }
    impl DecisionLog for AbortAfterDecision {
        fn id(&self) -> LogId {
            self.inner.id()
        }
        fn record_commit(&self, d: &Decision) -> tm_core::Result<()> {
            self.inner.record_commit(d)?;
            self.y.abort_prepared(&d.txid)
        }
        fn record_abort(&self, txid: &TxId) -> tm_core::Result<Outcome> {
            self.inner.record_abort(txid)
        }
        fn forget(&self, txid: &TxId) -> tm_core::Result<()> {
            self.inner.forget(txid)
        }
        fn pending(&self) -> tm_core::Result<Vec<Decision>> {
            self.inner.pending()
        }
    }
    let tm = manager(Arc::new(AbortAfterDecision {
        inner: s.log.clone(),
        y: s.y.clone(),
    }));
    let txn = tm.begin().unwrap();
    s.x.join(&txn).unwrap().put("k", 1).unwrap();
    s.y.join(&txn).unwrap().put("k", 1).unwrap();
    match txn.commit().unwrap_err() {
        Error::Heuristic {
            committed,
            rolled_back,
            in_doubt,
        } => {
            assert_eq!(committed, ["x"]);
            assert_eq!(rolled_back, ["y"]);
            assert!(in_doubt.is_empty());
        }
        other => panic!("expected Heuristic, got {other:?}"),
    }
    tm.abort().unwrap();
}

#[test]
fn unsafe_set_ups_are_refused_before_anything_is_prepared() {
    let calls = CallLog::new();
    let durable = || TestDataManager::new("redis", &calls).durable();
    let other = || TestDataManager::new("other", &calls);
    let sqlite = || TestDataManager::new("sqlite", &calls).one_phase();
    let refused = |tm: &TransactionManager, dms: Vec<Arc<TestDataManager>>, says: &str| {
        calls.clear();
        let txn = tm.begin().unwrap();
        for dm in dms {
            txn.join(dm).unwrap();
        }
        let err = txn.commit().unwrap_err();
        assert!(matches!(err, Error::UnsafeSetup(_)), "{err}");
        assert!(err.to_string().contains(says), "{err}");
        // Nothing prepared: every resource got `abort`, nothing else.
        assert!(
            calls.entries().iter().all(|(_, p)| *p == Phase::Abort),
            "{:?}",
            calls.entries()
        );
        tm.abort().unwrap();
    };
    let committed = |tm: &TransactionManager, dms: Vec<Arc<TestDataManager>>| {
        let txn = tm.begin().unwrap();
        for dm in dms {
            txn.join(dm).unwrap();
        }
        txn.commit().unwrap();
    };

    // A durable prepare beside another resource with no decision log.
    let no_log = tm();
    refused(&no_log, vec![durable(), other()], "no decision log");
    refused(&no_log, vec![durable(), sqlite()], "no decision log");
    let opted_out = TransactionManager::builder()
        .explicit(true)
        .allow_unrecoverable(true)
        .build();
    committed(&opted_out, vec![durable(), other()]);
    committed(&no_log, vec![durable()]); // alone: one phase, nothing to recover
    committed(&no_log, vec![other(), sqlite()]); // nothing durable

    // A one-phase resource beside a durable one, with the log kept outside it.
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(FileDecisionLog::open(dir.path().join("log")).unwrap());
    let with_log = manager(log.clone());
    refused(&with_log, vec![durable(), sqlite()], "kept outside it");
    committed(&with_log, vec![durable(), sqlite().hosting(log.id())]);
    committed(&with_log, vec![durable(), other()]);

    // Two one-phase resources.
    refused(
        &tm(),
        vec![sqlite(), TestDataManager::new("s2", &calls).one_phase()],
        "only one may commit last",
    );
    committed(
        &tm_many_last(),
        vec![sqlite(), TestDataManager::new("s2", &calls).one_phase()],
    );
}

#[test]
fn a_dry_run_changes_nothing() {
    let s = setup();
    let tm = manager(s.log.clone());
    let txid = leave_y_in_doubt(&s, &tm, 4);
    let report = recover_with(&*s.log, &[&s.x, &s.y], &now().dry_run(true)).unwrap();
    assert!(report.dry_run);
    assert_eq!(report.committed, [("memory:y".to_owned(), txid)]);
    assert!(report.to_string().starts_with("dry run: "), "{report}");
    assert_eq!(s.y.prepared_count(), 1);
    assert_eq!(s.log.pending().unwrap().len(), 1);
}

#[test]
fn the_operator_resolves_through_the_fence_and_takes_over_only_when_told() {
    let s = setup();
    // A dead coordinator with a log nobody has any more.
    let dead_dir = tempfile::tempdir().unwrap();
    let dead = Arc::new(FileDecisionLog::open(dead_dir.path().join("dead")).unwrap());
    let dead_id = dead.id();
    let tm = manager(dead.clone());
    let t1 = leave_y_in_doubt(&s, &tm, 1);
    drop(tm);
    // Its decision is lost with it: forget it to play the lost log.
    dead.forget(&t1).unwrap();
    drop(dead);

    let report = recover_with(&*s.log, &[&s.y], &now()).unwrap();
    assert_eq!(report.foreign.len(), 1);
    let report = recover_with(&*s.log, &[&s.y], &now().take_over(dead_id)).unwrap();
    assert_eq!(report.aborted, [("memory:y".to_owned(), t1)], "{report:?}");

    // Our own in-doubt transaction: the operator commits it; aborting it
    // after that is refused by the fence.
    let tm = manager(s.log.clone());
    let t2 = leave_y_in_doubt(&s, &tm, 2);
    let changed = resolve(Some(&*s.log), &[&s.x, &s.y], &t2, Resolution::Commit).unwrap();
    assert_eq!(changed, ["memory:y"]);
    assert_eq!(s.y.committed("k"), Some(2));
    let t3 = leave_y_in_doubt(&s, &tm, 3);
    s.log.record_abort(&TxId::new()).unwrap();
    let err = resolve(Some(&*s.log), &[&s.y], &t3, Resolution::Abort).unwrap_err();
    assert!(err.to_string().contains("commit is recorded"), "{err}");
}

/// The recovery service at a 1 ms interval with no grace at all, while
/// four threads transfer: only the fence stands between it and live work,
/// and the total stays exact.
#[test]
fn the_recovery_service_at_1ms_without_grace_never_breaks_concurrent_transfers() {
    let s = setup();
    const ACCOUNTS: i64 = 8;
    const START: i64 = 1_000;
    for i in 0..ACCOUNTS {
        let store = if i % 2 == 0 { &s.x } else { &s.y };
        let tm = TransactionManager::explicit();
        let txn = tm.begin().unwrap();
        store
            .join(&txn)
            .unwrap()
            .put(&format!("a{i}"), START)
            .unwrap();
        txn.commit().unwrap();
    }
    let service = RecoveryService::builder(
        s.log.clone(),
        vec![
            Arc::new(s.x.clone()) as Arc<dyn Recoverable>,
            Arc::new(s.y.clone()),
        ],
    )
    .interval(Duration::from_millis(1))
    .options(now())
    .start()
    .unwrap();
    let fenced = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let (s, fenced, done) = (&s, &fenced, &done);
            scope.spawn(move || {
                let tm = manager(s.log.clone());
                let mut seed = t * 7919 + 1;
                for _ in 0..300 {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let from = (seed >> 33) as i64 % ACCOUNTS;
                    let to = (from + 1 + (seed >> 40) as i64 % (ACCOUNTS - 1)) % ACCOUNTS;
                    let result = tm.run(|txn| {
                        for (acct, delta) in [(from, -1), (to, 1)] {
                            let store = if acct % 2 == 0 { &s.x } else { &s.y };
                            let h = store.join(txn)?;
                            let key = format!("a{acct}");
                            let v = h.get(&key)?.unwrap_or(0);
                            h.put(&key, v + delta)?;
                        }
                        Ok::<_, Error>(())
                    });
                    match result {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) if err.is_retryable() => {
                            if matches!(err, Error::Fenced { .. }) {
                                fenced.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(err) => panic!("transfer failed: {err}"),
                    }
                }
            });
        }
    });
    service.run_now();
    let passes = service.passes();
    drop(service);
    let total: i64 = s.x.snapshot().values().sum::<i64>() + s.y.snapshot().values().sum::<i64>();
    println!(
        "{} transfers committed, {} ended fenced, {passes} recovery passes",
        done.load(Ordering::Relaxed),
        fenced.load(Ordering::Relaxed)
    );
    assert_eq!(total, ACCOUNTS * START, "money created or destroyed");
    assert!(done.load(Ordering::Relaxed) > 0);
    assert!(passes > 10, "{passes}");
    assert_eq!(s.x.prepared_count() + s.y.prepared_count(), 0);
    assert!(s.log.pending().unwrap().is_empty());
}

/// The bug: aborting a transaction a resource had already committed (its
/// receipt) answered `Ok`, so an operator's abort or a report said
/// "aborted" for a committed part.
#[test]
fn aborting_what_a_resource_already_committed_is_never_ok() {
    let s = setup();
    let tm = manager(s.log.clone());
    // x commits (a receipt), y stays prepared.
    let t = leave_y_in_doubt(&s, &tm, 7);
    match s.x.abort_prepared(&t) {
        Err(Error::RecordMissing {
            missing: tm_core::Missing::Committed,
            txid,
            ..
        }) => assert_eq!(txid, t),
        other => panic!("expected RecordMissing(Committed), got {other:?}"),
    }
    assert_eq!(s.x.committed("k"), Some(7), "the commit stays");
    // A prepared one still aborts, and aborting it again is still `Ok`.
    s.y.abort_prepared(&t).unwrap();
    s.y.abort_prepared(&t).unwrap();
    assert_eq!(s.y.committed("k"), None);
}
