//! Misuse and panics: each gives a clear error, or is contained.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::*;
use tm_core::testing::{CallLog, Fault, TestDataManager};
use tm_core::{Error, Phase, Status};

#[test]
fn committed_handle_used_again_is_closed_with_a_clear_message() {
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.commit().unwrap();
    let err = txn.commit().unwrap_err();
    assert!(matches!(err, Error::Closed));
    assert_eq!(
        err.to_string(),
        "the transaction is finished (committed, committing or aborted)"
    );
}

#[test]
fn join_after_a_failed_commit_is_refused_until_abort() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.join(TestDataManager::new("b", &log).fail_at(Phase::Commit, Fault::Error))
        .unwrap();
    let err = txn.commit().unwrap_err();
    assert!(err.to_string().contains("resource b"), "{err}");
    let err = txn.join(TestDataManager::new("c", &log)).unwrap_err();
    assert!(matches!(err, Error::CommitFailed));
    assert!(err.to_string().contains("earlier commit"), "{err}");
    txn.abort().unwrap();
    assert!(matches!(
        txn.join(TestDataManager::new("c", &log)),
        Err(Error::Closed)
    ));
}

#[test]
fn invalidated_savepoint_rolled_back_is_invalid_savepoint() {
    let tm = tm();
    let txn = tm.begin().unwrap();
    let first = txn.savepoint().unwrap();
    let second = txn.savepoint().unwrap();
    first.rollback().unwrap();
    assert!(!second.is_valid());
    let err = second.rollback().unwrap_err();
    assert!(matches!(err, Error::InvalidSavepoint));
    assert!(err.to_string().contains("rolled back"), "{err}");
    txn.abort().unwrap();
}

#[test]
fn attempts_n_zero_names_the_problem() {
    let tm = tm();
    let err = tm
        .attempts_n(0)
        .next()
        .unwrap()
        .run(|_| Ok::<_, Error>(()))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)));
    assert!(err.to_string().contains("attempts"), "{err}");
}

#[test]
fn run_inside_an_active_transaction_is_already_in_transaction() {
    let tm = tm();
    tm.begin().unwrap();
    let err = tm.run(|_| Ok::<_, Error>(())).unwrap_err();
    assert!(matches!(err, Error::AlreadyInTransaction));
    tm.abort().unwrap();
}

#[test]
fn panic_inside_run_aborts_the_transaction_propagates_and_the_manager_stays_usable() {
    let log = CallLog::new();
    let tm = tm();
    let mut calls = 0;
    let payload = catch_unwind(AssertUnwindSafe(|| {
        tm.run(|txn| -> Result<(), Error> {
            calls += 1;
            txn.join(TestDataManager::new("a", &log))?;
            panic!("closure exploded")
        })
    }))
    .unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"closure exploded"));
    assert_eq!(calls, 1, "a panic is not retried");
    assert_eq!(log.entries(), seq(&[("a", Phase::Abort)]));
    assert!(!tm.in_transaction());
    let v = tm.run(|_| Ok::<_, Error>(42)).unwrap();
    assert_eq!(v, 42);
}

#[test]
fn panic_inside_attempt_run_aborts_and_propagates() {
    let log = CallLog::new();
    let tm = tm();
    let payload = catch_unwind(AssertUnwindSafe(|| {
        for attempt in tm.attempts() {
            attempt.run(|txn| -> Result<(), Error> {
                txn.join(TestDataManager::new("a", &log))?;
                panic!("attempt exploded")
            })?;
        }
        Ok::<_, Error>(())
    }))
    .unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"attempt exploded"));
    assert_eq!(log.entries(), seq(&[("a", Phase::Abort)]));
    assert!(!tm.in_transaction());
}

#[test]
fn panic_inside_atomic_aborts_propagates_and_the_manager_stays_usable() {
    let tm = tm();
    let txn_seen = std::sync::Mutex::new(None);
    let payload = catch_unwind(AssertUnwindSafe(|| {
        tm.atomic(|txn| -> Result<(), Error> {
            *txn_seen.lock().unwrap() = Some(txn.clone());
            panic!("atomic exploded")
        })
    }))
    .unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"atomic exploded"));
    let txn = txn_seen.into_inner().unwrap().unwrap();
    assert_eq!(txn.status(), Status::Aborted);
    assert!(!tm.in_transaction());
    tm.atomic(|_| Ok::<_, Error>(())).unwrap();
}

#[test]
fn panic_in_a_before_commit_hook_leaves_the_manager_usable() {
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.add_before_commit_hook(|_| panic!("validation crashed"));
    let payload = catch_unwind(AssertUnwindSafe(|| tm.commit())).unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"validation crashed"));
    assert_eq!(txn.status(), Status::Aborted);
    assert!(!tm.in_transaction());
    tm.run(|_| Ok::<_, Error>(())).unwrap();
}

#[test]
fn panic_in_a_before_commit_hook_inside_run_propagates_without_retry() {
    let tm = tm();
    let mut calls = 0;
    let payload = catch_unwind(AssertUnwindSafe(|| {
        tm.run(|txn| {
            calls += 1;
            txn.add_before_commit_hook(|_| panic!("hook in run"));
            Ok::<_, Error>(())
        })
    }))
    .unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"hook in run"));
    assert_eq!(calls, 1);
    assert!(!tm.in_transaction());
}

#[test]
fn panicking_resource_is_reported_as_panicked_naming_it_and_the_phase() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.join(TestDataManager::new("b", &log).fail_at(Phase::TpcVote, Fault::Panic))
        .unwrap();
    let err = txn.commit().unwrap_err();
    let text = err.to_string();
    assert!(text.contains("resource b panicked at tpc_vote"), "{text}");
    assert!(!err.is_retryable());
    tm.abort().unwrap();
}

#[test]
fn panic_in_after_commit_and_abort_hooks_is_contained_and_logged() {
    let tm = tm();
    let txn = tm.begin().unwrap();
    let ran = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    txn.add_after_commit_hook(|_, _| panic!("after-commit boom"));
    let r = ran.clone();
    txn.add_after_commit_hook(move |_, _| {
        r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
    let (result, events) = capture_logs(|| txn.commit());
    result.unwrap();
    assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(
        logged(&events, tracing::Level::ERROR, &["after-commit boom"]),
        "{events:?}"
    );

    let txn = tm.begin().unwrap();
    txn.add_after_abort_hook(|_| panic!("after-abort boom"));
    let r = ran.clone();
    txn.add_after_abort_hook(move |_| {
        r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
    let (result, events) = capture_logs(|| txn.abort());
    result.unwrap();
    assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert!(
        logged(&events, tracing::Level::ERROR, &["after-abort boom"]),
        "{events:?}"
    );
    assert!(!tm.in_transaction());
}
