//! Memory: transactions through one manager leave no resident memory behind.
//!
//! 100k transactions warm up (allocator pools, hash-map capacity, the store's
//! 1,024 keys), then VmRSS is read from `/proc/self/status`, the workload runs
//! again and VmRSS is read once more. The workload: begin, join a
//! `MemoryStore` and a no-op resource, put, a note; every 10th transaction a
//! savepoint, another put and a rollback; every 7th an abort instead of the
//! commit.
//!
//! 1,000,000 transactions in release builds (`cargo test --release --test
//! memory`), 200,000 in debug builds to stay quick; `cargo bench --bench
//! memory` runs 1,000,000 (or more) in release and reports the numbers.

use std::sync::Arc;

use tm::{DataManager, MemoryStore, ResourceSavepoint, Result, Transaction, TransactionManager};

const WARM_UP: u64 = 100_000;
const RUN: u64 = if cfg!(debug_assertions) {
    200_000
} else {
    1_000_000
};
/// Generous: a leak of even 8 bytes per transaction would show as 8 MB.
const MAX_GROWTH_KIB: u64 = 8 * 1024;

struct NoOp;
struct NoOpSavepoint;

impl ResourceSavepoint for NoOpSavepoint {
    fn rollback(&self) -> Result<()> {
        Ok(())
    }
}

impl DataManager for NoOp {
    fn sort_key(&self) -> &str {
        "noop"
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
    fn savepoint(&self, _: &Transaction) -> Result<Box<dyn ResourceSavepoint>> {
        Ok(Box::new(NoOpSavepoint))
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

fn workload(
    tm: &TransactionManager,
    store: &MemoryStore<u64>,
    noop: &Arc<dyn DataManager>,
    from: u64,
    n: u64,
) {
    for i in from..from + n {
        let txn = tm.begin().unwrap();
        let h = store.join(&txn).unwrap();
        h.put(&format!("k{}", i % 1024), i);
        txn.join(noop.clone()).unwrap();
        if i % 100 == 0 {
            txn.note("a note");
        }
        if i % 10 == 0 {
            let sp = txn.savepoint().unwrap();
            h.put(&format!("k{}", (i + 1) % 1024), i);
            sp.rollback().unwrap();
        }
        if i % 7 == 0 {
            txn.abort().unwrap();
        } else {
            txn.commit().unwrap();
        }
    }
}

#[test]
fn many_transactions_do_not_grow_resident_memory() {
    let tm = TransactionManager::explicit();
    let store = MemoryStore::<u64>::new();
    let noop: Arc<dyn DataManager> = Arc::new(NoOp);

    workload(&tm, &store, &noop, 0, WARM_UP);
    let before = rss_kib();
    workload(&tm, &store, &noop, WARM_UP, RUN);
    let after = rss_kib();

    let growth = after.saturating_sub(before);
    println!(
        "VmRSS after {WARM_UP} warm-up transactions: {before} KiB; after {RUN} more: {after} KiB (growth {growth} KiB)"
    );
    assert!(!tm.in_transaction());
    assert_eq!(store.prepared_count(), 0);
    assert!(
        growth < MAX_GROWTH_KIB,
        "resident memory grew by {growth} KiB over {RUN} transactions ({before} -> {after} KiB)"
    );
}
