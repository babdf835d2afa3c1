//! Redis and SQLite in one transaction: success changes both; a failure at
//! any phase before the decision leaves both unchanged; a failure after it
//! is heuristic and recovery finishes it. Real SQLite files and a real
//! redis-server started by the test; `TestDataManager` injects the faults.

use std::sync::Arc;

use parking_lot::Mutex;

use tm::redis::testing::TestServer;
use tm::redis::Store;
use tm::sqlite::{Database, Options, SqliteDecisionLog};
use tm::testing::{CallLog, Fault, TestDataManager};
use tm::{
    recover, recover_with, DataManager, Error, Phase, Recoverable, RecoveryOptions, Transaction,
    TransactionManager, TransactionManagerBuilder,
};

struct Stores {
    _dir: tempfile::TempDir,
    server: Arc<Mutex<TestServer>>,
    redis: Store,
    db: Database,
}

fn stores() -> Stores {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::builder().fsync_always(true).start();
    let redis = Store::open(&server.url()).unwrap();
    let db = Database::open_with(
        dir.path().join("app.db"),
        Options::default().setup_sql(
            "PRAGMA foreign_keys = ON;
             CREATE TABLE IF NOT EXISTS account (name TEXT PRIMARY KEY, balance INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS owner (name TEXT PRIMARY KEY);
             CREATE TABLE IF NOT EXISTS pet (name TEXT PRIMARY KEY,
                 owner TEXT REFERENCES owner(name) DEFERRABLE INITIALLY DEFERRED);",
        ),
    )
    .unwrap();
    db.with_connection(|c| c.execute("INSERT INTO account VALUES ('alice', 100)", []))
        .unwrap();
    let mut con = server.connection();
    redis::cmd("SET").arg("bob").arg(0).exec(&mut con).unwrap();
    Stores {
        _dir: dir,
        server: Arc::new(Mutex::new(server)),
        redis,
        db,
    }
}

impl Stores {
    /// (alice's balance in SQLite, bob's balance in Redis).
    fn balances(&self) -> (i64, i64) {
        let alice = self
            .db
            .with_connection(|c| {
                c.query_row(
                    "SELECT balance FROM account WHERE name = 'alice'",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap();
        (alice, self.redis.get::<i64>("bob").unwrap().unwrap_or(0))
    }

    /// An explicit manager whose decisions ride inside SQLite's commit
    /// (logging last resource): SQLite beside Redis needs it.
    fn manager(&self) -> TransactionManagerBuilder {
        TransactionManager::builder()
            .explicit(true)
            .decision_log(Arc::new(SqliteDecisionLog::new(&self.db).unwrap()))
    }

    /// Nothing of tm's is left on the Redis server: no lock, no prepared
    /// record (tombstones and receipts aside, which expire on their own, and
    /// the store's id, which is kept).
    fn assert_no_redis_leftovers(&self) {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("tm:*")
            .query(&mut self.server.lock().connection())
            .unwrap();
        let left: Vec<_> = keys
            .iter()
            .filter(|k| {
                !k.contains(":aborted:") && !k.contains(":applied:") && !k.ends_with("}:store-id")
            })
            .collect();
        assert!(left.is_empty(), "left on redis: {left:?}");
    }

    /// Moves 10 from alice (SQLite) to bob (Redis) in `txn`.
    fn transfer(&self, txn: &tm::Transaction) -> Result<(), Error> {
        self.db
            .join(txn)?
            .execute(
                "UPDATE account SET balance = balance - 10 WHERE name = 'alice'",
                [],
            )
            .map_err(|e| Error::resource("sqlite", e))?;
        let r = self.redis.join(txn)?;
        let bob: i64 = r.get("bob")?.unwrap_or(0);
        r.set("bob", bob + 10)?;
        Ok(())
    }
}

#[test]
fn success_changes_both_stores() {
    let s = stores();
    let tm = s.manager().build();
    tm.run(|txn| s.transfer(txn)).unwrap();
    assert_eq!(s.balances(), (90, 10));
    s.assert_no_redis_leftovers();
}

#[test]
fn failure_at_any_phase_before_the_decision_leaves_both_unchanged() {
    for phase in [Phase::TpcBegin, Phase::Commit, Phase::TpcVote] {
        for fault in [Fault::Error, Fault::Conflict, Fault::Panic] {
            for sort_key in ["a-first", "zz-last"] {
                let s = stores();
                let log = CallLog::new();
                let faulty = TestDataManager::new("faulty", &log)
                    .with_sort_key(sort_key)
                    .fail_at(phase, fault);
                let tm = s.manager().build();
                let txn = tm.begin().unwrap();
                s.transfer(&txn).unwrap();
                txn.join(faulty).unwrap();
                // tm turns a panic into an error of that resource.
                assert!(tm.commit().is_err(), "{phase:?} {fault:?} {sort_key}");
                tm.abort().unwrap();
                assert_eq!(s.balances(), (100, 0), "{phase:?} {fault:?} {sort_key}");
                s.assert_no_redis_leftovers();
            }
        }
    }
}

#[test]
fn redis_refusing_its_vote_leaves_sqlite_unchanged() {
    let s = stores();
    let tm = s.manager().build();
    let txn = tm.begin().unwrap();
    s.transfer(&txn).unwrap();
    // Another client changes what the transaction read in Redis.
    redis::cmd("SET")
        .arg("bob")
        .arg(5)
        .exec(&mut s.server.lock().connection())
        .unwrap();
    let err = tm.commit().unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
    tm.abort().unwrap();
    assert_eq!(s.balances(), (100, 5));
    s.assert_no_redis_leftovers();
}

#[test]
fn sqlite_failing_at_its_commit_rolls_back_the_redis_prepare() {
    let s = stores();
    let tm = s.manager().build();
    let txn = tm.begin().unwrap();
    s.transfer(&txn).unwrap();
    // A deferred foreign key: SQLite refuses only at COMMIT, after Redis voted.
    s.db.join(&txn)
        .unwrap()
        .execute("INSERT INTO pet VALUES ('rex', 'nobody')", [])
        .unwrap();
    let err = tm.commit().unwrap_err();
    assert!(!err.is_heuristic(), "{err:?}");
    tm.abort().unwrap();
    assert_eq!(s.balances(), (100, 0));
    s.assert_no_redis_leftovers();
    tm.abort().ok();
}

#[test]
fn retried_transfers_keep_the_total_under_contention() {
    let s = Arc::new(stores());
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || {
                let tm = s.manager().retry_attempt_count(10_000).build();
                for _ in 0..5 {
                    tm.run(|txn| s.transfer(txn)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(s.balances(), (100 - 150, 150));
    s.assert_no_redis_leftovers();
}

/// A participant voted after Redis whose vote kills the Redis server: the
/// crash falls between Redis's vote and its finish.
struct KillRedisAtVote(Arc<Mutex<TestServer>>);

impl DataManager for KillRedisAtVote {
    fn sort_key(&self) -> &str {
        "zz-kill-redis-at-vote"
    }
    fn abort(&self, _: &Transaction) -> tm::Result<()> {
        Ok(())
    }
    fn tpc_begin(&self, _: &Transaction) -> tm::Result<()> {
        Ok(())
    }
    fn commit(&self, _: &Transaction) -> tm::Result<()> {
        Ok(())
    }
    fn tpc_vote(&self, _: &Transaction) -> tm::Result<()> {
        self.0.lock().kill();
        Ok(())
    }
    fn tpc_finish(&self, _: &Transaction) -> tm::Result<()> {
        Ok(())
    }
    fn tpc_abort(&self, _: &Transaction) -> tm::Result<()> {
        Ok(())
    }
}

#[test]
fn redis_lost_after_the_decision_is_heuristic_and_recovery_finishes_it() {
    let s = stores();
    let log = Arc::new(SqliteDecisionLog::new(&s.db).unwrap());
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(log.clone())
        .build();
    let txn = tm.begin().unwrap();
    s.transfer(&txn).unwrap();
    txn.join(Arc::new(KillRedisAtVote(s.server.clone())))
        .unwrap();
    let err = tm.commit().unwrap_err();
    match &err {
        Error::Heuristic { in_doubt, .. } => {
            assert_eq!(in_doubt, &vec![s.redis.server().to_owned()])
        }
        other => panic!("expected a heuristic outcome, got {other:?}"),
    }
    tm.abort().unwrap();

    // SQLite's commit was the decision; Redis stays prepared across a restart.
    s.server.lock().restart();
    assert_eq!(s.redis.in_doubt().unwrap()[0].txid, txn.id());
    assert_eq!(s.balances(), (90, 0));
    let report = recover(log.as_ref(), &[&s.redis as &dyn Recoverable]).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.committed.len(), 1);
    assert_eq!(s.balances(), (90, 10));
    s.assert_no_redis_leftovers();
}

#[test]
fn redis_prepared_without_a_decision_is_aborted_by_recovery() {
    let s = stores();
    let log = Arc::new(SqliteDecisionLog::new(&s.db).unwrap());
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(log.clone())
        .build();
    let txn = tm.begin().unwrap();
    let r = s.redis.join(&txn).unwrap();
    r.set("bob", 99).unwrap();
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();
    // The coordinator dies here: no decision was logged.
    s.server.lock().kill_and_restart();
    // The crashed coordinator is dead: no grace to wait out.
    let now = RecoveryOptions::new().grace(std::time::Duration::ZERO);
    let report = recover_with(log.as_ref(), &[&s.redis as &dyn Recoverable], &now).unwrap();
    assert_eq!(report.aborted.len(), 1, "{report:?}");
    assert!(report.nothing_in_doubt(), "{report:?}");
    assert_eq!(s.balances(), (100, 0));
    s.assert_no_redis_leftovers();
    tm.abort().ok();
}

#[test]
fn sqlite_and_redis_without_a_log_or_with_the_log_outside_sqlite_are_refused() {
    let s = stores();
    let dir = tempfile::tempdir().unwrap();
    let outside = Arc::new(tm::FileDecisionLog::open(dir.path().join("log")).unwrap());
    for (tm, says) in [
        (TransactionManager::explicit(), "no decision log"),
        (
            TransactionManager::builder()
                .explicit(true)
                .decision_log(outside)
                .build(),
            "kept outside it",
        ),
    ] {
        let txn = tm.begin().unwrap();
        s.transfer(&txn).unwrap();
        let err = txn.commit().unwrap_err();
        assert!(matches!(err, Error::UnsafeSetup(_)), "{err}");
        assert!(err.to_string().contains(says), "{err}");
        tm.abort().unwrap();
        assert_eq!(s.balances(), (100, 0), "nothing may change");
        s.assert_no_redis_leftovers();
    }
    // The log inside SQLite: the same transfer commits.
    let tm = s.manager().build();
    let txn = tm.begin().unwrap();
    s.transfer(&txn).unwrap();
    txn.commit().unwrap();
    assert_eq!(s.balances(), (90, 10));
}
