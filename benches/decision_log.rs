//! FileDecisionLog throughput: decisions made durable per second with 1, 4
//! and 8 threads recording at once (each decision then forgotten, as a
//! completed commit does). Concurrent decisions share an fsync (group
//! commit), so throughput should grow with the threads.
//!
//! `cargo bench -p tm-benches --bench decision_log`

use std::sync::Arc;
use std::time::Instant;

use tm::{Decision, DecisionLog, FileDecisionLog, TxId};

fn main() {
    // `cargo test --benches` runs bench binaries with `--test`: keep it quick.
    let per_thread = if std::env::args().any(|a| a == "--test") {
        5
    } else {
        200
    };
    println!("| threads | decisions | decisions/s |");
    println!("|---:|---:|---:|");
    for threads in [1usize, 4, 8] {
        // On the project's disk (not a tmpfs), so that fsync costs what it costs.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let log = Arc::new(FileDecisionLog::open(dir.path().join("decisions.log")).unwrap());
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                let log = log.clone();
                s.spawn(move || {
                    for _ in 0..per_thread {
                        let d = Decision::new(
                            TxId::new(),
                            vec!["redis://127.0.0.1:6379/0#tm:".into()],
                            Default::default(),
                        );
                        log.record_commit(&d).unwrap();
                        log.forget(&d.txid).unwrap();
                    }
                });
            }
        });
        let n = threads * per_thread;
        println!(
            "| {threads} | {n} | {:.0} |",
            n as f64 / start.elapsed().as_secs_f64()
        );
    }
}
