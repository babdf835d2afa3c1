//! The crash matrix: a process killed (SIGKILL) at each named point of a
//! two-phase commit, or of the recovery that follows one, leaves nothing
//! half done once `recover` has run.
//!
//! Like sled's crash tests, this binary re-spawns itself: a child (chosen by
//! environment variables) runs one transfer, or one recovery pass, and
//! SIGKILLs itself at the chosen point. Cells that kill a `redis-server`
//! instead run the transfer in this process and kill the server under it.
//! The parent then restarts what died, recovers with grace ZERO (the crashed
//! coordinator is dead, nothing to wait for) and checks:
//! - the transfer happened in every store or in none, as the cell expects,
//!   and the total is exact;
//! - no lock or prepared record is left on any Redis server;
//! - the decision log has nothing pending, and a second pass is empty;
//! - a new transfer on the same keys commits at once.
//!
//! Each cell prints `cell <name>: ok` or `cell <name>: FAILED: <why>`; the
//! last line is `N passed, M failed`. Arguments that are not flags filter
//! the cells by name. `harness = false`: the dispatch needs its own `main`.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use tm::redis::testing::TestServer;
use tm::redis::Store;
use tm::sqlite::{Database, Options, SqliteDecisionLog};
use tm::{
    recover_with, DataManager, Decision, DecisionLog, Error, FileDecisionLog, InDoubt, LogId,
    Outcome, Phase, Recoverable, RecoveryOptions, Transaction, TransactionManager, TxId,
};

const CELL_ENV: &str = "TM_CRASH_CELL";
const STAGE_ENV: &str = "TM_CRASH_STAGE";
const DIR_ENV: &str = "TM_CRASH_DIR";
const REDIS_ENV: &str = "TM_CRASH_REDIS";

const INITIAL: i64 = 100;
/// Filler keys of the big workload: its Redis apply lasts long enough for a
/// server kill to land inside it.
const FILLER: usize = 30_000;

// ------------------------------------------------------------- the cells --

/// Where the decision is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coordinator {
    /// `SqliteDecisionLog` on the SQLite database that takes part: the
    /// decision rides inside SQLite's commit (logging last resource).
    Llr,
    /// `FileDecisionLog` in the cell's directory, two Redis participants.
    File,
}

/// What the transfer touches. Every account starts at `INITIAL`; the deltas
/// of a workload sum to zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// SQLite alice -30, Redis bob +30.
    SqlToRedis,
    /// Redis bob -30, SQLite alice +30.
    RedisToSql,
    /// SQLite alice -30, Redis bob +10 and `{c}:carol` +20 (one store, two
    /// hash tags).
    SqlToTwoKeys,
    /// SQLite alice -30, bob +10 on server 0, carol +20 on server 1.
    SqlToTwoServers,
    /// bob -30 on server 0, carol +30 on server 1.
    RedisToRedis,
    /// One server, two stores with prefixes `a:` and `b:`: bob -30 through
    /// one, carol +30 through the other.
    TwoPrefixes,
    /// `SqlToRedis` plus `FILLER` Redis keys written.
    BigSqlToRedis,
}

/// Where a resource that SIGKILLs the client sorts among the participants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    First,
    /// After the first Redis server, before the second.
    Between,
    Last,
}

/// Where the client dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientKill {
    /// A participant that kills the process in `Phase`, sorted at `Place`.
    At(Phase, Place),
    /// In `record_commit`, before the log is written.
    BeforeRecordCommit,
    /// In `record_commit`, once the log has written it (with SQLite: the row
    /// is in the open transaction, not committed; with a file: fsynced).
    AfterRecordCommit,
    /// Inside SQLite's COMMIT (its commit hook), which is the decision.
    InSqliteCommit,
    /// In an after-commit hook: everything is finished and forgotten.
    AfterCommit,
}

/// Where the recovering process dies (counted over all its resources).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecoveryKill {
    /// In `record_abort`, before the fence is written.
    BeforeFence,
    /// Between the fence (`record_abort`) and the first `abort_prepared`.
    AfterFence,
    /// After the n-th `abort_prepared` (0-based) returned.
    AfterAbort(usize),
    /// Before the n-th `commit_prepared` (0-based).
    BeforeCommitPrepared(usize),
    /// After the n-th `commit_prepared` (0-based) returned.
    AfterCommitPrepared(usize),
}

/// What kills a `redis-server` under a transfer run in the parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerKill {
    /// Server `n` (in the order of their addresses, which is the order the
    /// participants are called in) is killed by a participant in `Phase`
    /// sorted at `Place`.
    At(usize, Phase, Place),
    /// Server 0 is killed by a thread a moment after its finish began (the
    /// participant sorted first starts the thread at `TpcFinish`).
    DuringApply,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Client(ClientKill),
    Recovery(RecoveryKill),
    /// In the parent: a transfer with a server killed under it.
    Server(ServerKill),
    /// In the parent: a recovery pass pointed at a fresh, wrong log (a typo
    /// in a path), which must leave every record alone.
    WrongLog,
}

struct Cell {
    name: &'static str,
    coordinator: Coordinator,
    work: Work,
    stages: &'static [Stage],
    /// Whether the transfer must have happened (in every store).
    happened: bool,
}

const fn cell(
    name: &'static str,
    coordinator: Coordinator,
    work: Work,
    stages: &'static [Stage],
    happened: bool,
) -> Cell {
    Cell {
        name,
        coordinator,
        work,
        stages,
        happened,
    }
}

use ClientKill::*;
use Coordinator::{File, Llr};
use Place::{Between, First, Last};
use Stage::{Client, Recovery, Server, WrongLog};
use Work::*;

// One line per cell: name, coordinator, workload, stages (each child is
// SIGKILLed at its point, in order; a server stage runs in the parent),
// whether the transfer must have happened.
#[rustfmt::skip]
const CELLS: &[Cell] = &[
    // SQLite + Redis, the decision inside SQLite's commit.
    cell("llr_before_tpc_begin", Llr, SqlToRedis, &[Client(At(Phase::TpcBegin, First))], false),
    cell("llr_in_tpc_begin", Llr, RedisToSql, &[Client(At(Phase::TpcBegin, Last))], false),
    cell("llr_in_commit", Llr, SqlToRedis, &[Client(At(Phase::Commit, Last))], false),
    cell("llr_before_redis_vote", Llr, SqlToRedis, &[Client(At(Phase::TpcVote, First))], false),
    cell("llr_after_redis_vote", Llr, SqlToRedis, &[Client(At(Phase::TpcVote, Last))], false),
    cell("llr_after_redis_vote_redis_debited", Llr, RedisToSql, &[Client(At(Phase::TpcVote, Last))], false),
    cell("llr_after_redis_vote_two_keys", Llr, SqlToTwoKeys, &[Client(At(Phase::TpcVote, Last))], false),
    cell("llr_between_redis_votes", Llr, SqlToTwoServers, &[Client(At(Phase::TpcVote, Between))], false),
    cell("llr_after_both_redis_votes", Llr, SqlToTwoServers, &[Client(At(Phase::TpcVote, Last))], false),
    cell("llr_in_decision_before_the_row", Llr, SqlToRedis, &[Client(BeforeRecordCommit)], false),
    cell("llr_in_decision_row_not_committed", Llr, SqlToRedis, &[Client(AfterRecordCommit)], false),
    cell("llr_in_sqlite_commit", Llr, SqlToRedis, &[Client(InSqliteCommit)], false),
    cell("llr_in_sqlite_commit_two_servers", Llr, SqlToTwoServers, &[Client(InSqliteCommit)], false),
    cell("llr_after_decision", Llr, SqlToRedis, &[Client(At(Phase::TpcFinish, First))], true),
    cell("llr_after_decision_redis_debited", Llr, RedisToSql, &[Client(At(Phase::TpcFinish, First))], true),
    cell("llr_after_decision_two_keys", Llr, SqlToTwoKeys, &[Client(At(Phase::TpcFinish, First))], true),
    cell("llr_between_redis_finishes", Llr, SqlToTwoServers, &[Client(At(Phase::TpcFinish, Between))], true),
    cell("llr_after_redis_finish", Llr, SqlToRedis, &[Client(At(Phase::TpcFinish, Last))], true),
    cell("llr_after_commit", Llr, SqlToRedis, &[Client(AfterCommit)], true),
    cell("llr_after_commit_two_servers", Llr, SqlToTwoServers, &[Client(AfterCommit)], true),
    // Two Redis servers, the decision in a FileDecisionLog.
    cell("file_in_tpc_begin", File, RedisToRedis, &[Client(At(Phase::TpcBegin, Last))], false),
    cell("file_before_votes", File, RedisToRedis, &[Client(At(Phase::TpcVote, First))], false),
    cell("file_after_first_vote", File, RedisToRedis, &[Client(At(Phase::TpcVote, Between))], false),
    cell("file_after_second_vote", File, RedisToRedis, &[Client(At(Phase::TpcVote, Last))], false),
    cell("file_in_decision_before_the_record", File, RedisToRedis, &[Client(BeforeRecordCommit)], false),
    cell("file_after_decision_recorded", File, RedisToRedis, &[Client(AfterRecordCommit)], true),
    cell("file_after_decision_before_finishes", File, RedisToRedis, &[Client(At(Phase::TpcFinish, First))], true),
    cell("file_between_finishes", File, RedisToRedis, &[Client(At(Phase::TpcFinish, Between))], true),
    cell("file_after_finishes", File, RedisToRedis, &[Client(At(Phase::TpcFinish, Last))], true),
    cell("file_after_commit", File, RedisToRedis, &[Client(AfterCommit)], true),
    cell("file_two_prefixes_after_votes", File, TwoPrefixes, &[Client(At(Phase::TpcVote, Last))], false),
    cell("file_two_prefixes_after_decision", File, TwoPrefixes, &[Client(AfterRecordCommit)], true),
    // A redis-server SIGKILLed under a live coordinator.
    cell("redis_killed_before_its_vote", Llr, SqlToRedis, &[Server(ServerKill::At(0, Phase::TpcVote, First))], false),
    cell("redis_killed_after_its_vote", Llr, SqlToRedis, &[Server(ServerKill::At(0, Phase::TpcVote, Last))], true),
    cell("redis_killed_after_the_decision", Llr, RedisToSql, &[Server(ServerKill::At(0, Phase::TpcFinish, First))], true),
    cell("redis_killed_during_the_apply", Llr, BigSqlToRedis, &[Server(ServerKill::DuringApply)], true),
    cell("file_second_redis_killed_at_its_vote", File, RedisToRedis, &[Server(ServerKill::At(1, Phase::TpcVote, Between))], false),
    cell("file_second_redis_killed_after_the_decision", File, RedisToRedis, &[Server(ServerKill::At(1, Phase::TpcFinish, Between))], true),
    // Recovery from a fresh, wrong log first: the records are not its own.
    cell("llr_wrong_log_recovers_first_after_decision", Llr, SqlToRedis,
        &[Client(At(Phase::TpcFinish, First)), WrongLog], true),
    cell("file_wrong_log_recovers_first_after_decision", File, RedisToRedis,
        &[Client(AfterRecordCommit), WrongLog], true),
    cell("file_wrong_log_recovers_first_after_votes", File, RedisToRedis,
        &[Client(At(Phase::TpcVote, Last)), WrongLog], false),
    // The recovering process SIGKILLed too.
    cell("recovery_killed_before_its_fence", Llr, SqlToRedis,
        &[Client(At(Phase::TpcVote, Last)), Recovery(RecoveryKill::BeforeFence)], false),
    cell("recovery_killed_between_fence_and_abort", Llr, SqlToRedis,
        &[Client(At(Phase::TpcVote, Last)), Recovery(RecoveryKill::AfterFence)], false),
    cell("file_recovery_killed_between_fence_and_abort", File, RedisToRedis,
        &[Client(At(Phase::TpcVote, Last)), Recovery(RecoveryKill::AfterFence)], false),
    cell("file_recovery_killed_between_two_aborts", File, RedisToRedis,
        &[Client(At(Phase::TpcVote, Last)), Recovery(RecoveryKill::AfterAbort(0))], false),
    cell("recovery_killed_before_commit_prepared", Llr, SqlToRedis,
        &[Client(At(Phase::TpcFinish, First)), Recovery(RecoveryKill::BeforeCommitPrepared(0))], true),
    cell("file_recovery_killed_between_two_commit_prepared", File, RedisToRedis,
        &[Client(At(Phase::TpcFinish, First)), Recovery(RecoveryKill::BeforeCommitPrepared(1))], true),
    cell("llr_recovery_killed_between_two_commit_prepared", Llr, SqlToTwoServers,
        &[Client(At(Phase::TpcFinish, First)), Recovery(RecoveryKill::AfterCommitPrepared(0))], true),
    cell("file_recovery_killed_after_every_commit_prepared", File, RedisToRedis,
        &[Client(AfterRecordCommit), Recovery(RecoveryKill::AfterCommitPrepared(1))], true),
    cell("file_recovery_killed_twice", File, RedisToRedis,
        &[Client(At(Phase::TpcFinish, First)),
          Recovery(RecoveryKill::AfterCommitPrepared(0)),
          Recovery(RecoveryKill::BeforeCommitPrepared(0))], true),
];

fn cell_named(name: &str) -> &'static Cell {
    CELLS
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("unknown cell {name}"))
}

// ------------------------------------------------------------ the stores --

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loc {
    Sql,
    /// Index into `Work::stores`.
    Redis(usize),
}

impl Work {
    /// The Redis stores: (server index, prefix).
    fn stores(self) -> &'static [(usize, &'static str)] {
        match self {
            SqlToRedis | RedisToSql | SqlToTwoKeys | BigSqlToRedis => &[(0, "tm:")],
            SqlToTwoServers | RedisToRedis => &[(0, "tm:"), (1, "tm:")],
            TwoPrefixes => &[(0, "a:"), (0, "b:")],
        }
    }

    fn servers(self) -> usize {
        self.stores().iter().map(|(s, _)| s + 1).max().unwrap_or(0)
    }

    /// (where, key, delta)
    fn accounts(self) -> &'static [(Loc, &'static str, i64)] {
        match self {
            SqlToRedis | BigSqlToRedis => &[(Loc::Sql, "alice", -30), (Loc::Redis(0), "bob", 30)],
            RedisToSql => &[(Loc::Redis(0), "bob", -30), (Loc::Sql, "alice", 30)],
            SqlToTwoKeys => &[
                (Loc::Sql, "alice", -30),
                (Loc::Redis(0), "bob", 10),
                (Loc::Redis(0), "{c}:carol", 20),
            ],
            SqlToTwoServers => &[
                (Loc::Sql, "alice", -30),
                (Loc::Redis(0), "bob", 10),
                (Loc::Redis(1), "carol", 20),
            ],
            RedisToRedis | TwoPrefixes => {
                &[(Loc::Redis(0), "bob", -30), (Loc::Redis(1), "carol", 30)]
            }
        }
    }
}

/// Everything one process (parent or child) opens for a cell.
struct World {
    db: Option<Database>,
    stores: Vec<Store>,
    log: Arc<dyn DecisionLog>,
}

fn open_db(dir: &Path) -> Database {
    Database::open_with(
        dir.join("bank.db"),
        Options::default().setup_sql(
            "CREATE TABLE IF NOT EXISTS account (id TEXT PRIMARY KEY, balance INTEGER NOT NULL)",
        ),
    )
    .expect("open SQLite")
}

fn open_world(cell: &Cell, dir: &Path, urls: &[String]) -> Result<World, String> {
    let stores = cell
        .work
        .stores()
        .iter()
        .map(|(server, prefix)| {
            Store::open_with(&urls[*server], tm::redis::Options::default().prefix(prefix))
                .map_err(|e| format!("open Redis: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (db, log): (Option<Database>, Arc<dyn DecisionLog>) = match cell.coordinator {
        Llr => {
            let db = open_db(dir);
            let log = SqliteDecisionLog::new(&db).map_err(|e| format!("SQLite log: {e}"))?;
            (Some(db), Arc::new(log))
        }
        File => {
            let log = FileDecisionLog::open(dir.join("decisions.log"))
                .map_err(|e| format!("file log: {e}"))?;
            (None, Arc::new(log))
        }
    };
    Ok(World { db, stores, log })
}

impl World {
    fn balance(&self, loc: Loc, key: &str) -> Result<i64, String> {
        match loc {
            Loc::Sql => self
                .db
                .as_ref()
                .expect("an SQLite account needs the database")
                .with_connection(|c| {
                    c.query_row("SELECT balance FROM account WHERE id = ?1", [key], |r| {
                        r.get(0)
                    })
                })
                .map_err(|e| format!("read {key}: {e}")),
            Loc::Redis(i) => self.stores[i]
                .get::<i64>(key)
                .map_err(|e| format!("read {key}: {e}"))?
                .ok_or_else(|| format!("{key} is gone from Redis")),
        }
    }

    /// The transfer of `work`, staged in `txn`.
    fn transfer(&self, txn: &Transaction, work: Work) -> Result<(), Error> {
        for &(loc, key, delta) in work.accounts() {
            match loc {
                Loc::Sql => {
                    self.db
                        .as_ref()
                        .expect("database")
                        .join(txn)?
                        .execute(
                            "UPDATE account SET balance = balance + ?1 WHERE id = ?2",
                            rusqlite::params![delta, key],
                        )
                        .map_err(|e| Error::resource("sqlite", e))?;
                }
                Loc::Redis(i) => {
                    let r = self.stores[i].join(txn)?;
                    let v: i64 = r.get(key)?.unwrap_or(0);
                    r.set(key, v + delta)?;
                }
            }
        }
        if work == BigSqlToRedis {
            let r = self.stores[0].join(txn)?;
            for i in 0..FILLER {
                r.set(format!("filler:{i}"), i)?;
            }
        }
        Ok(())
    }

    fn manager(&self, log: Arc<dyn DecisionLog>) -> TransactionManager {
        TransactionManager::builder()
            .explicit(true)
            .decision_log(log)
            .build()
    }

    /// The sort key of a participant placed at `place`.
    fn sort_key(&self, place: Place) -> String {
        match place {
            Place::First => "!killer".to_owned(),
            Place::Last => "~killer".to_owned(),
            Place::Between => {
                // Redis participants sort by server address.
                let mut servers: Vec<&str> = self.stores.iter().map(|s| s.server()).collect();
                servers.sort();
                servers.dedup();
                assert_eq!(servers.len(), 2, "Between needs two Redis servers");
                format!("{}~", servers[0])
            }
        }
    }
}

// ------------------------------------------------------------ the killers --

fn sigkill_self() -> ! {
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg(std::process::id().to_string())
        .status();
    // SIGKILL is not instantaneous; never return into the protocol.
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A participant that runs `action` in the phase it was built for.
struct Trap {
    at: Phase,
    key: String,
    action: Box<dyn Fn() + Send + Sync>,
}

impl Trap {
    fn check(&self, phase: Phase) -> tm::Result<()> {
        if phase == self.at {
            (self.action)();
        }
        Ok(())
    }
}

impl DataManager for Trap {
    fn sort_key(&self) -> &str {
        &self.key
    }
    fn abort(&self, _: &Transaction) -> tm::Result<()> {
        Ok(())
    }
    fn tpc_begin(&self, _: &Transaction) -> tm::Result<()> {
        self.check(Phase::TpcBegin)
    }
    fn commit(&self, _: &Transaction) -> tm::Result<()> {
        self.check(Phase::Commit)
    }
    fn tpc_vote(&self, _: &Transaction) -> tm::Result<()> {
        self.check(Phase::TpcVote)
    }
    fn tpc_finish(&self, _: &Transaction) -> tm::Result<()> {
        self.check(Phase::TpcFinish)
    }
    fn tpc_abort(&self, _: &Transaction) -> tm::Result<()> {
        Ok(())
    }
}

/// A decision log that SIGKILLs the process at a chosen call.
struct KillingLog {
    inner: Arc<dyn DecisionLog>,
    commit: Option<ClientKill>,
    abort: Option<RecoveryKill>,
}

impl DecisionLog for KillingLog {
    fn id(&self) -> LogId {
        self.inner.id()
    }
    fn record_commit(&self, decision: &Decision) -> tm::Result<()> {
        if self.commit == Some(BeforeRecordCommit) {
            sigkill_self();
        }
        self.inner.record_commit(decision)?;
        if self.commit == Some(AfterRecordCommit) {
            sigkill_self();
        }
        Ok(())
    }
    fn record_abort(&self, txid: &TxId) -> tm::Result<Outcome> {
        if self.abort == Some(RecoveryKill::BeforeFence) {
            sigkill_self();
        }
        let outcome = self.inner.record_abort(txid)?;
        if self.abort == Some(RecoveryKill::AfterFence) {
            sigkill_self();
        }
        Ok(outcome)
    }
    fn forget(&self, txid: &TxId) -> tm::Result<()> {
        self.inner.forget(txid)
    }
    fn pending(&self) -> tm::Result<Vec<Decision>> {
        self.inner.pending()
    }
}

/// A Redis store, as recovery sees it, that SIGKILLs the process at the
/// n-th `commit_prepared` / `abort_prepared`, counted over every store.
struct KillingStore<'a> {
    inner: &'a Store,
    kill: RecoveryKill,
    commits: &'a AtomicUsize,
    aborts: &'a AtomicUsize,
}

impl Recoverable for KillingStore<'_> {
    fn resource_id(&self) -> String {
        self.inner.resource_id()
    }
    fn in_doubt(&self) -> tm::Result<Vec<InDoubt>> {
        self.inner.in_doubt()
    }
    fn commit_prepared(&self, txid: &TxId) -> tm::Result<()> {
        let n = self.commits.fetch_add(1, Ordering::SeqCst);
        if self.kill == RecoveryKill::BeforeCommitPrepared(n) {
            sigkill_self();
        }
        self.inner.commit_prepared(txid)?;
        if self.kill == RecoveryKill::AfterCommitPrepared(n) {
            sigkill_self();
        }
        Ok(())
    }
    fn abort_prepared(&self, txid: &TxId) -> tm::Result<()> {
        let n = self.aborts.fetch_add(1, Ordering::SeqCst);
        self.inner.abort_prepared(txid)?;
        if self.kill == RecoveryKill::AfterAbort(n) {
            sigkill_self();
        }
        Ok(())
    }
}

// ------------------------------------------------------------- the child --

fn child(cell: &Cell, stage: usize, dir: &Path, urls: &[String]) {
    let world = open_world(cell, dir, urls).expect("open the stores");
    match cell.stages[stage] {
        Client(kill) => {
            let log = Arc::new(KillingLog {
                inner: world.log.clone(),
                commit: Some(kill),
                abort: None,
            });
            let tm = world.manager(log);
            let txn = tm.begin().expect("begin");
            if let At(phase, place) = kill {
                txn.join(Arc::new(Trap {
                    at: phase,
                    key: world.sort_key(place),
                    action: Box::new(|| sigkill_self()),
                }))
                .expect("join the killer");
            }
            if kill == AfterCommit {
                txn.add_after_commit_hook(|ok, _| {
                    assert!(ok);
                    sigkill_self();
                });
            }
            world.transfer(&txn, cell.work).expect("stage the transfer");
            if kill == InSqliteCommit {
                let db = world.db.as_ref().expect("database");
                db.join(&txn)
                    .expect("join SQLite")
                    .commit_hook(Some(|| -> bool { sigkill_self() }));
            }
            let outcome = txn.commit();
            panic!("the child should have been killed, commit returned {outcome:?}");
        }
        Recovery(kill) => {
            let log = KillingLog {
                inner: world.log.clone(),
                commit: None,
                abort: Some(kill),
            };
            let (commits, aborts) = (AtomicUsize::new(0), AtomicUsize::new(0));
            let stores: Vec<KillingStore> = world
                .stores
                .iter()
                .map(|s| KillingStore {
                    inner: s,
                    kill,
                    commits: &commits,
                    aborts: &aborts,
                })
                .collect();
            let resources: Vec<&dyn Recoverable> =
                stores.iter().map(|s| s as &dyn Recoverable).collect();
            let report = recover_with(&log, &resources, &no_grace());
            panic!("the recovering child should have been killed, recover returned {report:?}");
        }
        Server(_) | WrongLog => unreachable!("runs in the parent"),
    }
}

fn no_grace() -> RecoveryOptions {
    RecoveryOptions::new().grace(Duration::ZERO)
}

// ------------------------------------------------------------ the parent --

/// The transfer with a redis-server killed under it, in this process.
fn server_stage(
    cell: &Cell,
    kill: ServerKill,
    dir: &Path,
    urls: &[String],
    servers: &[Arc<Mutex<TestServer>>],
) -> Result<String, String> {
    let world = open_world(cell, dir, urls)?;
    let tm = world.manager(world.log.clone());
    let txn = tm.begin().map_err(|e| e.to_string())?;
    let killer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::default();
    let (at, place, action): (Phase, Place, Box<dyn Fn() + Send + Sync>) = match kill {
        ServerKill::At(n, phase, place) => {
            // n counts in the order the participants are called: by address.
            let mut by_address: Vec<&Arc<Mutex<TestServer>>> = servers.iter().collect();
            by_address.sort_by_key(|s| s.lock().url());
            let server = by_address[n].clone();
            (phase, place, Box::new(move || server.lock().kill()))
        }
        ServerKill::DuringApply => {
            let (server, killer) = (servers[0].clone(), killer.clone());
            let url = urls[0].clone();
            let action = move || {
                let server = server.clone();
                let url = url.clone();
                *killer.lock() = Some(std::thread::spawn(move || {
                    // The apply is one function call: while it runs the server
                    // answers nobody, so a PING that stalls means "inside it".
                    let client = redis::Client::open(url).expect("url");
                    let mut con = client.get_connection().expect("connect");
                    con.set_read_timeout(Some(Duration::from_millis(3)))
                        .expect("read timeout");
                    let deadline = Instant::now() + Duration::from_secs(2);
                    let mut busy = false;
                    while Instant::now() < deadline {
                        if redis::cmd("PING").query::<String>(&mut con).is_err() {
                            busy = true;
                            break;
                        }
                    }
                    server.lock().kill();
                    BUSY_AT_KILL.store(busy, Ordering::SeqCst);
                }));
            };
            (Phase::TpcFinish, First, Box::new(action))
        }
    };
    txn.join(Arc::new(Trap {
        at,
        key: world.sort_key(place),
        action,
    }))
    .map_err(|e| e.to_string())?;
    world.transfer(&txn, cell.work).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let outcome = txn.commit();
    let took = started.elapsed();
    if let Some(t) = killer.lock().take() {
        t.join().map_err(|_| "the killer thread panicked")?;
    }
    let _ = tm.abort();
    // What the live coordinator was told must match what happened: never Ok
    // with a part missing, never a plain error after the decision.
    match (&outcome, cell.happened) {
        (Err(Error::Heuristic { in_doubt, .. }), true) if !in_doubt.is_empty() => {}
        (Ok(()), true) if kill == ServerKill::DuringApply => {} // applied before the kill
        (Err(e), false) if !e.is_heuristic() => {}
        _ => return Err(format!("the coordinator was told {outcome:?}")),
    }
    for server in servers {
        let mut server = server.lock();
        if !server.is_running() {
            server.restart();
        }
    }
    let told = match &outcome {
        Ok(()) => "Ok",
        Err(e) if e.is_heuristic() => "Heuristic",
        Err(_) => "an error",
    };
    let busy = if kill == ServerKill::DuringApply {
        if BUSY_AT_KILL.load(Ordering::SeqCst) {
            ", killed inside the apply"
        } else {
            ", killed outside the apply"
        }
    } else {
        ""
    };
    Ok(format!(
        "the coordinator was told {told} after {took:.0?}{busy}"
    ))
}

/// A recovery pass with a fresh log: every record is another log's.
fn wrong_log_stage(cell: &Cell, dir: &Path, urls: &[String]) -> Result<String, String> {
    let world = open_world(cell, dir, urls)?;
    let wrong = FileDecisionLog::open(dir.join("wrong.log")).map_err(|e| e.to_string())?;
    let resources: Vec<&dyn Recoverable> =
        world.stores.iter().map(|s| s as &dyn Recoverable).collect();
    let report = recover_with(&wrong, &resources, &no_grace()).map_err(|e| e.to_string())?;
    if !(report.committed.is_empty() && report.aborted.is_empty() && report.is_clean())
        || report.foreign.is_empty()
    {
        return Err(format!("a wrong log touched the records: {report:?}"));
    }
    Ok(format!(
        "a fresh log left {} foreign record(s) alone",
        report.foreign.len()
    ))
}

/// Whether the server was busy (inside the apply) when the killer struck.
static BUSY_AT_KILL: AtomicBool = AtomicBool::new(false);

/// tm's own keys that must not outlive recovery: locks and prepared records.
fn leftovers(server: &TestServer) -> Result<Vec<String>, String> {
    let mut left = Vec::new();
    for kind in ["lock", "rlock", "prepared"] {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("*}}:{kind}:*"))
            .query(&mut server.connection())
            .map_err(|e| e.to_string())?;
        left.extend(keys);
    }
    Ok(left)
}

fn run_cell(cell: &Cell, exe: &Path) -> Result<String, String> {
    let servers: Vec<Arc<Mutex<TestServer>>> = (0..cell.work.servers())
        .map(|_| Arc::new(Mutex::new(TestServer::builder().fsync_always(true).start())))
        .collect();
    let urls: Vec<String> = servers.iter().map(|s| s.lock().url()).collect();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let accounts = cell.work.accounts();
    if cell.coordinator == Llr {
        let db = open_db(dir.path());
        for &(loc, key, _) in accounts {
            if loc == Loc::Sql {
                db.with_connection(|c| {
                    c.execute(
                        "INSERT INTO account VALUES (?1, ?2)",
                        rusqlite::params![key, INITIAL],
                    )
                })
                .map_err(|e| e.to_string())?;
            }
        }
    }
    let stores = cell.work.stores();
    for &(loc, key, _) in accounts {
        if let Loc::Redis(i) = loc {
            redis::cmd("SET")
                .arg(key)
                .arg(INITIAL)
                .exec(&mut servers[stores[i].0].lock().connection())
                .map_err(|e| e.to_string())?;
        }
    }

    let mut notes = Vec::new();
    for (n, stage) in cell.stages.iter().enumerate() {
        if let Server(kill) = *stage {
            notes.push(
                server_stage(cell, kill, dir.path(), &urls, &servers)
                    .map_err(|e| format!("stage {n}: {e}"))?,
            );
            continue;
        }
        if *stage == WrongLog {
            notes.push(
                wrong_log_stage(cell, dir.path(), &urls).map_err(|e| format!("stage {n}: {e}"))?,
            );
            continue;
        }
        let status = Command::new(exe)
            .env(CELL_ENV, cell.name)
            .env(STAGE_ENV, n.to_string())
            .env(DIR_ENV, dir.path())
            .env(REDIS_ENV, urls.join(" "))
            .stderr(std::process::Stdio::piped())
            .output()
            .map_err(|e| e.to_string())?;
        if status.status.signal() != Some(9) {
            return Err(format!(
                "stage {n}: the child was not SIGKILLed ({}): {}",
                status.status,
                String::from_utf8_lossy(&status.stderr).trim()
            ));
        }
    }

    // Restart: recover, then check.
    let world = open_world(cell, dir.path(), &urls)?;
    let resources: Vec<&dyn Recoverable> =
        world.stores.iter().map(|s| s as &dyn Recoverable).collect();
    let report = recover_with(world.log.as_ref(), &resources, &no_grace())
        .map_err(|e| format!("recover: {e}"))?;
    if !report.nothing_in_doubt() {
        return Err(format!("recovery left something in doubt: {report:?}"));
    }
    notes.insert(0, report.to_string());
    let summary = notes.join("; ");
    let again = recover_with(world.log.as_ref(), &resources, &no_grace())
        .map_err(|e| format!("recover again: {e}"))?;
    if !again.is_empty() {
        return Err(format!(
            "a second recovery pass still found work: {again:?}"
        ));
    }
    let check = |times: i64| -> Result<(), String> {
        let mut total = 0;
        let mut got = Vec::new();
        let mut want = Vec::new();
        for &(loc, key, delta) in accounts {
            let v = world.balance(loc, key)?;
            total += v;
            got.push(v);
            want.push(INITIAL + delta * times);
        }
        if total != INITIAL * accounts.len() as i64 {
            return Err(format!("the total is {total}: balances {got:?}"));
        }
        if got != want {
            return Err(format!("balances {got:?}, expected {want:?} ({summary})"));
        }
        Ok(())
    };
    let done = i64::from(cell.happened);
    check(done)?;
    for server in &servers {
        let left = leftovers(&server.lock())?;
        if !left.is_empty() {
            return Err(format!("left on Redis after recovery: {left:?}"));
        }
    }
    let pending = world.log.pending().map_err(|e| e.to_string())?;
    if !pending.is_empty() {
        return Err(format!("decisions left pending: {pending:?}"));
    }
    // No lock is left: the same transfer again commits at once.
    let tm = world.manager(world.log.clone());
    tm.run(|txn| world.transfer(txn, cell.work))
        .map_err(|e| format!("a transfer after recovery failed: {e}"))?;
    check(done + 1)?;
    Ok(summary)
}

fn parent(filters: &[String]) -> bool {
    let exe = std::env::current_exe().expect("current exe");
    let started = Instant::now();
    let (mut passed, mut failed) = (0, 0);
    for cell in CELLS {
        if !filters.is_empty() && !filters.iter().any(|f| cell.name.contains(f.as_str())) {
            continue;
        }
        match run_cell(cell, &exe) {
            Ok(summary) => {
                passed += 1;
                println!("cell {}: ok ({summary})", cell.name);
            }
            Err(why) => {
                failed += 1;
                println!("cell {}: FAILED: {why}", cell.name);
            }
        }
    }
    eprintln!("crash matrix: {:.1?}", started.elapsed());
    println!("{passed} passed, {failed} failed");
    failed == 0
}

fn main() {
    if let Ok(name) = std::env::var(CELL_ENV) {
        let stage: usize = std::env::var(STAGE_ENV)
            .expect(STAGE_ENV)
            .parse()
            .expect("stage");
        let dir = PathBuf::from(std::env::var(DIR_ENV).expect(DIR_ENV));
        let urls: Vec<String> = std::env::var(REDIS_ENV)
            .expect(REDIS_ENV)
            .split(' ')
            .map(str::to_owned)
            .collect();
        child(cell_named(&name), stage, &dir, &urls);
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for cell in CELLS {
            println!("{}: test", cell.name);
        }
        return;
    }
    let filters: Vec<String> = args.into_iter().filter(|a| !a.starts_with('-')).collect();
    if !parent(&filters) {
        std::process::exit(1);
    }
}
