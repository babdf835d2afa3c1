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
//! memory`), 200,000 in debug builds to stay quick; `cargo bench -p tm-benches --bench
//! memory` runs 1,000,000 (or more) in release and reports the numbers.

#[path = "support/memory_workload.rs"]
mod memory_workload;

use memory_workload::{rss_kib, Workload, WARM_UP};

const RUN: u64 = if cfg!(debug_assertions) {
    200_000
} else {
    1_000_000
};
/// Generous: a leak of even 8 bytes per transaction would show as 8 MB.
const MAX_GROWTH_KIB: u64 = 8 * 1024;

#[test]
fn many_transactions_do_not_grow_resident_memory() {
    let w = Workload::new();
    w.run(0, WARM_UP);
    let before = rss_kib();
    w.run(WARM_UP, RUN);
    let after = rss_kib();

    let growth = after.saturating_sub(before);
    println!(
        "VmRSS after {WARM_UP} warm-up transactions: {before} KiB; after {RUN} more: {after} KiB (growth {growth} KiB)"
    );
    assert!(!w.tm.in_transaction());
    assert_eq!(w.store.prepared_count(), 0);
    assert!(
        growth < MAX_GROWTH_KIB,
        "resident memory grew by {growth} KiB over {RUN} transactions ({before} -> {after} KiB)"
    );
}
