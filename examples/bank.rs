//! The main job: concurrent money transfers between accounts kept partly in
//! SQLite and partly in a second store, every transfer one tm transaction.
//!
//! ```text
//! cargo run --release --example bank                      # SQLite + MemoryStore (embedded)
//! cargo run --release --example bank -- --redis redis://127.0.0.1:6379/
//! cargo run --release --example bank -- --redis URL --sqlite bank.db --crash-at tpc_finish
//! cargo run --release --example bank -- --redis URL --sqlite bank.db   # recovers, checks, goes on
//! ```
//!
//! Even-numbered accounts live in SQLite, odd-numbered ones in the second
//! store, so most transfers are two-phase commits across both. Each worker
//! thread uses its own thread-local manager (`tm::manager()`), as an
//! application would. At the end the invariant — total money unchanged,
//! no account negative — is checked against the stores themselves; a broken
//! invariant exits with status 1.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tm::redis::Store as RedisStore;
use tm::sqlite::{Database, Options as SqliteOptions, SqliteDecisionLog};
use tm::{
    DataManager, Error as TmError, MemoryStore, Phase, Recoverable, Transaction, TransactionManager,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const INITIAL_BALANCE: i64 = 1_000;

const USAGE: &str = "usage: bank [--accounts N] [--threads N] [--transfers N] [--seed N]
            [--sqlite PATH] [--redis URL] [--crash-at PHASE]

  --accounts N      accounts, half in SQLite, half in the second store (default 100)
  --threads N       worker threads (default 4)
  --transfers N     transfers in all (default 20000)
  --seed N          random seed (default 42)
  --sqlite PATH     SQLite file (default: a fresh temporary file)
  --redis URL       keep the second half in Redis (default: an in-memory MemoryStore)
  --crash-at PHASE  kill the process at tpc_begin, commit, tpc_vote or tpc_finish
                    of a transfer half-way through; needs --redis and --sqlite so
                    that a second run (without --crash-at) can recover";

#[derive(Debug, Clone)]
struct Args {
    accounts: u32,
    threads: u32,
    transfers: u64,
    seed: u64,
    sqlite: Option<PathBuf>,
    redis: Option<String>,
    crash_at: Option<Phase>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        accounts: 100,
        threads: 4,
        transfers: 20_000,
        seed: 42,
        sqlite: None,
        redis: None,
        crash_at: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        fn number<T: std::str::FromStr>(name: &str, v: String) -> Result<T, String> {
            v.parse()
                .map_err(|_| format!("{name}: {v:?} is not a valid number"))
        }
        match flag.as_str() {
            "--accounts" => args.accounts = number("--accounts", value("--accounts")?)?,
            "--threads" => args.threads = number("--threads", value("--threads")?)?,
            "--transfers" => args.transfers = number("--transfers", value("--transfers")?)?,
            "--seed" => args.seed = number("--seed", value("--seed")?)?,
            "--sqlite" => args.sqlite = Some(PathBuf::from(value("--sqlite")?)),
            "--redis" => args.redis = Some(value("--redis")?),
            "--crash-at" => {
                let v = value("--crash-at")?;
                args.crash_at = Some(match v.as_str() {
                    "tpc_begin" => Phase::TpcBegin,
                    "commit" => Phase::Commit,
                    "tpc_vote" => Phase::TpcVote,
                    "tpc_finish" => Phase::TpcFinish,
                    _ => {
                        return Err(format!(
                        "--crash-at: {v:?} is not one of tpc_begin, commit, tpc_vote, tpc_finish"
                    ))
                    }
                });
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.accounts < 2 {
        return Err("--accounts must be at least 2".into());
    }
    if args.threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    if args.crash_at.is_some() && (args.redis.is_none() || args.sqlite.is_none()) {
        return Err(
            "--crash-at needs --redis URL and --sqlite PATH: the in-memory store cannot survive a crash"
                .into(),
        );
    }
    Ok(args)
}

/// The second store: in memory (embedded default) or Redis.
#[derive(Clone)]
enum Second {
    Memory(MemoryStore<i64>),
    Redis(RedisStore),
}

impl Second {
    fn key(id: u32) -> String {
        format!("bank:account:{id}")
    }

    fn read(&self, txn: &Transaction, id: u32) -> Result<i64, BoxError> {
        match self {
            Second::Memory(m) => Ok(m.join(txn)?.get(&Self::key(id))?.unwrap_or(0)),
            Second::Redis(r) => Ok(r.join(txn)?.get::<i64>(Self::key(id))?.unwrap_or(0)),
        }
    }

    fn write(&self, txn: &Transaction, id: u32, balance: i64) -> Result<(), BoxError> {
        match self {
            Second::Memory(m) => m.join(txn)?.put(&Self::key(id), balance),
            Second::Redis(r) => r.join(txn)?.set(Self::key(id), balance)?,
        }
        Ok(())
    }

    fn committed(&self, id: u32) -> Result<Option<i64>, BoxError> {
        match self {
            Second::Memory(m) => Ok(m.committed(&Self::key(id))),
            Second::Redis(r) => Ok(r.get::<i64>(Self::key(id))?),
        }
    }

    fn describe(&self) -> String {
        match self {
            Second::Memory(_) => "MemoryStore (in process)".into(),
            Second::Redis(r) => format!("Redis {}", r.server()),
        }
    }
}

/// Joined to a transfer to kill the process at a chosen phase.
///
/// For `tpc_finish` it sorts first: when its finish runs, the decision is
/// made (SQLite, the last resource, has committed) and the second store is
/// still prepared — in doubt, to be committed by recovery. For the other
/// phases it sorts last: the second store has begun (or prepared, at
/// `tpc_vote`) and there is no decision — recovery presumes abort.
struct Crasher {
    at: Phase,
}

impl Crasher {
    fn maybe_die(&self, phase: Phase) -> tm::Result<()> {
        if phase == self.at {
            eprintln!("\n*** --crash-at {phase}: killing the process now ***");
            std::process::abort();
        }
        Ok(())
    }
}

impl DataManager for Crasher {
    fn sort_key(&self) -> &str {
        if self.at == Phase::TpcFinish {
            "!crash"
        } else {
            "~crash"
        }
    }
    fn abort(&self, _: &Transaction) -> tm::Result<()> {
        Ok(())
    }
    fn tpc_begin(&self, _: &Transaction) -> tm::Result<()> {
        self.maybe_die(Phase::TpcBegin)
    }
    fn commit(&self, _: &Transaction) -> tm::Result<()> {
        self.maybe_die(Phase::Commit)
    }
    fn tpc_vote(&self, _: &Transaction) -> tm::Result<()> {
        self.maybe_die(Phase::TpcVote)
    }
    fn tpc_finish(&self, _: &Transaction) -> tm::Result<()> {
        self.maybe_die(Phase::TpcFinish)
    }
    fn tpc_abort(&self, _: &Transaction) -> tm::Result<()> {
        Ok(())
    }
}

struct Bank {
    db: Database,
    second: Second,
    accounts: u32,
}

impl Bank {
    fn read(&self, txn: &Transaction, id: u32) -> Result<i64, BoxError> {
        if id % 2 == 0 {
            let conn = self.db.join(txn)?;
            Ok(
                conn.query_row("SELECT balance FROM account WHERE id = ?1", [id], |r| {
                    r.get(0)
                })?,
            )
        } else {
            self.second.read(txn, id)
        }
    }

    fn write(&self, txn: &Transaction, id: u32, balance: i64) -> Result<(), BoxError> {
        if id % 2 == 0 {
            let conn = self.db.join(txn)?;
            conn.execute(
                "UPDATE account SET balance = ?1 WHERE id = ?2",
                rusqlite::params![balance, id],
            )?;
            Ok(())
        } else {
            self.second.write(txn, id, balance)
        }
    }

    /// Every balance, read from the stores themselves (outside tm).
    fn balances(&self) -> Result<BTreeMap<u32, i64>, BoxError> {
        let mut out = BTreeMap::new();
        let rows: Vec<(u32, i64)> = self.db.with_connection(|c| {
            let mut stmt = c.prepare("SELECT id, balance FROM account ORDER BY id")?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        out.extend(rows);
        for id in (1..self.accounts).step_by(2) {
            out.insert(id, self.second.committed(id)?.unwrap_or(0));
        }
        Ok(out)
    }

    fn expected_total(&self) -> Result<Option<i64>, BoxError> {
        Ok(self.db.with_connection(|c| {
            c.query_row("SELECT total FROM bank_meta", [], |r| r.get(0))
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })
        })?)
    }

    /// Fresh accounts (and the expected total) in one transaction over both stores.
    fn initialize(&self, tm: &TransactionManager) -> Result<(), BoxError> {
        tm.run(|txn| {
            let conn = self.db.join(txn)?;
            conn.execute("DELETE FROM account", [])?;
            conn.execute("DELETE FROM bank_meta", [])?;
            for id in (0..self.accounts).step_by(2) {
                conn.execute(
                    "INSERT INTO account (id, balance) VALUES (?1, ?2)",
                    rusqlite::params![id, INITIAL_BALANCE],
                )?;
            }
            conn.execute(
                "INSERT INTO bank_meta (total, accounts) VALUES (?1, ?2)",
                rusqlite::params![INITIAL_BALANCE * i64::from(self.accounts), self.accounts],
            )?;
            drop(conn);
            for id in (1..self.accounts).step_by(2) {
                self.second.write(txn, id, INITIAL_BALANCE)?;
            }
            Ok::<_, BoxError>(())
        })
    }
}

/// xorshift64*: the bank needs reproducible spread, not cryptography.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct Counters {
    committed: AtomicU64,
    declined: AtomicU64,
    retried: AtomicU64,
    given_up: AtomicU64,
    done: AtomicU64,
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("bank: {msg}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("bank: {err}");
            let mut source = err.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> Result<bool, BoxError> {
    let _tmp;
    let sqlite_path = match &args.sqlite {
        Some(path) => path.clone(),
        None => {
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("bank.db");
            _tmp = dir;
            path
        }
    };
    let db = Database::open_with(
        &sqlite_path,
        SqliteOptions::default().setup_sql(
            "CREATE TABLE IF NOT EXISTS account (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS bank_meta (total INTEGER NOT NULL, accounts INTEGER NOT NULL);",
        ),
    )?;
    let second = match &args.redis {
        Some(url) => Second::Redis(RedisStore::open(url)?),
        None => Second::Memory(MemoryStore::named("memory-accounts")),
    };

    // The decision log lives in the same SQLite database (logging last
    // resource): no extra fsync per transfer.
    let decision_log = Arc::new(SqliteDecisionLog::new(&db)?);
    let bank = Arc::new(Bank {
        db: db.clone(),
        second: second.clone(),
        accounts: args.accounts,
    });

    println!(
        "bank: {} accounts ({} in SQLite {}, {} in {}), {} threads, {} transfers, seed {}",
        args.accounts,
        args.accounts.div_ceil(2),
        sqlite_path.display(),
        args.accounts / 2,
        second.describe(),
        args.threads,
        args.transfers,
        args.seed
    );

    // Recovery first: finish whatever a crash left prepared.
    if let Second::Redis(redis) = &second {
        let report = tm::recover(&*decision_log, &[redis as &dyn Recoverable])?;
        if !report.committed.is_empty() || !report.aborted.is_empty() {
            println!(
                "recovery: committed {} and aborted {} in-doubt transaction(s), forgot {} decision(s)",
                report.committed.len(),
                report.aborted.len(),
                report.forgotten.len()
            );
        }
        if !report.is_clean() {
            for (resource, err) in &report.errors {
                eprintln!("recovery error in {resource}: {err}");
            }
            return Err("recovery did not finish cleanly".into());
        }
    }

    let setup = TransactionManager::builder()
        .decision_log(decision_log.clone())
        .build();
    let resume = matches!(second, Second::Redis(_))
        && bank.expected_total()?.is_some()
        && bank.balances()?.len() == args.accounts as usize;
    if resume {
        let (ok, total) = check_invariant(&bank)?;
        println!(
            "resuming: total {total} — invariant {}",
            if ok { "holds" } else { "BROKEN" }
        );
        if !ok {
            return Ok(false);
        }
    } else {
        bank.initialize(&setup)?;
    }

    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let per_thread = args.transfers / u64::from(args.threads);
    let extra = args.transfers % u64::from(args.threads);
    let crash_after = args.transfers / 2;

    let mut workers = Vec::new();
    for t in 0..args.threads {
        let bank = bank.clone();
        let counters = counters.clone();
        let log = decision_log.clone();
        let n = per_thread + u64::from(u64::from(t) < extra);
        let seed = args
            .seed
            .wrapping_mul(0x9e37_79b9)
            .wrapping_add(u64::from(t) + 1)
            | 1;
        let crash_at = args.crash_at;
        let accounts = args.accounts;
        workers.push(std::thread::spawn(
            move || -> Result<Vec<Duration>, String> {
                // Each worker on its own thread-local manager, as an app would,
                // configured once at thread start: more attempts than the default
                // 3 (the bank is built to contend) and the decision log.
                tm::set_manager(
                    TransactionManager::builder()
                        .retry_attempt_count(20)
                        .decision_log(log)
                        .build(),
                );
                let tm = tm::manager();
                let mut rng = Rng(seed);
                let mut latencies = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let from = rng.below(u64::from(accounts)) as u32;
                    let mut to = rng.below(u64::from(accounts) - 1) as u32;
                    if to >= from {
                        to += 1;
                    }
                    let amount = 1 + rng.below(100) as i64;
                    let crash =
                        crash_at.filter(|_| counters.done.load(Ordering::Relaxed) >= crash_after);
                    let t0 = Instant::now();
                    let mut tries = 0u64;
                    let outcome = tm.run(|txn| {
                        tries += 1;
                        if let Some(at) = crash {
                            txn.join(Arc::new(Crasher { at }))?;
                        }
                        txn.note(&format!("transfer {amount} from {from} to {to}"));
                        let a = bank.read(txn, from)?;
                        if a < amount {
                            return Ok(false);
                        }
                        let b = bank.read(txn, to)?;
                        bank.write(txn, from, a - amount)?;
                        bank.write(txn, to, b + amount)?;
                        Ok::<_, BoxError>(true)
                    });
                    latencies.push(t0.elapsed());
                    counters.retried.fetch_add(tries - 1, Ordering::Relaxed);
                    match outcome {
                        Ok(true) => {
                            counters.committed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => {
                            counters.declined.fetch_add(1, Ordering::Relaxed);
                        }
                        // Every attempt spent: `run` only goes on after a
                        // retryable failure (asked of the resources, which a
                        // check made after `run` returned could not ask).
                        Err(_) if tries == u64::from(tm.retry_attempt_count()) => {
                            counters.given_up.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(err) => {
                            let mut msg = err.to_string();
                            if let Some(TmError::Heuristic { .. }) = err.downcast_ref::<TmError>() {
                                msg.push_str(" (run again to recover)");
                            }
                            return Err(msg);
                        }
                    }
                    counters.done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(latencies)
            },
        ));
    }

    // Progress: a bar once the run has lasted a second.
    let progress = {
        let counters = counters.clone();
        let total = args.transfers;
        std::thread::spawn(move || {
            let mut bar: Option<ProgressBar> = None;
            loop {
                let done = counters.done.load(Ordering::Relaxed);
                if done >= total {
                    if let Some(bar) = &bar {
                        bar.finish_and_clear();
                    }
                    return;
                }
                if bar.is_none() && start.elapsed() > Duration::from_secs(1) {
                    let b = ProgressBar::new(total);
                    b.set_style(
                        ProgressStyle::with_template(
                            "{bar:40} {pos}/{len} transfers  {per_sec}  eta {eta}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar = Some(b);
                }
                if let Some(bar) = &bar {
                    bar.set_position(done);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let mut latencies = Vec::new();
    let mut failure = None;
    for w in workers {
        match w.join() {
            Ok(Ok(l)) => latencies.extend(l),
            Ok(Err(e)) => failure = Some(e),
            Err(_) => failure = Some("a worker thread panicked".into()),
        }
    }
    counters.done.store(args.transfers, Ordering::Relaxed);
    let _ = progress.join();
    let elapsed = start.elapsed();
    if let Some(e) = failure {
        return Err(e.into());
    }

    latencies.sort();
    let pct = |p: f64| -> Duration {
        if latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[i]
    };
    let committed = counters.committed.load(Ordering::Relaxed);
    println!("transfers committed: {committed}");
    println!(
        "declined (insufficient funds): {}",
        counters.declined.load(Ordering::Relaxed)
    );
    println!(
        "per second:          {:.0}",
        committed as f64 / elapsed.as_secs_f64()
    );
    println!(
        "conflicts retried:   {}",
        counters.retried.load(Ordering::Relaxed)
    );
    println!(
        "given up:            {}",
        counters.given_up.load(Ordering::Relaxed)
    );
    println!("latency p50 / p99:   {:?} / {:?}", pct(0.50), pct(0.99));
    println!("elapsed:             {:.2?}", elapsed);

    let (ok, total) = check_invariant(&bank)?;
    if ok {
        println!("invariant: total {total} unchanged, no account negative — OK");
        Ok(true)
    } else {
        println!("invariant: BROKEN (total {total})");
        Ok(false)
    }
}

/// Total unchanged and no account negative, read from the stores.
fn check_invariant(bank: &Bank) -> Result<(bool, i64), BoxError> {
    let balances = bank.balances()?;
    let total: i64 = balances.values().sum();
    let expected = bank
        .expected_total()?
        .ok_or("the bank_meta row is missing")?;
    let negative: Vec<_> = balances.iter().filter(|(_, b)| **b < 0).collect();
    if !negative.is_empty() {
        eprintln!("negative accounts: {negative:?}");
    }
    if total != expected {
        eprintln!("total is {total}, expected {expected}");
    }
    Ok((negative.is_empty() && total == expected, total))
}
