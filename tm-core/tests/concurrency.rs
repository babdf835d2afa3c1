//! Threads: many transactions on one store, one manager shared by threads,
//! and thread-local managers that never see each other.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use tm_core::{Backoff, Error, MemoryStore, Status, TransactionManager};

#[test]
fn four_threads_of_a_thousand_increments_through_run_end_at_exactly_4000() {
    let store = MemoryStore::<u64>::named("counter");
    let tm = TransactionManager::builder()
        .retry_attempt_count(1_000_000)
        .backoff(Backoff::None)
        .build();
    let attempts = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (store, tm, attempts) = (store.clone(), tm.clone(), attempts.clone());
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    tm.run(|txn| {
                        attempts.fetch_add(1, Ordering::Relaxed);
                        let h = store.join(txn)?;
                        let n = h.get("n")?.unwrap_or(0);
                        h.put("n", n + 1)?;
                        Ok::<_, Error>(())
                    })
                    .unwrap();
                }
                assert!(!tm.in_transaction());
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(store.committed("n"), Some(4000));
    assert!(attempts.load(Ordering::Relaxed) >= 4000);
}

#[test]
fn concurrent_transfers_across_two_stores_keep_the_total() {
    let left = MemoryStore::<i64>::named("left");
    let right = MemoryStore::<i64>::named("right");
    let tm = TransactionManager::builder()
        .explicit(true)
        .retry_attempt_count(1_000_000)
        .backoff(Backoff::None)
        .build();
    tm.run(|txn| {
        left.join(txn)?.put("acct", 1000)?;
        right.join(txn)?.put("acct", 1000)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let (left, right, tm) = (left.clone(), right.clone(), tm.clone());
            std::thread::spawn(move || {
                for i in 0..250 {
                    let amount = (t * 7 + i) % 13 - 6;
                    tm.run(|txn| {
                        let (l, r) = (left.join(txn)?, right.join(txn)?);
                        let a = l.get("acct")?.unwrap();
                        let b = r.get("acct")?.unwrap();
                        l.put("acct", a - amount)?;
                        r.put("acct", b + amount)?;
                        Ok::<_, Error>(())
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let total = left.committed("acct").unwrap() + right.committed("acct").unwrap();
    assert_eq!(total, 2000);
    assert_eq!(left.prepared_count() + right.prepared_count(), 0);
}

#[test]
fn thread_local_managers_never_see_each_others_transaction() {
    let barrier = Arc::new(Barrier::new(2));
    let seen = |barrier: Arc<Barrier>, commit: bool| {
        std::thread::spawn(move || {
            let before = tm_core::manager().in_transaction();
            let mine = tm_core::begin().unwrap();
            mine.note(if commit { "committer" } else { "aborter" });
            barrier.wait(); // both have begun
            let got = tm_core::get().unwrap();
            barrier.wait(); // both have looked
            if commit {
                tm_core::commit().unwrap();
            } else {
                tm_core::abort().unwrap();
            }
            barrier.wait(); // both have ended
            let after = tm_core::manager().in_transaction();
            (before, got == mine, got.description(), mine.status(), after)
        })
    };
    let a = seen(barrier.clone(), true);
    let b = seen(barrier, false);
    let a = a.join().unwrap();
    let b = b.join().unwrap();
    assert_eq!(
        a,
        (
            false,
            true,
            "committer".to_string(),
            Status::Committed,
            false
        )
    );
    assert_eq!(
        b,
        (false, true, "aborter".to_string(), Status::Aborted, false)
    );
}
