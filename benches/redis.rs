//! tm-redis against raw Redis, on the same server in the same run: a blind
//! SET of 1 and 10 keys, through tm one-phase and two-phase (prepare +
//! finish), versus a pipelined MULTI/SET.../EXEC on one connection. Once
//! with `appendfsync everysec`, once with `appendfsync always`.
//!
//! `cargo bench -p tm-benches --bench redis`; needs `redis-server` on PATH (the bench
//! starts its own throwaway servers).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion};
use tm::redis::testing::TestServer;
use tm::redis::Store;
use tm::testing::NoOpDataManager;
use tm::{DataManager, TransactionManager};

fn bench_server(c: &mut Criterion, fsync: &str, server: &TestServer) {
    let store = Store::open(&server.url()).expect("open");
    let mut raw = store.client().get_connection().expect("raw connection");
    // Two-phase beside a no-op and no decision log is refused unless opted
    // out; this measures Redis' side of the protocol, not recovery.
    let tm = TransactionManager::builder()
        .explicit(true)
        .allow_unrecoverable(true)
        .build();
    let noop: Arc<dyn DataManager> = NoOpDataManager::new("zz-noop");
    let value = vec![b'v'; 32];
    let mut group = c.benchmark_group(format!("redis_{fsync}"));
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for n in [1usize, 10] {
        let keys: Vec<String> = (0..n).map(|i| format!("bench:{i}")).collect();
        group.bench_with_input(BenchmarkId::new("raw_multi_set_exec", n), &n, |b, _| {
            b.iter(|| {
                let mut pipe = redis::pipe();
                pipe.atomic();
                for k in &keys {
                    pipe.set(k, &value).ignore();
                }
                pipe.query::<()>(&mut raw).expect("raw MULTI/EXEC");
            })
        });
        group.bench_with_input(BenchmarkId::new("tm_one_phase", n), &n, |b, _| {
            b.iter(|| {
                let txn = tm.begin().expect("begin");
                let r = store.join(&txn).expect("join");
                for k in &keys {
                    r.set(k, value.as_slice()).expect("set");
                }
                tm.commit().expect("commit");
                black_box(&txn);
            })
        });
        group.bench_with_input(BenchmarkId::new("tm_two_phase", n), &n, |b, _| {
            b.iter(|| {
                let txn = tm.begin().expect("begin");
                let r = store.join(&txn).expect("join");
                for k in &keys {
                    r.set(k, value.as_slice()).expect("set");
                }
                txn.join(noop.clone()).expect("join noop");
                tm.commit().expect("commit");
                black_box(&txn);
            })
        });
    }
    group.finish();
}

fn redis(c: &mut Criterion) {
    let everysec = TestServer::start();
    bench_server(c, "everysec", &everysec);
    drop(everysec);
    let always = TestServer::builder().fsync_always(true).start();
    bench_server(c, "always", &always);
}

/// Criterion runs each benchmark on its own, so on a busy machine the load
/// can differ between them. This pass interleaves the three variants
/// iteration by iteration and prints the ratios of their medians.
fn interleaved_ratios() {
    for (fsync, always) in [("everysec", false), ("always", true)] {
        let server = TestServer::builder().fsync_always(always).start();
        let store = Store::open(&server.url()).expect("open");
        let mut raw = store.client().get_connection().expect("raw connection");
        // Two-phase beside a no-op and no decision log is refused unless opted
        // out; this measures Redis' side of the protocol, not recovery.
        let tm = TransactionManager::builder()
            .explicit(true)
            .allow_unrecoverable(true)
            .build();
        let noop: Arc<dyn DataManager> = NoOpDataManager::new("zz-noop");
        let value = vec![b'v'; 32];
        for n in [1usize, 10] {
            let keys: Vec<String> = (0..n).map(|i| format!("bench:{i}")).collect();
            let iterations = if always { 300 } else { 5000 };
            let mut times: [Vec<Duration>; 3] = Default::default();
            for _ in 0..iterations {
                let start = Instant::now();
                let mut pipe = redis::pipe();
                pipe.atomic();
                for k in &keys {
                    pipe.set(k, &value).ignore();
                }
                pipe.query::<()>(&mut raw).expect("raw MULTI/EXEC");
                times[0].push(start.elapsed());
                for (slot, two_phase) in [(1, false), (2, true)] {
                    let start = Instant::now();
                    let txn = tm.begin().expect("begin");
                    let r = store.join(&txn).expect("join");
                    for k in &keys {
                        r.set(k, value.as_slice()).expect("set");
                    }
                    if two_phase {
                        txn.join(noop.clone()).expect("join noop");
                    }
                    tm.commit().expect("commit");
                    times[slot].push(start.elapsed());
                }
            }
            let [raw_t, one, two] = times.map(|mut t| {
                t.sort();
                t[t.len() / 2].as_secs_f64() * 1e6
            });
            println!(
                "interleaved medians, appendfsync {fsync}, {n} key(s): raw MULTI/SET/EXEC {raw_t:.1} us, \
                 tm one-phase {one:.1} us ({:.2}x), tm two-phase {two:.1} us ({:.2}x)",
                one / raw_t,
                two / raw_t
            );
        }
    }
}

criterion_group!(benches, redis);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    interleaved_ratios();
}
