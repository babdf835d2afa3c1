//! The transaction manager: modes, refusals, synchronizers, thread locality.

mod common;

use std::sync::{Arc, Barrier};

use common::*;
use tm_core::testing::{CallLog, Fault, TestDataManager};
use tm_core::{Backoff, Error, Phase, Status, Synchronizer, TransactionManager};

#[test]
fn implicit_get_starts_a_transaction_and_returns_it_until_it_ends() {
    let tm = TransactionManager::new();
    assert!(!tm.is_explicit());
    assert!(!tm.in_transaction());
    let t1 = tm.get().unwrap();
    assert!(tm.in_transaction());
    assert_eq!(tm.get().unwrap(), t1);
    tm.commit().unwrap();
    assert_eq!(t1.status(), Status::Committed);
    let t2 = tm.get().unwrap();
    assert_ne!(t1, t2);
    assert_ne!(t1.id(), t2.id());
    tm.abort().unwrap();
}

#[test]
fn implicit_begin_aborts_the_current_transaction_first() {
    let log = CallLog::new();
    let tm = TransactionManager::new();
    let t1 = tm.begin().unwrap();
    t1.join(TestDataManager::new("a", &log)).unwrap();
    let t2 = tm.begin().unwrap();
    assert_eq!(t1.status(), Status::Aborted);
    assert_eq!(log.entries(), seq(&[("a", Phase::Abort)]));
    assert_eq!(tm.get().unwrap(), t2);
    tm.abort().unwrap();
}

#[test]
fn implicit_commit_and_abort_without_a_transaction_are_ok() {
    let tm = TransactionManager::new();
    tm.commit().unwrap();
    tm.abort().unwrap();
    assert!(!tm.in_transaction());
}

#[test]
fn explicit_manager_without_begin_refuses_with_no_transaction() {
    let tm = TransactionManager::explicit();
    assert!(tm.is_explicit());
    assert!(matches!(tm.get(), Err(Error::NoTransaction)));
    assert!(matches!(tm.commit(), Err(Error::NoTransaction)));
    assert!(matches!(tm.abort(), Err(Error::NoTransaction)));
    assert!(matches!(tm.doom(), Err(Error::NoTransaction)));
    assert!(matches!(tm.savepoint(), Err(Error::NoTransaction)));
    assert!(!tm.is_doomed());
    assert!(!tm.in_transaction());
}

#[test]
fn explicit_begin_inside_a_transaction_is_already_in_transaction() {
    let tm = TransactionManager::explicit();
    let t1 = tm.begin().unwrap();
    assert!(matches!(tm.begin(), Err(Error::AlreadyInTransaction)));
    assert_eq!(t1.status(), Status::Active, "the refusal leaves it alone");
    assert_eq!(tm.get().unwrap(), t1);
    tm.commit().unwrap();
    assert!(matches!(tm.get(), Err(Error::NoTransaction)));
    tm.begin().unwrap();
    tm.abort().unwrap();
}

#[test]
fn manager_forgets_committed_and_aborted_transactions() {
    let tm = TransactionManager::explicit();
    let t = tm.begin().unwrap();
    t.commit().unwrap();
    assert!(!tm.in_transaction());
    let t = tm.begin().unwrap();
    t.abort().unwrap();
    assert!(!tm.in_transaction());
    assert!(tm.ensure_no_transaction().is_ok());
}

#[test]
fn ensure_no_transaction_refuses_inside_one() {
    let tm = TransactionManager::explicit();
    tm.ensure_no_transaction().unwrap();
    tm.begin().unwrap();
    assert!(matches!(
        tm.ensure_no_transaction(),
        Err(Error::AlreadyInTransaction)
    ));
    tm.abort().unwrap();
}

#[test]
fn failed_commit_stays_current_until_aborted() {
    let log = CallLog::new();
    let tm = TransactionManager::new();
    let txn = tm.get().unwrap();
    txn.join(TestDataManager::new("a", &log).fail_at(Phase::CommitOnePhase, Fault::Error))
        .unwrap();
    assert!(tm.commit().is_err());
    assert!(tm.in_transaction());
    assert_eq!(tm.get().unwrap(), txn);
    assert!(matches!(tm.commit(), Err(Error::CommitFailed)));
    tm.abort().unwrap();
    assert!(!tm.in_transaction());
    assert_eq!(txn.status(), Status::Aborted);
}

#[test]
fn implicit_begin_after_a_failed_commit_aborts_it() {
    let log = CallLog::new();
    let tm = TransactionManager::new();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log).fail_at(Phase::CommitOnePhase, Fault::Error))
        .unwrap();
    assert!(txn.commit().is_err());
    let next = tm.begin().unwrap();
    assert_eq!(txn.status(), Status::Aborted);
    assert_eq!(log.entries(), seq(&[("a", Phase::CommitOnePhase)]));
    assert_eq!(next.status(), Status::Active);
    tm.abort().unwrap();
}

#[test]
fn doom_through_the_manager_refuses_commit_and_abort_clears_it() {
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    assert!(!tm.is_doomed());
    tm.doom().unwrap();
    tm.doom().unwrap(); // idempotent
    assert!(tm.is_doomed());
    assert!(txn.is_doomed());
    assert_eq!(txn.status(), Status::Doomed);
    assert!(matches!(tm.commit(), Err(Error::Doomed)));
    assert!(tm.in_transaction(), "a doomed transaction must be aborted");
    tm.abort().unwrap();
    assert!(!tm.is_doomed());
    assert_eq!(txn.status(), Status::Aborted);
}

#[test]
fn builder_sets_mode_retry_count_and_backoff() {
    let tm = TransactionManager::builder()
        .explicit(true)
        .retry_attempt_count(7)
        .backoff(Backoff::None)
        .build();
    assert!(tm.is_explicit());
    assert_eq!(tm.retry_attempt_count(), 7);
    assert_eq!(tm.backoff(), Backoff::None);
    tm.set_retry_attempt_count(2);
    assert_eq!(tm.retry_attempt_count(), 2);
    assert_eq!(tm.attempts().count(), 2);

    let default = TransactionManager::builder().build();
    assert!(!default.is_explicit());
    assert_eq!(default.retry_attempt_count(), 3, "ZODB's default");
    assert_eq!(default.backoff(), Backoff::default());
    assert!(default.decision_log().is_none());
}

#[test]
fn clones_share_the_current_transaction_and_settings() {
    let tm = TransactionManager::explicit();
    let other = tm.clone();
    let txn = tm.begin().unwrap();
    assert_eq!(other.get().unwrap(), txn);
    other.set_retry_attempt_count(9);
    assert_eq!(tm.retry_attempt_count(), 9);
    other.commit().unwrap();
    assert!(!tm.in_transaction());
}

#[test]
fn two_independent_managers_on_one_thread_have_separate_transactions() {
    let tm1 = TransactionManager::explicit();
    let tm2 = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let t1 = tm1.begin().unwrap();
    assert!(!tm2.in_transaction());
    let t2 = tm2.begin().unwrap();
    assert_ne!(t1, t2);
    tm1.commit().unwrap();
    assert_eq!(tm2.get().unwrap(), t2);
    tm2.abort().unwrap();
}

#[test]
fn a_transaction_of_another_manager_inside_one_is_refused_naming_both() {
    let outer = TransactionManager::builder()
        .explicit(true)
        .name("app")
        .build();
    let t = outer.begin().unwrap();
    let inner = TransactionManager::builder()
        .explicit(true)
        .name("audit")
        .build();
    let err = inner.begin().unwrap_err();
    match &err {
        Error::Nested {
            manager,
            outer_manager,
            outer: txid,
        } => {
            assert!(manager.contains("\"audit\""), "{err}");
            assert!(outer_manager.contains("\"app\""), "{err}");
            assert_eq!(*txid, t.id());
        }
        other => panic!("expected Nested, got {other:?}"),
    }
    assert!(err.to_string().contains("independent(true)"), "{err}");
    // The thread-local manager's shorthands are refused the same way: they
    // would commit on their own, once per retry of the outer run.
    let store = tm_core::MemoryStore::<i32>::new();
    let r = tm_core::atomic(|txn| {
        store.join(txn)?.put("k", 1)?;
        Ok::<_, Error>(())
    });
    assert!(matches!(r, Err(Error::Nested { .. })), "{r:?}");
    assert!(tm_core::get().is_err());
    assert_eq!(store.committed("k"), None);
    outer.abort().unwrap();
    // Once the outer one ended, both work.
    tm_core::atomic(|txn| {
        store.join(txn)?.put("k", 1)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(store.committed("k"), Some(1));
}

#[test]
fn synchronizer_sees_new_transaction_then_before_and_after_completion_of_a_commit() {
    let tm = TransactionManager::explicit();
    let s = RecordingSynch::new();
    tm.register_synch(s.clone());
    let txn = tm.begin().unwrap();
    txn.commit().unwrap();
    let events = s.events.lock().clone();
    assert_eq!(
        events,
        [("new", txn.id()), ("before", txn.id()), ("after", txn.id())]
    );
}

#[test]
fn synchronizer_sees_before_and_after_completion_of_an_abort() {
    let tm = TransactionManager::explicit();
    let s = RecordingSynch::new();
    tm.register_synch(s.clone());
    tm.begin().unwrap();
    tm.abort().unwrap();
    assert_eq!(s.names(), ["new", "before", "after"]);
}

#[test]
fn synchronizers_bracket_a_failed_commit_and_the_abort_that_follows() {
    let log = CallLog::new();
    let tm = TransactionManager::explicit();
    tm.register_synch(Arc::new(LoggingSynch(log.clone())));
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.join(TestDataManager::new("b", &log).fail_at(Phase::TpcVote, Fault::Error))
        .unwrap();
    assert!(txn.commit().is_err());
    txn.abort().unwrap();
    let entries = log.entries();
    assert_eq!(entries.first().unwrap().0, "synch:before");
    let tail: Vec<_> = entries.into_iter().skip(7).collect();
    assert_eq!(
        tail,
        seq(&[
            ("a", Phase::TpcAbort),
            ("b", Phase::TpcAbort),
            ("synch:after", Phase::Work),
            ("synch:before", Phase::Work),
            ("synch:after", Phase::Work),
        ])
    );
}

#[test]
fn synchronizer_registered_during_a_transaction_gets_new_transaction_at_once() {
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    let s = RecordingSynch::new();
    tm.register_synch(s.clone());
    assert_eq!(*s.events.lock(), [("new", txn.id())]);
    tm.commit().unwrap();
    assert_eq!(s.names(), ["new", "before", "after"]);
}

#[test]
fn synchronizer_registered_outside_a_transaction_is_not_called_until_one_begins() {
    let tm = TransactionManager::explicit();
    let s = RecordingSynch::new();
    tm.register_synch(s.clone());
    assert!(s.names().is_empty());
    tm.begin().unwrap();
    assert_eq!(s.names(), ["new"]);
    tm.abort().unwrap();
}

#[test]
fn implicit_get_that_starts_a_transaction_tells_synchronizers() {
    let tm = TransactionManager::new();
    let s = RecordingSynch::new();
    tm.register_synch(s.clone());
    let txn = tm.get().unwrap();
    assert_eq!(*s.events.lock(), [("new", txn.id())]);
    tm.abort().unwrap();
}

#[test]
fn unregistered_synchronizer_is_no_longer_called() {
    let tm = TransactionManager::explicit();
    let s = RecordingSynch::new();
    let as_dyn: Arc<dyn Synchronizer> = s.clone();
    tm.register_synch(as_dyn.clone());
    tm.begin().unwrap();
    tm.unregister_synch(&as_dyn);
    tm.commit().unwrap();
    tm.begin().unwrap();
    tm.abort().unwrap();
    assert_eq!(s.names(), ["new"]);
}

#[test]
fn registering_the_same_synchronizer_twice_calls_it_once() {
    let tm = TransactionManager::explicit();
    let s = RecordingSynch::new();
    tm.register_synch(s.clone());
    tm.register_synch(s.clone());
    tm.begin().unwrap();
    tm.commit().unwrap();
    assert_eq!(s.names(), ["new", "before", "after"]);
}

#[test]
fn synchronizers_belong_to_their_manager() {
    let tm1 = TransactionManager::explicit();
    let tm2 = TransactionManager::explicit();
    let s = RecordingSynch::new();
    tm1.register_synch(s.clone());
    tm2.begin().unwrap();
    tm2.commit().unwrap();
    assert!(s.names().is_empty());
}

#[test]
fn doomed_commit_calls_no_synchronizer() {
    let tm = TransactionManager::explicit();
    let s = RecordingSynch::new();
    tm.register_synch(s.clone());
    tm.begin().unwrap();
    tm.doom().unwrap();
    assert!(tm.commit().is_err());
    assert_eq!(s.names(), ["new"]);
    tm.abort().unwrap();
    assert_eq!(s.names(), ["new", "before", "after"]);
}

#[test]
fn savepoint_through_the_manager_belongs_to_the_current_transaction() {
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    let sp = tm.savepoint().unwrap();
    assert_eq!(sp.transaction(), &txn);
    assert!(sp.is_valid());
    tm.abort().unwrap();
    assert!(!sp.is_valid());
}

#[test]
fn is_retryable_outside_a_transaction_counts_only_conflict_and_transient() {
    let tm = TransactionManager::explicit();
    assert!(tm.is_retryable(&Error::conflict("x", Phase::TpcVote, "k")));
    assert!(tm.is_retryable(&Error::transient("x", Phase::Work, "reset")));
    assert!(!tm.is_retryable(&Error::Doomed));
    assert!(!tm.is_retryable(&Busy));
    let wrapped = Wrapped {
        context: "saving".into(),
        source: Box::new(Error::conflict("x", Phase::TpcVote, "k")),
    };
    assert!(tm.is_retryable(&wrapped), "found through source()");
}

#[test]
fn is_retryable_asks_the_resources_of_the_current_transaction() {
    let tm = TransactionManager::explicit();
    let dm = BusyDm::new();
    tm.begin().unwrap().join(dm.clone()).unwrap();
    assert!(tm.is_retryable(&Busy));
    assert!(tm.is_retryable(&Wrapped {
        context: "insert".into(),
        source: Box::new(Busy),
    }));
    assert!(!tm.is_retryable(&Error::Doomed));
    tm.abort().unwrap();
    assert!(!tm.is_retryable(&Busy));
}

#[test]
fn thread_local_shorthands_use_this_threads_implicit_manager() {
    std::thread::spawn(|| {
        let txn = tm_core::begin().unwrap();
        assert_eq!(tm_core::get().unwrap(), txn);
        assert!(tm_core::manager().in_transaction());
        assert!(!tm_core::manager().is_explicit());
        tm_core::doom().unwrap();
        assert!(matches!(tm_core::commit(), Err(Error::Doomed)));
        tm_core::abort().unwrap();
        assert_eq!(txn.status(), Status::Aborted);
        let sp = tm_core::savepoint().unwrap();
        assert!(sp.is_valid());
        tm_core::commit().unwrap();
        let n: i32 = tm_core::run(|_| Ok::<_, Error>(5)).unwrap();
        assert_eq!(n, 5);
        let m: i32 = tm_core::atomic(|_| Ok::<_, Error>(6)).unwrap();
        assert_eq!(m, 6);
        assert_eq!(tm_core::attempts().count(), 3);
        assert!(!tm_core::manager().in_transaction());
    })
    .join()
    .unwrap();
}

#[test]
fn thread_local_managers_of_two_threads_never_see_each_others_transaction() {
    let barrier = Arc::new(Barrier::new(2));
    let spawn = |barrier: Arc<Barrier>| {
        std::thread::spawn(move || {
            let mine = tm_core::begin().unwrap();
            barrier.wait(); // both threads have begun
            assert_eq!(tm_core::get().unwrap(), mine);
            let id = mine.id();
            barrier.wait();
            tm_core::commit().unwrap();
            barrier.wait(); // both have committed
            assert!(!tm_core::manager().in_transaction());
            id
        })
    };
    let a = spawn(barrier.clone());
    let b = spawn(barrier);
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert_ne!(a, b);
}

#[test]
fn one_shared_manager_gives_each_thread_its_own_current_transaction() {
    let tm = TransactionManager::explicit();
    let barrier = Arc::new(Barrier::new(2));
    let main_txn = tm.begin().unwrap();
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let tm = tm.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                assert!(!tm.in_transaction(), "the main thread's is not ours");
                let txn = tm.begin().unwrap();
                barrier.wait();
                assert_eq!(tm.get().unwrap(), txn);
                barrier.wait();
                tm.commit().unwrap();
                txn.id()
            })
        })
        .collect();
    let ids: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_ne!(ids[0], ids[1]);
    assert_eq!(tm.get().unwrap(), main_txn);
    assert_eq!(main_txn.status(), Status::Active);
    tm.abort().unwrap();
}
