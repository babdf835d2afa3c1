//! Crashes: a prepare survives SIGKILL + restart; a server lost between vote
//! and finish is a heuristic outcome that recovery finishes; late prepares;
//! finishing at maxmemory.

use std::sync::Arc;

use parking_lot::Mutex;
use tm_core::{
    recover, DataManager, DecisionLog, Error as TmError, Recoverable, Transaction,
    TransactionManager,
};
use tm_redis::testing::TestServer;
use tm_redis::{Error, Store};

mod support;
use support::in_doubt_ids;

/// Votes `store`'s handle of a new transaction that writes `writes`.
fn prepare(
    store: &Store,
    writes: &[(&str, &str)],
) -> (TransactionManager, Transaction, Arc<dyn DataManager>) {
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    for (k, v) in writes {
        r.set(k, v).unwrap();
    }
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();
    (tm, txn, dm)
}

fn try_write(store: &Store, key: &str) -> Result<(), TmError> {
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    tm.begin()?;
    store.join(&tm.get()?)?.set(key, "other")?;
    let result = tm.commit();
    if result.is_err() {
        tm.abort()?;
    }
    result
}

#[test]
fn prepared_transaction_survives_sigkill_and_is_committed_by_commit_prepared() {
    let mut server = TestServer::builder().fsync_always(true).start();
    let store = Store::open(&server.url()).unwrap();
    let (_tm, txn, _dm) = prepare(&store, &[("a", "1"), ("b", "2")]);
    server.kill_and_restart();

    assert_eq!(in_doubt_ids(&store), vec![txn.id()]);
    assert_eq!(
        store.get::<String>("a").unwrap(),
        None,
        "not applied before the decision"
    );
    // Its keys make others conflict at once (never a wait).
    let err = try_write(&store, "a").unwrap_err();
    assert!(matches!(err, TmError::Conflict { .. }), "{err:?}");

    store.commit_prepared(&txn.id()).unwrap();
    store.commit_prepared(&txn.id()).unwrap(); // idempotent
    assert_eq!(store.get::<String>("a").unwrap().as_deref(), Some("1"));
    assert_eq!(store.get::<String>("b").unwrap().as_deref(), Some("2"));
    assert!(in_doubt_ids(&store).is_empty());
    try_write(&store, "a").unwrap();
}

#[test]
fn prepared_transaction_survives_sigkill_and_is_removed_by_abort_prepared() {
    let mut server = TestServer::builder().fsync_always(true).start();
    let store = Store::open(&server.url()).unwrap();
    let (_tm, txn, _dm) = prepare(&store, &[("a", "1")]);
    server.kill_and_restart();

    assert_eq!(in_doubt_ids(&store), vec![txn.id()]);
    store.abort_prepared(&txn.id()).unwrap();
    store.abort_prepared(&txn.id()).unwrap(); // idempotent
    assert!(in_doubt_ids(&store).is_empty());
    assert_eq!(store.get::<String>("a").unwrap(), None);
    try_write(&store, "a").unwrap();
    assert_eq!(store.get::<String>("a").unwrap().as_deref(), Some("other"));
}

/// A participant whose vote kills the Redis server: the crash falls between
/// Redis's vote and its finish.
struct KillAtVote {
    server: Arc<Mutex<TestServer>>,
}

impl DataManager for KillAtVote {
    fn sort_key(&self) -> &str {
        "zz-kill-redis-at-vote"
    }
    fn abort(&self, _: &Transaction) -> tm_core::Result<()> {
        Ok(())
    }
    fn tpc_begin(&self, _: &Transaction) -> tm_core::Result<()> {
        Ok(())
    }
    fn commit(&self, _: &Transaction) -> tm_core::Result<()> {
        Ok(())
    }
    fn tpc_vote(&self, _: &Transaction) -> tm_core::Result<()> {
        self.server.lock().kill();
        Ok(())
    }
    fn tpc_finish(&self, _: &Transaction) -> tm_core::Result<()> {
        Ok(())
    }
    fn tpc_abort(&self, _: &Transaction) -> tm_core::Result<()> {
        Ok(())
    }
}

#[test]
fn redis_killed_between_vote_and_finish_is_heuristic_and_recovery_commits_it() {
    let server = Arc::new(Mutex::new(TestServer::builder().fsync_always(true).start()));
    let url = server.lock().url();
    let store = Store::open(&url).unwrap();
    let (_dir, log) = support::decision_log();
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(log.clone())
        .build();

    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    let _ = r.get::<String>("balance").unwrap();
    r.set("balance", "100").unwrap();
    txn.join(Arc::new(KillAtVote {
        server: server.clone(),
    }))
    .unwrap();
    let err = tm.commit().unwrap_err();
    match &err {
        TmError::Heuristic {
            committed,
            rolled_back,
            in_doubt,
        } => {
            assert_eq!(committed, &vec!["zz-kill-redis-at-vote".to_owned()]);
            assert!(rolled_back.is_empty(), "{err}");
            assert_eq!(in_doubt, &vec![store.server().to_owned()]);
        }
        other => panic!("expected a heuristic outcome, got {other:?}"),
    }
    tm.abort().unwrap();

    server.lock().restart();
    assert_eq!(in_doubt_ids(&store), vec![txn.id()], "the record survived");
    // Decided: committed at once, whatever its age.
    let report = recover(log.as_ref(), &[&store as &dyn Recoverable]).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.committed.len(), 1);
    assert_eq!(
        store.get::<String>("balance").unwrap().as_deref(),
        Some("100")
    );
    assert!(in_doubt_ids(&store).is_empty());
    assert!(
        log.pending().unwrap().is_empty(),
        "the decision is forgotten"
    );
}

#[test]
fn vote_failing_on_a_dead_server_is_an_error_not_a_hang() {
    let mut server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let txn = tm.begin().unwrap();
    store.join(&txn).unwrap().set("a", "1").unwrap();
    server.kill();
    let err = tm.commit().unwrap_err();
    assert!(err.to_string().contains(store.server()), "{err}");
    tm.abort().unwrap();
}

#[test]
fn late_prepare_after_its_abort_refuses() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.set("a", "1").unwrap();
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    // The abort overtakes the prepare (e.g. the prepare was delayed in the
    // network and the coordinator gave up on it).
    store.abort_prepared(&txn.id()).unwrap();
    let err = dm.tpc_vote(&txn).unwrap_err();
    let TmError::Resource { source, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(
        matches!(source.downcast_ref::<Error>(), Some(Error::Aborted { .. })),
        "{err}"
    );
    dm.tpc_abort(&txn).unwrap();
    assert!(in_doubt_ids(&store).is_empty(), "no orphan record");
    assert_eq!(store.get::<String>("a").unwrap(), None);
    try_write(&store, "a").unwrap(); // no orphan lock
}

#[test]
fn finish_succeeds_at_maxmemory_under_noeviction() {
    let server = TestServer::builder()
        .fsync_always(true)
        .maxmemory(4 * 1024 * 1024)
        .start();
    let store = Store::open(&server.url()).unwrap();
    let (_tm, txn, dm) = prepare(&store, &[("a", "1")]);

    // Fill the server, then lower its limit below what it holds: it is now
    // out of memory for certain.
    let mut con = server.connection();
    let chunk = vec![b'x'; 64 * 1024];
    for i in 0..32 {
        redis::cmd("SET")
            .arg(format!("fill{i}"))
            .arg(&chunk)
            .exec(&mut con)
            .unwrap();
    }
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(1024 * 1024)
        .exec(&mut con)
        .unwrap();
    let err = redis::cmd("SET")
        .arg("x")
        .arg("y")
        .exec(&mut con)
        .unwrap_err();
    assert_eq!(err.code(), Some("OOM"));
    // A new prepare is a clean no...
    let (_dir, other) = support::logged_manager();
    let t2 = other.begin().unwrap();
    store.join(&t2).unwrap().set("b", "2").unwrap();
    t2.join(tm_core::testing::TestDataManager::new(
        "zz",
        &tm_core::testing::CallLog::new(),
    ))
    .unwrap();
    let err = other.commit().unwrap_err();
    let text = tm_core::Report(&err).to_string();
    assert!(text.contains("OOM"), "{text}");
    other.abort().unwrap();
    // ...but the promised finish goes through.
    dm.tpc_finish(&txn).unwrap();
    assert_eq!(store.get::<String>("a").unwrap().as_deref(), Some("1"));
    assert!(in_doubt_ids(&store).is_empty());
}
