//! Memory in release: many transactions through one manager, resident memory
//! (VmRSS from `/proc/self/status`) read after a warm-up and at every
//! million. The same workload as `tests/memory.rs`: begin, join a
//! `MemoryStore` and a no-op resource, put, a note; every 10th transaction a
//! savepoint, another put and a rollback; every 7th an abort.
//!
//! ```text
//! cargo bench -p tm-benches --bench memory                   # 100k warm-up + 3 x 1,000,000
//! MEMORY_TXNS=5000000 cargo bench -p tm-benches --bench memory
//! ```

use std::time::Instant;

#[path = "../tests/support/memory_workload.rs"]
mod memory_workload;

use memory_workload::{rss_kib, Workload, WARM_UP};

fn main() {
    // `cargo test --benches` runs bench binaries with `--test`: keep that quick.
    let test_mode = std::env::args().any(|a| a == "--test");
    let total: u64 = std::env::var("MEMORY_TXNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if test_mode { 10_000 } else { 3_000_000 });
    let w = Workload::new();

    let start_rss = rss_kib();
    w.run(0, WARM_UP);
    let before = rss_kib();
    println!("VmRSS at start {start_rss} KiB; after {WARM_UP} warm-up transactions {before} KiB");
    println!("| transactions after warm-up | VmRSS | growth since warm-up | ns per transaction |");
    println!("|---:|---:|---:|---:|");
    let step = 1_000_000.min(total);
    let mut done = 0;
    while done < total {
        let n = step.min(total - done);
        let t0 = Instant::now();
        w.run(WARM_UP + done, n);
        let ns = t0.elapsed().as_nanos() as f64 / n as f64;
        done += n;
        let rss = rss_kib();
        println!(
            "| {done} | {rss} KiB | {} KiB | {ns:.0} |",
            rss as i64 - before as i64
        );
    }
    assert!(!w.tm.in_transaction());
    assert_eq!(w.store.prepared_count(), 0);
}
