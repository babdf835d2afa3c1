//! tm-core overhead: begin + commit with 0/1/4/16 no-op data managers, the
//! retry loop, savepoint + rollback. Compare with the Python `transaction`
//! package via `benches/peers/run.sh`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tm::testing::NoOpDataManager;
use tm::{DataManager, TransactionManager};

fn no_ops(n: usize) -> Vec<Arc<dyn DataManager>> {
    (0..n)
        .map(|i| NoOpDataManager::new(&format!("noop{i:02}")) as Arc<dyn DataManager>)
        .collect()
}

fn begin_commit(c: &mut Criterion) {
    let mut group = c.benchmark_group("begin_commit");
    for n in [0usize, 1, 4, 16] {
        let tm = TransactionManager::explicit();
        let dms = no_ops(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let txn = tm.begin().unwrap();
                for dm in &dms {
                    txn.join(dm.clone()).unwrap();
                }
                txn.commit().unwrap();
                black_box(txn);
            })
        });
    }
    group.finish();
}

fn attempts_overhead(c: &mut Criterion) {
    let mut group = c.benchmark_group("retry_loop");
    let tm = TransactionManager::explicit();
    let dm = no_ops(1).pop().unwrap();
    group.bench_function("attempts_1_resource", |b| {
        b.iter(|| {
            for attempt in tm.attempts() {
                attempt.run(|txn| txn.join(dm.clone())).unwrap();
            }
        })
    });
    group.bench_function("run_1_resource", |b| {
        b.iter(|| tm.run(|txn| txn.join(dm.clone())).unwrap())
    });
    group.finish();
}

fn savepoints(c: &mut Criterion) {
    let tm = TransactionManager::explicit();
    let dms = no_ops(4);
    let txn = tm.begin().unwrap();
    for dm in &dms {
        txn.join(dm.clone()).unwrap();
    }
    c.bench_function("savepoint_rollback_4_resources", |b| {
        b.iter(|| {
            let sp = txn.savepoint().unwrap();
            sp.rollback().unwrap();
        })
    });
    txn.abort().unwrap();
}

criterion_group!(benches, begin_commit, attempts_overhead, savepoints);
criterion_main!(benches);
