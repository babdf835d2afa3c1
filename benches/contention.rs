//! Contention: 2, 4 and 8 threads transferring money among 10 accounts, each
//! transfer one `tm.run` (read both balances, write both), with the default
//! 3 attempts, with `Backoff::None` and with the default jittered backoff.
//!
//! Stores:
//! * `memory`: all 10 accounts in one `MemoryStore` (one resource, so a
//!   one-phase commit; conflicts are found by its version check).
//! * `sqlite+memory`: even accounts in SQLite (`BEGIN IMMEDIATE`, so writers
//!   queue on SQLite's lock and its busy timeout), odd ones in a
//!   `MemoryStore`; a transfer across both is a two-phase commit with SQLite
//!   as the last resource.
//!
//! Prints one table: committed transfers per second (goodput), retries per
//! committed transfer, and transfers given up after the last attempt. The
//! total money is checked after every row.
//!
//! ```text
//! cargo bench -p tm-benches --bench contention                 # about 25 s
//! CONTENTION_SECS=3 cargo bench -p tm-benches --bench contention
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tm::sqlite::{Database, Options};
use tm::{Backoff, MemoryStore, Transaction, TransactionManager};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const ACCOUNTS: u64 = 10;
const INITIAL: i64 = 1_000_000_000;

#[derive(Clone)]
enum Bank {
    Memory(MemoryStore<i64>),
    Mixed(Database, MemoryStore<i64>),
}

fn key(id: u64) -> String {
    format!("account:{id}")
}

impl Bank {
    fn name(&self) -> &'static str {
        match self {
            Bank::Memory(_) => "memory",
            Bank::Mixed(..) => "sqlite+memory",
        }
    }

    fn read(&self, txn: &Transaction, id: u64) -> Result<i64, BoxError> {
        match self {
            Bank::Mixed(db, _) if id.is_multiple_of(2) => Ok(db.join(txn)?.query_row(
                "SELECT balance FROM account WHERE id = ?1",
                [id as i64],
                |r| r.get(0),
            )?),
            Bank::Memory(m) | Bank::Mixed(_, m) => Ok(m.join(txn)?.get(&key(id))?.unwrap_or(0)),
        }
    }

    fn write(&self, txn: &Transaction, id: u64, balance: i64) -> Result<(), BoxError> {
        match self {
            Bank::Mixed(db, _) if id.is_multiple_of(2) => {
                db.join(txn)?.execute(
                    "UPDATE account SET balance = ?1 WHERE id = ?2",
                    [balance, id as i64],
                )?;
            }
            Bank::Memory(m) | Bank::Mixed(_, m) => m.join(txn)?.put(&key(id), balance)?,
        }
        Ok(())
    }

    fn total(&self) -> i64 {
        (0..ACCOUNTS)
            .map(|id| match self {
                Bank::Mixed(db, _) if id.is_multiple_of(2) => db
                    .with_connection(|c| {
                        c.query_row(
                            "SELECT balance FROM account WHERE id = ?1",
                            [id as i64],
                            |r| r.get::<_, i64>(0),
                        )
                    })
                    .unwrap(),
                Bank::Memory(m) | Bank::Mixed(_, m) => m.committed(&key(id)).unwrap_or(0),
            })
            .sum()
    }
}

fn new_bank(mixed: bool, dir: &std::path::Path) -> Bank {
    let memory = MemoryStore::named("memory-accounts");
    let tm = TransactionManager::explicit();
    let bank = if mixed {
        let db = Database::open_with(
            dir.join("contention.db"),
            Options::default().setup_sql(
                "CREATE TABLE IF NOT EXISTS account (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)",
            ),
        )
        .unwrap();
        Bank::Mixed(db, memory)
    } else {
        Bank::Memory(memory)
    };
    tm.run(|txn| {
        for id in 0..ACCOUNTS {
            match &bank {
                Bank::Mixed(db, _) if id.is_multiple_of(2) => {
                    db.join(txn)?.execute(
                        "INSERT INTO account (id, balance) VALUES (?1, ?2)",
                        [id as i64, INITIAL],
                    )?;
                }
                Bank::Memory(m) | Bank::Mixed(_, m) => m.join(txn)?.put(&key(id), INITIAL)?,
            }
        }
        Ok::<_, BoxError>(())
    })
    .unwrap();
    bank
}

#[derive(Default)]
struct Counters {
    committed: AtomicU64,
    retries: AtomicU64,
    given_up: AtomicU64,
    /// Kinds of the final errors of given-up transfers (message with digits
    /// blanked, so transaction ids and keys fold together) and their counts.
    causes: parking_lot::Mutex<std::collections::BTreeMap<String, u64>>,
}

fn cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    let mut out = String::new();
    for ch in text.chars() {
        if ch.is_ascii_digit() || (ch.is_ascii_hexdigit() && out.ends_with('#')) {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(ch);
        }
    }
    out
}

struct Row {
    store: &'static str,
    threads: usize,
    backoff: &'static str,
    per_sec: f64,
    retries_per_commit: f64,
    given_up: u64,
    committed: u64,
}

fn run_one(bank: &Bank, threads: usize, backoff: Backoff, secs: f64) -> (Arc<Counters>, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let bank = bank.clone();
            let stop = stop.clone();
            let counters = counters.clone();
            let backoff = backoff.clone();
            std::thread::spawn(move || {
                let tm = TransactionManager::builder()
                    .explicit(true)
                    .backoff(backoff)
                    .build();
                let mut rng =
                    0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1).wrapping_mul(0xff51_afd7_ed55_8ccd);
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                while !stop.load(Ordering::Relaxed) {
                    let from = next() % ACCOUNTS;
                    let to = (from + 1 + next() % (ACCOUNTS - 1)) % ACCOUNTS;
                    let amount = 1 + (next() % 100) as i64;
                    let mut tries = 0u64;
                    let outcome = tm.run(|txn| {
                        tries += 1;
                        let a = bank.read(txn, from)?;
                        let b = bank.read(txn, to)?;
                        bank.write(txn, from, a - amount)?;
                        bank.write(txn, to, b + amount)?;
                        Ok::<_, BoxError>(())
                    });
                    counters.retries.fetch_add(tries - 1, Ordering::Relaxed);
                    match outcome {
                        Ok(()) => {
                            counters.committed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) if tm.is_retryable(&*err) => {
                            counters.given_up.fetch_add(1, Ordering::Relaxed);
                            *counters.causes.lock().entry(cause(&*err)).or_default() += 1;
                        }
                        Err(err) => panic!("transfer failed: {err}"),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker panicked");
    }
    (counters, start.elapsed())
}

fn main() {
    // `cargo test --benches` runs bench binaries with `--test`: keep that quick.
    let test_mode = std::env::args().any(|a| a == "--test");
    let secs: f64 = std::env::var("CONTENTION_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if test_mode { 0.05 } else { 2.0 });
    let mut rows = Vec::new();
    let causes = parking_lot::Mutex::new(std::collections::BTreeMap::<(&str, String), u64>::new());
    for mixed in [false, true] {
        for threads in [2usize, 4, 8] {
            for (backoff_name, backoff) in
                [("none", Backoff::None), ("default", Backoff::default())]
            {
                let dir = tempfile::tempdir().unwrap();
                let bank = new_bank(mixed, dir.path());
                let (counters, elapsed) = run_one(&bank, threads, backoff, secs);
                let committed = counters.committed.load(Ordering::Relaxed);
                let retries = counters.retries.load(Ordering::Relaxed);
                let given_up = counters.given_up.load(Ordering::Relaxed);
                for (cause, n) in counters.causes.lock().iter() {
                    let mut all = causes.lock();
                    *all.entry((bank.name(), cause.clone())).or_insert(0) += n;
                }
                assert_eq!(
                    bank.total(),
                    INITIAL * ACCOUNTS as i64,
                    "money created or lost"
                );
                let row = Row {
                    store: bank.name(),
                    threads,
                    backoff: backoff_name,
                    per_sec: committed as f64 / elapsed.as_secs_f64(),
                    retries_per_commit: retries as f64 / committed.max(1) as f64,
                    given_up,
                    committed,
                };
                eprintln!(
                    "{:<14} {} threads, backoff {:<7}: {:>9.0} committed/s",
                    row.store, row.threads, row.backoff, row.per_sec
                );
                rows.push(row);
            }
        }
    }
    println!(
        "\ncontention: 10 accounts, {secs} s per row, 3 attempts per transfer (retry_attempt_count default)"
    );
    println!(
        "| store | threads | backoff | committed/s | retries per commit | given up | committed |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.0} | {:.3} | {} | {} |",
            r.store, r.threads, r.backoff, r.per_sec, r.retries_per_commit, r.given_up, r.committed
        );
    }
    let causes = causes.into_inner();
    if !causes.is_empty() {
        println!("\nlast error of the given-up transfers (all rows; digits folded to #):");
        println!("| store | count | error |");
        println!("|---|---:|---|");
        for ((store, cause), n) in causes {
            println!("| {store} | {n} | {} |", cause.replace('|', "\\|"));
        }
    }
}
