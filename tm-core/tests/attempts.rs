//! Retries: `attempts()`, `Attempt::run`, `run`, retryability and backoff.

mod common;

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tm_core::testing::{CallLog, Fault, TestDataManager};
use tm_core::{Backoff, BoxError, Error, MemoryStore, Phase, TransactionManager};

fn conflict() -> Error {
    Error::conflict("store", Phase::Work, "key k changed")
}

#[test]
fn attempts_are_numbered_from_one_and_only_the_last_is_last() {
    let tm = tm();
    let mut seen = Vec::new();
    let mut last_err = None;
    for attempt in tm.attempts() {
        seen.push((attempt.number(), attempt.is_last()));
        if let Err(e) = attempt.run(|_| Err::<(), _>(conflict())) {
            last_err = Some(e);
        }
    }
    assert_eq!(seen, [(1, false), (2, false), (3, true)]);
    assert!(matches!(last_err, Some(Error::Conflict { .. })));
}

#[test]
fn attempts_n_yields_n_attempts() {
    let tm = tm();
    assert_eq!(tm.attempts_n(5).count(), 5);
    assert_eq!(tm.attempts_n(1).count(), 1);
    tm.set_retry_attempt_count(4);
    assert_eq!(tm.attempts().count(), 4);
}

#[test]
fn attempts_stop_after_the_first_success() {
    let tm = tm();
    let mut tries = 0;
    let mut results = Vec::new();
    for attempt in tm.attempts_n(5) {
        let r = attempt.run(|_| {
            tries += 1;
            if tries < 2 {
                Err(conflict())
            } else {
                Ok(tries * 10)
            }
        });
        results.push(r.unwrap());
    }
    assert_eq!(tries, 2);
    assert_eq!(results, [None, Some(20)]);
    assert!(!tm.in_transaction());
}

#[test]
fn attempt_run_commits_on_ok_and_aborts_on_err() {
    let log = CallLog::new();
    let tm = tm();
    let mut attempts = tm.attempts_n(1);
    let attempt = attempts.next().unwrap();
    let err = attempt
        .run(|txn| {
            txn.join(TestDataManager::new("a", &log))?;
            Err::<(), _>(Error::InvalidArgument("no".into()))
        })
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)));
    assert_eq!(log.entries(), seq(&[("a", Phase::Abort)]));
    assert!(attempts.next().is_none());
    log.clear();
    for attempt in tm.attempts() {
        attempt
            .run(|txn| txn.join(TestDataManager::new("a", &log)))
            .unwrap();
    }
    assert_eq!(log.entries(), seq(&[("a", Phase::CommitOnePhase)]));
}

#[test]
fn run_returns_the_closures_value() {
    let tm = tm();
    let store = MemoryStore::<i32>::new();
    let v = tm
        .run(|txn| {
            store.join(txn)?.put("k", 3)?;
            Ok::<_, Error>("done")
        })
        .unwrap();
    assert_eq!(v, "done");
    assert_eq!(store.committed("k"), Some(3));
    assert!(!tm.in_transaction());
}

#[test]
fn run_retries_a_conflict_returned_by_the_closure() {
    let tm = tm();
    let mut calls = 0;
    let v = tm
        .run(|_| {
            calls += 1;
            if calls < 3 {
                Err(conflict())
            } else {
                Ok(calls)
            }
        })
        .unwrap();
    assert_eq!((v, calls), (3, 3));
}

#[test]
fn run_retries_a_transient_failure() {
    let tm = tm();
    let mut calls = 0;
    tm.run(|_| {
        calls += 1;
        if calls == 1 {
            Err(Error::transient("db", Phase::Work, "connection reset"))
        } else {
            Ok(())
        }
    })
    .unwrap();
    assert_eq!(calls, 2);
}

#[test]
fn run_retries_a_conflict_at_vote_and_each_failed_attempt_is_tpc_aborted() {
    let log = CallLog::new();
    let a = TestDataManager::new("a", &log);
    let b = TestDataManager::new("b", &log).fail_times(Phase::TpcVote, Fault::Conflict, 2);
    let tm = tm();
    let mut calls = 0;
    tm.run(|txn| {
        calls += 1;
        txn.join(a.clone())?;
        txn.join(b.clone())
    })
    .unwrap();
    assert_eq!(calls, 3);
    assert_eq!(
        log.phases_of("b"),
        [
            [
                Phase::TpcBegin,
                Phase::Commit,
                Phase::TpcVote,
                Phase::TpcAbort
            ],
            [
                Phase::TpcBegin,
                Phase::Commit,
                Phase::TpcVote,
                Phase::TpcAbort
            ],
            [
                Phase::TpcBegin,
                Phase::Commit,
                Phase::TpcVote,
                Phase::TpcFinish
            ],
        ]
        .concat()
    );
}

#[test]
fn run_gives_up_after_the_last_attempt_and_returns_the_error_unchanged() {
    let tm = tm();
    let mut calls = 0;
    let err = tm
        .run(|_| {
            calls += 1;
            Err::<(), _>(Error::conflict(
                "store",
                Phase::Work,
                format!("try {calls}"),
            ))
        })
        .unwrap_err();
    assert_eq!(calls, 3);
    match err {
        Error::Conflict {
            resource,
            phase,
            detail,
        } => assert_eq!(
            (resource.as_str(), phase, detail.as_str()),
            ("store", Phase::Work, "try 3")
        ),
        other => panic!("expected the last Conflict, got {other:?}"),
    }
    assert!(!tm.in_transaction());
}

#[test]
fn the_last_attempts_transaction_is_aborted_too() {
    let tm = tm();
    let dm = BusyDm::new();
    let err = tm
        .run(|txn| {
            txn.join(dm.clone())?;
            Err::<(), _>(conflict())
        })
        .unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }));
    assert_eq!(dm.aborted.load(Ordering::SeqCst), 3);
    assert!(!tm.in_transaction());
}

#[test]
fn giving_up_logs_a_warning_that_names_the_attempts_spent() {
    let tm = tm();
    let (result, events) = capture_logs(|| tm.run(|_| Err::<(), _>(conflict())));
    assert!(result.is_err());
    assert!(
        logged(&events, tracing::Level::WARN, &["attempts=3"]),
        "{events:?}"
    );
}

#[test]
fn non_retryable_error_propagates_at_once() {
    let tm = tm();
    let mut calls = 0;
    let err = tm
        .run(|_| {
            calls += 1;
            Err::<(), _>(Error::InvalidArgument("bad amount".into()))
        })
        .unwrap_err();
    assert_eq!(calls, 1);
    assert!(matches!(err, Error::InvalidArgument(m) if m == "bad amount"));
}

#[test]
fn non_retryable_commit_failure_propagates_at_once_and_leaves_no_transaction() {
    let log = CallLog::new();
    let a = TestDataManager::new("a", &log).fail_at(Phase::CommitOnePhase, Fault::Error);
    let tm = tm();
    let mut calls = 0;
    let err = tm
        .run(|txn| {
            calls += 1;
            txn.join(a.clone())
        })
        .unwrap_err();
    assert_eq!(calls, 1);
    assert_resource_error(&err, "a");
    assert!(!tm.in_transaction());
}

#[test]
fn heuristic_outcome_is_never_retried() {
    let log = CallLog::new();
    let a = TestDataManager::new("a", &log);
    let b = TestDataManager::new("b", &log).fail_at(Phase::TpcFinish, Fault::Conflict);
    let tm = tm();
    let mut calls = 0;
    let err = tm
        .run(|txn| {
            calls += 1;
            txn.join(a.clone())?;
            txn.join(b.clone())
        })
        .unwrap_err();
    assert_eq!(calls, 1);
    assert!(err.is_heuristic());
}

#[test]
fn should_retry_of_a_joined_resource_makes_its_error_retryable() {
    let tm = tm();
    let dm = BusyDm::new();
    let mut calls = 0;
    let v = tm
        .run(|txn| {
            calls += 1;
            txn.join(dm.clone())?;
            if calls < 3 {
                return Err::<u32, BoxError>(Box::new(Busy));
            }
            Ok(calls)
        })
        .unwrap();
    assert_eq!(v, 3);
    assert!(dm.asked.load(Ordering::SeqCst) >= 2);
}

#[test]
fn error_of_a_resource_that_is_not_joined_is_not_retried() {
    let tm = tm();
    let mut calls = 0;
    let err = tm
        .run(|_| {
            calls += 1;
            Err::<(), BoxError>(Box::new(Busy))
        })
        .unwrap_err();
    assert_eq!(calls, 1);
    assert!(err.is::<Busy>());
}

#[test]
fn retry_decision_walks_the_source_chain_of_a_wrapped_error() {
    let tm = tm();
    let dm = BusyDm::new();
    let mut calls = 0;
    tm.run(|txn| {
        calls += 1;
        txn.join(dm.clone())?;
        match calls {
            1 => Err::<(), BoxError>(Box::new(Wrapped {
                context: "inserting a row".into(),
                source: Box::new(Busy),
            })),
            2 => Err(Box::new(Wrapped {
                context: "outer".into(),
                source: Box::new(Wrapped {
                    context: "inner".into(),
                    source: Box::new(conflict()),
                }),
            })),
            _ => Ok(()),
        }
    })
    .unwrap();
    assert_eq!(calls, 3);
}

#[test]
fn wrapped_error_is_handed_back_unchanged_after_the_last_attempt() {
    let tm = tm();
    let err = tm
        .run(|_| {
            Err::<(), BoxError>(Box::new(Wrapped {
                context: "saving".into(),
                source: Box::new(conflict()),
            }))
        })
        .unwrap_err();
    let wrapped = err
        .downcast_ref::<Wrapped>()
        .expect("the caller's own type");
    assert_eq!(wrapped.context, "saving");
}

#[test]
fn boxed_error_closure_can_use_question_mark_on_foreign_errors() {
    let tm = tm();
    let mut calls = 0;
    let err = tm
        .run(|_| -> Result<i32, BoxError> {
            calls += 1;
            let n: i32 = "not a number".parse()?;
            Ok(n)
        })
        .unwrap_err();
    assert_eq!(calls, 1);
    assert!(err.is::<std::num::ParseIntError>());
}

/// Runs `tm.run` with a closure that fails once with `first()` and then
/// succeeds; returns how many times the closure was called.
fn calls_when_failing_once<E: tm_core::TxError>(first: impl Fn() -> E) -> u32 {
    let tm = tm();
    let mut calls = 0;
    let outcome = tm.run(|_| -> Result<(), E> {
        calls += 1;
        if calls == 1 {
            return Err(first());
        }
        Ok(())
    });
    assert!(outcome.is_ok(), "gave up after {calls} calls");
    calls
}

#[test]
fn boxed_error_holding_a_conflict_is_retried() {
    assert_eq!(calls_when_failing_once(|| BoxError::from(conflict())), 2);
}

#[cfg(feature = "anyhow")]
#[test]
fn anyhow_error_with_context_is_retried_and_returned_unchanged() {
    use anyhow::Context;
    let tm = tm();
    let mut calls = 0;
    tm.run(|_| -> anyhow::Result<()> {
        calls += 1;
        if calls == 1 {
            return Err(conflict()).context("transferring");
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(calls, 2);

    let err = tm
        .run(|_| -> anyhow::Result<()> { Err(conflict()).context("transferring") })
        .unwrap_err();
    assert_eq!(err.to_string(), "transferring");
    assert!(matches!(
        err.downcast_ref::<Error>(),
        Some(Error::Conflict { .. })
    ));
    let err = tm
        .run(|_| -> anyhow::Result<()> { anyhow::bail!("insufficient funds") })
        .unwrap_err();
    assert_eq!(err.to_string(), "insufficient funds");
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("insufficient funds")]
    Funds,
    #[error(transparent)]
    Tm(#[from] Error),
}
tm_core::tx_error!(AppError => Tm);

/// The tm error is the variant's `source()` (not transparent): the plain
/// macro form finds it through the chain.
#[derive(Debug, thiserror::Error)]
enum SourcedError {
    #[error("transaction failed")]
    Tm(#[from] Error),
}
tm_core::tx_error!(SourcedError);

/// Transparent variant with the plain macro form: tm's own commit failure is
/// still judged before it is converted.
#[derive(Debug, thiserror::Error)]
enum PlainTransparent {
    #[error(transparent)]
    Tm(#[from] Error),
}
tm_core::tx_error!(PlainTransparent);

#[test]
fn sourced_app_error_is_retried_through_the_source_chain() {
    assert_eq!(
        calls_when_failing_once(|| SourcedError::from(conflict())),
        2
    );
}

#[test]
fn conflict_at_commit_is_retried_whatever_the_closures_error_type_hides() {
    let log = CallLog::new();
    let a = TestDataManager::new("a", &log).fail_times(Phase::CommitOnePhase, Fault::Conflict, 1);
    let tm = tm();
    let mut calls = 0;
    tm.run(|txn| -> Result<(), PlainTransparent> {
        calls += 1;
        txn.join(a.clone())?;
        Ok(())
    })
    .unwrap();
    assert_eq!(calls, 2);
}

#[test]
fn app_error_enum_with_tx_error_macro_works_with_run_atomic_and_attempts() {
    let tm = tm();
    let mut calls = 0;
    let err = tm
        .run(|_| -> Result<(), AppError> {
            calls += 1;
            if calls == 1 {
                return Err(conflict().into());
            }
            Err(AppError::Funds)
        })
        .unwrap_err();
    assert_eq!(calls, 2, "the Tm(Conflict) variant is retried");
    assert!(matches!(err, AppError::Funds));

    let r: Result<(), AppError> = tm.atomic(|_| Err(AppError::Funds));
    assert!(matches!(r, Err(AppError::Funds)));

    let mut out = None;
    for attempt in tm.attempts() {
        out = attempt.run(|_| Ok::<_, AppError>(1)).unwrap();
    }
    assert_eq!(out, Some(1));

    // A tm error raised by the manager itself arrives in the Tm variant.
    let outer = tm.begin().unwrap();
    let r: Result<(), AppError> = tm.run(|_| Ok(()));
    assert!(matches!(r, Err(AppError::Tm(Error::AlreadyInTransaction))));
    outer.abort().unwrap();
}

#[test]
fn attempts_n_zero_is_a_clear_error_and_the_closure_is_not_called() {
    let tm = tm();
    let called = Cell::new(false);
    let mut results = Vec::new();
    for attempt in tm.attempts_n(0) {
        results.push(attempt.run(|_| {
            called.set(true);
            Ok::<_, Error>(())
        }));
    }
    assert_eq!(results.len(), 1);
    let err = results.pop().unwrap().unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)));
    assert!(err.to_string().contains("at least 1"), "{err}");
    assert!(!called.get());
    assert!(!tm.in_transaction());
}

#[test]
fn run_with_a_retry_count_of_zero_is_a_clear_error() {
    let tm = tm();
    tm.set_retry_attempt_count(0);
    let mut called = false;
    let err = tm
        .run(|_| {
            called = true;
            Ok::<_, Error>(())
        })
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert!(!called);
}

#[test]
fn run_named_notes_the_name_on_every_attempts_transaction() {
    let tm = tm();
    let mut descriptions = Vec::new();
    tm.run_named("transfer 10 from alice to bob", |txn| {
        descriptions.push(txn.description());
        if descriptions.len() < 2 {
            Err(conflict())
        } else {
            Ok(())
        }
    })
    .unwrap();
    assert_eq!(
        descriptions,
        [
            "transfer 10 from alice to bob",
            "transfer 10 from alice to bob"
        ]
    );
}

#[test]
fn run_inside_an_active_transaction_is_refused_and_leaves_it_alone() {
    let tm = tm();
    let outer = tm.begin().unwrap();
    let mut called = false;
    let err = tm
        .run(|_| {
            called = true;
            Ok::<_, Error>(())
        })
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyInTransaction));
    assert!(err.to_string().contains("already active"), "{err}");
    assert!(!called);
    assert_eq!(tm.get().unwrap(), outer);
    assert_eq!(outer.status(), tm_core::Status::Active);
    tm.abort().unwrap();
}

#[test]
fn attempt_run_inside_an_active_transaction_is_refused() {
    let tm = tm();
    let outer = tm.begin().unwrap();
    let mut results = Vec::new();
    for attempt in tm.attempts() {
        results.push(attempt.run(|_| Ok::<_, Error>(())));
    }
    assert_eq!(results.len(), 1, "the refusal ends the loop");
    assert!(matches!(results[0], Err(Error::AlreadyInTransaction)));
    assert_eq!(outer.status(), tm_core::Status::Active);
    tm.abort().unwrap();
}

#[test]
fn run_on_an_implicit_manager_with_a_lazily_started_transaction_is_refused() {
    let tm = TransactionManager::builder().backoff(Backoff::None).build();
    let txn = tm.get().unwrap();
    let r = tm.run(|_| Ok::<_, Error>(()));
    assert!(matches!(r, Err(Error::AlreadyInTransaction)));
    txn.abort().unwrap();
    tm.run(|_| Ok::<_, Error>(())).unwrap();
}

#[test]
fn default_backoff_is_jittered_exponential_from_1ms_to_100ms() {
    assert_eq!(
        Backoff::default(),
        Backoff::Exponential {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(100)
        }
    );
    let b = Backoff::default();
    let mut distinct = std::collections::HashSet::new();
    for retry in 1..=12 {
        let ceiling = Duration::from_millis(1 << (retry - 1)).min(Duration::from_millis(100));
        for _ in 0..50 {
            let d = b.delay(retry);
            assert!(d <= ceiling, "retry {retry}: {d:?} > {ceiling:?}");
            distinct.insert(d);
        }
    }
    assert!(distinct.len() > 100, "jittered, not fixed");
}

#[test]
fn backoff_none_never_waits() {
    for retry in 0..40 {
        assert_eq!(Backoff::None.delay(retry), Duration::ZERO);
    }
}

#[test]
fn retries_with_the_default_backoff_still_succeed() {
    let tm = TransactionManager::explicit();
    assert_eq!(tm.backoff(), Backoff::default());
    let mut calls = 0;
    tm.run(|_| {
        calls += 1;
        if calls < 3 {
            Err(conflict())
        } else {
            Ok(())
        }
    })
    .unwrap();
    assert_eq!(calls, 3);
}
