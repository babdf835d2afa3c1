//! The memory workload shared by `tests/memory.rs` and `benches/memory.rs`:
//! begin, join a `MemoryStore` and a no-op resource, put, a note every
//! 100th; every 10th transaction a savepoint, another put and a rollback;
//! every 7th an abort instead of the commit.

use std::sync::Arc;

use tm::testing::NoOpDataManager;
use tm::{DataManager, MemoryStore, TransactionManager};

/// Transactions run before the first measurement (allocator pools,
/// hash-map capacity, the store's 1,024 keys).
pub const WARM_UP: u64 = 100_000;

/// The manager, store and no-op participant the workload runs on.
pub struct Workload {
    pub tm: TransactionManager,
    pub store: MemoryStore<u64>,
    noop: Arc<dyn DataManager>,
}

impl Workload {
    pub fn new() -> Self {
        Workload {
            tm: TransactionManager::explicit(),
            store: MemoryStore::new(),
            noop: NoOpDataManager::new("noop"),
        }
    }

    /// Transactions number `from .. from + n`.
    pub fn run(&self, from: u64, n: u64) {
        for i in from..from + n {
            let txn = self.tm.begin().unwrap();
            let h = self.store.join(&txn).unwrap();
            h.put(&format!("k{}", i % 1024), i).unwrap();
            txn.join(self.noop.clone()).unwrap();
            if i % 100 == 0 {
                txn.note("a note");
            }
            if i % 10 == 0 {
                let sp = txn.savepoint().unwrap();
                h.put(&format!("k{}", (i + 1) % 1024), i).unwrap();
                sp.rollback().unwrap();
            }
            if i % 7 == 0 {
                txn.abort().unwrap();
            } else {
                txn.commit().unwrap();
            }
        }
    }
}

/// Resident memory in KiB, from `/proc/self/status`.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}
