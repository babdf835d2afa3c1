//! The commit protocol: exact ordered `(resource, phase)` sequences from a
//! shared `CallLog`, for a failure at every phase and every fault.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tm_core::testing::{CallLog, Fault, TestDataManager};
use tm_core::{
    recover, recover_with, Error, FileDecisionLog, MemoryStore, Phase, Recoverable,
    RecoveryOptions, Status, TransactionManager,
};

use Phase::*;

const FAULTS: [Fault; 3] = [Fault::Error, Fault::Conflict, Fault::Panic];

/// Asserts `err` is what `fault` injected into `resource` at `phase`.
#[track_caller]
fn assert_fault(err: &Error, fault: Fault, resource: &str, phase: Phase) {
    match (fault, err) {
        (
            Fault::Error,
            Error::Resource {
                resource: r,
                source,
            },
        ) => {
            assert_eq!(r, resource);
            assert!(source.to_string().contains(phase.as_str()), "{err}");
        }
        (
            Fault::Conflict,
            Error::Conflict {
                resource: r,
                phase: p,
                ..
            },
        ) => {
            assert_eq!((r.as_str(), *p), (resource, phase));
        }
        (
            Fault::Panic,
            Error::Panicked {
                resource: r,
                phase: p,
                message,
            },
        ) => {
            assert_eq!((r.as_str(), *p), (resource, phase));
            assert!(message.contains("injected panic"), "{message}");
        }
        _ => panic!("{fault:?} at {resource}/{phase} gave {err:?}"),
    }
}

/// Commits a, b, c with b failing with `fault` at `phase`.
fn commit_abc_with_b_failing(
    phase: Phase,
    fault: Fault,
) -> (
    CallLog,
    TransactionManager,
    tm_core::Transaction,
    tm_core::Result<()>,
) {
    let log = CallLog::new();
    let [a, b, c] = abc(&log);
    let (tm, txn, result) = commit_with(&[a, b.fail_at(phase, fault), c]);
    (log, tm, txn, result)
}

fn abc(log: &CallLog) -> [Arc<TestDataManager>; 3] {
    [
        TestDataManager::new("a", log),
        TestDataManager::new("b", log),
        TestDataManager::new("c", log),
    ]
}

#[test]
fn two_phase_commit_runs_begin_commit_vote_finish_on_all_in_order() {
    let log = CallLog::new();
    let [a, b, _] = abc(&log);
    let (_tm, txn, result) = commit_with(&[a, b]);
    result.unwrap();
    assert_eq!(txn.status(), Status::Committed);
    assert_eq!(
        log.entries(),
        seq(&[
            ("a", TpcBegin),
            ("b", TpcBegin),
            ("a", Commit),
            ("b", Commit),
            ("a", TpcVote),
            ("b", TpcVote),
            ("a", TpcFinish),
            ("b", TpcFinish),
        ])
    );
}

#[test]
fn single_resource_gets_only_commit_one_phase() {
    let log = CallLog::new();
    let (_tm, txn, result) = commit_with(&[TestDataManager::new("a", &log)]);
    result.unwrap();
    assert_eq!(txn.status(), Status::Committed);
    assert_eq!(log.entries(), seq(&[("a", CommitOnePhase)]));
}

#[test]
fn single_one_phase_resource_also_commits_in_one_phase() {
    let log = CallLog::new();
    let (_tm, _txn, result) = commit_with(&[TestDataManager::new("a", &log).one_phase()]);
    result.unwrap();
    assert_eq!(log.entries(), seq(&[("a", CommitOnePhase)]));
}

#[test]
fn empty_transaction_commits_without_calling_anything() {
    let (_tm, txn, result) = commit_with(&[]);
    result.unwrap();
    assert_eq!(txn.status(), Status::Committed);
}

#[test]
fn resources_are_called_in_sort_key_order_not_join_order() {
    let log = CallLog::new();
    let [a, b, c] = abc(&log);
    let (_tm, _txn, result) = commit_with(&[c, a, b]);
    result.unwrap();
    let begins: Vec<_> = log
        .entries()
        .into_iter()
        .filter(|(_, p)| *p == TpcBegin)
        .map(|(n, _)| n)
        .collect();
    assert_eq!(begins, ["a", "b", "c"]);
    let finishes: Vec<_> = log
        .entries()
        .into_iter()
        .filter(|(_, p)| *p == TpcFinish)
        .map(|(n, _)| n)
        .collect();
    assert_eq!(finishes, ["a", "b", "c"]);
}

#[test]
fn sort_key_overrides_the_name_and_ties_keep_join_order() {
    let log = CallLog::new();
    let z = TestDataManager::new("z", &log).with_sort_key("1");
    let x = TestDataManager::new("x", &log).with_sort_key("2");
    let y = TestDataManager::new("y", &log).with_sort_key("2");
    let w = TestDataManager::new("w", &log).with_sort_key("2");
    let (_tm, _txn, result) = commit_with(&[x, w, y, z]);
    result.unwrap();
    let votes: Vec<_> = log
        .entries()
        .into_iter()
        .filter(|(_, p)| *p == TpcVote)
        .map(|(n, _)| n)
        .collect();
    assert_eq!(votes, ["z", "x", "w", "y"]);
}

#[test]
fn tpc_begin_failure_tpc_aborts_begun_resources_and_aborts_the_rest() {
    for fault in FAULTS {
        let (log, tm, txn, result) = commit_abc_with_b_failing(TpcBegin, fault);
        let err = result.unwrap_err();
        assert_fault(&err, fault, "b", TpcBegin);
        assert_eq!(
            log.entries(),
            seq(&[
                ("a", TpcBegin),
                ("b", TpcBegin),
                ("a", TpcAbort),
                ("b", TpcAbort),
                ("c", Abort),
            ]),
            "{fault:?}"
        );
        assert_eq!(txn.status(), Status::CommitFailed);
        assert!(tm.in_transaction());
    }
}

#[test]
fn first_resource_tpc_begin_failure_still_tpc_aborts_it() {
    let log = CallLog::new();
    let [a, b, _] = abc(&log);
    let a = a.fail_at(TpcBegin, Fault::Error);
    let (_tm, _txn, result) = commit_with(&[a, b]);
    assert_resource_error(&result.unwrap_err(), "a");
    assert_eq!(
        log.entries(),
        seq(&[("a", TpcBegin), ("a", TpcAbort), ("b", Abort)])
    );
}

#[test]
fn commit_failure_tpc_aborts_every_begun_resource() {
    for fault in FAULTS {
        let (log, _tm, txn, result) = commit_abc_with_b_failing(Commit, fault);
        assert_fault(&result.unwrap_err(), fault, "b", Commit);
        assert_eq!(
            log.entries(),
            seq(&[
                ("a", TpcBegin),
                ("b", TpcBegin),
                ("c", TpcBegin),
                ("a", Commit),
                ("b", Commit),
                ("a", TpcAbort),
                ("b", TpcAbort),
                ("c", TpcAbort),
            ]),
            "{fault:?}"
        );
        assert_eq!(txn.status(), Status::CommitFailed);
    }
}

#[test]
fn vote_failure_tpc_aborts_every_begun_resource() {
    for fault in FAULTS {
        let (log, _tm, txn, result) = commit_abc_with_b_failing(TpcVote, fault);
        assert_fault(&result.unwrap_err(), fault, "b", TpcVote);
        assert_eq!(
            log.entries(),
            seq(&[
                ("a", TpcBegin),
                ("b", TpcBegin),
                ("c", TpcBegin),
                ("a", Commit),
                ("b", Commit),
                ("c", Commit),
                ("a", TpcVote),
                ("b", TpcVote),
                ("a", TpcAbort),
                ("b", TpcAbort),
                ("c", TpcAbort),
            ]),
            "{fault:?}"
        );
        assert_eq!(txn.status(), Status::CommitFailed);
    }
}

#[test]
fn finish_failure_is_heuristic_naming_committed_and_failed_and_rolls_back_nobody() {
    for fault in FAULTS {
        let (log, tm, txn, result) = commit_abc_with_b_failing(TpcFinish, fault);
        match result.unwrap_err() {
            Error::Heuristic {
                committed,
                rolled_back,
                in_doubt,
            } => {
                assert_eq!(committed, ["a", "c"], "{fault:?}");
                assert_eq!(in_doubt, ["b"], "{fault:?}");
                assert!(rolled_back.is_empty(), "{fault:?}");
            }
            other => panic!("{fault:?}: expected Heuristic, got {other:?}"),
        }
        assert_eq!(
            log.entries(),
            seq(&[
                ("a", TpcBegin),
                ("b", TpcBegin),
                ("c", TpcBegin),
                ("a", Commit),
                ("b", Commit),
                ("c", Commit),
                ("a", TpcVote),
                ("b", TpcVote),
                ("c", TpcVote),
                ("a", TpcFinish),
                ("b", TpcFinish),
                ("c", TpcFinish),
            ]),
            "{fault:?}"
        );
        assert_eq!(txn.status(), Status::CommitFailed);
        // The abort that must follow calls nobody: b stays in doubt.
        tm.abort().unwrap();
        assert_eq!(log.entries().len(), 12);
        assert_eq!(txn.status(), Status::Aborted);
    }
}

#[test]
fn heuristic_error_is_not_retryable_and_names_both_lists() {
    let log = CallLog::new();
    let [a, b, _] = abc(&log);
    let a = a.fail_at(TpcFinish, Fault::Conflict);
    let (tm, _txn, result) = commit_with(&[a, b]);
    let err = result.unwrap_err();
    assert!(err.is_heuristic());
    assert!(!err.is_retryable());
    assert!(!tm.is_retryable(&err));
    let text = err.to_string();
    assert!(
        text.contains("committed [\"b\"]") && text.contains("in doubt [\"a\"]"),
        "{text}"
    );
}

#[test]
fn commit_one_phase_failure_is_the_resources_only_ending() {
    for fault in FAULTS {
        let log = CallLog::new();
        let a = TestDataManager::new("a", &log).fail_at(CommitOnePhase, fault);
        let (tm, txn, result) = commit_with(&[a]);
        assert_fault(&result.unwrap_err(), fault, "a", CommitOnePhase);
        assert_eq!(txn.status(), Status::CommitFailed);
        tm.abort().unwrap();
        assert_eq!(log.entries(), seq(&[("a", CommitOnePhase)]), "{fault:?}");
    }
}

#[test]
fn tpc_abort_raising_during_cleanup_does_not_stop_the_others_and_first_error_wins() {
    for fault in FAULTS {
        let log = CallLog::new();
        let [a, b, c] = abc(&log);
        let a = a.fail_at(TpcAbort, fault);
        let c = c.fail_at(TpcVote, Fault::Error);
        let (tm, txn, result) = commit_with(&[a, b, c]);
        assert_resource_error(&result.unwrap_err(), "c");
        let tail: Vec<_> = log.entries().into_iter().skip(9).collect();
        assert_eq!(
            tail,
            seq(&[("a", TpcAbort), ("b", TpcAbort), ("c", TpcAbort)]),
            "{fault:?}"
        );
        assert_eq!(txn.status(), Status::CommitFailed);
        tm.abort().unwrap();
        assert_eq!(log.entries().len(), 12);
    }
}

#[test]
fn abort_raising_during_cleanup_does_not_stop_the_others() {
    for fault in FAULTS {
        let log = CallLog::new();
        let [a, b, c] = abc(&log);
        let a = a.fail_at(TpcBegin, Fault::Error);
        let b = b.fail_at(Abort, fault);
        let (_tm, _txn, result) = commit_with(&[a, b, c]);
        assert_resource_error(&result.unwrap_err(), "a");
        assert_eq!(
            log.entries(),
            seq(&[("a", TpcBegin), ("a", TpcAbort), ("b", Abort), ("c", Abort)]),
            "{fault:?}"
        );
    }
}

#[test]
fn abort_calls_abort_on_each_resource_once_in_join_order() {
    let log = CallLog::new();
    let [a, b, c] = abc(&log);
    let tm = tm();
    let txn = tm.begin().unwrap();
    for dm in [c, a, b] {
        txn.join(dm).unwrap();
    }
    txn.abort().unwrap();
    assert_eq!(
        log.entries(),
        seq(&[("c", Abort), ("a", Abort), ("b", Abort)])
    );
    assert_eq!(txn.status(), Status::Aborted);
    assert!(!tm.in_transaction());
}

#[test]
fn abort_failure_of_one_resource_still_aborts_the_others_and_returns_the_first_error() {
    for fault in FAULTS {
        let log = CallLog::new();
        let [a, b, c] = abc(&log);
        let a = a.fail_at(Abort, fault);
        let b = b.fail_at(Abort, Fault::Error);
        let tm = tm();
        let txn = tm.begin().unwrap();
        for dm in [a, b, c] {
            txn.join(dm).unwrap();
        }
        let err = txn.abort().unwrap_err();
        assert_fault(&err, fault, "a", Abort);
        assert_eq!(
            log.entries(),
            seq(&[("a", Abort), ("b", Abort), ("c", Abort)])
        );
        assert_eq!(txn.status(), Status::Aborted);
        assert!(!tm.in_transaction(), "{fault:?}");
    }
}

#[test]
fn one_phase_resource_is_voted_after_every_vote_and_finished_before_every_finish() {
    let log = CallLog::new();
    let [a, _, c] = abc(&log);
    let last = TestDataManager::new("b", &log).one_phase();
    let (_tm, _txn, result) = commit_with(&[c, last, a]);
    result.unwrap();
    assert_eq!(
        log.entries(),
        seq(&[
            ("a", TpcBegin),
            ("b", TpcBegin),
            ("c", TpcBegin),
            ("a", Commit),
            ("b", Commit),
            ("c", Commit),
            ("a", TpcVote),
            ("c", TpcVote),
            ("b", TpcVote),
            ("b", TpcFinish),
            ("a", TpcFinish),
            ("c", TpcFinish),
        ])
    );
}

#[test]
fn one_phase_resource_refusing_its_vote_aborts_everyone_without_heuristic() {
    for fault in FAULTS {
        for phase in [TpcVote, TpcFinish] {
            let log = CallLog::new();
            let [a, _, c] = abc(&log);
            let last = TestDataManager::new("b", &log)
                .one_phase()
                .fail_at(phase, fault);
            let (_tm, txn, result) = commit_with(&[a, last, c]);
            let err = result.unwrap_err();
            assert_fault(&err, fault, "b", phase);
            let tail: Vec<_> = log.entries().into_iter().skip(8).collect();
            let mut expected = vec![("b", TpcVote)];
            if phase == TpcFinish {
                expected.push(("b", TpcFinish));
            }
            expected.extend([("a", TpcAbort), ("b", TpcAbort), ("c", TpcAbort)]);
            assert_eq!(tail, seq(&expected), "{fault:?} at {phase}");
            assert_eq!(txn.status(), Status::CommitFailed);
        }
    }
}

#[test]
fn several_one_phase_resources_commit_in_sort_order_after_the_votes() {
    let log = CallLog::new();
    let a = TestDataManager::new("a", &log);
    let l2 = TestDataManager::new("l2", &log).one_phase();
    let l1 = TestDataManager::new("l1", &log).one_phase();
    let (_tm, _txn, result) = commit_with(&[l2, a, l1]);
    result.unwrap();
    let tail: Vec<_> = log.entries().into_iter().skip(6).collect();
    assert_eq!(
        tail,
        seq(&[
            ("a", TpcVote),
            ("l1", TpcVote),
            ("l1", TpcFinish),
            ("l2", TpcVote),
            ("l2", TpcFinish),
            ("a", TpcFinish),
        ])
    );
}

#[test]
fn second_one_phase_failure_after_the_first_committed_is_heuristic() {
    for fault in FAULTS {
        let log = CallLog::new();
        let a = TestDataManager::new("a", &log);
        let l1 = TestDataManager::new("l1", &log).one_phase();
        let l2 = TestDataManager::new("l2", &log)
            .one_phase()
            .fail_at(TpcVote, fault);
        let (tm, txn, result) = commit_with(&[a, l1, l2]);
        match result.unwrap_err() {
            Error::Heuristic {
                committed,
                rolled_back,
                in_doubt,
            } => {
                assert_eq!(committed, ["l1", "a"], "{fault:?}");
                assert_eq!(rolled_back, ["l2"], "{fault:?}");
                assert!(in_doubt.is_empty(), "{fault:?}");
            }
            other => panic!("{fault:?}: expected Heuristic, got {other:?}"),
        }
        let tail: Vec<_> = log.entries().into_iter().skip(6).collect();
        assert_eq!(
            tail,
            seq(&[
                ("a", TpcVote),
                ("l1", TpcVote),
                ("l1", TpcFinish),
                ("l2", TpcVote),
                ("l2", TpcAbort),
                ("a", TpcFinish),
            ]),
            "{fault:?}"
        );
        assert_eq!(txn.status(), Status::CommitFailed);
        tm.abort().unwrap();
        assert_eq!(log.entries().len(), 12);
    }
}

#[test]
fn every_resource_gets_at_most_one_ending_for_a_failure_at_any_phase() {
    let phases = [TpcBegin, Commit, TpcVote, TpcFinish, TpcAbort, Abort];
    for fault in FAULTS {
        for phase in phases {
            for victim in ["a", "b", "l"] {
                let log = CallLog::new();
                let make = |name: &str| {
                    let dm = TestDataManager::new(name, &log);
                    let dm = if name == "l" { dm.one_phase() } else { dm };
                    if name == victim {
                        dm.fail_at(phase, fault)
                    } else {
                        dm
                    }
                };
                let dms = [make("a"), make("b"), make("l")];
                let (tm, txn, result) = commit_with(&dms);
                let in_doubt = match &result {
                    Err(Error::Heuristic { in_doubt, .. }) => in_doubt.clone(),
                    _ => Vec::new(),
                };
                // The abort that follows a failure ends nobody twice.
                if result.is_err() {
                    tm.abort().unwrap();
                }
                assert!(!tm.in_transaction());
                assert!(txn.status().is_finished());
                for name in ["a", "b", "l"] {
                    let n = endings(&log, name);
                    let phases = log.phases_of(name);
                    // A one-phase resource's successful vote + finish is its
                    // ending; a refused one is tpc_aborted.
                    if in_doubt.iter().any(|f| f == name) && name != "l" {
                        assert_eq!(n, 1, "{name} {phases:?} ({fault:?} at {victim}/{phase})");
                        assert_eq!(phases.last(), Some(&TpcFinish));
                    } else {
                        assert!(
                            n == 1
                                || (name == "l"
                                    && n == 2
                                    && phases.ends_with(&[TpcFinish, TpcAbort])),
                            "{name}: {phases:?} ({fault:?} at {victim}/{phase})"
                        );
                    }
                    // Never an abort after a successful finish.
                    if let Some(i) = phases.iter().position(|p| *p == TpcFinish) {
                        let finish_failed = victim == name && phase == TpcFinish;
                        if !finish_failed {
                            assert!(
                                !phases[i..].contains(&Abort) && !phases[i..].contains(&TpcAbort),
                                "{name}: {phases:?} ({fault:?} at {victim}/{phase})"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn commit_failed_refuses_everything_but_abort() {
    let log = CallLog::new();
    let [a, b, c] = abc(&log);
    let a = a.fail_at(TpcVote, Fault::Error);
    let (tm, txn, result) = commit_with(&[a, b]);
    assert!(result.is_err());
    let calls = log.entries().len();
    assert!(matches!(txn.commit(), Err(Error::CommitFailed)));
    assert!(matches!(tm.commit(), Err(Error::CommitFailed)));
    assert!(matches!(txn.join(c), Err(Error::CommitFailed)));
    assert!(matches!(txn.savepoint(), Err(Error::CommitFailed)));
    assert!(matches!(
        txn.savepoint_optimistic(),
        Err(Error::CommitFailed)
    ));
    assert!(matches!(txn.doom(), Err(Error::CommitFailed)));
    assert!(matches!(tm.begin(), Err(Error::AlreadyInTransaction)));
    assert_eq!(tm.get().unwrap(), txn);
    assert_eq!(log.entries().len(), calls, "refusals call no resource");
    txn.abort().unwrap();
    assert_eq!(
        log.entries().len(),
        calls,
        "abort after a failed commit ends nobody twice"
    );
    assert_eq!(txn.status(), Status::Aborted);
    assert!(!tm.in_transaction());
    tm.begin().unwrap();
}

#[test]
fn doomed_transaction_refuses_to_commit_without_calling_resources() {
    let log = CallLog::new();
    let [a, b, _] = abc(&log);
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(a).unwrap();
    txn.doom().unwrap();
    txn.join(b).unwrap();
    assert!(matches!(txn.commit(), Err(Error::Doomed)));
    assert!(log.entries().is_empty());
    assert_eq!(txn.status(), Status::Doomed);
    txn.abort().unwrap();
    assert_eq!(log.entries(), seq(&[("a", Abort), ("b", Abort)]));
}

#[test]
fn decision_is_logged_after_every_vote_and_before_any_finish_then_forgotten() {
    let log = CallLog::new();
    let dlog = RecordingDecisionLog::new(&log);
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(dlog.clone())
        .build();
    let txn = tm.begin().unwrap();
    let [a, b, _] = abc(&log);
    txn.join(b).unwrap();
    txn.join(a).unwrap();
    txn.commit().unwrap();
    let tail: Vec<_> = log.entries().into_iter().skip(4).collect();
    assert_eq!(
        tail,
        seq(&[
            ("a", TpcVote),
            ("b", TpcVote),
            ("decision-log:record", Work),
            ("a", TpcFinish),
            ("b", TpcFinish),
            ("decision-log:forget", Work),
        ])
    );
    assert_eq!(dlog.decisions.lock()[0].txid, txn.id());
    assert!(dlog.pending.lock().is_empty());
}

#[test]
fn decision_is_logged_before_the_one_phase_resource_votes() {
    let log = CallLog::new();
    let dlog = RecordingDecisionLog::new(&log);
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(dlog)
        .build();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.join(TestDataManager::new("l", &log).one_phase())
        .unwrap();
    txn.commit().unwrap();
    let tail: Vec<_> = log.entries().into_iter().skip(4).collect();
    assert_eq!(
        tail,
        seq(&[
            ("a", TpcVote),
            ("decision-log:record", Work),
            ("l", TpcVote),
            ("l", TpcFinish),
            ("a", TpcFinish),
            ("decision-log:forget", Work),
        ])
    );
}

#[test]
fn one_phase_resource_refusal_withdraws_the_logged_decision() {
    let log = CallLog::new();
    let dlog = RecordingDecisionLog::new(&log);
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(dlog.clone())
        .build();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.join(
        TestDataManager::new("l", &log)
            .one_phase()
            .fail_at(TpcVote, Fault::Conflict),
    )
    .unwrap();
    let err = txn.commit().unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
    assert!(dlog.pending.lock().is_empty(), "the decision is withdrawn");
    assert_eq!(log.phases_of("a").last(), Some(&TpcAbort));
}

#[test]
fn decision_log_failure_tpc_aborts_everyone() {
    let log = CallLog::new();
    let dlog = RecordingDecisionLog::new(&log);
    dlog.fail_record
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(dlog)
        .build();
    let txn = tm.begin().unwrap();
    let [a, b, _] = abc(&log);
    txn.join(a).unwrap();
    txn.join(b).unwrap();
    let err = txn.commit().unwrap_err();
    assert!(matches!(err, Error::DecisionLog { .. }), "{err:?}");
    let tail: Vec<_> = log.entries().into_iter().skip(6).collect();
    assert_eq!(
        tail,
        seq(&[
            ("decision-log:record", Work),
            ("a", TpcAbort),
            ("b", TpcAbort),
        ])
    );
    assert_eq!(txn.status(), Status::CommitFailed);
}

#[test]
fn one_resource_transaction_writes_no_decision() {
    let log = CallLog::new();
    let dlog = RecordingDecisionLog::new(&log);
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(dlog.clone())
        .build();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.commit().unwrap();
    assert_eq!(log.entries(), seq(&[("a", CommitOnePhase)]));
    assert!(dlog.decisions.lock().is_empty());
}

#[test]
fn only_one_phase_resources_write_no_decision_their_commits_decide() {
    let log = CallLog::new();
    let dlog = RecordingDecisionLog::new(&log);
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(dlog.clone())
        .allow_multiple_last_resources(true)
        .build();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log).one_phase())
        .unwrap();
    txn.join(TestDataManager::new("b", &log).one_phase())
        .unwrap();
    txn.commit().unwrap();
    assert!(dlog.decisions.lock().is_empty(), "{:?}", log.entries());
    assert!(!log
        .entries()
        .iter()
        .any(|(n, _)| n.starts_with("decision-log")));
}

#[test]
fn decision_names_the_recoverable_participants_and_the_metadata() {
    let log = CallLog::new();
    let dlog = RecordingDecisionLog::new(&log);
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(dlog.clone())
        .build();
    let x = MemoryStore::<i32>::named("x");
    let y = MemoryStore::<i32>::named("y");
    let txn = tm.begin().unwrap();
    txn.set_user("alice");
    txn.note("transfer");
    txn.set_extension("request", "42");
    x.join(&txn).unwrap().put("k", 1).unwrap();
    y.join(&txn).unwrap().put("k", 2).unwrap();
    txn.join(TestDataManager::new("not-recoverable", &log))
        .unwrap();
    txn.commit().unwrap();
    let d = dlog.decisions.lock()[0].clone();
    assert_eq!(d.txid, txn.id());
    assert_eq!(d.participants, ["memory:x", "memory:y"]);
    assert_eq!(d.metadata.get("user").map(String::as_str), Some("alice"));
    assert_eq!(
        d.metadata.get("description").map(String::as_str),
        Some("transfer")
    );
    assert_eq!(d.metadata.get("request").map(String::as_str), Some("42"));
}

#[test]
fn finish_failure_with_a_file_log_is_heuristic_and_recover_finishes_it_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.log");
    let x = MemoryStore::<i32>::named("x");
    let y = MemoryStore::<i32>::named("y");
    let txid = {
        let flog = Arc::new(FileDecisionLog::open(&path).unwrap());
        let tm = TransactionManager::builder()
            .explicit(true)
            .decision_log(flog)
            .build();
        y.fail_finish(true);
        let txn = tm.begin().unwrap();
        x.join(&txn).unwrap().put("k", 1).unwrap();
        y.join(&txn).unwrap().put("k", 2).unwrap();
        match txn.commit().unwrap_err() {
            Error::Heuristic {
                committed,
                in_doubt,
                ..
            } => {
                assert_eq!(committed, ["x"]);
                assert_eq!(in_doubt, ["y"]);
            }
            other => panic!("expected Heuristic, got {other:?}"),
        }
        tm.abort().unwrap();
        assert_eq!(x.committed("k"), Some(1));
        assert_eq!(y.committed("k"), None);
        assert_eq!(y.prepared_count(), 1, "y stays prepared (in doubt)");
        txn.id()
    };
    y.fail_finish(false);
    // "Restart": reopen the log from its file.
    let flog = FileDecisionLog::open(&path).unwrap();
    let pending: Vec<_> = tm_core::DecisionLog::pending(&flog)
        .unwrap()
        .into_iter()
        .map(|d| d.txid)
        .collect();
    assert_eq!(pending, [txid]);
    assert_eq!(y.in_doubt().unwrap()[0].txid, txid);
    let report = recover(&flog, &[&x, &y]).unwrap();
    assert!(report.is_clean());
    assert_eq!(report.committed, [("memory:y".to_string(), txid)]);
    assert!(report.aborted.is_empty());
    assert_eq!(report.forgotten, [txid]);
    assert_eq!(y.committed("k"), Some(2));
    assert_eq!(y.prepared_count(), 0);
    assert!(tm_core::DecisionLog::pending(&flog).unwrap().is_empty());
    // Recovery is idempotent.
    let again = recover(&flog, &[&x, &y]).unwrap();
    assert!(again.committed.is_empty() && again.aborted.is_empty() && again.forgotten.is_empty());
}

#[test]
fn a_record_prepared_without_a_decision_log_is_never_presumed_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let x = MemoryStore::<i32>::named("x");
    let y = MemoryStore::<i32>::named("y");
    // No decision log: nothing records the decision, so no recovery may
    // guess it (the old rule aborted it, though x had committed).
    let tm = tm();
    y.fail_finish(true);
    let txn = tm.begin().unwrap();
    x.join(&txn).unwrap().put("k", 1).unwrap();
    y.join(&txn).unwrap().put("k", 2).unwrap();
    assert!(txn.commit().unwrap_err().is_heuristic());
    tm.abort().unwrap();
    y.fail_finish(false);
    let flog = FileDecisionLog::open(dir.path().join("log")).unwrap();
    let report = recover_with(
        &flog,
        &[&x, &y],
        &RecoveryOptions::new().grace(Duration::ZERO),
    )
    .unwrap();
    assert!(
        report.aborted.is_empty() && report.committed.is_empty(),
        "{report:?}"
    );
    assert_eq!(report.foreign.len(), 1, "{report:?}");
    assert_eq!(report.foreign[0].0, "memory:y");
    assert_eq!(report.foreign[0].1.txid, txn.id());
    assert_eq!(report.foreign[0].1.log, None);
    assert_eq!(y.prepared_count(), 1, "left alone");
}

#[test]
fn recover_keeps_a_decision_while_a_participant_was_not_given() {
    let dir = tempfile::tempdir().unwrap();
    let flog = Arc::new(FileDecisionLog::open(dir.path().join("log")).unwrap());
    let x = MemoryStore::<i32>::named("x");
    let y = MemoryStore::<i32>::named("y");
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(flog.clone())
        .build();
    y.fail_finish(true);
    let txn = tm.begin().unwrap();
    x.join(&txn).unwrap().put("k", 1).unwrap();
    y.join(&txn).unwrap().put("k", 2).unwrap();
    assert!(txn.commit().unwrap_err().is_heuristic());
    tm.abort().unwrap();
    y.fail_finish(false);
    let report = recover(&*flog, &[&x as &dyn Recoverable]).unwrap();
    assert!(report.forgotten.is_empty());
    assert_eq!(tm_core::DecisionLog::pending(&*flog).unwrap().len(), 1);
    let report = recover(&*flog, &[&x, &y]).unwrap();
    assert_eq!(report.forgotten, [txn.id()]);
    assert_eq!(y.committed("k"), Some(2));
}

#[test]
fn successful_commit_with_a_file_log_leaves_nothing_pending() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let flog = Arc::new(FileDecisionLog::open(&path).unwrap());
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(flog.clone())
        .build();
    let x = MemoryStore::<i32>::named("x");
    let y = MemoryStore::<i32>::named("y");
    for i in 0..3 {
        let txn = tm.begin().unwrap();
        x.join(&txn).unwrap().put("k", i).unwrap();
        y.join(&txn).unwrap().put("k", i).unwrap();
        txn.commit().unwrap();
    }
    assert!(tm_core::DecisionLog::pending(&*flog).unwrap().is_empty());
    drop(tm);
    drop(flog);
    let reopened = FileDecisionLog::open(&path).unwrap();
    assert!(tm_core::DecisionLog::pending(&reopened).unwrap().is_empty());
    assert_eq!((x.committed("k"), y.committed("k")), (Some(2), Some(2)));
}

/// A resource that finished only in part says so with `Heuristic`: tm names
/// it committed and rolled back, never in doubt (recovery has nothing left
/// to finish there). It was reported in doubt before.
#[test]
fn a_finish_done_in_part_is_named_committed_and_rolled_back() {
    let (_log, tm, _txn, result) = commit_abc_with_b_failing(TpcFinish, Fault::Partial);
    match result.unwrap_err() {
        Error::Heuristic {
            committed,
            rolled_back,
            in_doubt,
        } => {
            assert_eq!(committed, ["a", "b", "c"]);
            assert_eq!(rolled_back, ["b"]);
            assert!(in_doubt.is_empty(), "{in_doubt:?}");
        }
        other => panic!("expected Heuristic, got {other:?}"),
    }
    tm.abort().ok();
}
