//! Memory in release: many transactions through one manager, resident memory
//! (VmRSS from `/proc/self/status`) read after a warm-up and at every
//! million. The same workload as `tests/memory.rs`: begin, join a
//! `MemoryStore` and a no-op resource, put, a note; every 10th transaction a
//! savepoint, another put and a rollback; every 7th an abort.
//!
//! ```text
//! cargo bench --bench memory                   # 100k warm-up + 3 x 1,000,000
//! MEMORY_TXNS=5000000 cargo bench --bench memory
//! ```

use std::sync::Arc;
use std::time::Instant;

use tm::{DataManager, MemoryStore, ResourceSavepoint, Result, Transaction, TransactionManager};

const WARM_UP: u64 = 100_000;

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

fn main() {
    // `cargo test --benches` runs bench binaries with `--test`: keep that quick.
    let test_mode = std::env::args().any(|a| a == "--test");
    let total: u64 = std::env::var("MEMORY_TXNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if test_mode { 10_000 } else { 3_000_000 });
    let tm = TransactionManager::explicit();
    let store = MemoryStore::<u64>::new();
    let noop: Arc<dyn DataManager> = Arc::new(NoOp);

    let start_rss = rss_kib();
    workload(&tm, &store, &noop, 0, WARM_UP);
    let before = rss_kib();
    println!("VmRSS at start {start_rss} KiB; after {WARM_UP} warm-up transactions {before} KiB");
    println!("| transactions after warm-up | VmRSS | growth since warm-up | ns per transaction |");
    println!("|---:|---:|---:|---:|");
    let step = 1_000_000.min(total);
    let mut done = 0;
    while done < total {
        let n = step.min(total - done);
        let t0 = Instant::now();
        workload(&tm, &store, &noop, WARM_UP + done, n);
        let ns = t0.elapsed().as_nanos() as f64 / n as f64;
        done += n;
        let rss = rss_kib();
        println!(
            "| {done} | {rss} KiB | {} KiB | {ns:.0} |",
            rss as i64 - before as i64
        );
    }
    assert!(!tm.in_transaction());
    assert_eq!(store.prepared_count(), 0);
}
