//! The main job: concurrent money transfers between accounts kept partly in
//! SQLite and partly in a second store, every transfer one tm transaction.
//!
//! ```text
//! cargo run --release --example bank                      # SQLite + MemoryStore (embedded)
//! cargo run --release --example bank -- --redis redis://127.0.0.1:6379/ --sqlite bank.db
//! cargo run --release --example bank -- --redis URL --sqlite bank.db --crash-at tpc_finish
//! cargo run --release --example bank -- --redis URL --sqlite bank.db   # recovers, checks, goes on
//! ```
//!
//! Even-numbered accounts live in SQLite, odd-numbered ones in the second
//! store, so most transfers are two-phase commits across both. The decision
//! log is a `SqliteDecisionLog` on the same database (logging last
//! resource: the decision row rides in SQLite's own COMMIT).
//!
//! Recovery: every start runs `recover` and prints its report; a
//! `RecoveryService` then runs for the whole run, so what a failed
//! `tpc_finish` or a crashed sibling process left prepared is finished
//! within the grace period plus one interval. Several banks may share one
//! SQLite file and one Redis: they share the decision log (its id is kept in
//! the file), records younger than the grace period are left alone, and the
//! fence makes a presumed abort safe against a live coordinator.
//!
//! The invariant (total money unchanged, no account negative) is checked at
//! the end on a consistent snapshot: the balances are read in one tm
//! transaction over both stores, so a transfer that is prepared but not yet
//! finished (by this process, a sibling or recovery) is a conflict to wait
//! for, never miscounted money.
//!
//! Exit codes: 0 ok, 1 invariant broken, 2 usage, 3 stopped by a failure
//! (a store failed, or the invariant could not be checked).

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tm::redis::Store as RedisStore;
use tm::sqlite::{Database, Options as SqliteOptions, SqliteDecisionLog};
use tm::{
    DataManager, DecisionLog, Error as TmError, MemoryStore, Phase, Recoverable, RecoveryOptions,
    RecoveryReport, RecoveryService, Transaction, TransactionManager,
};

type BoxError = Box<dyn StdError + Send + Sync>;

const INITIAL_BALANCE: i64 = 1_000;
/// Accounts written per set-up transaction.
const SETUP_BATCH: u32 = 5_000;

const EXIT_INVARIANT_BROKEN: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_FAILED: u8 = 3;

/// Concurrent money transfers over SQLite and a second store (Redis or an
/// in-process MemoryStore), every transfer one atomic tm transaction.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "bank",
    after_help = "Exit codes: 0 ok, 1 invariant broken, 2 usage, 3 stopped by a failure.\n\
                  Several banks may run at once on one --sqlite file and one --redis server."
)]
struct Args {
    /// Accounts, half in SQLite, half in the second store.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(2..=10_000_000))]
    accounts: u32,
    /// Worker threads.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: u32,
    /// Transfers in all.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(0..=1_000_000_000))]
    transfers: u64,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// SQLite file (default: a fresh temporary file). With --redis, an
    /// existing bank in it is resumed.
    #[arg(long, value_parser = non_empty_path)]
    sqlite: Option<PathBuf>,
    /// Keep the second half of the accounts in Redis (default: an in-process
    /// MemoryStore), e.g. redis://127.0.0.1:6379/
    #[arg(long, value_parser = non_empty_url)]
    redis: Option<String>,
    /// Kill the process inside a transfer's commit half-way through the run;
    /// that transfer spans both stores. Needs --redis and --sqlite, so that
    /// the next run can recover.
    #[arg(long, value_enum, value_name = "PHASE")]
    crash_at: Option<CrashPhase>,
    /// Recovery leaves own undecided records younger than this alone (they
    /// may belong to a live bank on the same stores). Lower it only when no
    /// other bank runs: the fence keeps the money safe, but a live
    /// transfer caught by it fails.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = grace_secs)]
    grace: f64,
    /// The background recovery service's interval, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    recovery_interval: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
enum CrashPhase {
    TpcBegin,
    Commit,
    TpcVote,
    TpcFinish,
}

impl CrashPhase {
    fn phase(self) -> Phase {
        match self {
            CrashPhase::TpcBegin => Phase::TpcBegin,
            CrashPhase::Commit => Phase::Commit,
            CrashPhase::TpcVote => Phase::TpcVote,
            CrashPhase::TpcFinish => Phase::TpcFinish,
        }
    }
}

fn non_empty_path(s: &str) -> Result<PathBuf, String> {
    if s.trim().is_empty() {
        Err("the path is empty (leave --sqlite out for a temporary file)".into())
    } else {
        Ok(PathBuf::from(s))
    }
}

fn non_empty_url(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("the URL is empty (leave --redis out for the in-process store)".into())
    } else {
        Ok(s.to_owned())
    }
}

fn grace_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(0.0..=3600.0).contains(&v) {
        return Err("must be between 0 and 3600 seconds".into());
    }
    Ok(v)
}

/// The second store: in memory (embedded default) or Redis.
#[derive(Clone)]
enum Second {
    Memory(MemoryStore<i64>),
    Redis(RedisStore),
}

impl Second {
    fn read(&self, txn: &Transaction, key: &str) -> Result<i64, BoxError> {
        match self {
            Second::Memory(m) => Ok(m.join(txn)?.get(key)?.unwrap_or(0)),
            Second::Redis(r) => Ok(r.join(txn)?.get::<i64>(key)?.unwrap_or(0)),
        }
    }

    fn write(&self, txn: &Transaction, key: &str, balance: i64) -> Result<(), BoxError> {
        match self {
            Second::Memory(m) => m.join(txn)?.put(key, balance)?,
            Second::Redis(r) => r.join(txn)?.set(key, balance)?,
        }
        Ok(())
    }

    fn recoverable(&self) -> Arc<dyn Recoverable> {
        match self {
            Second::Memory(m) => Arc::new(m.clone()),
            Second::Redis(r) => Arc::new(r.clone()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Second::Memory(_) => "MemoryStore (in process)".into(),
            Second::Redis(r) => format!("Redis {}", r.server()),
        }
    }
}

/// Joined to one transfer to kill the process at a chosen phase.
///
/// For `tpc_finish` it sorts first: when its finish runs, the decision is
/// made (SQLite, the last resource, has committed) and the second store is
/// still prepared — in doubt, to be committed by recovery. For the other
/// phases it sorts last: the second store has begun (or prepared, at
/// `tpc_vote`) and there is no decision — recovery presumes abort once the
/// record is older than the grace period.
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
    /// Second-store keys are `bank:<log id>:account:<n>`: the decision
    /// log's id is kept in the SQLite file, so banks on one file share
    /// their accounts and banks on different files never touch each
    /// other's, even on one Redis.
    namespace: String,
    db: Database,
    sqlite_path: PathBuf,
    second: Second,
    accounts: u32,
}

/// What the stores hold, read in one transaction.
struct Snapshot {
    balances: BTreeMap<u32, i64>,
    expected: Option<i64>,
}

impl Bank {
    fn key(&self, id: u32) -> String {
        format!("bank:{}:account:{id}", self.namespace)
    }

    fn read(&self, txn: &Transaction, id: u32) -> Result<i64, BoxError> {
        if id.is_multiple_of(2) {
            let conn = self.db.join(txn)?;
            Ok(
                conn.query_row("SELECT balance FROM account WHERE id = ?1", [id], |r| {
                    r.get(0)
                })?,
            )
        } else {
            self.second.read(txn, &self.key(id))
        }
    }

    fn write(&self, txn: &Transaction, id: u32, balance: i64) -> Result<(), BoxError> {
        if id.is_multiple_of(2) {
            let conn = self.db.join(txn)?;
            conn.execute(
                "UPDATE account SET balance = ?1 WHERE id = ?2",
                rusqlite::params![balance, id],
            )?;
            Ok(())
        } else {
            self.second.write(txn, &self.key(id), balance)
        }
    }

    /// `(total, accounts)` of the bank kept in the SQLite file, if any.
    fn meta(&self) -> Result<Option<(i64, u32)>, BoxError> {
        Ok(self.db.with_connection(|c| {
            c.query_row("SELECT total, accounts FROM bank_meta", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })
        })?)
    }

    /// Every balance and the expected total, read in one transaction over
    /// both stores: SQLite under its write lock, the second store's reads
    /// checked at the vote. A transfer prepared but unfinished anywhere (a
    /// lock on a key read) makes this a conflict, retried by `run`.
    fn snapshot(&self, tm: &TransactionManager) -> Result<Snapshot, BoxError> {
        tm.run(|txn| {
            let (rows, expected) = {
                let conn = self.db.join(txn)?;
                let mut stmt = conn.prepare("SELECT id, balance FROM account ORDER BY id")?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                drop(stmt);
                let expected = conn
                    .query_row("SELECT total FROM bank_meta", [], |r| r.get::<_, i64>(0))
                    .map(Some)
                    .or_else(|e| match e {
                        rusqlite::Error::QueryReturnedNoRows => Ok(None),
                        e => Err(e),
                    })?;
                (rows, expected)
            };
            let mut balances: BTreeMap<u32, i64> = rows.into_iter().collect();
            for id in (1..self.accounts).step_by(2) {
                balances.insert(id, self.second.read(txn, &self.key(id))?);
            }
            Ok::<_, BoxError>(Snapshot { balances, expected })
        })
    }

    /// Fresh accounts in batches (each one transaction over both stores),
    /// then the `bank_meta` row, which marks the bank as set up. Plain
    /// INSERTs: a second bank setting up the same file at the same moment
    /// fails on a duplicate id instead of mixing two set-ups.
    fn initialize(&self, tm: &TransactionManager, bar: &ProgressBar) -> Result<(), BoxError> {
        let mut start = 0;
        while start < self.accounts {
            let end = (start + SETUP_BATCH).min(self.accounts);
            tm.run(|txn| {
                let conn = self.db.join(txn)?;
                if start == 0 {
                    conn.execute("DELETE FROM account", [])?;
                    conn.execute("DELETE FROM bank_meta", [])?;
                }
                let mut insert =
                    conn.prepare_cached("INSERT INTO account (id, balance) VALUES (?1, ?2)")?;
                for id in (start..end).filter(|id| id % 2 == 0) {
                    insert.execute(rusqlite::params![id, INITIAL_BALANCE])?;
                }
                drop(insert);
                drop(conn);
                for id in (start..end).filter(|id| id % 2 == 1) {
                    self.second.write(txn, &self.key(id), INITIAL_BALANCE)?;
                }
                Ok::<_, BoxError>(())
            })?;
            bar.set_position(u64::from(end));
            start = end;
        }
        self.db.with_connection(|c| {
            c.execute(
                "INSERT INTO bank_meta (total, accounts) VALUES (?1, ?2)",
                rusqlite::params![INITIAL_BALANCE * i64::from(self.accounts), self.accounts],
            )
        })?;
        Ok(())
    }

    /// The store an error came from (kind, address), for the message.
    fn blame(&self, err: &(dyn StdError + 'static)) -> (&'static str, String) {
        let mut cur = Some(err);
        while let Some(e) = cur {
            if e.downcast_ref::<tm::redis::Error>().is_some() {
                if let Second::Redis(r) = &self.second {
                    return ("Redis", r.server().to_owned());
                }
            }
            if e.downcast_ref::<tm::sqlite::Error>().is_some()
                || e.downcast_ref::<rusqlite::Error>().is_some()
            {
                return ("SQLite", self.sqlite_path.display().to_string());
            }
            cur = e.source();
        }
        match err
            .downcast_ref::<TmError>()
            .and_then(|e| e.resource_name())
        {
            Some(name) => ("resource", name.to_owned()),
            None => ("the transfer", String::new()),
        }
    }

    /// `err` with the store it came from named once.
    fn describe_failure(&self, err: &(dyn StdError + 'static)) -> String {
        let (kind, address) = self.blame(err);
        let text = chain(err);
        if text.contains(&address) {
            format!("{kind}: {text}")
        } else {
            format!("{kind} {address}: {text}")
        }
    }
}

/// An error and its causes, each said once: a cause whose text the previous
/// message already contains is skipped.
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut prev = out.clone();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !prev.contains(&text) {
            out.push_str("\n  caused by: ");
            out.push_str(&text);
        }
        prev = text;
        source = s.source();
    }
    out
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
    in_doubt: AtomicU64,
    done: AtomicU64,
}

/// How the run ended.
enum Outcome {
    /// The invariant was checked: `true` if it held.
    Checked(bool),
    /// Stopped by a failure, already reported.
    Failed,
    /// A usage error found after start (the stores disagree with the flags).
    Usage,
}

fn main() -> ExitCode {
    // clap's own errors (unknown flag, bad value) exit with status 2.
    let args = Args::parse();
    if args.crash_at.is_some() && (args.redis.is_none() || args.sqlite.is_none()) {
        eprintln!(
            "bank: --crash-at needs --redis URL and --sqlite PATH: the in-process store cannot survive a crash"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    match run(args) {
        Ok(Outcome::Checked(true)) => ExitCode::SUCCESS,
        Ok(Outcome::Checked(false)) => ExitCode::from(EXIT_INVARIANT_BROKEN),
        Ok(Outcome::Failed) => ExitCode::from(EXIT_FAILED),
        Ok(Outcome::Usage) => ExitCode::from(EXIT_USAGE),
        Err(err) => {
            eprintln!("bank: {}", chain(&*err));
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn print_report(when: &str, report: &RecoveryReport) {
    println!("recovery {when}: {report}");
    for (resource, r) in &report.deferred {
        println!(
            "  left for a later pass (younger than the grace period): {} in {resource}, age {:.1?}",
            r.txid, r.age
        );
    }
    for (resource, r) in &report.foreign {
        let log = r.log.map_or_else(|| "no log".to_owned(), |l| l.to_string());
        println!(
            "  foreign (another decision log, left alone): {} in {resource}, log {log}, age {:.1?}",
            r.txid, r.age
        );
    }
    for (resource, txid) in &report.lost {
        println!("  LOST: decided {txid}, but {resource} has neither its record nor a receipt");
    }
    for (resource, err) in &report.errors {
        println!(
            "  error in {resource}: {}",
            chain(err as &(dyn StdError + 'static))
        );
    }
}

fn run(args: Args) -> Result<Outcome, BoxError> {
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
    )
    .map_err(|e| format!("SQLite {}: {}", sqlite_path.display(), chain(&e)))?;
    let second = match &args.redis {
        Some(url) => {
            Second::Redis(RedisStore::open(url).map_err(|e| format!("Redis {url}: {}", chain(&e)))?)
        }
        None => Second::Memory(MemoryStore::named("memory-accounts")),
    };

    // The decision log lives in the same SQLite database (logging last
    // resource): the decision row commits inside SQLite's COMMIT, no extra
    // fsync, and the manager accepts SQLite beside a durable preparer.
    // Banks sharing the file share this log (its id is kept in the file).
    let decision_log = Arc::new(SqliteDecisionLog::new(&db)?);
    let bank = Arc::new(Bank {
        namespace: decision_log.id().to_string(),
        db: db.clone(),
        sqlite_path: sqlite_path.clone(),
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
    match &second {
        Second::Redis(r) => {
            let d = r.durability();
            if d.is_durable() {
                println!("redis durability: prepares are {d}");
            } else {
                println!("redis durability: prepares are NOT durable: {d}");
                println!(
                    "  (start redis-server with --appendonly yes --appendfsync always --maxmemory-policy noeviction)"
                );
            }
        }
        Second::Memory(_) => {
            println!("second store: in process; its prepares end with the process (use --redis for a durable one)")
        }
    }
    println!(
        "decision log: SQLite {} (log {})",
        sqlite_path.display(),
        decision_log.id()
    );

    // Recovery first: finish whatever a crash left prepared. Records
    // younger than the grace period may be a live sibling's: left alone
    // here, the background service comes back for them.
    let options = RecoveryOptions::new().grace(Duration::from_secs_f64(args.grace));
    let resources = vec![second.recoverable()];
    {
        let refs: Vec<&dyn Recoverable> = resources.iter().map(|r| &**r).collect();
        let report = tm::recover_with(&*decision_log, &refs, &options)?;
        print_report("at start", &report);
    }
    let service = Arc::new(
        RecoveryService::builder(decision_log.clone(), resources.clone())
            .interval(Duration::from_millis(args.recovery_interval))
            .options(options.clone())
            .start()?,
    );

    let setup = TransactionManager::builder()
        .retry_attempt_count(20)
        .decision_log(decision_log.clone())
        .build();
    let resumable = matches!(second, Second::Redis(_));
    match bank.meta()? {
        Some((_, n)) if resumable && n != args.accounts => {
            eprintln!(
                "bank: {} holds a bank of {n} accounts; pass --accounts {n}, or another --sqlite file",
                sqlite_path.display()
            );
            return Ok(Outcome::Usage);
        }
        Some((total, _)) if resumable => {
            println!(
                "resuming the bank in {} (total {total})",
                sqlite_path.display()
            );
        }
        _ => {
            let bar = bar(u64::from(args.accounts), "accounts set up");
            bank.initialize(&setup, &bar)
                .map_err(|e| format!("setting up the accounts: {}", bank.describe_failure(&*e)))?;
            bar.finish_and_clear();
            println!("set up {} accounts of {INITIAL_BALANCE}", args.accounts);
        }
    }

    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let failure: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let bar = bar(args.transfers, "transfers");
    let start = Instant::now();
    let per_thread = args.transfers / u64::from(args.threads);
    let extra = args.transfers % u64::from(args.threads);

    let mut workers = Vec::new();
    for t in 0..args.threads {
        let bank = bank.clone();
        let counters = counters.clone();
        let stop = stop.clone();
        let failure = failure.clone();
        let service = service.clone();
        let bar = bar.clone();
        let log = decision_log.clone();
        let n = per_thread + u64::from(u64::from(t) < extra);
        let seed = args
            .seed
            .wrapping_mul(0x9e37_79b9)
            .wrapping_add(u64::from(t) + 1)
            | 1;
        // The first worker crashes half-way through its share, inside a
        // transfer from an SQLite account to a second-store account.
        let crash_at = args.crash_at.filter(|_| t == 0).map(CrashPhase::phase);
        let accounts = args.accounts;
        workers.push(std::thread::spawn(move || -> Vec<Duration> {
            // Each worker on its own thread-local manager, as an app would:
            // more attempts than the default 3 (the bank is built to
            // contend) and the decision log.
            tm::set_manager(
                TransactionManager::builder()
                    .retry_attempt_count(20)
                    .decision_log(log)
                    .build(),
            );
            let tm = tm::manager();
            let mut rng = Rng(seed);
            let mut latencies = Vec::with_capacity(n as usize);
            for i in 0..n {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let crash = crash_at.filter(|_| i == n / 2);
                let (from, to) = if crash.is_some() {
                    let even = 2 * rng.below(u64::from(accounts.div_ceil(2))) as u32;
                    let odd = 2 * rng.below(u64::from(accounts / 2)) as u32 + 1;
                    (even, odd)
                } else {
                    let from = rng.below(u64::from(accounts)) as u32;
                    let mut to = rng.below(u64::from(accounts) - 1) as u32;
                    if to >= from {
                        to += 1;
                    }
                    (from, to)
                };
                let amount = 1 + rng.below(100) as i64;
                let t0 = Instant::now();
                let mut tries = 0u64;
                let outcome = tm.run(|txn| {
                    tries += 1;
                    if let Some(at) = crash {
                        txn.join(Arc::new(Crasher { at }))?;
                    }
                    txn.note(&format!("transfer {amount} from {from} to {to}"));
                    let a = bank.read(txn, from)?;
                    // At a crash, move money whatever the balance: the
                    // transfer must reach both stores.
                    if a < amount && crash.is_none() {
                        return Ok(false);
                    }
                    let b = bank.read(txn, to)?;
                    bank.write(txn, from, a - amount.min(a))?;
                    bank.write(txn, to, b + amount.min(a))?;
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
                    Err(err)
                        if err
                            .downcast_ref::<TmError>()
                            .is_some_and(TmError::is_heuristic) =>
                    {
                        // Decided, but not finished everywhere: the service
                        // finishes it; the snapshot at the end waits for it.
                        // Within one store it was a one-phase commit whose
                        // reply was lost: whole or not at all, nothing to
                        // finish.
                        counters.in_doubt.fetch_add(1, Ordering::Relaxed);
                        service.nudge();
                        let what = if from % 2 == to % 2 {
                            "has an unknown outcome (its one-phase commit's reply was lost; it happened whole or not at all)"
                        } else {
                            "is in doubt (background recovery will finish it)"
                        };
                        say(
                            &bar,
                            format!(
                                "transfer {amount} from {from} to {to} {what}: {}",
                                chain(&*err)
                            ),
                        );
                    }
                    // Every attempt spent on retryable failures.
                    Err(_) if tries == u64::from(tm.retry_attempt_count()) => {
                        counters.given_up.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => {
                        let msg = bank.describe_failure(&*err);
                        let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
                        f.get_or_insert(msg);
                        stop.store(true, Ordering::Relaxed);
                        break;
                    }
                }
                counters.done.fetch_add(1, Ordering::Relaxed);
                bar.inc(1);
            }
            latencies
        }));
    }

    // Report what background recovery does while the run goes on.
    let watcher = {
        let service = service.clone();
        let bar = bar.clone();
        let stop = stop.clone();
        let running = Arc::new(AtomicBool::new(true));
        let r = running.clone();
        let handle = std::thread::spawn(move || {
            let mut last: Option<Arc<RecoveryReport>> = None;
            let (mut committed, mut aborted) = (0, 0);
            while r.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                if let Some(report) = service.last_report() {
                    let new = last.as_ref().is_none_or(|l| !Arc::ptr_eq(l, &report));
                    let acted = !report.committed.is_empty()
                        || !report.aborted.is_empty()
                        || !report.lost.is_empty()
                        || !report.errors.is_empty();
                    if new && acted {
                        committed += report.committed.len();
                        aborted += report.aborted.len();
                        say(&bar, format!("background recovery: {report}"));
                    }
                    last = Some(report);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (committed, aborted)
        });
        (running, handle)
    };

    let mut latencies = Vec::new();
    let mut panicked = false;
    for w in workers {
        match w.join() {
            Ok(l) => latencies.extend(l),
            Err(_) => panicked = true,
        }
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    watcher.0.store(false, Ordering::Relaxed);
    let (bg_committed, bg_aborted) = watcher.1.join().unwrap_or((0, 0));

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
    println!(
        "in doubt at commit:  {}",
        counters.in_doubt.load(Ordering::Relaxed)
    );
    println!("latency p50 / p99:   {:?} / {:?}", pct(0.50), pct(0.99));
    println!("elapsed:             {:.2?}", elapsed);

    let failed = failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .or_else(|| panicked.then(|| "a worker thread panicked".to_owned()));
    if let Some(msg) = failed {
        eprintln!("bank: stopped: {msg}");
        eprintln!(
            "bank: {committed} transfers were committed before the stop; the invariant is not checked (run again to recover and check)"
        );
        // Stop the service without a final pass: the store has failed.
        drop(service);
        return Ok(Outcome::Failed);
    }

    // Stop the background service, then one last pass of our own.
    let passes = service.passes();
    match Arc::try_unwrap(service) {
        Ok(s) => s.stop(),
        Err(_) => unreachable!("every worker has ended"),
    }
    println!(
        "background recovery: {passes} passes, committed {bg_committed}, aborted {bg_aborted} in-doubt transaction(s)"
    );
    let refs: Vec<&dyn Recoverable> = resources.iter().map(|r| &**r).collect();
    let report = tm::recover_with(&*decision_log, &refs, &options)?;
    print_report("at the end", &report);

    check_invariant(&bank, &setup, &*decision_log, &refs, &options)
}

/// A line above the bar, or on stdout when the bar is hidden (a hidden
/// bar's `println` prints nothing).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

/// A progress bar for `len` steps, drawn only on a terminal.
fn bar(len: u64, what: &str) -> ProgressBar {
    let target = if std::io::stderr().is_terminal() && std::io::stdout().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{bar:40}} {{human_pos}}/{{human_len}} {what}  {{per_sec}}  eta {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Total unchanged and no account negative, on a consistent snapshot. A
/// transfer still prepared somewhere (a sibling's, or one of ours that
/// recovery has not finished yet) holds a lock: the snapshot waits for it,
/// up to the grace period and some, running recovery passes meanwhile.
fn check_invariant(
    bank: &Bank,
    tm: &TransactionManager,
    log: &dyn DecisionLog,
    resources: &[&dyn Recoverable],
    options: &RecoveryOptions,
) -> Result<Outcome, BoxError> {
    let deadline = Instant::now() + options.grace + Duration::from_secs(10);
    let snapshot = loop {
        match bank.snapshot(tm) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let is_conflict = e
                    .downcast_ref::<TmError>()
                    .is_some_and(TmError::is_retryable)
                    || e.downcast_ref::<tm::redis::Error>().is_some();
                if !is_conflict {
                    return Err(format!("reading the balances: {}", chain(&*e)).into());
                }
                let _ = tm::recover_with(log, resources, options);
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => {
                eprintln!(
                    "bank: invariant not checked: no consistent snapshot (transfers still in doubt): {}",
                    chain(&*e)
                );
                return Ok(Outcome::Failed);
            }
        }
    };
    let total: i64 = snapshot.balances.values().sum();
    let Some(expected) = snapshot.expected else {
        eprintln!("bank: invariant not checked: the bank_meta row is missing");
        return Ok(Outcome::Failed);
    };
    let negative: Vec<_> = snapshot.balances.iter().filter(|(_, b)| **b < 0).collect();
    if !negative.is_empty() {
        eprintln!("negative accounts: {negative:?}");
    }
    if snapshot.balances.len() != bank.accounts as usize {
        eprintln!(
            "{} accounts found, expected {}",
            snapshot.balances.len(),
            bank.accounts
        );
    }
    if total != expected {
        eprintln!("total is {total}, expected {expected}");
    }
    if negative.is_empty() && total == expected {
        println!("invariant: total {total} unchanged, no account negative — OK");
        Ok(Outcome::Checked(true))
    } else {
        println!("invariant: BROKEN (total {total}, expected {expected})");
        Ok(Outcome::Checked(false))
    }
}
