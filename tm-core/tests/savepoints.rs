//! Savepoints (ZODB semantics) and `atomic` nesting.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::*;
use tm_core::testing::{CallLog, Fault, TestDataManager};
use tm_core::{Error, MemoryStore, Phase, Status};

#[test]
fn rollback_restores_every_resource_to_the_savepoint() {
    let tm = tm();
    let x = MemoryStore::<i32>::named("x");
    let y = MemoryStore::<i32>::named("y");
    let txn = tm.begin().unwrap();
    let (hx, hy) = (x.join(&txn).unwrap(), y.join(&txn).unwrap());
    hx.put("k", 1).unwrap();
    hy.put("k", 1).unwrap();
    let sp = txn.savepoint().unwrap();
    hx.put("k", 2).unwrap();
    hy.delete("k").unwrap();
    hy.put("new", 5).unwrap();
    sp.rollback().unwrap();
    assert_eq!(hx.get("k").unwrap(), Some(1));
    assert_eq!(hy.get("k").unwrap(), Some(1));
    assert_eq!(hy.get("new").unwrap(), None);
    txn.commit().unwrap();
    assert_eq!((x.committed("k"), y.committed("k")), (Some(1), Some(1)));
    assert_eq!(y.committed("new"), None);
}

#[test]
fn savepoint_and_rollback_call_each_resource_in_join_order() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("b", &log)).unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    let sp = txn.savepoint().unwrap();
    sp.rollback().unwrap();
    assert_eq!(
        log.entries(),
        seq(&[
            ("b", Phase::Savepoint),
            ("a", Phase::Savepoint),
            ("b", Phase::Rollback),
            ("a", Phase::Rollback),
        ])
    );
    assert_eq!(txn.status(), Status::Active);
}

#[test]
fn a_savepoint_can_be_rolled_back_to_again() {
    let tm = tm();
    let store = MemoryStore::<i32>::new();
    let txn = tm.begin().unwrap();
    let h = store.join(&txn).unwrap();
    h.put("k", 1).unwrap();
    let sp = txn.savepoint().unwrap();
    for v in 2..5 {
        h.put("k", v).unwrap();
        sp.rollback().unwrap();
        assert_eq!(h.get("k").unwrap(), Some(1));
        assert!(sp.is_valid());
    }
    txn.commit().unwrap();
    assert_eq!(store.committed("k"), Some(1));
}

#[test]
fn rollback_invalidates_later_savepoints_but_not_itself_or_earlier_ones() {
    let tm = tm();
    let store = MemoryStore::<i32>::new();
    let txn = tm.begin().unwrap();
    let h = store.join(&txn).unwrap();
    let sp1 = txn.savepoint().unwrap();
    h.put("k", 1).unwrap();
    let sp2 = txn.savepoint().unwrap();
    h.put("k", 2).unwrap();
    let sp3 = txn.savepoint().unwrap();
    h.put("k", 3).unwrap();
    sp2.rollback().unwrap();
    assert!(sp1.is_valid() && sp2.is_valid());
    assert!(!sp3.is_valid());
    assert_eq!(h.get("k").unwrap(), Some(1));
    sp1.rollback().unwrap();
    assert!(!sp2.is_valid());
    assert_eq!(h.get("k").unwrap(), None);
}

#[test]
fn rolling_back_an_invalidated_savepoint_is_invalid_savepoint_and_calls_no_resource() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    let sp1 = txn.savepoint().unwrap();
    let sp2 = txn.savepoint().unwrap();
    sp1.rollback().unwrap();
    let calls = log.entries().len();
    let err = sp2.rollback().unwrap_err();
    assert!(matches!(err, Error::InvalidSavepoint));
    assert!(err.to_string().contains("invalid savepoint"), "{err}");
    assert_eq!(log.entries().len(), calls);
    assert_eq!(
        txn.status(),
        Status::Active,
        "a refused rollback changes nothing"
    );
    txn.commit().unwrap();
}

#[test]
fn commit_and_abort_invalidate_every_savepoint() {
    let tm = tm();
    let txn = tm.begin().unwrap();
    let sp = txn.savepoint().unwrap();
    txn.commit().unwrap();
    assert!(!sp.is_valid());
    assert!(matches!(sp.rollback(), Err(Error::InvalidSavepoint)));

    let txn = tm.begin().unwrap();
    let sp = txn.savepoint().unwrap();
    txn.abort().unwrap();
    assert!(!sp.is_valid());
    assert!(matches!(sp.rollback(), Err(Error::InvalidSavepoint)));
}

#[test]
fn rollback_of_a_savepoint_of_a_finished_transaction_calls_no_resource() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    let sp = txn.savepoint().unwrap();
    txn.commit().unwrap();
    log.clear();
    assert!(matches!(sp.rollback(), Err(Error::InvalidSavepoint)));
    assert!(log.entries().is_empty());
    assert_eq!(txn.status(), Status::Committed);
}

#[test]
fn taking_a_savepoint_of_a_finished_transaction_is_invalid_and_calls_no_resource() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.commit().unwrap();
    log.clear();
    assert!(matches!(txn.savepoint(), Err(Error::InvalidSavepoint)));
    assert!(matches!(
        txn.savepoint_optimistic(),
        Err(Error::InvalidSavepoint)
    ));
    let aborted = tm.begin().unwrap();
    aborted.join(TestDataManager::new("b", &log)).unwrap();
    aborted.abort().unwrap();
    log.clear();
    assert!(matches!(aborted.savepoint(), Err(Error::InvalidSavepoint)));
    assert!(log.entries().is_empty());
}

#[test]
fn strict_savepoint_is_refused_when_a_resource_lacks_support() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.join(TestDataManager::new("nosp", &log).without_savepoints())
        .unwrap();
    match txn.savepoint().unwrap_err() {
        Error::SavepointNotSupported { resource } => assert_eq!(resource, "nosp"),
        other => panic!("expected SavepointNotSupported, got {other:?}"),
    }
    assert_eq!(txn.status(), Status::Active);
    assert!(log.phases_of("nosp").is_empty(), "logs nothing when asked");
    txn.commit().unwrap();
}

#[test]
fn optimistic_savepoint_is_taken_but_its_rollback_fails_and_the_transaction_is_commit_failed() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.join(TestDataManager::new("nosp", &log).without_savepoints())
        .unwrap();
    let sp = txn.savepoint_optimistic().unwrap();
    match sp.rollback().unwrap_err() {
        Error::SavepointNotSupported { resource } => assert_eq!(resource, "nosp"),
        other => panic!("expected SavepointNotSupported, got {other:?}"),
    }
    assert_eq!(txn.status(), Status::CommitFailed);
    assert!(matches!(txn.commit(), Err(Error::CommitFailed)));
    txn.abort().unwrap();
    assert_eq!(log.phases_of("a").last(), Some(&Phase::Abort));
    assert_eq!(log.phases_of("nosp"), [Phase::Abort]);
}

#[test]
fn optimistic_savepoint_that_is_never_rolled_back_does_not_hurt() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("nosp", &log).without_savepoints())
        .unwrap();
    let _sp = txn.savepoint_optimistic().unwrap();
    txn.commit().unwrap();
    assert_eq!(log.phases_of("nosp"), [Phase::CommitOnePhase]);
}

#[test]
fn rollback_error_makes_the_transaction_commit_failed() {
    for fault in [Fault::Error, Fault::Conflict, Fault::Panic] {
        let log = CallLog::new();
        let tm = tm();
        let txn = tm.begin().unwrap();
        txn.join(TestDataManager::new("a", &log).fail_at(Phase::Rollback, fault))
            .unwrap();
        txn.join(TestDataManager::new("b", &log)).unwrap();
        let sp = txn.savepoint().unwrap();
        let err = sp.rollback().unwrap_err();
        assert_eq!(err.resource_name(), Some("a"), "{fault:?}: {err:?}");
        assert_eq!(txn.status(), Status::CommitFailed);
        assert!(matches!(txn.commit(), Err(Error::CommitFailed)));
        assert!(matches!(
            txn.join(TestDataManager::new("c", &log)),
            Err(Error::CommitFailed)
        ));
        assert!(tm.in_transaction());
        tm.abort().unwrap();
        assert_eq!(
            log.entries(),
            seq(&[
                ("a", Phase::Savepoint),
                ("b", Phase::Savepoint),
                ("a", Phase::Rollback),
                ("b", Phase::Rollback),
                ("a", Phase::Abort),
                ("b", Phase::Abort),
            ]),
            "{fault:?}"
        );
    }
}

#[test]
fn resource_joined_after_a_savepoint_is_aborted_and_removed_on_rollback() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    let sp = txn.savepoint().unwrap();
    let late = TestDataManager::new("late", &log);
    txn.join(late.clone()).unwrap();
    sp.rollback().unwrap();
    assert_eq!(log.phases_of("late"), [Phase::Abort]);
    assert_eq!(txn.resource_names(), ["a"]);
    txn.commit().unwrap();
    assert_eq!(log.phases_of("late"), [Phase::Abort], "no second ending");
    assert_eq!(log.phases_of("a").last(), Some(&Phase::CommitOnePhase));
}

#[test]
fn resource_removed_by_a_rollback_may_join_again_and_commit() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    let sp = txn.savepoint().unwrap();
    let late = TestDataManager::new("late", &log);
    txn.join(late.clone()).unwrap();
    sp.rollback().unwrap();
    assert!(txn.resource_names().is_empty());
    txn.join(late).unwrap();
    txn.commit().unwrap();
    assert_eq!(log.phases_of("late"), [Phase::Abort, Phase::CommitOnePhase]);
}

#[test]
fn memory_store_joined_after_a_savepoint_loses_its_writes_on_rollback_and_can_rejoin() {
    let tm = tm();
    let store = MemoryStore::<i32>::new();
    let txn = tm.begin().unwrap();
    let sp = txn.savepoint().unwrap();
    let h = store.join(&txn).unwrap();
    h.put("k", 1).unwrap();
    sp.rollback().unwrap();
    assert!(
        matches!(h.get("k"), Err(Error::Closed)),
        "the old handle is ended"
    );
    let h = store.join(&txn).unwrap();
    assert_eq!(h.get("k").unwrap(), None);
    h.put("j", 2).unwrap();
    txn.commit().unwrap();
    assert_eq!(
        (store.committed("k"), store.committed("j")),
        (None, Some(2))
    );
}

#[test]
fn rollback_works_on_a_doomed_transaction() {
    let tm = tm();
    let store = MemoryStore::<i32>::new();
    let txn = tm.begin().unwrap();
    let h = store.join(&txn).unwrap();
    let sp = txn.savepoint().unwrap();
    h.put("k", 1).unwrap();
    txn.doom().unwrap();
    sp.rollback().unwrap();
    assert_eq!(h.get("k").unwrap(), None);
    assert_eq!(txn.status(), Status::Doomed);
    txn.abort().unwrap();
}

#[test]
fn nested_atomic_err_rolls_back_only_the_inner_block() {
    let tm = tm();
    let store = MemoryStore::<i32>::new();
    tm.atomic(|txn| {
        store.join(txn)?.put("outer", 1)?;
        let inner: Result<(), Error> = tm.atomic(|txn| {
            store.join(txn)?.put("inner", 2)?;
            store.join(txn)?.put("outer", 99)?;
            Err(Error::InvalidArgument("no".into()))
        });
        assert!(inner.is_err());
        assert_eq!(store.join(txn)?.get("outer")?, Some(1));
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(store.committed("outer"), Some(1));
    assert_eq!(store.committed("inner"), None);
    assert!(!tm.in_transaction());
}

#[test]
fn nested_atomic_ok_keeps_its_changes_in_the_outer_transaction() {
    let tm = tm();
    let store = MemoryStore::<i32>::new();
    let v = tm
        .atomic(|txn| {
            let outer_txn = txn.clone();
            let n = tm.atomic(|txn| {
                assert_eq!(*txn, outer_txn, "nested = same transaction");
                store.join(txn)?.put("k", 7)?;
                Ok::<_, Error>(7)
            })?;
            Ok::<_, Error>(n + 1)
        })
        .unwrap();
    assert_eq!(v, 8);
    assert_eq!(store.committed("k"), Some(7));
}

#[test]
fn outer_atomic_err_aborts_the_transaction() {
    let log = CallLog::new();
    let tm = tm();
    let r: Result<(), Error> = tm.atomic(|txn| {
        txn.join(TestDataManager::new("a", &log))?;
        Err(Error::InvalidArgument("no".into()))
    });
    assert!(r.is_err());
    assert_eq!(log.entries(), seq(&[("a", Phase::Abort)]));
    assert!(!tm.in_transaction());
}

#[test]
fn outer_atomic_commit_failure_is_returned_and_leaves_no_transaction() {
    let log = CallLog::new();
    let tm = tm();
    let r: Result<(), Error> = tm.atomic(|txn| {
        txn.join(TestDataManager::new("a", &log).fail_at(Phase::CommitOnePhase, Fault::Conflict))
    });
    assert!(matches!(r, Err(Error::Conflict { .. })));
    assert!(!tm.in_transaction());
    assert_eq!(log.entries(), seq(&[("a", Phase::CommitOnePhase)]));
}

#[test]
fn nested_atomic_failing_over_a_resource_without_savepoints_fails_the_transaction() {
    let log = CallLog::new();
    let tm = tm();
    let r: Result<(), Error> = tm.atomic(|txn| {
        txn.join(TestDataManager::new("nosp", &log).without_savepoints())?;
        let inner: Result<(), Error> = tm.atomic(|_| Err(Error::InvalidArgument("no".into())));
        assert!(inner.is_err());
        assert_eq!(txn.status(), Status::CommitFailed);
        Ok(())
    });
    assert!(matches!(r, Err(Error::CommitFailed)));
    assert!(!tm.in_transaction());
    assert_eq!(log.phases_of("nosp"), [Phase::Abort]);
}

#[test]
fn atomic_inside_run_is_a_savepoint() {
    let tm = tm();
    let store = MemoryStore::<i32>::new();
    tm.run(|txn| {
        let h = store.join(txn)?;
        h.put("a", 1)?;
        let _ = tm.atomic(|txn| {
            store.join(txn)?.put("b", 2)?;
            Err::<(), _>(Error::InvalidArgument("undo".into()))
        });
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(
        (store.committed("a"), store.committed("b")),
        (Some(1), None)
    );
}

#[test]
fn panic_inside_nested_atomic_rolls_back_aborts_the_outer_and_propagates() {
    let log = CallLog::new();
    let tm = tm();
    let store = MemoryStore::<i32>::new();
    let payload = catch_unwind(AssertUnwindSafe(|| {
        tm.atomic(|txn| {
            txn.join(TestDataManager::new("a", &log))?;
            store.join(txn)?.put("k", 1)?;
            tm.atomic(|_| -> Result<(), Error> { panic!("inner boom") })
        })
    }))
    .unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"inner boom"));
    assert!(!tm.in_transaction());
    assert_eq!(
        log.entries(),
        seq(&[
            ("a", Phase::Savepoint),
            ("a", Phase::Rollback),
            ("a", Phase::Abort)
        ])
    );
    assert_eq!(store.committed("k"), None);
    // The manager is usable.
    tm.atomic(|txn| {
        store.join(txn)?.put("k", 2)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(store.committed("k"), Some(2));
}

#[test]
fn panic_inside_outer_atomic_aborts_and_propagates() {
    let log = CallLog::new();
    let tm = tm();
    let payload = catch_unwind(AssertUnwindSafe(|| {
        tm.atomic(|txn| -> Result<(), Error> {
            txn.join(TestDataManager::new("a", &log))?;
            panic!("outer boom")
        })
    }))
    .unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"outer boom"));
    assert_eq!(log.entries(), seq(&[("a", Phase::Abort)]));
    assert!(!tm.in_transaction());
    tm.atomic(|_| Ok::<_, Error>(())).unwrap();
}
