//! tm-redis against raw Redis, on the same server in the same run: a blind
//! SET of 1 and 10 keys, through tm one-phase and two-phase (prepare +
//! finish), versus a pipelined MULTI/SET.../EXEC on one connection. Once
//! with `appendfsync everysec`, once with `appendfsync always`; then each
//! again on a primary with one replica (same fsync setting), where the
//! two-phase vote pipelines `WAIT 1 1000` after the prepare and raw is also
//! measured with that `WAIT` pipelined after its EXEC.
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

/// The variants measured; `RawWait` only with a replica.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Raw,
    RawWait,
    OnePhase,
    TwoPhase,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Raw => "raw_multi_set_exec",
            Variant::RawWait => "raw_multi_set_exec_wait",
            Variant::OnePhase => "tm_one_phase",
            Variant::TwoPhase => "tm_two_phase",
        }
    }
}

/// A primary (with its replica, if any), a `Store` on it, a raw
/// connection to it and a transaction manager.
struct Setup {
    label: String,
    replicated: bool,
    store: Store,
    raw: redis::Connection,
    tm: TransactionManager,
    noop: Arc<dyn DataManager>,
    value: Vec<u8>,
    // Dropped last: the servers.
    _servers: Vec<TestServer>,
}

impl Setup {
    fn new(always: bool, replicated: bool) -> Setup {
        let primary = TestServer::builder().fsync_always(always).start();
        let mut servers = Vec::new();
        if replicated {
            servers.push(
                TestServer::builder()
                    .fsync_always(always)
                    .replica_of(&primary)
                    .start(),
            );
        }
        let store = Store::open(&primary.url()).expect("open");
        // The vote waits for exactly the replicas started here.
        let wanted = usize::from(replicated);
        assert_eq!(store.durability().replicas, Some(wanted));
        assert_eq!(store.durability().replicas_waited, wanted);
        let raw = store.client().get_connection().expect("raw connection");
        servers.insert(0, primary);
        // Two-phase beside a no-op and no decision log is refused unless opted
        // out; this measures Redis' side of the protocol, not recovery.
        let tm = TransactionManager::builder()
            .explicit(true)
            .allow_unrecoverable(true)
            .build();
        let fsync = if always { "always" } else { "everysec" };
        Setup {
            label: format!("{fsync}{}", if replicated { "_replica" } else { "" }),
            replicated,
            store,
            raw,
            tm,
            noop: NoOpDataManager::new("zz-noop"),
            value: vec![b'v'; 32],
            _servers: servers,
        }
    }

    fn variants(&self) -> Vec<Variant> {
        let mut v = vec![Variant::Raw];
        if self.replicated {
            v.push(Variant::RawWait);
        }
        v.extend([Variant::OnePhase, Variant::TwoPhase]);
        v
    }

    fn run(&mut self, variant: Variant, keys: &[String]) {
        match variant {
            Variant::Raw => {
                let mut pipe = redis::pipe();
                pipe.atomic();
                for k in keys {
                    pipe.set(k, &self.value).ignore();
                }
                pipe.query::<()>(&mut self.raw).expect("raw MULTI/EXEC");
            }
            Variant::RawWait => {
                // Not `pipe.atomic()`: WAIT inside MULTI does not block.
                let mut pipe = redis::pipe();
                pipe.cmd("MULTI").ignore();
                for k in keys {
                    pipe.set(k, &self.value).ignore();
                }
                pipe.cmd("EXEC").ignore();
                pipe.cmd("WAIT").arg(1).arg(1000);
                let (acked,): (i64,) = pipe.query(&mut self.raw).expect("raw MULTI/EXEC/WAIT");
                assert_eq!(acked, 1, "WAIT: the replica did not acknowledge");
            }
            Variant::OnePhase | Variant::TwoPhase => {
                let txn = self.tm.begin().expect("begin");
                let r = self.store.join(&txn).expect("join");
                for k in keys {
                    r.set(k, self.value.as_slice()).expect("set");
                }
                if variant == Variant::TwoPhase {
                    txn.join(self.noop.clone()).expect("join noop");
                }
                self.tm.commit().expect("commit");
                black_box(&txn);
            }
        }
    }
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("bench:{i}")).collect()
}

const CONFIGS: [(bool, bool); 4] = [(false, false), (true, false), (false, true), (true, true)];

fn bench_setup(c: &mut Criterion, setup: &mut Setup) {
    let mut group = c.benchmark_group(format!("redis_{}", setup.label));
    group
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for n in [1usize, 10] {
        let keys = keys(n);
        for variant in setup.variants() {
            group.bench_with_input(BenchmarkId::new(variant.name(), n), &n, |b, _| {
                b.iter(|| setup.run(variant, &keys))
            });
        }
    }
    group.finish();
}

fn redis(c: &mut Criterion) {
    for (always, replicated) in CONFIGS {
        let mut setup = Setup::new(always, replicated);
        bench_setup(c, &mut setup);
    }
}

/// Criterion runs each benchmark on its own, so on a busy machine the load
/// can differ between them. This pass interleaves the variants iteration
/// by iteration and prints the ratios of their medians to raw.
fn interleaved_ratios() {
    for (always, replicated) in CONFIGS {
        let mut setup = Setup::new(always, replicated);
        let variants = setup.variants();
        for n in [1usize, 10] {
            let keys = keys(n);
            let iterations = if always { 1000 } else { 4000 };
            let mut times: Vec<Vec<Duration>> = vec![Vec::new(); variants.len()];
            for _ in 0..iterations {
                for (slot, &variant) in variants.iter().enumerate() {
                    let start = Instant::now();
                    setup.run(variant, &keys);
                    times[slot].push(start.elapsed());
                }
            }
            let medians: Vec<f64> = times
                .into_iter()
                .map(|mut t| {
                    t.sort();
                    t[t.len() / 2].as_secs_f64() * 1e6
                })
                .collect();
            let line: Vec<String> = variants
                .iter()
                .zip(&medians)
                .map(|(v, m)| format!("{} {m:.1} us ({:.2}x)", v.name(), m / medians[0]))
                .collect();
            println!(
                "interleaved medians, {}, {n} key(s): {}",
                setup.label,
                line.join(", ")
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
