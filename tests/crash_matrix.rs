//! The crash matrix: a process killed (SIGKILL) at each named point of a
//! two-phase commit over SQLite and Redis leaves nothing half done once
//! `recover` has run.
//!
//! Like sled's crash tests, this binary re-spawns itself: the child (chosen
//! by an environment variable) runs one transfer — debit an SQLite row,
//! credit a Redis key — and SIGKILLs itself at the chosen point; the parent
//! then recovers with the SQLite decision log (logging last resource) and
//! checks that the transfer happened in both stores or in neither, and that
//! no lock or prepared record is left behind.
//!
//! `harness = false`: the parent/child dispatch needs its own `main`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use tm::redis::testing::TestServer;
use tm::redis::Store;
use tm::sqlite::{Database, Options, SqliteDecisionLog};
use tm::{DataManager, Phase, Recoverable, Transaction, TransactionManager};

const CHILD_ENV: &str = "TM_CRASH_MATRIX_CHILD";

/// Where the child dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    /// In `tpc_begin`, before anything is staged.
    TpcBegin,
    /// In `commit`, after both stores staged their changes.
    Commit,
    /// After Redis prepared (durably), before the decision.
    AfterPrepare,
    /// After the decision (SQLite committed with the decision row), before
    /// Redis's `tpc_finish`: Redis is in doubt.
    AfterDecision,
    /// In an after-commit hook: everything is finished.
    AfterCommit,
}

const POINTS: [(Point, &str, bool); 5] = [
    // (point, name, transfer expected to have happened)
    (Point::TpcBegin, "tpc_begin", false),
    (Point::Commit, "commit", false),
    (Point::AfterPrepare, "after_prepare", false),
    (Point::AfterDecision, "after_decision", true),
    (Point::AfterCommit, "after_commit", true),
];

fn point_named(name: &str) -> Point {
    POINTS
        .iter()
        .find(|(_, n, _)| *n == name)
        .map(|(p, _, _)| *p)
        .unwrap_or_else(|| panic!("unknown crash point {name}"))
}

fn sigkill_self() -> ! {
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg(std::process::id().to_string())
        .status();
    // SIGKILL is not instantaneous; never return into the protocol.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// A resource that kills the process in the phase it was built for.
struct Killer {
    at: Phase,
    key: &'static str,
}

impl Killer {
    fn check(&self, phase: Phase) -> tm::Result<()> {
        if phase == self.at {
            sigkill_self();
        }
        Ok(())
    }
}

impl DataManager for Killer {
    fn sort_key(&self) -> &str {
        self.key
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

fn open_db(path: &Path) -> Database {
    Database::open_with(
        path,
        Options::default().setup_sql(
            "CREATE TABLE IF NOT EXISTS account (id TEXT PRIMARY KEY, balance INTEGER NOT NULL)",
        ),
    )
    .expect("open SQLite")
}

fn child(point: Point, db_path: &Path, redis_url: &str) {
    let db = open_db(db_path);
    let store = Store::open(redis_url).expect("open Redis");
    let log = Arc::new(SqliteDecisionLog::new(&db).expect("decision log"));
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(log)
        .build();
    let txn = tm.begin().expect("begin");
    // Sort keys place the killer: "!" before every store, "~" after them.
    let killer = match point {
        Point::TpcBegin => Some(Killer {
            at: Phase::TpcBegin,
            key: "~killer",
        }),
        Point::Commit => Some(Killer {
            at: Phase::Commit,
            key: "~killer",
        }),
        Point::AfterPrepare => Some(Killer {
            at: Phase::TpcVote,
            key: "~killer",
        }),
        Point::AfterDecision => Some(Killer {
            at: Phase::TpcFinish,
            key: "!killer",
        }),
        Point::AfterCommit => None,
    };
    if let Some(k) = killer {
        txn.join(Arc::new(k)).expect("join killer");
    }
    if point == Point::AfterCommit {
        txn.add_after_commit_hook(|ok, _| {
            assert!(ok);
            sigkill_self();
        });
    }
    {
        let conn = db.join(&txn).expect("join SQLite");
        conn.execute(
            "UPDATE account SET balance = balance - 30 WHERE id = 'alice'",
            [],
        )
        .expect("debit");
    }
    let redis = store.join(&txn).expect("join Redis");
    let bob: i64 = redis.get("bob").expect("read bob").unwrap_or(0);
    redis.set("bob", bob + 30).expect("credit");
    let outcome = txn.commit();
    panic!("the child should have been killed at {point:?}, commit returned {outcome:?}");
}

fn balances(db: &Database, store: &Store) -> (i64, i64) {
    let alice: i64 = db
        .with_connection(|c| {
            c.query_row("SELECT balance FROM account WHERE id = 'alice'", [], |r| {
                r.get(0)
            })
        })
        .expect("read alice");
    let bob: i64 = store.get::<i64>("bob").expect("read bob").unwrap_or(0);
    (alice, bob)
}

fn parent() -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut failures = Vec::new();
    for (_, name, happened) in POINTS {
        let server = TestServer::builder().fsync_always(true).start();
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let db_path = dir.path().join("bank.db");
        {
            let db = open_db(&db_path);
            db.with_connection(|c| {
                c.execute("INSERT INTO account VALUES ('alice', 100)", [])
                    .map(|_| ())
            })
            .map_err(|e| e.to_string())?;
            let mut con = server.connection();
            redis::cmd("SET")
                .arg("bob")
                .arg(0)
                .exec(&mut con)
                .map_err(|e| e.to_string())?;
        }

        let status = Command::new(&exe)
            .env(CHILD_ENV, name)
            .env("TM_CRASH_DB", &db_path)
            .env("TM_CRASH_REDIS", server.url())
            .status()
            .map_err(|e| e.to_string())?;
        use std::os::unix::process::ExitStatusExt;
        if status.signal() != Some(9) {
            failures.push(format!("{name}: the child was not SIGKILLed ({status})"));
            continue;
        }

        // Restart: recover, then check both stores agree.
        let db = open_db(&db_path);
        let store = Store::open(&server.url()).map_err(|e| e.to_string())?;
        let log = SqliteDecisionLog::new(&db).map_err(|e| e.to_string())?;
        let report = tm::recover(&log, &[&store as &dyn Recoverable]).map_err(|e| e.to_string())?;
        if !report.is_clean() {
            failures.push(format!("{name}: recovery errors {:?}", report.errors));
            continue;
        }
        let (alice, bob) = balances(&db, &store);
        let expected = if happened { (70, 30) } else { (100, 0) };
        if (alice, bob) != expected {
            failures.push(format!(
                "{name}: after recovery alice={alice} bob={bob}, expected {expected:?} (report {report:?})"
            ));
            continue;
        }
        if !store.in_doubt().map_err(|e| e.to_string())?.is_empty() {
            failures.push(format!("{name}: a prepared record is left after recovery"));
        }
        use tm::DecisionLog;
        if !log.pending().map_err(|e| e.to_string())?.is_empty() {
            failures.push(format!("{name}: a decision is left pending after recovery"));
        }
        // No lock is left: a new transfer on the same keys commits at once.
        let tm = TransactionManager::explicit();
        let again = tm.run(|txn| {
            db.join(txn)?.execute(
                "UPDATE account SET balance = balance - 1 WHERE id = 'alice'",
                [],
            )?;
            let r = store.join(txn)?;
            let bob: i64 = r.get("bob")?.unwrap_or(0);
            r.set("bob", bob + 1)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        });
        if let Err(e) = again {
            failures.push(format!("{name}: a transfer after recovery failed: {e}"));
            continue;
        }
        let (alice2, bob2) = balances(&db, &store);
        if (alice2, bob2) != (expected.0 - 1, expected.1 + 1) {
            failures.push(format!(
                "{name}: the transfer after recovery gave {alice2}/{bob2}"
            ));
        }
        println!(
            "crash at {name:<15} recovered: committed {} aborted {} -> alice={alice} bob={bob} ok",
            report.committed.len(),
            report.aborted.len()
        );
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

fn main() {
    if let Ok(name) = std::env::var(CHILD_ENV) {
        let db = std::env::var("TM_CRASH_DB").expect("TM_CRASH_DB");
        let url = std::env::var("TM_CRASH_REDIS").expect("TM_CRASH_REDIS");
        child(point_named(&name), Path::new(&db), &url);
        return;
    }
    // `cargo test -- <filter>` passes arguments; this binary has one test.
    if std::env::args().skip(1).any(|a| a == "--list") {
        println!("crash_matrix: test");
        return;
    }
    match parent() {
        Ok(()) => println!("test crash_matrix ... ok"),
        Err(e) => {
            eprintln!("test crash_matrix ... FAILED\n{e}");
            std::process::exit(1);
        }
    }
}
