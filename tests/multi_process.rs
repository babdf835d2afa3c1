//! Several bank-like processes on one SQLite file and one Redis: each start
//! recovers and runs a `RecoveryService`, none may hurt another, and no
//! failure is silent.
//!
//! The binary re-spawns itself as a worker (an environment variable picks
//! the role, as in `crash_matrix.rs`). A worker's every transfer moves money
//! between an SQLite account and a Redis account and, in the same
//! transaction, writes its journal entry to both stores: a row in SQLite's
//! `journal` and a key `mp:journal:<uid>` in Redis. The worker appends one
//! line per outcome to its own event file (`ok`, `declined`, `err`,
//! `heuristic`). After every worker has stopped, the parent recovers once
//! (grace zero: no coordinator is alive) and checks:
//! - the total is exact and every balance is its initial one plus the
//!   journal's movements;
//! - every journal entry has both halves;
//! - every `ok` is in the journal, and no plain `err` or `declined` is (a
//!   heuristic may go either way: it said so);
//! - every journal entry of a worker that exited normally was reported `ok`;
//! - nothing is prepared or locked in Redis, and the decision log has no
//!   pending decision.
//!
//! `cargo test --test multi_process -- --broken-fence` runs the same
//! scenarios with a decision log whose fence is bypassed (`record_abort`
//! answers "aborted" without writing) and recovery at grace zero: the
//! checks are expected to fail then. `harness = false`: it has its own
//! `main`, prints one line per scenario and `N passed, M failed`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tm::redis::testing::TestServer;
use tm::redis::Store;
use tm::sqlite::{Database, Options, SqliteDecisionLog};
use tm::{
    Decision, DecisionLog, LogId, Outcome, Recoverable, RecoveryOptions, RecoveryService,
    TransactionManager, TxId,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const ROLE_ENV: &str = "TM_MP_WORKER";
const ACCOUNTS: u32 = 40;
const INITIAL: i64 = 1_000;
const THREADS: usize = 2;

fn open_db(path: &Path) -> Database {
    Database::open_with(
        path,
        Options::default().setup_sql(
            "CREATE TABLE IF NOT EXISTS account (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS journal (uid TEXT PRIMARY KEY, sq INTEGER NOT NULL,
                 rd INTEGER NOT NULL, delta INTEGER NOT NULL);",
        ),
    )
    .expect("open SQLite")
}

fn account_key(id: u32) -> String {
    format!("mp:account:{id}")
}

fn journal_key(uid: &str) -> String {
    format!("mp:journal:{uid}")
}

/// A decision log whose fence is bypassed: `record_abort` writes nothing
/// and answers "aborted". Only for `--broken-fence`, to see the checks fail.
struct NoFence(Arc<SqliteDecisionLog>);

impl DecisionLog for NoFence {
    fn id(&self) -> LogId {
        self.0.id()
    }
    fn record_commit(&self, decision: &Decision) -> tm::Result<()> {
        self.0.record_commit(decision)
    }
    fn record_abort(&self, _: &TxId) -> tm::Result<Outcome> {
        Ok(Outcome::Aborted)
    }
    fn forget(&self, txid: &TxId) -> tm::Result<()> {
        self.0.forget(txid)
    }
    fn pending(&self) -> tm::Result<Vec<Decision>> {
        self.0.pending()
    }
}

/// xorshift64*.
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

/// Appends whole lines (one `write` each) to a worker's event file.
struct Events(File);
impl Events {
    fn line(&self, text: &str) {
        let mut buf = text.replace('\n', " ");
        buf.push('\n');
        (&self.0).write_all(buf.as_bytes()).expect("write event");
    }
}

/// The worker process: recover at start, a recovery service, `THREADS`
/// threads transferring until the stop file appears or `TM_MP_SECONDS`
/// have passed.
fn worker(name: &str) {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let db_path = PathBuf::from(var("TM_MP_DB"));
    let url = var("TM_MP_REDIS");
    let stop_file = PathBuf::from(var("TM_MP_STOP"));
    let seconds: f64 = var("TM_MP_SECONDS").parse().expect("TM_MP_SECONDS");
    let broken_fence = std::env::var("TM_MP_BROKEN_FENCE").is_ok();
    let events = Arc::new(Events(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(var("TM_MP_EVENTS"))
            .expect("open the event file"),
    ));

    let db = open_db(&db_path);
    let store = Store::open(&url).expect("open Redis");
    let log = Arc::new(SqliteDecisionLog::new(&db).expect("decision log"));
    let (recovery_log, options): (Arc<dyn DecisionLog>, RecoveryOptions) = if broken_fence {
        (
            Arc::new(NoFence(log.clone())),
            RecoveryOptions::new().grace(Duration::ZERO),
        )
    } else {
        (log.clone(), RecoveryOptions::default())
    };
    let resources: Vec<Arc<dyn Recoverable>> = vec![Arc::new(store.clone())];
    let report = tm::recover_with(&*recovery_log, &[&store as &dyn Recoverable], &options)
        .expect("recovery at start");
    events.line(&format!(
        "recovered committed={} aborted={} deferred={} foreign={} errors={}",
        report.committed.len(),
        report.aborted.len(),
        report.deferred.len(),
        report.foreign.len(),
        report.errors.len()
    ));
    let service = Arc::new(
        RecoveryService::builder(recovery_log, resources)
            .interval(Duration::from_millis(100))
            .options(options)
            .start()
            .expect("start the recovery service"),
    );

    // What this worker's service finishes (its reports, summed).
    let watch_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (service, watch_stop) = (service.clone(), watch_stop.clone());
        std::thread::spawn(move || {
            let (mut committed, mut aborted) = (0, 0);
            let mut last = None;
            while !watch_stop.load(Ordering::Relaxed) {
                if let Some(r) = service.last_report() {
                    if last.as_ref().is_none_or(|l| !Arc::ptr_eq(l, &r)) {
                        committed += r.committed.len();
                        aborted += r.aborted.len();
                    }
                    last = Some(r);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (committed, aborted)
        })
    };
    let deadline = (seconds > 0.0).then(|| Instant::now() + Duration::from_secs_f64(seconds));
    let counter = Arc::new(AtomicU64::new(0));
    let pid = std::process::id();
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (db, store, log, events, stop_file, counter) = (
                db.clone(),
                store.clone(),
                log.clone(),
                events.clone(),
                stop_file.clone(),
                counter.clone(),
            );
            let name = name.to_owned();
            std::thread::spawn(move || {
                let tm = TransactionManager::builder()
                    .explicit(true)
                    .retry_attempt_count(10)
                    .decision_log(log)
                    .build();
                let mut rng = Rng(u64::from(pid) << 8 | t as u64 | 1);
                while !stop_file.exists() && deadline.is_none_or(|d| Instant::now() < d) {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let uid = format!("{name}-{pid}-{n}");
                    let sq = 2 * rng.below(u64::from(ACCOUNTS / 2)) as u32;
                    let rd = 2 * rng.below(u64::from(ACCOUNTS / 2)) as u32 + 1;
                    let amount = 1 + rng.below(50) as i64;
                    // delta: what moves from SQLite to Redis.
                    let delta = if rng.below(2) == 0 { amount } else { -amount };
                    let outcome = tm.run(|txn| {
                        let conn = db.join(txn)?;
                        let a: i64 = conn.query_row(
                            "SELECT balance FROM account WHERE id = ?1",
                            [sq],
                            |r| r.get(0),
                        )?;
                        let r = store.join(txn)?;
                        let b: i64 = r.get(account_key(rd))?.unwrap_or(0);
                        if a - delta < 0 || b + delta < 0 {
                            return Ok(false);
                        }
                        conn.execute(
                            "UPDATE account SET balance = ?1 WHERE id = ?2",
                            rusqlite::params![a - delta, sq],
                        )?;
                        conn.execute(
                            "INSERT INTO journal (uid, sq, rd, delta) VALUES (?1, ?2, ?3, ?4)",
                            rusqlite::params![uid, sq, rd, delta],
                        )?;
                        r.set(account_key(rd), b + delta)?;
                        r.set(journal_key(&uid), delta)?;
                        Ok::<_, BoxError>(true)
                    });
                    match outcome {
                        Ok(true) => events.line(&format!("ok {uid}")),
                        Ok(false) => events.line(&format!("declined {uid}")),
                        Err(e)
                            if e.downcast_ref::<tm::Error>()
                                .is_some_and(tm::Error::is_heuristic) =>
                        {
                            events.line(&format!("heuristic {uid} {e}"))
                        }
                        Err(e) => events.line(&format!("err {uid} {e}")),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a transfer thread panicked");
    }
    watch_stop.store(true, Ordering::Relaxed);
    let (committed, aborted) = watcher.join().expect("the watcher panicked");
    let passes = service.passes();
    if let Ok(service) = Arc::try_unwrap(service) {
        service.stop();
    }
    events.line(&format!(
        "exit service_committed={committed} service_aborted={aborted} passes={passes}"
    ));
}

/// One worker process.
struct Worker {
    name: String,
    events: PathBuf,
    child: Child,
}

struct Scenario<'a> {
    dir: &'a Path,
    db_path: PathBuf,
    stop_file: PathBuf,
    url: String,
    broken_fence: bool,
    exe: PathBuf,
    spawned: usize,
}

impl Scenario<'_> {
    fn spawn(&mut self, name: &str, seconds: f64) -> Worker {
        self.spawned += 1;
        let events = self.dir.join(format!("events-{name}-{}.log", self.spawned));
        let mut cmd = Command::new(&self.exe);
        cmd.env(ROLE_ENV, name)
            .env("TM_MP_DB", &self.db_path)
            .env("TM_MP_REDIS", &self.url)
            .env("TM_MP_STOP", &self.stop_file)
            .env("TM_MP_SECONDS", seconds.to_string())
            .env("TM_MP_EVENTS", &events);
        if self.broken_fence {
            cmd.env("TM_MP_BROKEN_FENCE", "1");
        }
        Worker {
            name: name.to_owned(),
            events,
            child: cmd.spawn().expect("spawn a worker"),
        }
    }
}

/// A journal row: (SQLite account, Redis account, amount moved from SQLite to Redis).
type JournalEntry = (u32, u32, i64);

/// What the event files say.
#[derive(Default)]
struct Tally {
    ok: BTreeSet<String>,
    declined: BTreeSet<String>,
    err: BTreeMap<String, String>,
    heuristic: BTreeSet<String>,
    /// `<name>-<pid>` of the workers that exited normally: every journal
    /// entry of theirs must have been reported.
    normal_exit_workers: BTreeSet<String>,
    start_committed: usize,
    start_aborted: usize,
    start_deferred: usize,
    service_passes: u64,
    service_committed: usize,
    service_aborted: usize,
    broken_fence: bool,
}

impl Tally {
    fn read(&mut self, path: &Path, normal_exit: bool, prefix: &str) {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for line in text.lines() {
            let mut parts = line.splitn(3, ' ');
            let kind = parts.next().unwrap_or("");
            let rest = parts.next().unwrap_or("").to_owned();
            match kind {
                "ok" => {
                    self.ok.insert(rest);
                }
                "declined" => {
                    self.declined.insert(rest);
                }
                "err" => {
                    self.err.insert(rest, parts.next().unwrap_or("").to_owned());
                }
                "heuristic" => {
                    self.heuristic.insert(rest);
                }
                "recovered" => {
                    for kv in line.split(' ').skip(1) {
                        let (k, v) = kv.split_once('=').unwrap_or(("", "0"));
                        let v: usize = v.parse().unwrap_or(0);
                        match k {
                            "committed" => self.start_committed += v,
                            "aborted" => self.start_aborted += v,
                            "deferred" => self.start_deferred += v,
                            _ => {}
                        }
                    }
                }
                "exit" => {
                    for kv in line.split(' ').skip(1) {
                        let (k, v) = kv.split_once('=').unwrap_or(("", "0"));
                        let v: usize = v.parse().unwrap_or(0);
                        match k {
                            "service_committed" => self.service_committed += v,
                            "service_aborted" => self.service_aborted += v,
                            "passes" => self.service_passes += v as u64,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if normal_exit {
            self.normal_exit_workers.insert(prefix.to_owned());
        }
    }
}

fn wait_for_exit(w: &mut Worker, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        match w.child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(format!("worker {} exited with {status}", w.name)),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = w.child.kill();
                let _ = w.child.wait();
                return Err(format!("worker {} did not stop within {within:?}", w.name));
            }
            Err(e) => return Err(format!("worker {}: {e}", w.name)),
        }
    }
}

/// The checks after every worker has stopped. Returns a summary line.
fn check(
    server: &TestServer,
    db_path: &Path,
    tally: &Tally,
    uid_worker: impl Fn(&str) -> String,
) -> Result<String, Vec<String>> {
    let mut failures = Vec::new();
    let db = open_db(db_path);
    let store = Store::open(&server.url()).expect("open Redis");
    let log = SqliteDecisionLog::new(&db).expect("decision log");
    // No coordinator is alive: presume abort at once.
    let report = tm::recover_with(
        &log,
        &[&store as &dyn Recoverable],
        &RecoveryOptions::new().grace(Duration::ZERO),
    )
    .expect("final recovery");
    if !report.is_clean() {
        failures.push(format!(
            "final recovery not clean: {report}; lost {:?}, errors {:?}",
            report.lost, report.errors
        ));
    }
    if !tally.broken_fence && (!report.committed.is_empty() || !report.aborted.is_empty()) {
        failures.push(format!(
            "the running workers' services left work for the final pass: {report}"
        ));
    }
    if !report.foreign.is_empty() {
        failures.push(format!("foreign records: {:?}", report.foreign));
    }

    // Balances and the journal.
    let (sq_balances, journal): (BTreeMap<u32, i64>, BTreeMap<String, JournalEntry>) = db
        .with_connection(|c| {
            let mut s = c.prepare("SELECT id, balance FROM account")?;
            let b = s
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let mut s = c.prepare("SELECT uid, sq, rd, delta FROM journal")?;
            let j = s
                .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))?
                .collect::<rusqlite::Result<_>>()?;
            Ok((b, j))
        })
        .expect("read SQLite");
    let mut con = server.connection();
    let mut rd_balances = BTreeMap::new();
    for id in (1..ACCOUNTS).step_by(2) {
        let v: Option<i64> = redis::cmd("GET")
            .arg(account_key(id))
            .query(&mut con)
            .expect("GET");
        rd_balances.insert(id, v.unwrap_or(0));
    }
    let total: i64 = sq_balances.values().sum::<i64>() + rd_balances.values().sum::<i64>();
    let expected_total = INITIAL * i64::from(ACCOUNTS);
    if total != expected_total {
        failures.push(format!(
            "total is {total}, expected {expected_total}: money was {}",
            if total > expected_total {
                "created"
            } else {
                "destroyed"
            }
        ));
    }
    let mut expected: BTreeMap<u32, i64> = (0..ACCOUNTS).map(|id| (id, INITIAL)).collect();
    for (sq, rd, delta) in journal.values() {
        *expected.entry(*sq).or_default() -= delta;
        *expected.entry(*rd).or_default() += delta;
    }
    let actual: BTreeMap<u32, i64> = sq_balances.into_iter().chain(rd_balances).collect();
    let off: Vec<_> = expected
        .iter()
        .filter(|(id, e)| actual.get(id) != Some(e))
        .map(|(id, e)| format!("{id}: {:?} (journal says {e})", actual.get(id)))
        .collect();
    if !off.is_empty() {
        failures.push(format!(
            "{} balances disagree with the journal, e.g. {}",
            off.len(),
            off.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    let redis_journal: BTreeSet<String> = {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("mp:journal:*")
            .query(&mut con)
            .expect("KEYS");
        keys.into_iter()
            .map(|k| k["mp:journal:".len()..].to_owned())
            .collect()
    };
    let sqlite_journal: BTreeSet<String> = journal.keys().cloned().collect();
    let only_sqlite: Vec<_> = sqlite_journal.difference(&redis_journal).collect();
    let only_redis: Vec<_> = redis_journal.difference(&sqlite_journal).collect();
    if !only_sqlite.is_empty() || !only_redis.is_empty() {
        let said = |u: Option<&&String>| match u {
            None => String::new(),
            Some(u) if tally.ok.contains(*u) => " (its worker saw Ok)".into(),
            Some(u) if tally.heuristic.contains(*u) => " (its worker saw Heuristic)".into(),
            Some(u) => match tally.err.get(*u) {
                Some(e) => format!(" (its worker saw: {e})"),
                None => " (its worker reported nothing: killed?)".into(),
            },
        };
        failures.push(format!(
            "half-done transfers: {} only in SQLite (e.g. {:?}{}), {} only in Redis (e.g. {:?}{})",
            only_sqlite.len(),
            only_sqlite.first(),
            said(only_sqlite.first()),
            only_redis.len(),
            only_redis.first(),
            said(only_redis.first())
        ));
    }

    // No silent loss, no false failure.
    let ok_missing: Vec<_> = tally
        .ok
        .iter()
        .filter(|u| !sqlite_journal.contains(*u) || !redis_journal.contains(*u))
        .collect();
    if !ok_missing.is_empty() {
        failures.push(format!(
            "{} transfers returned Ok but are not in both stores (silent loss), e.g. {:?}",
            ok_missing.len(),
            ok_missing.first()
        ));
    }
    let err_committed: Vec<_> = tally
        .err
        .iter()
        .filter(|(u, _)| sqlite_journal.contains(*u) || redis_journal.contains(*u))
        .collect();
    if !err_committed.is_empty() {
        failures.push(format!(
            "{} transfers failed with a plain error but were committed, e.g. {:?}",
            err_committed.len(),
            err_committed.first()
        ));
    }
    let declined_committed = tally
        .declined
        .iter()
        .filter(|u| sqlite_journal.contains(*u))
        .count();
    if declined_committed > 0 {
        failures.push(format!(
            "{declined_committed} declined transfers are in the journal"
        ));
    }
    let unreported: Vec<_> = sqlite_journal
        .iter()
        .filter(|u| tally.normal_exit_workers.contains(&uid_worker(u)))
        .filter(|u| !tally.ok.contains(*u) && !tally.heuristic.contains(*u))
        .collect();
    if !unreported.is_empty() {
        failures.push(format!(
            "{} journal entries of normally exited workers were never reported ok, e.g. {:?}",
            unreported.len(),
            unreported.first()
        ));
    }

    // Nothing prepared or locked, nothing pending.
    let tm_keys: Vec<String> = redis::cmd("KEYS")
        .arg("tm:*")
        .query(&mut con)
        .expect("KEYS");
    let held: Vec<_> = tm_keys
        .iter()
        .filter(|k| k.contains(":lock:") || k.contains(":rlock:") || k.contains(":prepared:"))
        .collect();
    if !held.is_empty() {
        failures.push(format!(
            "{} lock or prepared keys left in Redis, e.g. {:?}",
            held.len(),
            held.first()
        ));
    }
    match store.in_doubt() {
        Ok(v) if v.is_empty() => {}
        Ok(v) => failures.push(format!("{} records still in doubt", v.len())),
        Err(e) => failures.push(format!("in_doubt: {e}")),
    }
    match log.pending() {
        Ok(v) if v.is_empty() => {}
        Ok(v) => failures.push(format!("{} decisions still pending", v.len())),
        Err(e) => failures.push(format!("pending: {e}")),
    }

    if failures.is_empty() {
        let mut err_kinds: BTreeMap<String, usize> = BTreeMap::new();
        for msg in tally.err.values() {
            let kind: String = msg
                .split(':')
                .next()
                .unwrap_or("")
                .chars()
                .take(40)
                .collect();
            *err_kinds.entry(kind).or_default() += 1;
        }
        Ok(format!(
            "{} committed, {} declined, {} failed with an error {:?}, {} heuristic; \
             start recoveries committed {} aborted {} deferred {}; \
             services committed {} aborted {} in {} passes; final pass: {report}",
            tally.ok.len(),
            tally.declined.len(),
            tally.err.len(),
            err_kinds,
            tally.heuristic.len(),
            tally.start_committed,
            tally.start_aborted,
            tally.start_deferred,
            tally.service_committed,
            tally.service_aborted,
            tally.service_passes,
        ))
    } else {
        Err(failures)
    }
}

fn setup(server: &TestServer, db_path: &Path) {
    let db = open_db(db_path);
    db.with_connection(|c| {
        for id in (0..ACCOUNTS).step_by(2) {
            c.execute(
                "INSERT INTO account (id, balance) VALUES (?1, ?2)",
                rusqlite::params![id, INITIAL],
            )?;
        }
        Ok(())
    })
    .expect("set up SQLite");
    let mut con = server.connection();
    for id in (1..ACCOUNTS).step_by(2) {
        redis::cmd("SET")
            .arg(account_key(id))
            .arg(INITIAL)
            .exec(&mut con)
            .expect("set up Redis");
    }
}

/// The worker name in a uid (`<name>-<pid>-<n>`) with its instance.
fn worker_of(uid: &str) -> String {
    let mut parts = uid.rsplitn(3, '-');
    let _n = parts.next();
    let pid = parts.next().unwrap_or("");
    let name = parts.next().unwrap_or("");
    format!("{name}-{pid}")
}

/// `steady` workers run the whole time; `restarted` is started `restarts`
/// times, each instance ended by SIGKILL (`kill`) or by running out its
/// `lifetime`, at a random moment.
fn scenario(
    broken_fence: bool,
    rng: &mut Rng,
    steady: &[&str],
    restarts: usize,
    kill: bool,
    lifetime: (u64, u64),
) -> Result<String, Vec<String>> {
    let server = TestServer::builder().fsync_always(true).start();
    let dir = tempfile::tempdir().expect("tempdir");
    let db_path = dir.path().join("bank.db");
    setup(&server, &db_path);
    let mut sc = Scenario {
        dir: dir.path(),
        db_path: db_path.clone(),
        stop_file: dir.path().join("stop"),
        url: server.url(),
        broken_fence,
        exe: std::env::current_exe().expect("current_exe"),
        spawned: 0,
    };
    let mut failures = Vec::new();
    let mut tally = Tally {
        broken_fence,
        ..Tally::default()
    };
    let mut running: Vec<Worker> = steady.iter().map(|n| sc.spawn(n, 0.0)).collect();
    let mut pids = BTreeMap::new();
    for w in &running {
        pids.insert(w.child.id(), true);
    }
    let mut finished = Vec::new();
    for _ in 0..restarts {
        let ms = lifetime.0 + rng.below(lifetime.1 - lifetime.0);
        if kill {
            let mut w = sc.spawn("r", 0.0);
            std::thread::sleep(Duration::from_millis(ms));
            let _ = w.child.kill(); // SIGKILL
            let _ = w.child.wait();
            pids.insert(w.child.id(), false);
            finished.push(w);
        } else {
            let mut w = sc.spawn("r", ms as f64 / 1000.0);
            match wait_for_exit(&mut w, Duration::from_secs(30)) {
                Ok(()) => {
                    pids.insert(w.child.id(), true);
                }
                Err(e) => failures.push(e),
            }
            finished.push(w);
        }
    }
    // The running workers' services must finish what the killed ones left
    // within the grace period plus an interval; the final pass then finds
    // nothing of theirs to do.
    std::thread::sleep(if kill {
        RecoveryOptions::default().grace + Duration::from_millis(1000)
    } else {
        Duration::from_millis(300)
    });
    File::create(&sc.stop_file).expect("create the stop file");
    for w in &mut running {
        if let Err(e) = wait_for_exit(w, Duration::from_secs(30)) {
            failures.push(e);
            pids.insert(w.child.id(), false);
        }
    }
    for w in running.iter().chain(&finished) {
        let normal = pids.get(&w.child.id()).copied().unwrap_or(false);
        tally.read(&w.events, normal, &format!("{}-{}", w.name, w.child.id()));
    }
    if tally.ok.is_empty() {
        failures.push("no transfer committed at all".into());
    }
    match check(&server, &db_path, &tally, worker_of) {
        Ok(summary) if failures.is_empty() => Ok(summary),
        Ok(_) => Err(failures),
        Err(mut f) => {
            failures.append(&mut f);
            Err(failures)
        }
    }
}

fn main() {
    if let Ok(name) = std::env::var(ROLE_ENV) {
        worker(&name);
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("multi_process: test");
        return;
    }
    let broken_fence = args.iter().any(|a| a == "--broken-fence");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    println!(
        "multi_process: seed {seed}{}",
        if broken_fence {
            " (fence BYPASSED: failures expected)"
        } else {
            ""
        }
    );
    let mut rng = Rng(seed);
    type Run = fn(bool, &mut Rng) -> Result<String, Vec<String>>;
    let scenarios: [(&str, Run); 2] = [
        (
            "two_running_one_sigkilled_and_restarted_8_times",
            |b, rng| scenario(b, rng, &["a", "b"], 8, true, (300, 1500)),
        ),
        ("one_running_one_restarted_beside_it_20_times", |b, rng| {
            scenario(b, rng, &["a"], 20, false, (100, 600))
        }),
    ];
    let (mut passed, mut failed) = (0, 0);
    for (name, run) in scenarios {
        let t0 = Instant::now();
        match run(broken_fence, &mut rng) {
            Ok(summary) => {
                passed += 1;
                println!("scenario {name}: ok ({:.1?}): {summary}", t0.elapsed());
            }
            Err(failures) => {
                failed += 1;
                println!("scenario {name}: FAILED ({:.1?})", t0.elapsed());
                for f in failures {
                    println!("  {f}");
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
