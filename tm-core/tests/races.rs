//! One transaction, one outcome, under threads: every race between two
//! operations on clones of one transaction has exactly one winner, and no
//! resource is called by both. Each test spins two threads to a common
//! start many times (100,000 in release builds; `TM_RACE_ITERS` overrides).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use tm_core::{DataManager, Error, ResourceSavepoint, Result, Transaction, TransactionManager};

fn iterations() -> usize {
    std::env::var("TM_RACE_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) {
            10_000
        } else {
            100_000
        })
}

/// Counts the calls that end a resource's part, and notices a call that
/// comes after its ending.
struct Probe {
    me: std::sync::Weak<Probe>,
    name: String,
    endings: AtomicU32,
    /// A call arrived after the ending (a rollback after a finish, ...).
    late: AtomicBool,
    finished: AtomicBool,
}

impl Probe {
    fn new(name: &str) -> Arc<Probe> {
        Arc::new_cyclic(|me| Probe {
            me: me.clone(),
            name: name.to_owned(),
            endings: AtomicU32::new(0),
            late: AtomicBool::new(false),
            finished: AtomicBool::new(false),
        })
    }
    fn end(&self, finished: bool) -> Result<()> {
        self.endings.fetch_add(1, Ordering::SeqCst);
        if finished {
            self.finished.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
    fn work(&self) -> Result<()> {
        if self.endings.load(Ordering::SeqCst) > 0 {
            self.late.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

struct ProbeSavepoint(Arc<Probe>);

impl ResourceSavepoint for ProbeSavepoint {
    fn rollback(&self) -> Result<()> {
        self.0.work()
    }
}

impl DataManager for Probe {
    fn sort_key(&self) -> &str {
        &self.name
    }
    fn abort(&self, _: &Transaction) -> Result<()> {
        self.end(false)
    }
    fn tpc_begin(&self, _: &Transaction) -> Result<()> {
        self.work()
    }
    fn commit(&self, _: &Transaction) -> Result<()> {
        self.work()
    }
    fn tpc_vote(&self, _: &Transaction) -> Result<()> {
        self.work()
    }
    fn tpc_finish(&self, _: &Transaction) -> Result<()> {
        self.end(true)
    }
    fn tpc_abort(&self, _: &Transaction) -> Result<()> {
        self.end(false)
    }
    fn commit_one_phase(&self, _: &Transaction) -> Result<()> {
        self.end(true)
    }
    fn savepoint(&self, _: &Transaction) -> Result<Box<dyn ResourceSavepoint>> {
        self.work()?;
        Ok(Box::new(ProbeSavepoint(self.me.upgrade().expect("alive"))))
    }
}

/// Spins, yielding the core now and then: the machine may have fewer
/// cores than spinning threads.
fn wait_until(ready: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !ready() {
        spins += 1;
        if spins.is_multiple_of(64) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Two threads that start each round at the same moment (a spin on a
/// shared round number, no sleeping barrier between them).
fn race<S: Send + Sync>(
    rounds: usize,
    setup: impl Fn() -> S + Sync,
    a: impl Fn(&S) + Sync,
    b: impl Fn(&S) + Sync,
    mut check: impl FnMut(usize, S),
) {
    let round = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let slot: parking_lot::Mutex<Option<Arc<S>>> = parking_lot::Mutex::new(None);
    std::thread::scope(|scope| {
        for side in 0..2 {
            let (round, done, slot, a, b) = (&round, &done, &slot, &a, &b);
            scope.spawn(move || {
                for r in 1..=rounds {
                    wait_until(|| round.load(Ordering::Acquire) >= r);
                    let state = slot.lock().clone().expect("set before the round starts");
                    if side == 0 {
                        a(&state);
                    } else {
                        b(&state);
                    }
                    drop(state);
                    done.fetch_add(1, Ordering::AcqRel);
                }
            });
        }
        for r in 1..=rounds {
            *slot.lock() = Some(Arc::new(setup()));
            round.store(r, Ordering::Release);
            wait_until(|| done.load(Ordering::Acquire) >= 2 * r);
            let state = slot.lock().take().expect("still set");
            let state = Arc::try_unwrap(state)
                .ok()
                .expect("both sides are done with it");
            check(r, state);
        }
    });
}

struct CommitAbort {
    txn: Transaction,
    probes: [Arc<Probe>; 2],
    committed: parking_lot::Mutex<Option<Result<()>>>,
    aborted: parking_lot::Mutex<Option<Result<()>>>,
    after_commit_ok: Arc<AtomicBool>,
    after_abort: Arc<AtomicBool>,
}

#[test]
fn commit_racing_abort_on_two_clones_has_one_winner_and_one_ending_per_resource() {
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let mut wins = [0usize; 2];
    race(
        iterations(),
        || {
            let txn = tm.begin().unwrap();
            let probes = [Probe::new("a"), Probe::new("b")];
            for p in &probes {
                txn.join(p.clone()).unwrap();
            }
            let after_commit_ok = Arc::new(AtomicBool::new(false));
            let after_abort = Arc::new(AtomicBool::new(false));
            let flag = after_commit_ok.clone();
            txn.add_after_commit_hook(move |ok, _| flag.store(ok, Ordering::SeqCst));
            let flag = after_abort.clone();
            txn.add_after_abort_hook(move |_| flag.store(true, Ordering::SeqCst));
            CommitAbort {
                txn,
                probes,
                committed: parking_lot::Mutex::new(None),
                aborted: parking_lot::Mutex::new(None),
                after_commit_ok,
                after_abort,
            }
        },
        |s| *s.committed.lock() = Some(s.txn.commit()),
        |s| *s.aborted.lock() = Some(s.txn.abort()),
        |round, s| {
            let committed = s.committed.into_inner().unwrap();
            let aborted = s.aborted.into_inner().unwrap();
            assert!(
                committed.is_ok() != aborted.is_ok(),
                "round {round}: commit {committed:?}, abort {aborted:?}: exactly one must win"
            );
            let loser = if committed.is_ok() {
                &aborted
            } else {
                &committed
            };
            assert!(
                matches!(loser, Err(Error::Closed)),
                "round {round}: the loser must be Closed, got {loser:?}"
            );
            wins[usize::from(committed.is_ok())] += 1;
            for p in &s.probes {
                assert_eq!(
                    p.endings.load(Ordering::SeqCst),
                    1,
                    "round {round}: {}",
                    p.name
                );
                assert!(
                    !p.late.load(Ordering::SeqCst),
                    "round {round}: call after ending"
                );
                assert_eq!(p.finished.load(Ordering::SeqCst), committed.is_ok());
            }
            assert!(
                !(s.after_commit_ok.load(Ordering::SeqCst) && s.after_abort.load(Ordering::SeqCst)),
                "round {round}: both the after-commit(true) and the after-abort hooks ran"
            );
        },
    );
    println!("commit won {} times, abort won {}", wins[1], wins[0]);
}

struct Pair {
    txn: parking_lot::Mutex<Option<Transaction>>,
    other: parking_lot::Mutex<Option<Transaction>>,
    probe: Arc<Probe>,
}

#[test]
fn dropping_the_last_two_clones_at_once_aborts_exactly_once() {
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    race(
        iterations(),
        || {
            // Begun on a thread that then ends: its manager's handle goes
            // with it, and exactly these two clones are left.
            let probe = Probe::new("a");
            let (txn, other) = std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        let txn = tm.begin().unwrap();
                        txn.join(probe.clone()).unwrap();
                        let other = txn.clone();
                        (txn, other)
                    })
                    .join()
                    .unwrap()
            });
            Pair {
                txn: parking_lot::Mutex::new(Some(txn)),
                other: parking_lot::Mutex::new(Some(other)),
                probe,
            }
        },
        |s| drop(s.txn.lock().take()),
        |s| drop(s.other.lock().take()),
        |round, s| {
            assert_eq!(
                s.probe.endings.load(Ordering::SeqCst),
                1,
                "round {round}: the transaction must be aborted exactly once"
            );
        },
    );
}

struct TwoAborts {
    txn: Transaction,
    probe: Arc<Probe>,
    results: parking_lot::Mutex<Vec<Result<()>>>,
}

#[test]
fn two_racing_aborts_have_one_winner() {
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let setup = || {
        let txn = tm.begin().unwrap();
        let probe = Probe::new("a");
        txn.join(probe.clone()).unwrap();
        TwoAborts {
            txn,
            probe,
            results: parking_lot::Mutex::new(Vec::new()),
        }
    };
    let abort = |s: &TwoAborts| {
        let r = s.txn.abort();
        s.results.lock().push(r);
    };
    race(iterations(), setup, abort, abort, |round, s| {
        let results = s.results.into_inner();
        let oks = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(oks, 1, "round {round}: {results:?}");
        assert_eq!(s.probe.endings.load(Ordering::SeqCst), 1, "round {round}");
    });
}

struct RollbackCommit {
    txn: Transaction,
    sp: parking_lot::Mutex<tm_core::Savepoint>,
    probe: Arc<Probe>,
    rolled: parking_lot::Mutex<Option<Result<()>>>,
    committed: parking_lot::Mutex<Option<Result<()>>>,
}

#[test]
fn a_savepoint_rollback_racing_commit_never_reaches_a_finished_resource() {
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    race(
        iterations(),
        || {
            let txn = tm.begin().unwrap();
            let probe = Probe::new("a");
            txn.join(probe.clone()).unwrap();
            txn.join(Probe::new("b")).unwrap();
            let sp = parking_lot::Mutex::new(txn.savepoint().unwrap());
            RollbackCommit {
                txn,
                sp,
                probe,
                rolled: parking_lot::Mutex::new(None),
                committed: parking_lot::Mutex::new(None),
            }
        },
        |s| *s.rolled.lock() = Some(s.sp.lock().rollback()),
        |s| *s.committed.lock() = Some(s.txn.commit()),
        |round, s| {
            let committed = s.committed.into_inner().unwrap();
            assert!(
                !s.probe.late.load(Ordering::SeqCst),
                "round {round}: a call reached the resource after its ending"
            );
            if committed.is_err() {
                // The rollback won: the commit was refused, the transaction
                // is still open and aborts cleanly.
                s.txn.abort().unwrap();
            }
            assert_eq!(s.probe.endings.load(Ordering::SeqCst), 1, "round {round}");
        },
    );
}

#[test]
fn joining_from_a_hook_that_runs_after_the_outcome_is_closed() {
    let tm = TransactionManager::explicit();
    let late = Probe::new("late");
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));

    let txn = tm.begin().unwrap();
    let (l, s) = (late.clone(), seen.clone());
    txn.add_after_abort_hook(move |txn| s.lock().push(txn.join(l.clone())));
    txn.abort().unwrap();

    let txn = tm.begin().unwrap();
    txn.join(Probe::new("a")).unwrap();
    let (l, s) = (late.clone(), seen.clone());
    txn.add_after_commit_hook(move |_, txn| s.lock().push(txn.join(l.clone())));
    txn.commit().unwrap();

    let seen = seen.lock();
    assert_eq!(seen.len(), 2);
    for r in seen.iter() {
        assert!(matches!(r, Err(Error::Closed)), "{r:?}");
    }
    assert_eq!(late.endings.load(Ordering::SeqCst), 0);
}
