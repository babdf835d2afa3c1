//! The transaction object: status, join rules, metadata, ids, finished handles.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::*;
use parking_lot::Mutex;
use tm_core::testing::{CallLog, Fault, TestDataManager};
use tm_core::{DataManager, Error, Phase, Result, Status, Transaction, TxId};

#[test]
fn status_goes_active_committed() {
    let tm = tm();
    let txn = tm.begin().unwrap();
    assert_eq!(txn.status(), Status::Active);
    assert!(!txn.status().is_finished());
    txn.commit().unwrap();
    assert_eq!(txn.status(), Status::Committed);
    assert!(txn.status().is_finished());
}

#[test]
fn status_goes_active_aborted() {
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.abort().unwrap();
    assert_eq!(txn.status(), Status::Aborted);
    assert!(txn.status().is_finished());
}

#[test]
fn status_goes_active_doomed_aborted() {
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.doom().unwrap();
    assert_eq!(txn.status(), Status::Doomed);
    assert!(!txn.status().is_finished());
    txn.abort().unwrap();
    assert_eq!(txn.status(), Status::Aborted);
}

#[test]
fn status_goes_active_commit_failed_aborted() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log).fail_at(Phase::CommitOnePhase, Fault::Error))
        .unwrap();
    assert!(txn.commit().is_err());
    assert_eq!(txn.status(), Status::CommitFailed);
    assert!(!txn.status().is_finished());
    txn.abort().unwrap();
    assert_eq!(txn.status(), Status::Aborted);
}

#[test]
fn status_names_follow_zodb_plus_aborted() {
    let names: Vec<_> = [
        Status::Active,
        Status::Committing,
        Status::Committed,
        Status::Doomed,
        Status::CommitFailed,
        Status::Aborted,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(
        names,
        [
            "Active",
            "Committing",
            "Committed",
            "Doomed",
            "Commit failed",
            "Aborted"
        ]
    );
}

/// A resource that tries to join another one while it is being committed.
struct JoinsWhileCommitting {
    other: Arc<TestDataManager>,
    seen: Mutex<Vec<(Status, String)>>,
}

impl DataManager for JoinsWhileCommitting {
    fn sort_key(&self) -> &str {
        "joiner"
    }
    fn abort(&self, _: &Transaction) -> Result<()> {
        Ok(())
    }
    fn tpc_begin(&self, _: &Transaction) -> Result<()> {
        Ok(())
    }
    fn commit(&self, _: &Transaction) -> Result<()> {
        Ok(())
    }
    fn tpc_vote(&self, _: &Transaction) -> Result<()> {
        Ok(())
    }
    fn tpc_finish(&self, _: &Transaction) -> Result<()> {
        Ok(())
    }
    fn tpc_abort(&self, _: &Transaction) -> Result<()> {
        Ok(())
    }
    fn commit_one_phase(&self, txn: &Transaction) -> Result<()> {
        let r = txn.join(self.other.clone());
        self.seen
            .lock()
            .push((txn.status(), format!("{:?}", r.map_err(|e| e.to_string()))));
        Ok(())
    }
}

#[test]
fn join_while_committing_is_closed() {
    let log = CallLog::new();
    let dm = Arc::new(JoinsWhileCommitting {
        other: TestDataManager::new("other", &log),
        seen: Mutex::new(Vec::new()),
    });
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(dm.clone()).unwrap();
    txn.commit().unwrap();
    let seen = dm.seen.lock().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, Status::Committing);
    assert!(seen[0].1.contains("finished"), "{:?}", seen[0].1);
    assert!(
        log.entries().is_empty(),
        "the refused resource is never called"
    );
}

#[test]
fn join_after_commit_or_abort_is_closed() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.commit().unwrap();
    assert!(matches!(
        txn.join(TestDataManager::new("a", &log)),
        Err(Error::Closed)
    ));
    let txn = tm.begin().unwrap();
    txn.abort().unwrap();
    assert!(matches!(
        txn.join(TestDataManager::new("a", &log)),
        Err(Error::Closed)
    ));
    assert!(log.entries().is_empty());
}

#[test]
fn join_after_a_failed_commit_is_commit_failed_with_a_clear_message() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log).fail_at(Phase::CommitOnePhase, Fault::Error))
        .unwrap();
    assert!(txn.commit().is_err());
    let err = txn.join(TestDataManager::new("b", &log)).unwrap_err();
    assert!(matches!(err, Error::CommitFailed));
    assert!(err.to_string().contains("abort() it first"), "{err}");
    txn.abort().unwrap();
    assert!(log.phases_of("b").is_empty());
}

#[test]
fn join_while_doomed_is_allowed_and_the_resource_is_aborted() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.doom().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.abort().unwrap();
    assert_eq!(log.entries(), seq(&[("a", Phase::Abort)]));
}

#[test]
fn the_same_arc_joined_twice_joins_once() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    let a = TestDataManager::new("a", &log);
    let b = TestDataManager::new("b", &log);
    txn.join(a.clone()).unwrap();
    txn.join(b.clone()).unwrap();
    txn.join(a.clone()).unwrap();
    assert_eq!(txn.resource_names(), ["a", "b"]);
    let a_dyn: Arc<dyn DataManager> = a;
    assert!(txn.is_joined(&a_dyn));
    txn.commit().unwrap();
    assert_eq!(
        log.phases_of("a"),
        log.phases_of("b"),
        "one call per phase each"
    );
    assert_eq!(log.phases_of("a").len(), 4);
}

#[test]
fn two_distinct_resources_with_the_same_name_both_join() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    assert_eq!(txn.resource_names(), ["a", "a"]);
    txn.abort().unwrap();
    assert_eq!(
        log.entries(),
        seq(&[("a", Phase::Abort), ("a", Phase::Abort)])
    );
}

#[test]
fn note_appends_trimmed_lines_and_ignores_empty_text() {
    let tm = tm();
    let txn = tm.begin().unwrap();
    assert_eq!(txn.description(), "");
    txn.note("  first  ");
    txn.note("");
    txn.note("second\n");
    assert_eq!(txn.description(), "first\nsecond");
    txn.abort().unwrap();
}

#[test]
fn user_and_extension_last_value_wins() {
    let tm = tm();
    let txn = tm.begin().unwrap();
    assert_eq!(txn.user(), "");
    txn.set_user("alice");
    txn.set_user("bob");
    assert_eq!(txn.user(), "bob");
    assert_eq!(txn.extension("k"), None);
    txn.set_extension("k", "1");
    txn.set_extension("k", "2");
    txn.set_extension("other", "x");
    assert_eq!(txn.extension("k").as_deref(), Some("2"));
    assert_eq!(txn.extensions().len(), 2);
    txn.abort().unwrap();
}

#[test]
fn data_is_kept_one_value_per_type() {
    #[derive(Debug, PartialEq)]
    struct Cache(u8);
    let tm = tm();
    let txn = tm.begin().unwrap();
    assert!(txn.data::<Cache>().is_none());
    txn.set_data(Cache(1));
    txn.set_data(5_u64);
    txn.set_data(Cache(2));
    assert_eq!(*txn.data::<Cache>().unwrap(), Cache(2));
    assert_eq!(*txn.data::<u64>().unwrap(), 5);
    assert!(txn.data::<u32>().is_none());
    let other = tm_core::TransactionManager::explicit().begin().unwrap();
    assert!(other.data::<Cache>().is_none(), "data is per transaction");
    txn.abort().unwrap();
}

#[test]
fn clones_are_the_same_transaction_and_others_differ() {
    let tm = tm();
    let txn = tm.begin().unwrap();
    let clone = txn.clone();
    assert_eq!(txn, clone);
    assert_eq!(txn.id(), clone.id());
    clone.note("via clone");
    assert_eq!(txn.description(), "via clone");
    txn.commit().unwrap();
    assert_eq!(clone.status(), Status::Committed);
    let next = tm.begin().unwrap();
    assert_ne!(next, txn);
    next.abort().unwrap();
}

#[test]
fn txids_are_unique_across_threads() {
    let handles: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(|| (0..5000).map(|_| TxId::new()).collect::<Vec<_>>()))
        .collect();
    let mut all = HashSet::new();
    for h in handles {
        for id in h.join().unwrap() {
            assert!(all.insert(id), "duplicate {id}");
        }
    }
    assert_eq!(all.len(), 20_000);
    let tm = tm();
    let a = tm.begin().unwrap().id();
    tm.abort().unwrap();
    let b = tm.begin().unwrap().id();
    tm.abort().unwrap();
    assert_ne!(a, b);
}

#[test]
fn txid_display_and_from_str_round_trip() {
    for id in [
        TxId::new(),
        TxId::from_parts(0, 0),
        TxId::from_parts(u64::MAX, u64::MAX),
    ] {
        let text = id.to_string();
        let back: TxId = text.parse().unwrap();
        assert_eq!(back, id, "{text}");
        assert_eq!((back.prefix(), back.counter()), (id.prefix(), id.counter()));
    }
    assert_eq!(TxId::from_parts(0xab, 7).to_string(), "00000000000000ab-7");
}

#[test]
fn txid_from_str_refuses_malformed_text_with_a_clear_error() {
    for bad in [
        "",
        "abc",
        "00000000000000ab",
        "00000000000000ab-",
        "ab-7",
        "00000000000000ag-7",
        "00000000000000ab--7",
        "00000000000000ab-7x",
    ] {
        let err = bad.parse::<TxId>().unwrap_err();
        assert!(
            err.to_string().contains("not a transaction id"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn a_finished_transactions_handle_refuses_reuse_with_closed() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.commit().unwrap();
    let calls = log.entries().len();
    for (what, r) in [
        ("commit", txn.commit()),
        ("abort", txn.abort()),
        ("doom", txn.doom()),
        ("join", txn.join(TestDataManager::new("b", &log))),
    ] {
        let err = r.unwrap_err();
        assert!(matches!(err, Error::Closed), "{what}: {err:?}");
        assert!(err.to_string().contains("finished"), "{what}: {err}");
    }
    // A savepoint of a finished transaction is InvalidSavepoint.
    assert!(matches!(txn.savepoint(), Err(Error::InvalidSavepoint)));
    assert_eq!(log.entries().len(), calls, "no resource is called");
    assert_eq!(txn.status(), Status::Committed);
}

#[test]
fn an_aborted_transactions_handle_refuses_reuse_with_closed() {
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.abort().unwrap();
    assert!(matches!(txn.commit(), Err(Error::Closed)));
    assert!(matches!(txn.abort(), Err(Error::Closed)));
    assert!(matches!(txn.doom(), Err(Error::Closed)));
    assert_eq!(txn.status(), Status::Aborted);
    // The old handle does not disturb the manager's next transaction.
    let next = tm.begin().unwrap();
    assert!(txn.commit().is_err());
    assert_eq!(next.status(), Status::Active);
    next.commit().unwrap();
}

#[test]
fn errors_about_a_resource_name_it_and_the_phase() {
    let err = Error::conflict("sqlite:/tmp/db", Phase::TpcVote, "row 7");
    let text = err.to_string();
    assert!(
        text.contains("sqlite:/tmp/db") && text.contains("tpc_vote"),
        "{text}"
    );
    assert_eq!(err.resource_name(), Some("sqlite:/tmp/db"));
    assert!(err.is_retryable());
    let err = Error::transient("redis", Phase::Work, "reset");
    assert!(err.is_retryable() && err.to_string().contains("redis"));
    let err = Error::resource("redis", "boom");
    assert!(!err.is_retryable());
    assert_eq!(err.to_string(), "resource redis failed");
    assert_eq!(
        tm_core::Report(&err).to_string(),
        "resource redis failed: boom"
    );
    assert!(std::error::Error::source(&err).is_some(), "source kept");
    assert!(!Error::Doomed.is_retryable());
}

#[test]
fn a_thread_that_ends_inside_a_transaction_aborts_it() {
    let log = CallLog::new();
    let dm = TestDataManager::new("a", &log);
    let (txid, joined) = std::thread::spawn({
        let dm = dm.clone();
        move || {
            let txn = tm_core::begin().unwrap();
            txn.join(dm).unwrap();
            (txn.id(), txn.status())
        }
    })
    .join()
    .unwrap();
    assert_eq!(joined, Status::Active);
    assert_eq!(log.entries(), seq(&[("a", Phase::Abort)]), "{txid}");
}

#[test]
fn dropping_the_last_handle_of_an_unfinished_transaction_aborts_it() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    let kept = txn.clone();
    drop(txn);
    assert!(log.entries().is_empty(), "a handle is still alive");
    // The manager holds the current one: begin() elsewhere is refused, the
    // transaction lives on until it is ended.
    assert!(matches!(tm.begin(), Err(Error::AlreadyInTransaction)));
    kept.abort().unwrap();
    assert_eq!(log.entries(), seq(&[("a", Phase::Abort)]));
    drop(kept);
    assert_eq!(
        log.entries().len(),
        1,
        "a finished transaction is not aborted again"
    );
}

#[test]
fn a_committed_transaction_is_not_aborted_when_dropped() {
    let log = CallLog::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.commit().unwrap();
    drop(txn);
    assert_eq!(log.entries(), seq(&[("a", Phase::CommitOnePhase)]));
}
