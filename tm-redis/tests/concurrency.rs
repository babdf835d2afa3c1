//! Isolation: lost updates and write skew, on one server and across two.

use std::sync::Arc;

use tm_core::{DataManager, Error as TmError, Transaction, TransactionManager};
use tm_redis::testing::TestServer;
use tm_redis::{RedisHandle, Store};

mod support;

#[test]
fn lost_update_is_prevented_4_threads_x_500_increments_end_at_2000() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || {
                let tm = TransactionManager::builder()
                    .explicit(true)
                    .retry_attempt_count(100_000)
                    .build();
                for _ in 0..500 {
                    tm.run(|txn| {
                        let r = store.join(txn)?;
                        let n: i64 = r.get("counter")?.unwrap_or(0);
                        r.set("counter", n + 1)?;
                        Ok::<_, TmError>(())
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(store.get::<i64>("counter").unwrap(), Some(2000));
}

/// Every way to interleave two step sequences of the given lengths.
fn interleavings(a: usize, b: usize) -> Vec<Vec<usize>> {
    if a == 0 {
        return vec![vec![1; b]];
    }
    if b == 0 {
        return vec![vec![0; a]];
    }
    let mut out = Vec::new();
    for mut rest in interleavings(a - 1, b) {
        rest.insert(0, 0);
        out.push(rest);
    }
    for mut rest in interleavings(a, b - 1) {
        rest.insert(0, 1);
        out.push(rest);
    }
    out
}

/// One transaction driven step by step through the protocol: it reads
/// `read_key` on `read_store` and writes `write_key` on `write_store` the
/// value read + 1. Steps: read, then one prepare per participant (in the
/// given order), then finish (or abort if a prepare failed).
struct Driven {
    _tm: TransactionManager,
    txn: Transaction,
    read: RedisHandle,
    write: RedisHandle,
    read_key: String,
    write_key: String,
    /// Participants in prepare order.
    order: Vec<Arc<dyn DataManager>>,
    prepared: usize,
    failed: bool,
    committed: bool,
    step: usize,
}

impl Driven {
    fn new(
        read_store: &Store,
        read_key: &str,
        write_store: &Store,
        write_key: &str,
        reverse: bool,
    ) -> Driven {
        let tm = TransactionManager::builder()
            .explicit(true)
            .independent(true)
            .build();
        let txn = tm.begin().unwrap();
        let read = read_store.join(&txn).unwrap();
        let write = write_store.join(&txn).unwrap();
        let mut order = vec![read.data_manager()];
        if !Arc::ptr_eq(&read.data_manager(), &write.data_manager()) {
            order.push(write.data_manager());
        }
        if reverse {
            order.reverse();
        }
        Driven {
            _tm: tm,
            txn,
            read,
            write,
            read_key: read_key.to_owned(),
            write_key: write_key.to_owned(),
            order,
            prepared: 0,
            failed: false,
            committed: false,
            step: 0,
        }
    }

    fn steps(&self) -> usize {
        2 + self.order.len()
    }

    fn next(&mut self) {
        let step = self.step;
        self.step += 1;
        if step == 0 {
            let seen: i64 = self.read.get(&self.read_key).unwrap().unwrap_or(0);
            self.write.set(&self.write_key, seen + 1).unwrap();
            for dm in &self.order {
                dm.tpc_begin(&self.txn).unwrap();
                dm.commit(&self.txn).unwrap();
            }
        } else if step <= self.order.len() {
            if self.failed {
                return;
            }
            match self.order[step - 1].tpc_vote(&self.txn) {
                Ok(()) => self.prepared += 1,
                Err(TmError::Conflict { .. }) => self.failed = true,
                Err(other) => panic!("prepare failed with a non-conflict: {other}"),
            }
        } else if self.failed {
            for dm in &self.order {
                dm.tpc_abort(&self.txn).unwrap();
            }
        } else {
            for dm in &self.order {
                dm.tpc_finish(&self.txn).unwrap();
            }
            self.committed = true;
        }
    }
}

fn get(store: &Store, key: &str) -> i64 {
    store.get::<i64>(key).unwrap().unwrap_or(0)
}

/// Runs every interleaving; T1 reads `a` and writes `b`, T2 reads `b` and
/// writes `a`. Returns (both committed, one aborted) counts.
fn write_skew(x: &Store, y: &Store, servers: &[&TestServer]) -> (usize, usize) {
    let probe = Driven::new(x, "a", y, "b", false);
    let (n1, n2) = (probe.steps(), probe.steps());
    drop(probe);
    let (mut both, mut one) = (0, 0);
    for (i, order) in interleavings(n1, n2).iter().enumerate() {
        let a = format!("a{i}");
        let b = format!("b{i}");
        let mut t1 = Driven::new(x, &a, y, &b, false);
        let mut t2 = Driven::new(y, &b, x, &a, true);
        for &who in order {
            if who == 0 {
                t1.next()
            } else {
                t2.next()
            }
        }
        let (va, vb) = (get(x, &a), get(y, &b));
        match (t1.committed, t2.committed) {
            (true, true) => {
                both += 1;
                assert!(
                    (va, vb) == (2, 1) || (va, vb) == (1, 2),
                    "interleaving {order:?}: both committed with a={va} b={vb}: not serializable"
                );
            }
            (true, false) => {
                one += 1;
                assert_eq!((va, vb), (0, 1), "interleaving {order:?}");
            }
            (false, true) => {
                one += 1;
                assert_eq!((va, vb), (1, 0), "interleaving {order:?}");
            }
            (false, false) => panic!("interleaving {order:?}: both aborted"),
        }
        for server in servers {
            let left = support::tm_keys(server);
            assert!(left.is_empty(), "interleaving {order:?} left {left:?}");
        }
    }
    (both, one)
}

#[test]
fn write_skew_is_prevented_on_one_server_in_all_20_interleavings() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    assert_eq!(interleavings(3, 3).len(), 20);
    let (both, one) = write_skew(&store, &store, &[&server]);
    assert_eq!(both + one, 20);
    assert!(both >= 2, "the two serial orders commit both");
}

#[test]
fn write_skew_is_prevented_across_two_servers_in_all_70_interleavings() {
    let sx = TestServer::start();
    let sy = TestServer::start();
    let x = Store::open(&sx.url()).unwrap();
    let y = Store::open(&sy.url()).unwrap();
    assert_eq!(interleavings(4, 4).len(), 70);
    let (both, one) = write_skew(&x, &y, &[&sx, &sy]);
    assert_eq!(both + one, 70);
    assert!(both >= 2, "the two serial orders commit both");
}

#[test]
fn a_key_held_by_a_prepared_transaction_conflicts_at_once() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.set("held", "1").unwrap();
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();

    // A writer, and a reader that prepares: both refused at once, retryable.
    let tm2 = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    tm2.begin().unwrap();
    store
        .join(&tm2.get().unwrap())
        .unwrap()
        .set("held", "2")
        .unwrap();
    let err = tm2.commit().unwrap_err();
    assert!(
        matches!(&err, TmError::Conflict { detail, .. } if detail.contains(&txn.id().to_string())),
        "{err:?}"
    );
    assert!(tm2.is_retryable(&err));
    tm2.abort().unwrap();

    let t3 = tm2.begin().unwrap();
    let r3 = store.join(&t3).unwrap();
    assert_eq!(
        r3.get::<String>("held").unwrap(),
        None,
        "reads see committed data"
    );
    r3.set("other", "x").unwrap();
    let err = tm2.commit().unwrap_err();
    assert!(matches!(err, TmError::Conflict { .. }), "{err:?}");
    tm2.abort().unwrap();

    dm.tpc_finish(&txn).unwrap();
    assert_eq!(store.get::<String>("held").unwrap().as_deref(), Some("1"));
    tm2.run(|txn| store.join(txn)?.set("held", "3").map_err(TmError::from))
        .unwrap();
}

#[test]
fn a_conflict_names_the_key_the_lock_kind_and_the_holder() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    let _ = r.get::<String>("r").unwrap(); // read lock on r
    r.set("b", "1").unwrap(); // write lock on b
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();
    let holder = txn.id().to_string();

    // The held key is not the first of the refused transaction's keys: the
    // error must still name it, not its neighbour.
    for (key, kind) in [("b", "written"), ("r", "read")] {
        let tm2 = TransactionManager::builder()
            .explicit(true)
            .independent(true)
            .build();
        let t2 = tm2.begin().unwrap();
        let r2 = store.join(&t2).unwrap();
        let _ = r2.get::<String>("z0").unwrap();
        r2.set("w1", "x").unwrap();
        r2.set(key, "2").unwrap();
        let err = tm2.commit().unwrap_err();
        let want = format!("key {key:?} is {kind} by prepared transaction {holder}");
        assert!(
            matches!(&err, TmError::Conflict { detail, .. } if detail.contains(&want)),
            "want {want:?}: {err:?}"
        );
        tm2.abort().unwrap();
    }
    dm.tpc_finish(&txn).unwrap();
}
