//! Chaos: concurrent transfers over SQLite, Redis and a MemoryStore, with
//! faults injected at random phases (errors, conflicts, panics) by an extra
//! participant. Whatever fails, money is never created or destroyed, every
//! store ends with nothing prepared or locked, and recovery leaves no
//! decision pending.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tm::redis::testing::TestServer;
use tm::redis::Store;
use tm::sqlite::{Database, Options, SqliteDecisionLog};
use tm::testing::{CallLog, Fault, TestDataManager};
use tm::{DecisionLog, Error, MemoryStore, Phase, Recoverable, Transaction, TransactionManager};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const ACCOUNTS: u64 = 12;
const INITIAL: i64 = 1_000;
const THREADS: u64 = 4;
const TRANSFERS: u64 = 300;

struct Bank {
    db: Database,
    redis: Store,
    memory: MemoryStore<i64>,
}

impl Bank {
    fn key(id: u64) -> String {
        format!("acct:{id}")
    }

    fn read(&self, txn: &Transaction, id: u64) -> Result<i64, BoxError> {
        Ok(match id % 3 {
            0 => self.db.join(txn)?.query_row(
                "SELECT balance FROM account WHERE id = ?1",
                [id as i64],
                |r| r.get(0),
            )?,
            1 => self
                .redis
                .join(txn)?
                .get::<i64>(Self::key(id))?
                .unwrap_or(0),
            _ => self.memory.join(txn)?.get(&Self::key(id))?.unwrap_or(0),
        })
    }

    fn write(&self, txn: &Transaction, id: u64, balance: i64) -> Result<(), BoxError> {
        match id % 3 {
            0 => {
                self.db.join(txn)?.execute(
                    "UPDATE account SET balance = ?1 WHERE id = ?2",
                    [balance, id as i64],
                )?;
            }
            1 => self.redis.join(txn)?.set(Self::key(id), balance)?,
            _ => self.memory.join(txn)?.put(&Self::key(id), balance)?,
        }
        Ok(())
    }

    fn total(&self) -> i64 {
        (0..ACCOUNTS)
            .map(|id| match id % 3 {
                0 => self
                    .db
                    .with_connection(|c| {
                        c.query_row(
                            "SELECT balance FROM account WHERE id = ?1",
                            [id as i64],
                            |r| r.get::<_, i64>(0),
                        )
                    })
                    .unwrap(),
                1 => self.redis.get::<i64>(Self::key(id)).unwrap().unwrap_or(0),
                _ => self.memory.committed(&Self::key(id)).unwrap_or(0),
            })
            .sum()
    }
}

/// xorshift: reproducible per thread.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn concurrent_transfers_with_faults_at_random_phases_never_break_the_invariant() {
    // The injected panics are caught by tm; keep the default hook from
    // printing a backtrace for each of them.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let injected = info
            .payload()
            .downcast_ref::<String>()
            .is_some_and(|m| m.contains("injected panic"));
        if !injected {
            default_hook(info);
        }
    }));
    let server = TestServer::builder().fsync_always(true).start();
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open_with(
        dir.path().join("chaos.db"),
        Options::default().setup_sql(
            "CREATE TABLE IF NOT EXISTS account (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)",
        ),
    )
    .unwrap();
    let bank = Arc::new(Bank {
        db: db.clone(),
        redis: Store::open(&server.url()).unwrap(),
        memory: MemoryStore::named("memory-accounts"),
    });
    let log = Arc::new(SqliteDecisionLog::new(&db).unwrap());
    TransactionManager::builder()
        .explicit(true)
        .decision_log(log.clone())
        .build()
        .run(|txn| {
            for id in 0..ACCOUNTS {
                if id % 3 == 0 {
                    bank.db.join(txn)?.execute(
                        "INSERT INTO account (id, balance) VALUES (?1, ?2)",
                        [id as i64, INITIAL],
                    )?;
                } else {
                    bank.write(txn, id, INITIAL)?;
                }
            }
            Ok::<_, BoxError>(())
        })
        .unwrap();
    assert_eq!(bank.total(), INITIAL * ACCOUNTS as i64);

    let committed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let heuristic = Arc::new(AtomicU64::new(0));
    let calls = CallLog::new();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (bank, log, calls) = (bank.clone(), log.clone(), calls.clone());
            let (committed, failed, heuristic) =
                (committed.clone(), failed.clone(), heuristic.clone());
            std::thread::spawn(move || {
                let tm = TransactionManager::builder()
                    .explicit(true)
                    .retry_attempt_count(20)
                    .decision_log(log)
                    .build();
                let mut rng =
                    Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1).wrapping_mul(0x1234_5678_9abc_def1));
                for n in 0..TRANSFERS {
                    let from = rng.below(ACCOUNTS);
                    let to = (from + 1 + rng.below(ACCOUNTS - 1)) % ACCOUNTS;
                    let amount = 1 + rng.below(50) as i64;
                    // One transfer in four gets a faulty extra participant,
                    // sorted first or last, failing once at a random phase.
                    let fault = (rng.below(4) == 0).then(|| {
                        let phase = [
                            Phase::TpcBegin,
                            Phase::Commit,
                            Phase::TpcVote,
                            Phase::TpcFinish,
                            Phase::CommitOnePhase,
                        ][rng.below(5) as usize];
                        let kind =
                            [Fault::Error, Fault::Conflict, Fault::Panic][rng.below(3) as usize];
                        let key = if rng.below(2) == 0 {
                            "!fault"
                        } else {
                            "~fault"
                        };
                        (phase, kind, key)
                    });
                    let mut tries = 0;
                    let outcome = tm.run(|txn| {
                        tries += 1;
                        // The fault strikes the first attempt; a retry (after
                        // a conflict) runs clean.
                        if let Some((phase, kind, key)) = fault.filter(|_| tries == 1) {
                            let dm = TestDataManager::new(&format!("{key}-{t}-{n}"), &calls)
                                .with_sort_key(key)
                                .fail_times(phase, kind, 1);
                            txn.join(dm)?;
                        }
                        let a = bank.read(txn, from)?;
                        let b = bank.read(txn, to)?;
                        if a < amount {
                            return Ok(());
                        }
                        bank.write(txn, from, a - amount)?;
                        bank.write(txn, to, b + amount)?;
                        Ok::<_, BoxError>(())
                    });
                    match outcome {
                        Ok(()) => committed.fetch_add(1, Ordering::Relaxed),
                        Err(e)
                            if matches!(
                                e.downcast_ref::<Error>(),
                                Some(Error::Heuristic { .. })
                            ) =>
                        {
                            heuristic.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for w in workers {
        w.join()
            .expect("a worker panicked: a resource panic must not escape tm");
    }

    let (committed, failed, heuristic) = (
        committed.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        heuristic.load(Ordering::Relaxed),
    );
    println!("chaos: {committed} committed, {failed} failed, {heuristic} heuristic");
    assert_eq!(committed + failed + heuristic, THREADS * TRANSFERS);
    assert!(committed > THREADS * TRANSFERS / 2, "{committed} committed");
    assert!(failed > 0, "some faults are not retryable");

    // The invariant, read from the stores themselves.
    assert_eq!(bank.total(), INITIAL * ACCOUNTS as i64);
    // Nothing is left prepared, locked or open.
    assert!(bank.redis.in_doubt().unwrap().is_empty());
    assert_eq!(bank.memory.prepared_count(), 0);
    let idle = db.idle_connections();
    assert!((0..idle.max(1)).all(|_| db.with_connection(|c| Ok(c.is_autocommit())).unwrap()));
    // A heuristic outcome here is the faulty participant's finish failing
    // after the decision: the real stores committed, and recovery (nothing
    // in doubt) forgets the decisions.
    let report = tm::recover(
        &*log,
        &[
            &bank.redis as &dyn Recoverable,
            &bank.memory as &dyn Recoverable,
        ],
    )
    .unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(
        report.committed.is_empty() && report.aborted.is_empty(),
        "{report:?}"
    );
    assert!(log.pending().unwrap().is_empty());
    // Every faulty participant got exactly one ending.
    let mut endings = std::collections::HashMap::<String, u32>::new();
    for (name, phase) in calls.entries() {
        if matches!(
            phase,
            Phase::Abort | Phase::TpcAbort | Phase::TpcFinish | Phase::CommitOnePhase
        ) {
            *endings.entry(name).or_default() += 1;
        }
    }
    let names: std::collections::HashSet<String> =
        calls.entries().into_iter().map(|(n, _)| n).collect();
    for name in names {
        assert_eq!(endings.get(&name).copied().unwrap_or(0), 1, "{name}");
    }
}
