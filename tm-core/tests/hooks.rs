//! Before/after commit and abort hooks.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use common::*;
use parking_lot::Mutex;
use tm_core::testing::{CallLog, Fault, TestDataManager};
use tm_core::{Error, Phase, Status, Transaction};

type Trace = Arc<Mutex<Vec<String>>>;

fn trace() -> Trace {
    Arc::new(Mutex::new(Vec::new()))
}

fn push(t: &Trace, s: impl Into<String>) {
    t.lock().push(s.into());
}

fn hook_logging(
    log: &CallLog,
    name: &'static str,
) -> impl FnOnce(&Transaction) -> tm_core::Result<()> + Send + 'static {
    let log = log.clone();
    move |_| {
        log.record(name, Phase::Work);
        Ok(())
    }
}

#[test]
fn before_commit_hooks_run_in_order_added_before_any_resource() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.add_before_commit_hook(hook_logging(&log, "hook1"));
    txn.add_before_commit_hook(hook_logging(&log, "hook2"));
    txn.commit().unwrap();
    assert_eq!(
        log.entries(),
        seq(&[
            ("hook1", Phase::Work),
            ("hook2", Phase::Work),
            ("a", Phase::CommitOnePhase)
        ])
    );
}

#[test]
fn before_commit_hooks_run_before_synchronizers_before_completion() {
    let log = CallLog::new();
    let tm = tm();
    tm.register_synch(Arc::new(LoggingSynch(log.clone())));
    let txn = tm.begin().unwrap();
    txn.add_before_commit_hook(hook_logging(&log, "hook"));
    txn.commit().unwrap();
    assert_eq!(
        log.entries(),
        seq(&[
            ("hook", Phase::Work),
            ("synch:before", Phase::Work),
            ("synch:after", Phase::Work)
        ])
    );
}

#[test]
fn hooks_added_by_a_before_commit_hook_also_run_in_order() {
    let t = trace();
    let tm = tm();
    let txn = tm.begin().unwrap();
    let (t1, t2) = (t.clone(), t.clone());
    txn.add_before_commit_hook(move |txn| {
        push(&t1, "first");
        let t3 = t1.clone();
        txn.add_before_commit_hook(move |_| {
            push(&t3, "added by first");
            Ok(())
        });
        Ok(())
    });
    txn.add_before_commit_hook(move |_| {
        push(&t2, "second");
        Ok(())
    });
    txn.commit().unwrap();
    assert_eq!(*t.lock(), ["first", "second", "added by first"]);
}

#[test]
fn before_commit_hook_may_join_a_resource_which_then_commits() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    let late = TestDataManager::new("b", &log);
    txn.add_before_commit_hook(move |txn| txn.join(late));
    txn.commit().unwrap();
    assert_eq!(log.phases_of("b").last(), Some(&Phase::TpcFinish));
    assert_eq!(log.phases_of("a").last(), Some(&Phase::TpcFinish));
}

#[test]
fn before_commit_hook_sees_the_transaction_active_and_its_data() {
    let t = trace();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.set_data(41_u32);
    let t1 = t.clone();
    txn.add_before_commit_hook(move |txn| {
        push(&t1, format!("{} {:?}", txn.status(), txn.data::<u32>()));
        Ok(())
    });
    txn.commit().unwrap();
    assert_eq!(*t.lock(), ["Active Some(41)"]);
}

#[test]
fn before_commit_hook_error_fails_the_commit_and_aborts_the_resources() {
    let log = CallLog::new();
    let t = trace();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.join(TestDataManager::new("b", &log)).unwrap();
    txn.add_before_commit_hook(|_| Err(Error::InvalidArgument("validation failed".into())));
    let t1 = t.clone();
    txn.add_before_commit_hook(move |_| {
        push(&t1, "later hook ran");
        Ok(())
    });
    let t2 = t.clone();
    txn.add_after_commit_hook(move |ok, txn| push(&t2, format!("after {ok} {}", txn.status())));
    let err = txn.commit().unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(m) if m == "validation failed"));
    assert_eq!(txn.status(), Status::CommitFailed);
    assert_eq!(
        log.entries(),
        seq(&[("a", Phase::Abort), ("b", Phase::Abort)])
    );
    assert_eq!(*t.lock(), ["after false Commit failed"]);
    assert!(matches!(txn.commit(), Err(Error::CommitFailed)));
    tm.abort().unwrap();
    assert_eq!(log.entries().len(), 2, "each resource ended once");
}

#[test]
fn panic_in_a_before_commit_hook_aborts_the_transaction_and_propagates() {
    let log = CallLog::new();
    let t = trace();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    let t1 = t.clone();
    txn.add_after_abort_hook(move |_| push(&t1, "after-abort"));
    txn.add_before_commit_hook(|_| panic!("hook exploded"));
    let payload = catch_unwind(AssertUnwindSafe(|| txn.commit())).unwrap_err();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"hook exploded"));
    assert_eq!(txn.status(), Status::Aborted);
    assert_eq!(log.entries(), seq(&[("a", Phase::Abort)]));
    assert_eq!(*t.lock(), ["after-abort"]);
    assert!(!tm.in_transaction());
    // The manager is usable.
    let next = tm.begin().unwrap();
    next.join(TestDataManager::new("a", &log)).unwrap();
    next.commit().unwrap();
}

#[test]
fn after_commit_hooks_get_true_in_order_with_the_status_committed() {
    let t = trace();
    let tm = tm();
    let txn = tm.begin().unwrap();
    for name in ["one", "two"] {
        let t = t.clone();
        txn.add_after_commit_hook(move |ok, txn| push(&t, format!("{name} {ok} {}", txn.status())));
    }
    txn.commit().unwrap();
    assert_eq!(*t.lock(), ["one true Committed", "two true Committed"]);
}

#[test]
fn after_commit_hooks_get_false_when_a_resource_fails() {
    let log = CallLog::new();
    let t = trace();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log).fail_at(Phase::CommitOnePhase, Fault::Conflict))
        .unwrap();
    let t1 = t.clone();
    txn.add_after_commit_hook(move |ok, txn| push(&t1, format!("{ok} {}", txn.status())));
    assert!(txn.commit().is_err());
    assert_eq!(*t.lock(), ["false Commit failed"]);
    tm.abort().unwrap();
    assert_eq!(
        t.lock().len(),
        1,
        "abort does not run after-commit hooks again"
    );
}

#[test]
fn after_commit_hooks_run_before_synchronizers_after_completion() {
    let log = CallLog::new();
    let tm = tm();
    tm.register_synch(Arc::new(LoggingSynch(log.clone())));
    let txn = tm.begin().unwrap();
    let l = log.clone();
    txn.add_after_commit_hook(move |_, _| l.record("after-commit", Phase::Work));
    txn.commit().unwrap();
    assert_eq!(
        log.entries(),
        seq(&[
            ("synch:before", Phase::Work),
            ("after-commit", Phase::Work),
            ("synch:after", Phase::Work)
        ])
    );
}

#[test]
fn after_commit_hook_added_by_an_after_commit_hook_runs_too() {
    let t = trace();
    let tm = tm();
    let txn = tm.begin().unwrap();
    let t1 = t.clone();
    txn.add_after_commit_hook(move |ok, txn| {
        push(&t1, format!("first {ok}"));
        let t2 = t1.clone();
        txn.add_after_commit_hook(move |ok, _| push(&t2, format!("added {ok}")));
    });
    txn.commit().unwrap();
    assert_eq!(*t.lock(), ["first true", "added true"]);
}

#[test]
fn after_commit_hook_can_still_read_the_transactions_data_and_metadata() {
    let t = trace();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.set_data(String::from("payload"));
    txn.note("note");
    let t1 = t.clone();
    txn.add_after_commit_hook(move |_, txn| {
        push(
            &t1,
            format!(
                "{:?} {}",
                txn.data::<String>().as_deref(),
                txn.description()
            ),
        );
    });
    txn.commit().unwrap();
    assert_eq!(*t.lock(), ["Some(\"payload\") note"]);
}

#[test]
fn panic_in_an_after_commit_hook_is_caught_logged_and_the_others_run() {
    let t = trace();
    let tm = tm();
    let txn = tm.begin().unwrap();
    let t1 = t.clone();
    txn.add_after_commit_hook(|_, _| panic!("after-commit exploded"));
    txn.add_after_commit_hook(move |ok, _| push(&t1, format!("second {ok}")));
    let (result, events) = capture_logs(|| txn.commit());
    result.unwrap();
    assert_eq!(*t.lock(), ["second true"]);
    assert_eq!(txn.status(), Status::Committed);
    assert!(
        logged(&events, tracing::Level::ERROR, &["after-commit exploded"]),
        "{events:?}"
    );
    assert!(!tm.in_transaction());
}

#[test]
fn abort_hooks_do_not_run_on_a_successful_commit() {
    let t = trace();
    let tm = tm();
    let txn = tm.begin().unwrap();
    let (t1, t2) = (t.clone(), t.clone());
    txn.add_before_abort_hook(move |_| push(&t1, "before-abort"));
    txn.add_after_abort_hook(move |_| push(&t2, "after-abort"));
    txn.commit().unwrap();
    assert!(t.lock().is_empty());
    assert!(matches!(txn.abort(), Err(Error::Closed)));
    assert!(t.lock().is_empty());
}

#[test]
fn before_abort_hooks_run_before_the_resources_abort_and_after_abort_hooks_after() {
    let log = CallLog::new();
    let tm = tm();
    tm.register_synch(Arc::new(LoggingSynch(log.clone())));
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    for (name, before) in [
        ("before1", true),
        ("after1", false),
        ("before2", true),
        ("after2", false),
    ] {
        let l = log.clone();
        if before {
            txn.add_before_abort_hook(move |_| l.record(name, Phase::Work));
        } else {
            txn.add_after_abort_hook(move |_| l.record(name, Phase::Work));
        }
    }
    txn.abort().unwrap();
    // As the Python package: before-abort hooks, then the synchronizers'
    // before_completion, the resources, the after-abort hooks, and last the
    // synchronizers' after_completion.
    assert_eq!(
        log.entries(),
        seq(&[
            ("before1", Phase::Work),
            ("before2", Phase::Work),
            ("synch:before", Phase::Work),
            ("a", Phase::Abort),
            ("after1", Phase::Work),
            ("after2", Phase::Work),
            ("synch:after", Phase::Work),
        ])
    );
}

#[test]
fn failed_commit_runs_no_abort_hook_and_the_abort_that_follows_runs_them_once() {
    let log = CallLog::new();
    let t = trace();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.join(TestDataManager::new("b", &log).fail_at(Phase::TpcVote, Fault::Error))
        .unwrap();
    let (t1, t2) = (t.clone(), t.clone());
    txn.add_before_abort_hook(move |_| push(&t1, "before-abort"));
    txn.add_after_abort_hook(move |_| push(&t2, "after-abort"));
    assert!(txn.commit().is_err());
    assert!(t.lock().is_empty());
    txn.abort().unwrap();
    assert_eq!(*t.lock(), ["before-abort", "after-abort"]);
    assert!(matches!(txn.abort(), Err(Error::Closed)));
    assert_eq!(t.lock().len(), 2);
}

#[test]
fn panic_in_an_abort_hook_is_caught_logged_and_the_others_run() {
    let log = CallLog::new();
    let t = trace();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    let (t1, t2) = (t.clone(), t.clone());
    txn.add_before_abort_hook(|_| panic!("before-abort exploded"));
    txn.add_before_abort_hook(move |_| push(&t1, "before-abort 2"));
    txn.add_after_abort_hook(|_| panic!("after-abort exploded"));
    txn.add_after_abort_hook(move |_| push(&t2, "after-abort 2"));
    let (result, events) = capture_logs(|| txn.abort());
    result.unwrap();
    assert_eq!(*t.lock(), ["before-abort 2", "after-abort 2"]);
    assert_eq!(log.entries(), seq(&[("a", Phase::Abort)]));
    assert_eq!(txn.status(), Status::Aborted);
    assert!(
        logged(&events, tracing::Level::ERROR, &["before-abort exploded"]),
        "{events:?}"
    );
    assert!(
        logged(&events, tracing::Level::ERROR, &["after-abort exploded"]),
        "{events:?}"
    );
    assert!(!tm.in_transaction());
}

#[test]
fn doomed_transaction_runs_no_before_commit_hook() {
    let t = trace();
    let tm = tm();
    let txn = tm.begin().unwrap();
    let t1 = t.clone();
    txn.add_before_commit_hook(move |_| {
        push(&t1, "ran");
        Ok(())
    });
    txn.doom().unwrap();
    assert!(matches!(txn.commit(), Err(Error::Doomed)));
    assert!(t.lock().is_empty());
    txn.abort().unwrap();
}

#[test]
fn before_commit_hook_that_dooms_the_transaction_stops_the_commit() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.add_before_commit_hook(|txn| txn.doom());
    assert!(matches!(txn.commit(), Err(Error::Doomed)));
    assert!(log.entries().is_empty());
    txn.abort().unwrap();
    assert_eq!(log.entries(), seq(&[("a", Phase::Abort)]));
}
