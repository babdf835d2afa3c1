//! `MemoryStore`: the reference resource manager.

mod common;

use common::*;
use std::sync::Arc;
use tm_core::testing::{CallLog, TestDataManager};

use tm_core::{
    DataManager, Error, MemoryHandle, MemoryStore, Phase, Recoverable, Status, Transaction,
    TransactionManager,
};

#[test]
fn a_transaction_reads_its_own_writes_and_deletes() {
    let tm = tm();
    let store = MemoryStore::<String>::new();
    let txn = tm.begin().unwrap();
    let h = store.join(&txn).unwrap();
    assert_eq!(h.get("k").unwrap(), None);
    h.put("k", "v1".into()).unwrap();
    assert_eq!(h.get("k").unwrap().as_deref(), Some("v1"));
    h.put("k", "v2".into()).unwrap();
    assert_eq!(h.get("k").unwrap().as_deref(), Some("v2"));
    h.delete("k").unwrap();
    assert_eq!(h.get("k").unwrap(), None);
    h.put("k", "v3".into()).unwrap();
    txn.commit().unwrap();
    assert_eq!(store.committed("k").as_deref(), Some("v3"));
}

#[test]
fn writes_are_invisible_outside_until_commit_and_abort_discards_them() {
    let tm = tm();
    let store = MemoryStore::<i32>::new();
    let txn = tm.begin().unwrap();
    store.join(&txn).unwrap().put("k", 1).unwrap();
    assert_eq!(store.committed("k"), None);
    txn.abort().unwrap();
    assert_eq!(store.committed("k"), None);
    assert!(store.snapshot().is_empty());

    let txn = tm.begin().unwrap();
    store.join(&txn).unwrap().put("k", 2).unwrap();
    txn.commit().unwrap();
    assert_eq!(store.snapshot().get("k"), Some(&2));
}

#[test]
fn committed_delete_removes_the_key() {
    let tm = tm();
    let store = MemoryStore::<i32>::new();
    tm.run(|txn| {
        store.join(txn)?.put("k", 1)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    tm.run(|txn| {
        store.join(txn)?.delete("k")?;
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(store.committed("k"), None);
    assert!(store.snapshot().is_empty());
}

#[test]
fn joining_twice_gives_handles_on_the_same_transaction_state() {
    let tm = tm();
    let store = MemoryStore::<i32>::new();
    let txn = tm.begin().unwrap();
    let h1 = store.join(&txn).unwrap();
    let h2 = store.join(&txn).unwrap();
    h1.put("k", 1).unwrap();
    assert_eq!(h2.get("k").unwrap(), Some(1));
    assert_eq!(txn.resource_names(), ["memory"], "joined once");
    assert_eq!(h1.txid(), txn.id());
    txn.abort().unwrap();
}

#[test]
fn a_key_read_then_changed_by_another_transaction_conflicts_at_commit() {
    let tm1 = tm();
    let tm2 = tm();
    let store = MemoryStore::<i32>::named("accounts");
    let t1 = tm1.begin().unwrap();
    let h1 = store.join(&t1).unwrap();
    let seen = h1.get("k").unwrap().unwrap_or(0);

    let t2 = tm2.begin().unwrap();
    store.join(&t2).unwrap().put("k", 100).unwrap();
    t2.commit().unwrap();

    h1.put("k", seen + 1).unwrap();
    let err = t1.commit().unwrap_err();
    match &err {
        Error::Conflict {
            resource,
            phase,
            detail,
        } => {
            assert_eq!(resource, "accounts");
            assert_eq!(*phase, Phase::CommitOnePhase);
            assert!(detail.contains("\"k\""), "{detail}");
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert!(tm1.is_retryable(&err));
    tm1.abort().unwrap();
    assert_eq!(store.committed("k"), Some(100));
}

#[test]
fn a_conflict_at_vote_aborts_the_other_store_too() {
    let tm1 = tm();
    let tm2 = tm();
    let x = MemoryStore::<i32>::named("x");
    let y = MemoryStore::<i32>::named("y");
    let t1 = tm1.begin().unwrap();
    let hy = y.join(&t1).unwrap();
    let v = hy.get("k").unwrap().unwrap_or(0);
    x.join(&t1).unwrap().put("k", 1).unwrap();

    tm2.run(|txn| {
        y.join(txn)?.put("k", 50)?;
        Ok::<_, Error>(())
    })
    .unwrap();

    hy.put("k", v + 1).unwrap();
    let err = t1.commit().unwrap_err();
    assert!(
        matches!(&err, Error::Conflict { resource, phase: Phase::TpcVote, .. } if resource == "y")
    );
    tm1.abort().unwrap();
    assert_eq!(x.committed("k"), None, "all or nothing");
    assert_eq!(y.committed("k"), Some(50));
    assert_eq!(x.prepared_count() + y.prepared_count(), 0);
}

#[test]
fn transactions_on_disjoint_keys_never_conflict() {
    let tm1 = tm();
    let tm2 = tm();
    let store = MemoryStore::<i32>::new();
    let t1 = tm1.begin().unwrap();
    let t2 = tm2.begin().unwrap();
    let (h1, h2) = (store.join(&t1).unwrap(), store.join(&t2).unwrap());
    let a = h1.get("a").unwrap().unwrap_or(0);
    let b = h2.get("b").unwrap().unwrap_or(0);
    h1.put("a", a + 1).unwrap();
    h2.put("b", b + 1).unwrap();
    t2.commit().unwrap();
    t1.commit().unwrap();
    assert_eq!(
        (store.committed("a"), store.committed("b")),
        (Some(1), Some(1))
    );
}

#[test]
fn a_prepared_transaction_locks_its_keys_until_it_is_recovered() {
    let tm1 = tm();
    let x = MemoryStore::<i32>::named("x");
    let y = MemoryStore::<i32>::named("y");
    y.fail_finish(true);
    let t1 = tm1.begin().unwrap();
    x.join(&t1).unwrap().put("k", 1).unwrap();
    y.join(&t1).unwrap().put("k", 1).unwrap();
    assert!(t1.commit().unwrap_err().is_heuristic());
    tm1.abort().unwrap();
    y.fail_finish(false);

    // Another transaction writing the in-doubt key conflicts...
    let tm2 = tm();
    let r = tm2.run(|txn| {
        y.join(txn)?.put("k", 2)?;
        Ok::<_, Error>(())
    });
    assert!(matches!(r, Err(Error::Conflict { .. })), "{r:?}");
    // ... until recovery commits the prepared one.
    let ids: Vec<_> = y.in_doubt().unwrap().into_iter().map(|r| r.txid).collect();
    assert_eq!(ids, [t1.id()]);
    y.commit_prepared(&ids[0]).unwrap();
    y.commit_prepared(&ids[0]).unwrap(); // idempotent
    assert_eq!(y.committed("k"), Some(1));
    tm2.run(|txn| {
        y.join(txn)?.put("k", 2)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(y.committed("k"), Some(2));
}

#[test]
fn abort_prepared_discards_the_prepared_writes_and_is_idempotent() {
    let tm1 = tm();
    let x = MemoryStore::<i32>::named("x");
    let y = MemoryStore::<i32>::named("y");
    y.fail_finish(true);
    let t1 = tm1.begin().unwrap();
    x.join(&t1).unwrap().put("k", 1).unwrap();
    y.join(&t1).unwrap().put("k", 1).unwrap();
    assert!(t1.commit().is_err());
    tm1.abort().unwrap();
    assert_eq!(y.prepared_count(), 1);
    y.abort_prepared(&t1.id()).unwrap();
    y.abort_prepared(&t1.id()).unwrap();
    assert_eq!(y.prepared_count(), 0);
    assert!(y.in_doubt().unwrap().is_empty());
    assert_eq!(y.committed("k"), None);
    assert_eq!(y.resource_id(), "memory:y");
}

#[test]
fn a_handle_of_an_ended_transaction_refuses_reads_and_writes() {
    let tm = tm();
    let store = MemoryStore::<i32>::new();
    let txn = tm.begin().unwrap();
    let h = store.join(&txn).unwrap();
    h.put("k", 1).unwrap();
    txn.commit().unwrap();
    assert!(matches!(h.get("k"), Err(Error::Closed)));
    assert!(matches!(h.put("k", 2), Err(Error::Closed)));
    assert!(matches!(h.delete("k"), Err(Error::Closed)));
    assert_eq!(store.committed("k"), Some(1));
    assert!(matches!(store.join(&txn), Err(Error::Closed)));
}

#[test]
fn memory_store_takes_part_in_two_phase_commit_with_other_resources() {
    let log = CallLog::new();
    let tm = tm();
    let store = MemoryStore::<i32>::named("m");
    let txn = tm.begin().unwrap();
    store.join(&txn).unwrap().put("k", 1).unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.commit().unwrap();
    assert_eq!(store.committed("k"), Some(1));
    assert_eq!(store.prepared_count(), 0);
    assert_eq!(log.phases_of("a").last(), Some(&Phase::TpcFinish));
    assert_eq!(txn.status(), Status::Committed);
}

#[test]
fn stores_are_send_sync_and_clone_shares_the_data() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<MemoryStore<i32>>();
    assert_send_sync::<TransactionManager>();
    assert_send_sync::<tm_core::Transaction>();
    let store = MemoryStore::<i32>::named("shared");
    let clone = store.clone();
    let tm = tm();
    tm.run(|txn| {
        clone.join(txn)?.put("k", 9)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(store.committed("k"), Some(9));
    assert_eq!(clone.name(), "shared");
}

/// Reads through a captured handle from its own `tpc_finish`, which runs
/// after the store voted.
struct ReadsAfterVote {
    handle: MemoryHandle<i64>,
    seen: parking_lot::Mutex<Option<bool>>,
}

impl DataManager for ReadsAfterVote {
    fn sort_key(&self) -> &str {
        "zz-reader"
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
        *self.seen.lock() = Some(matches!(self.handle.get("k"), Err(Error::Closed)));
        Ok(())
    }
    fn tpc_abort(&self, _: &Transaction) -> tm_core::Result<()> {
        Ok(())
    }
}

#[test]
fn a_handle_is_closed_once_its_store_has_voted_and_the_vote_keeps_every_write() {
    let store = MemoryStore::<i64>::new();
    let tm = tm();
    let txn = tm.begin().unwrap();
    let h = store.join(&txn).unwrap();
    h.put("k", 1).unwrap();
    h.put("k", 2).unwrap();
    h.put("j", 3).unwrap();
    let reader = Arc::new(ReadsAfterVote {
        handle: h.clone(),
        seen: parking_lot::Mutex::new(None),
    });
    txn.join(reader.clone()).unwrap();
    txn.commit().unwrap();
    assert_eq!(
        *reader.seen.lock(),
        Some(true),
        "reads after the vote are refused"
    );
    assert_eq!(store.committed("k"), Some(2));
    assert_eq!(store.committed("j"), Some(3));
}

/// A resource that, after the memory store voted, writes through the
/// memory handle (as application code racing the commit might).
struct LateWriter {
    handle: MemoryHandle<i32>,
    result: parking_lot::Mutex<Option<Result<(), Error>>>,
}

impl DataManager for LateWriter {
    fn sort_key(&self) -> &str {
        "zz-late"
    }
    fn abort(&self, _: &Transaction) -> Result<(), Error> {
        Ok(())
    }
    fn tpc_begin(&self, _: &Transaction) -> Result<(), Error> {
        Ok(())
    }
    fn commit(&self, _: &Transaction) -> Result<(), Error> {
        Ok(())
    }
    fn tpc_vote(&self, _: &Transaction) -> Result<(), Error> {
        *self.result.lock() = Some(self.handle.put("late", 1));
        Ok(())
    }
    fn tpc_finish(&self, _: &Transaction) -> Result<(), Error> {
        Ok(())
    }
    fn tpc_abort(&self, _: &Transaction) -> Result<(), Error> {
        Ok(())
    }
}

#[test]
fn a_write_after_the_vote_is_refused_not_silently_dropped() {
    let tm = tm();
    let store = MemoryStore::<i32>::named("m");
    let txn = tm.begin().unwrap();
    let h = store.join(&txn).unwrap();
    h.put("k", 1).unwrap();
    let late = Arc::new(LateWriter {
        handle: h.clone(),
        result: parking_lot::Mutex::new(None),
    });
    txn.join(late.clone()).unwrap();
    txn.commit().unwrap();
    let result = late.result.lock().take().expect("the late write ran");
    assert!(matches!(result, Err(Error::Closed)), "{result:?}");
    assert_eq!(store.committed("k"), Some(1));
    assert_eq!(store.committed("late"), None);
}
