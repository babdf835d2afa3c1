//! The SQLite and Redis adapters as their crate docs and the recovery
//! contract promise them, written from the outside:
//! only the public names of the `tm` facade, real SQLite files in temporary
//! directories and a real `redis-server` per test (`TestServer`).

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tm::redis::testing::TestServer;
use tm::redis::Store;
use tm::sqlite::SqliteDecisionLog;
use tm::sqlite::{Begin, Database, JournalMode, Options, Synchronous};
use tm::testing::{CallLog, Fault, TestDataManager};
use tm::{
    recover, recover_with, DecisionLog, Error, FileDecisionLog, MemoryStore, Phase, Recoverable,
    RecoveryOptions, Status, TransactionManager, TransactionManagerBuilder, TxId,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// ---------------------------------------------------------------- helpers --

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v INTEGER NOT NULL)";

fn sqlite_with(dir: &tempfile::TempDir, options: Options) -> Database {
    Database::open_with(dir.path().join("app.db"), options.setup_sql(SCHEMA)).unwrap()
}

fn sqlite(dir: &tempfile::TempDir) -> Database {
    sqlite_with(dir, Options::default())
}

/// The rows as an independent connection (not tm's pool) sees them.
fn rows(db: &Database) -> Vec<(String, i64)> {
    let conn = rusqlite::Connection::open(db.path()).unwrap();
    let mut stmt = conn.prepare("SELECT k, v FROM kv ORDER BY k").unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<Vec<_>>>()
        .unwrap();
    rows
}

fn row(k: &str, v: i64) -> (String, i64) {
    (k.to_owned(), v)
}

/// A new decision log file in `dir`, one per call: a second open of one
/// file is refused while the first is held.
fn file_log(dir: &tempfile::TempDir) -> Arc<FileDecisionLog> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    Arc::new(FileDecisionLog::open(dir.path().join(format!("decisions-{n}.log"))).unwrap())
}

/// An explicit manager whose decisions go to a log file of its own: what a
/// Redis store beside another two-phase resource needs (no log is refused).
fn with_file_log(dir: &tempfile::TempDir) -> TransactionManagerBuilder {
    TransactionManager::builder()
        .explicit(true)
        .decision_log(file_log(dir))
}

/// An explicit manager whose decisions ride inside `db`'s own commit
/// (logging last resource): what SQLite beside Redis needs.
fn with_sqlite_log(db: &Database) -> TransactionManagerBuilder {
    TransactionManager::builder()
        .explicit(true)
        .decision_log(Arc::new(SqliteDecisionLog::new(db).unwrap()))
}

/// Every key tm itself keeps on the server (tombstones and receipts aside,
/// which expire on their own), sorted: locks and prepared records.
fn tm_keys(server: &TestServer) -> Vec<Vec<u8>> {
    let mut keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("tm:*")
        .query(&mut server.connection())
        .unwrap();
    // Tombstones and receipts expire on their own; the store's id is kept.
    keys.retain(|k| {
        !k.windows(9).any(|w| w == b":aborted:")
            && !k.windows(9).any(|w| w == b":applied:")
            && !k.ends_with(b"}:store-id")
    });
    keys.sort();
    keys
}

fn raw_get(server: &TestServer, key: &[u8]) -> Option<Vec<u8>> {
    redis::cmd("GET")
        .arg(key)
        .query(&mut server.connection())
        .unwrap()
}

/// Runs one plain command on the server, outside tm.
fn raw(server: &TestServer, args: &[&str]) {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.exec(&mut server.connection()).unwrap();
}

fn raw_set(server: &TestServer, key: &str, value: &str) {
    raw(server, &["SET", key, value]);
}

/// `calls` of each command since the last `CONFIG RESETSTAT`.
fn command_calls(server: &TestServer) -> Vec<(String, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut server.connection())
        .unwrap();
    let mut out = Vec::new();
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let (name, stats) = rest.split_once(':').unwrap();
        let calls = stats
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .unwrap()
            .parse()
            .unwrap();
        out.push((name.to_owned(), calls));
    }
    out.sort();
    out
}

/// The commands a client can send to run or guard a transaction (commandstats
/// also counts what a function calls inside the server; those are left out).
fn client_commands(calls: &[(String, u64)]) -> Vec<(String, u64)> {
    const CLIENT_SIDE: &[&str] = &[
        "fcall",
        "fcall_ro",
        "multi",
        "exec",
        "discard",
        "watch",
        "unwatch",
        "eval",
        "evalsha",
        "ping",
        "get",
        "mget",
        "function|load",
        "script|load",
    ];
    calls
        .iter()
        .filter(|(name, _)| CLIENT_SIDE.contains(&name.as_str()))
        .cloned()
        .collect()
}

fn reset_stats(server: &TestServer) {
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .exec(&mut server.connection())
        .unwrap();
}

/// The tm-redis error inside a `tm::Error::Resource`.
fn redis_source(err: &Error) -> &tm::redis::Error {
    match err {
        Error::Resource { source, .. } => source
            .downcast_ref::<tm::redis::Error>()
            .unwrap_or_else(|| panic!("not a tm-redis error: {source:?}")),
        other => panic!("not a resource error: {other:?}"),
    }
}

/// The tm-sqlite error inside a `tm::Error::Resource`.
fn sqlite_source(err: &Error) -> &tm::sqlite::Error {
    match err {
        Error::Resource { source, .. } => source
            .downcast_ref::<tm::sqlite::Error>()
            .unwrap_or_else(|| panic!("not a tm-sqlite error: {source:?}")),
        other => panic!("not a resource error: {other:?}"),
    }
}

// ----------------------------------------------------------------- SQLite --

#[test]
fn sqlite_options_default_to_wal_normal_5s_immediate_and_apply_to_the_file() {
    let o = Options::default();
    assert_eq!(o.journal_mode, JournalMode::Wal);
    assert_eq!(o.synchronous, Synchronous::Normal);
    assert_eq!(o.busy_timeout, Duration::from_secs(5));
    assert_eq!(o.begin, Begin::Immediate);
    assert!(o.pool_size >= 1);

    let dir = tempfile::tempdir().unwrap();
    let opened = Arc::new(AtomicUsize::new(0));
    let counter = opened.clone();
    let db = Database::open_with(
        dir.path().join("app.db"),
        Options {
            synchronous: Synchronous::Full,
            pool_size: 2,
            ..Options::default()
        }
        .on_connect(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }),
    )
    .unwrap();
    // open connects once (a bad path or file fails there).
    assert_eq!(opened.load(Ordering::SeqCst), 1);
    let (mode, sync): (String, i64) = db
        .with_connection(|c| {
            Ok((
                c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?,
                c.query_row("PRAGMA synchronous", [], |r| r.get(0))?,
            ))
        })
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(sync, 2, "FULL");
    fn check<T: Clone + Send + Sync>() {}
    check::<Database>();
}

#[test]
fn sqlite_join_begins_on_first_use_and_returns_the_same_connection_in_the_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(&dir);
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    {
        let conn = db.join(&txn).unwrap();
        assert!(!conn.is_autocommit(), "inside an SQLite transaction");
        conn.execute("INSERT INTO kv VALUES ('a', 1)", []).unwrap();
    }
    let n: i64 = db
        .join(&txn)
        .unwrap()
        .query_row("SELECT count(*) FROM kv", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1, "the second join sees the first one's insert");
    assert!(rows(&db).is_empty(), "invisible to others before commit");
    tm.commit().unwrap();
    assert_eq!(rows(&db), vec![row("a", 1)]);
}

#[test]
fn sqlite_abort_rolls_back_and_every_pooled_connection_comes_back_clean() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(&dir);
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    let conn = db.join(&txn).unwrap();
    conn.execute("INSERT INTO kv VALUES ('a', 1)", []).unwrap();
    conn.execute_batch("SAVEPOINT user_sp; INSERT INTO kv VALUES ('b', 2)")
        .unwrap();
    drop(conn);
    tm.abort().unwrap();
    assert!(rows(&db).is_empty());
    // Every idle connection is in autocommit mode (no transaction, no
    // savepoint left open).
    let idle = db.idle_connections();
    assert!(idle >= 1);
    for _ in 0..idle {
        assert!(db.with_connection(|c| Ok(c.is_autocommit())).unwrap());
    }
    // And the next transaction starts from nothing.
    tm.run(|txn| {
        db.join(txn)?
            .execute("INSERT INTO kv VALUES ('c', 3)", [])?;
        Ok::<_, BoxError>(())
    })
    .unwrap();
    assert_eq!(rows(&db), vec![row("c", 3)]);
}

#[test]
fn sqlite_guard_kept_across_commit_is_a_clear_error_and_the_connection_still_returns() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_with(&dir, Options::default().pool_size(1));
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    let conn = db.join(&txn).unwrap();
    conn.execute("INSERT INTO kv VALUES ('a', 1)", []).unwrap();
    tm.commit().unwrap(); // same thread: does not deadlock on the guard
    assert!(!conn.is_active());
    match conn.try_connection() {
        Err(e @ tm::sqlite::Error::TransactionEnded { .. }) => {
            assert!(
                e.to_string().contains(&db.path().display().to_string()),
                "{e}"
            );
        }
        other => panic!("expected TransactionEnded, got {other:?}"),
    }
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        conn.execute("INSERT INTO kv VALUES ('late', 9)", []).ok();
    }));
    assert!(panicked.is_err(), "deref of an ended guard panics");
    drop(conn);
    assert_eq!(rows(&db), vec![row("a", 1)]);
    assert_eq!(db.idle_connections(), 1);
    assert!(db.with_connection(|c| Ok(c.is_autocommit())).unwrap());
}

#[test]
fn sqlite_join_after_the_transaction_ended_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(&dir);
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    tm.commit().unwrap();
    assert!(matches!(db.join(&txn), Err(Error::Closed)));
}

#[test]
fn sqlite_busy_at_commit_is_retryable_rolled_back_and_names_path_phase_and_code() {
    // Rollback journal: COMMIT needs an exclusive lock that a reader's
    // shared lock refuses, so SQLite answers BUSY at COMMIT itself.
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_with(
        &dir,
        Options::default()
            .journal_mode(JournalMode::Delete)
            .busy_timeout(Duration::from_millis(20)),
    );
    let reader = rusqlite::Connection::open(db.path()).unwrap();
    reader
        .execute_batch("BEGIN; SELECT count(*) FROM kv")
        .unwrap();

    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    db.join(&txn)
        .unwrap()
        .execute("INSERT INTO kv VALUES ('a', 1)", [])
        .unwrap();
    let err = tm.commit().unwrap_err();
    assert!(tm.is_retryable(&err), "BUSY at COMMIT is retryable: {err}");
    let e = sqlite_source(&err);
    assert_eq!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy)
    );
    assert_eq!(e.phase(), Phase::CommitOnePhase);
    let text = tm::Report(&err).to_string();
    assert!(text.contains(&db.path().display().to_string()), "{text}");
    assert!(text.contains("commit_one_phase"), "{text}");
    assert!(text.contains("extended code 5"), "{text}");
    assert_eq!(txn.status(), Status::CommitFailed);
    tm.abort().unwrap();
    reader.execute_batch("COMMIT").unwrap();
    assert!(rows(&db).is_empty(), "the failed COMMIT was rolled back");
    for _ in 0..db.idle_connections() {
        assert!(db.with_connection(|c| Ok(c.is_autocommit())).unwrap());
    }
}

#[test]
fn sqlite_busy_at_begin_wrapped_in_a_boxed_error_is_retried_by_run() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_with(
        &dir,
        Options::default().busy_timeout(Duration::from_millis(20)),
    );
    let blocker = rusqlite::Connection::open(db.path()).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let tm = TransactionManager::builder()
        .backoff(tm::Backoff::None)
        .build();
    let attempts = Cell::new(0);
    tm.run(|txn| {
        attempts.set(attempts.get() + 1);
        let joined = db.join(txn);
        if attempts.get() == 1 {
            blocker.execute_batch("COMMIT")?;
        }
        joined?.execute("INSERT INTO kv VALUES ('a', 1)", [])?;
        Ok::<_, BoxError>(())
    })
    .unwrap();
    assert_eq!(attempts.get(), 2);
    assert_eq!(rows(&db), vec![row("a", 1)]);
}

#[test]
fn sqlite_constraint_violation_is_not_retried_and_names_the_extended_code() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(&dir);
    db.with_connection(|c| c.execute("INSERT INTO kv VALUES ('a', 1)", []))
        .unwrap();
    let tm = TransactionManager::explicit();
    let attempts = Cell::new(0);
    let err = tm
        .run(|txn| {
            attempts.set(attempts.get() + 1);
            db.join(txn)?
                .execute("INSERT INTO kv VALUES ('a', 2)", [])
                .map_err(|e| Error::resource(db.name(), e))?;
            Ok::<_, Error>(())
        })
        .unwrap_err();
    assert_eq!(attempts.get(), 1, "not retried");
    assert!(!tm.is_retryable(&err));
    assert!(!tm.in_transaction());
    assert_eq!(rows(&db), vec![row("a", 1)]);
}

#[test]
fn sqlite_panic_inside_a_joined_closure_aborts_and_releases_the_write_lock() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_with(
        &dir,
        Options::default().busy_timeout(Duration::from_millis(200)),
    );
    let tm = TransactionManager::explicit();
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        tm.run(|txn| {
            db.join(txn)?
                .execute("INSERT INTO kv VALUES ('a', 1)", [])?;
            panic!("boom");
            #[allow(unreachable_code)]
            Ok::<_, BoxError>(())
        })
    }));
    assert!(panicked.is_err());
    assert!(!tm.in_transaction());
    // Another writer gets the lock at once: the panicking transaction
    // rolled back and gave its connection back.
    let other = rusqlite::Connection::open(db.path()).unwrap();
    other.execute("INSERT INTO kv VALUES ('b', 2)", []).unwrap();
    assert_eq!(rows(&db), vec![row("b", 2)]);
    for _ in 0..db.idle_connections() {
        assert!(db.with_connection(|c| Ok(c.is_autocommit())).unwrap());
    }
}

#[test]
fn sqlite_commit_run_by_hand_is_refused_at_the_vote_and_the_other_resource_is_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(&dir);
    let mem = MemoryStore::<i64>::new();
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    mem.join(&txn).unwrap().put("m", 1).unwrap();
    let conn = db.join(&txn).unwrap();
    conn.execute_batch("INSERT INTO kv VALUES ('a', 1); COMMIT; BEGIN")
        .unwrap();
    conn.execute("INSERT INTO kv VALUES ('b', 2)", []).unwrap();
    drop(conn);
    let err = tm.commit().unwrap_err();
    assert!(matches!(
        sqlite_source(&err),
        tm::sqlite::Error::EndedOutsideTm { .. }
    ));
    let text = tm::Report(&err).to_string();
    assert!(text.contains("tpc_vote"), "{text}");
    tm.abort().unwrap();
    assert_eq!(mem.committed("m"), None, "the other resource was aborted");
    // What the hand-run COMMIT committed is there; the rest is not.
    assert_eq!(rows(&db), vec![row("a", 1)]);
}

#[test]
fn sqlite_savepoints_dropped_out_of_order_leave_the_live_ones_usable() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(&dir);
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    db.join(&txn)
        .unwrap()
        .execute("INSERT INTO kv VALUES ('a', 1)", [])
        .unwrap();
    let sp1 = txn.savepoint().unwrap();
    db.join(&txn)
        .unwrap()
        .execute("INSERT INTO kv VALUES ('b', 2)", [])
        .unwrap();
    let sp2 = txn.savepoint().unwrap();
    db.join(&txn)
        .unwrap()
        .execute("INSERT INTO kv VALUES ('c', 3)", [])
        .unwrap();
    let sp3 = txn.savepoint().unwrap();
    drop(sp1); // the oldest first: must not release sp2 and sp3 with it
    db.join(&txn)
        .unwrap()
        .execute("INSERT INTO kv VALUES ('d', 4)", [])
        .unwrap();
    sp2.rollback().unwrap();
    assert!(!sp3.is_valid());
    assert!(matches!(sp3.rollback(), Err(Error::InvalidSavepoint)));
    db.join(&txn)
        .unwrap()
        .execute("INSERT INTO kv VALUES ('e', 5)", [])
        .unwrap();
    sp2.rollback().unwrap(); // again
    drop(sp3);
    drop(sp2);
    tm.commit().unwrap();
    assert_eq!(rows(&db), vec![row("a", 1), row("b", 2)]);
}

#[test]
fn sqlite_commits_last_after_the_other_vote_and_a_finish_failure_is_heuristic_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(&dir);
    let log = CallLog::new();
    let other = TestDataManager::new("zz-other", &log).fail_at(Phase::TpcFinish, Fault::Error);
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    txn.join(other).unwrap();
    db.join(&txn)
        .unwrap()
        .execute("INSERT INTO kv VALUES ('a', 1)", [])
        .unwrap();
    match tm.commit().unwrap_err() {
        Error::Heuristic {
            committed,
            in_doubt,
            ..
        } => {
            assert_eq!(committed, vec![db.name().to_owned()]);
            assert_eq!(in_doubt, vec!["zz-other".to_owned()]);
        }
        other => panic!("expected Heuristic, got {other:?}"),
    }
    assert_eq!(rows(&db), vec![row("a", 1)]);
    let _ = tm.abort();
}

// ------------------------------------------------------------------ Redis --

#[test]
fn redis_open_reports_durability_and_can_require_it() {
    let lax = TestServer::start(); // appendfsync everysec
    let store = Store::open(&lax.url()).unwrap();
    assert_eq!(store.prefix(), "tm:");
    assert!(!store.durability().is_durable());
    assert!(
        store.durability().to_string().contains("appendfsync"),
        "{}",
        store.durability()
    );
    let err = Store::open_with(
        &lax.url(),
        tm::redis::Options::default().require_durable_prepare(true),
    )
    .unwrap_err();
    assert!(matches!(err, tm::redis::Error::NotDurable { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!(":{}", lax.port())),
        "{err}"
    );

    let strict = TestServer::builder().fsync_always(true).start();
    let store = Store::open_with(
        &strict.url(),
        tm::redis::Options {
            require_durable_prepare: true,
            ..tm::redis::Options::default()
        },
    )
    .unwrap();
    assert!(store.durability().is_durable(), "{}", store.durability());
    fn check<T: Clone + Send + Sync>() {}
    check::<Store>();
}

#[test]
fn redis_unreachable_server_is_a_clear_error_naming_the_url() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("redis://127.0.0.1:{port}/");
    let err = Store::open_with(
        &url,
        tm::redis::Options::default().connect_timeout(Duration::from_secs(2)),
    )
    .unwrap_err();
    assert!(err.is_connection_refusal() || err.is_timeout(), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn redis_one_phase_commit_is_one_fcall_inside_one_multi_exec() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    raw_set(&server, "n", "5");
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    let n: i64 = r.get("n").unwrap().unwrap();
    r.set("n", n + 1).unwrap();
    r.rpush("log", "+1").unwrap();
    reset_stats(&server);
    tm.commit().unwrap();
    let calls = command_calls(&server);
    let tm_calls = client_commands(&calls);
    assert_eq!(
        tm_calls,
        vec![
            ("exec".to_owned(), 1),
            ("fcall".to_owned(), 1),
            ("multi".to_owned(), 1)
        ],
        "{calls:?}"
    );
    assert_eq!(store.get::<i64>("n").unwrap(), Some(6));
    assert!(tm_keys(&server).is_empty());
}

#[test]
fn redis_blind_one_phase_commit_is_a_single_fcall() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    store.join(&txn).unwrap().set("k", "v").unwrap();
    reset_stats(&server);
    tm.commit().unwrap();
    let calls = command_calls(&server);
    let tm_calls = client_commands(&calls);
    assert_eq!(tm_calls, vec![("fcall".to_owned(), 1)], "{calls:?}");
    assert_eq!(store.get::<String>("k").unwrap().as_deref(), Some("v"));
}

#[test]
fn redis_prepared_keys_put_the_hash_tag_first() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::explicit();

    // Keys sharing a hash tag: locks and the record share it.
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.set("{u1}:a", 1).unwrap();
    r.set("{u1}:b", 2).unwrap();
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();
    let id = txn.id().to_string();
    let want: Vec<Vec<u8>> = vec![
        b"tm:{u1}:lock:{u1}:a".to_vec(),
        b"tm:{u1}:lock:{u1}:b".to_vec(),
        format!("tm:{{u1}}:prepared:{id}").into_bytes(),
        b"tm:{}:records".to_vec(), // the index of prepared records
    ];
    assert_eq!(tm_keys(&server), want);
    assert_eq!(
        raw_get(&server, b"tm:{u1}:lock:{u1}:a"),
        Some(id.clone().into_bytes())
    );
    dm.tpc_finish(&txn).unwrap();
    assert!(tm_keys(&server).is_empty());
    tm.abort().ok();

    // Untagged keys: an empty tag.
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.set("plain", 1).unwrap();
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();
    let id = txn.id().to_string();
    assert_eq!(
        tm_keys(&server),
        vec![
            b"tm:{}:lock:plain".to_vec(),
            format!("tm:{{}}:prepared:{id}").into_bytes(),
            b"tm:{}:records".to_vec(),
        ]
    );
    dm.tpc_abort(&txn).unwrap();
    assert!(tm_keys(&server).is_empty());
    tm.abort().ok();
}

#[test]
fn redis_prefix_option_names_every_tm_key() {
    let server = TestServer::start();
    let store = Store::open_with(
        &server.url(),
        tm::redis::Options::default().prefix("app:tx:"),
    )
    .unwrap();
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.set("k", 1).unwrap();
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query(&mut server.connection())
        .unwrap();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "app:tx:{}:lock:k".to_owned(),
            format!("app:tx:{{}}:prepared:{}", txn.id()),
            "app:tx:{}:records".to_owned(),
            "app:tx:{}:store-id".to_owned()
        ]
    );
    // Each prefix is a store of its own, with an id of its own.
    let default = Store::open(&server.url()).unwrap();
    assert_ne!(store.resource_id(), default.resource_id());
    dm.tpc_abort(&txn).unwrap();
    tm.abort().ok();
}

#[test]
fn redis_conflict_on_a_changed_read_is_error_conflict_and_retried_by_run() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    raw_set(&server, "n", "0");
    let tm = TransactionManager::builder()
        .backoff(tm::Backoff::None)
        .build();

    // Seen directly: Error::Conflict naming the resource.
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    let n: i64 = r.get("n").unwrap().unwrap();
    r.set("n", n + 1).unwrap();
    raw_set(&server, "n", "100");
    let err = tm.commit().unwrap_err();
    match &err {
        Error::Conflict { resource, .. } => assert_eq!(resource, store.server()),
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert!(err.to_string().contains("commit_one_phase"), "{err}");
    tm.abort().unwrap();
    assert_eq!(store.get::<i64>("n").unwrap(), Some(100));

    // Through run: the first attempt conflicts, the second commits.
    let attempts = Cell::new(0);
    tm.run(|txn| {
        attempts.set(attempts.get() + 1);
        let r = store.join(txn)?;
        let n: i64 = r.get("n")?.unwrap_or(0);
        if attempts.get() == 1 {
            raw_set(&server, "n", "200");
        }
        r.set("n", n + 1)?;
        Ok::<_, BoxError>(())
    })
    .unwrap();
    assert_eq!(attempts.get(), 2);
    assert_eq!(store.get::<i64>("n").unwrap(), Some(201));
}

#[test]
fn redis_key_held_by_a_prepared_transaction_conflicts_at_once_and_is_retryable() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm1 = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let t1 = tm1.begin().unwrap();
    let r1 = store.join(&t1).unwrap();
    r1.set("k", "t1").unwrap();
    let dm = r1.data_manager();
    dm.tpc_begin(&t1).unwrap();
    dm.commit(&t1).unwrap();
    dm.tpc_vote(&t1).unwrap();

    let tm2 = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let t2 = tm2.begin().unwrap();
    store.join(&t2).unwrap().set("k", "t2").unwrap();
    let err = tm2.commit().unwrap_err();
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
    assert!(tm2.is_retryable(&err));
    assert!(err.to_string().contains(&t1.id().to_string()), "{err}");
    tm2.abort().unwrap();

    // A reader of the key conflicts too (it is write-locked).
    let t3 = tm2.begin().unwrap();
    let r3 = store.join(&t3).unwrap();
    let _: Option<String> = r3.get("k").unwrap();
    r3.set("other", 1).unwrap();
    assert!(matches!(tm2.commit(), Err(Error::Conflict { .. })));
    tm2.abort().unwrap();

    dm.tpc_finish(&t1).unwrap();
    assert_eq!(store.get::<String>("k").unwrap().as_deref(), Some("t1"));
    tm1.abort().ok();
}

#[test]
fn redis_reads_see_own_string_writes_and_refuse_undefined_ones() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    raw_set(&server, "s", "old");
    raw_set(&server, "n", "40");
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.set("s", "new").unwrap();
    assert_eq!(r.get::<String>("s").unwrap().as_deref(), Some("new"));
    r.del("s").unwrap();
    assert_eq!(r.get::<String>("s").unwrap(), None);
    assert!(!r.exists("s").unwrap());
    r.incr_by("n", 2).unwrap();
    assert_eq!(r.get::<i64>("n").unwrap(), Some(42));
    r.incr_by("missing", 7).unwrap();
    assert_eq!(r.get::<i64>("missing").unwrap(), Some(7));
    assert!(r.exists("missing").unwrap());
    assert_eq!(
        r.mget::<i64, _>(&["n", "missing", "nothing"]).unwrap(),
        vec![Some(42), Some(7), None]
    );
    r.hset("h", "f", "v").unwrap();
    assert!(r.exists("h").unwrap());
    let err = r.hget::<String>("h", "f").unwrap_err();
    assert!(
        matches!(err, tm::redis::Error::ReadAfterWrite { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("HGET"), "{err}");
    r.set_ex("ttl", "x", Duration::from_secs(100)).unwrap();
    assert_eq!(r.get::<String>("ttl").unwrap().as_deref(), Some("x"));
    tm.commit().unwrap();
    assert_eq!(store.get::<String>("s").unwrap(), None);
    assert_eq!(store.get::<i64>("n").unwrap(), Some(42));
    assert_eq!(store.get::<i64>("missing").unwrap(), Some(7));
}

#[test]
fn redis_del_then_set_and_set_then_del_of_one_key_apply_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let mut con = server.connection();
    raw(&server, &["HSET", "k1", "f", "v"]);
    raw_set(&server, "k2", "keep?");
    let dm_other = TestDataManager::new("zz-other", &CallLog::new());
    for two_phase in [false, true] {
        let tm = with_file_log(&dir).build();
        tm.run(|txn| {
            if two_phase {
                txn.join(dm_other.clone())?;
            }
            let r = store.join(txn)?;
            r.del("k1")?; // a hash: DEL then SET must not be WRONGTYPE
            r.set("k1", "string now")?;
            r.set("k2", "gone soon")?;
            r.del("k2")?;
            r.del("k3")?;
            r.incr_by("k3", 3)?; // INCRBY after DEL counts from 0
            Ok::<_, Error>(())
        })
        .unwrap();
        assert_eq!(
            store.get::<String>("k1").unwrap().as_deref(),
            Some("string now")
        );
        assert_eq!(store.get::<String>("k2").unwrap(), None);
        assert_eq!(store.get::<i64>("k3").unwrap(), Some(3));
        raw_set(&server, "k2", "again");
        redis::cmd("DEL").arg("k3").exec(&mut con).unwrap();
        assert!(tm_keys(&server).is_empty());
    }
}

#[test]
fn redis_key_both_read_and_written_is_write_locked_once_and_committed() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    raw_set(&server, "acct", "10");
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    let v: i64 = r.get("acct").unwrap().unwrap();
    r.set("acct", v - 3).unwrap();
    let _: Option<String> = r.get("only-read").unwrap();
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();
    let keys = tm_keys(&server);
    assert!(keys.contains(&b"tm:{}:lock:acct".to_vec()), "{keys:?}");
    assert!(!keys.contains(&b"tm:{}:rlock:acct".to_vec()), "{keys:?}");
    assert!(
        keys.contains(&b"tm:{}:rlock:only-read".to_vec()),
        "{keys:?}"
    );
    dm.tpc_finish(&txn).unwrap();
    assert_eq!(store.get::<i64>("acct").unwrap(), Some(7));
    assert!(tm_keys(&server).is_empty());
    tm.abort().ok();
}

#[test]
fn redis_wrongtype_and_overflow_are_refused_at_the_vote_not_retried_and_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    raw_set(&server, "s", "text");
    raw_set(&server, "big", &i64::MAX.to_string());
    let other = TestDataManager::new("zz-other", &CallLog::new());
    for (key, what) in [("s", "hset"), ("big", "incr")] {
        let tm = with_file_log(&dir).build();
        let attempts = Cell::new(0);
        let err = tm
            .run(|txn| {
                attempts.set(attempts.get() + 1);
                txn.join(other.clone())?;
                let r = store.join(txn)?;
                r.set("written-first", 1)?;
                match what {
                    "hset" => r.hset(key, "f", "v")?,
                    _ => r.incr_by(key, 1)?,
                }
                Ok::<_, Error>(())
            })
            .unwrap_err();
        assert_eq!(attempts.get(), 1, "{what}: not retried");
        match redis_source(&err) {
            tm::redis::Error::Invalid {
                phase, op, command, ..
            } => {
                assert_eq!(*phase, Phase::TpcVote);
                assert_eq!(*op, 2);
                assert_eq!(command, if what == "hset" { "HSET" } else { "INCRBY" });
            }
            e => panic!("expected Invalid, got {e}"),
        }
        assert_eq!(store.get::<i64>("written-first").unwrap(), None);
        assert!(tm_keys(&server).is_empty());
    }
}

#[test]
fn redis_binary_keys_values_and_hash_tags_round_trip_through_two_phase_commit() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let all: Vec<u8> = (0..=255).collect();
    let tagged: Vec<u8> = [&b"{\x00\xff}"[..], &all].concat();
    let other = TestDataManager::new("zz-other", &CallLog::new());
    let tm = with_file_log(&dir).build();
    tm.run(|txn| {
        txn.join(other.clone())?;
        let r = store.join(txn)?;
        r.set(&all, &all[..])?;
        r.set(&tagged, &all[..])?;
        r.sadd(&all[..1], &all[..])?;
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(raw_get(&server, &all), Some(all.clone()));
    assert_eq!(raw_get(&server, &tagged), Some(all.clone()));
    assert!(tm_keys(&server).is_empty());
}

#[test]
fn redis_large_write_set_commits_in_two_phases() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let other = TestDataManager::new("zz-other", &CallLog::new());
    let tm = with_file_log(&dir).build();
    tm.run(|txn| {
        txn.join(other.clone())?;
        let r = store.join(txn)?;
        for i in 0..5000 {
            r.set(format!("k{i}"), i)?;
            r.sadd("members", i)?;
        }
        for _ in 0..3000 {
            r.incr_by("counter", 1)?;
        }
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(store.get::<i64>("k4999").unwrap(), Some(4999));
    assert_eq!(store.get::<i64>("counter").unwrap(), Some(3000));
    let n: usize = redis::cmd("SCARD")
        .arg("members")
        .query(&mut server.connection())
        .unwrap();
    assert_eq!(n, 5000);
    assert!(tm_keys(&server).is_empty());
}

#[test]
fn redis_expire_zero_deletes_set_without_expiry_clears_an_old_ttl() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    raw(&server, &["SET", "had-ttl", "v", "EX", "1000"]);
    raw_set(&server, "doomed", "v");
    let tm = TransactionManager::explicit();
    tm.run(|txn| {
        let r = store.join(txn)?;
        r.set("had-ttl", "w")?;
        r.expire("doomed", Duration::ZERO)?;
        assert!(!r.exists("doomed")?);
        r.set_ex("fresh", "x", Duration::from_secs(1000))?;
        Ok::<_, Error>(())
    })
    .unwrap();
    let ttl = |k: &str| -> i64 {
        redis::cmd("TTL")
            .arg(k)
            .query(&mut server.connection())
            .unwrap()
    };
    assert_eq!(ttl("had-ttl"), -1, "a plain SET clears the old expiry");
    assert_eq!(ttl("doomed"), -2, "expire(0) deleted it");
    assert!(ttl("fresh") > 0);
}

#[test]
fn redis_pooled_connection_comes_back_without_stale_watches() {
    let server = TestServer::start();
    let store =
        Store::open_with(&server.url(), tm::redis::Options::default().pool_size(1)).unwrap();
    raw_set(&server, "watched", "1");
    let tm = TransactionManager::explicit();
    // Reads (WATCH) and aborts: its connection goes back to the pool.
    let txn = tm.begin().unwrap();
    let _: Option<String> = store.join(&txn).unwrap().get("watched").unwrap();
    tm.abort().unwrap();
    raw_set(&server, "watched", "2");
    // The next transaction reuses that connection: the old WATCH must not
    // make its EXEC fail.
    tm.run(|txn| {
        let r = store.join(txn)?;
        let _: Option<String> = r.get("unrelated")?;
        r.set("unrelated", 1)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(store.get::<i64>("unrelated").unwrap(), Some(1));
}

#[test]
fn redis_abort_leaves_a_tombstone_that_refuses_a_late_prepare() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    for key in ["plain", "{tag}:key"] {
        let tm = TransactionManager::explicit();
        let txn = tm.begin().unwrap();
        let r = store.join(&txn).unwrap();
        r.set(key, 1).unwrap();
        // Recovery (another process) presumes the transaction aborted before
        // its prepare arrived.
        let recovery = Store::open(&server.url()).unwrap();
        recovery.abort_prepared(&txn.id()).unwrap();
        let dm = r.data_manager();
        dm.tpc_begin(&txn).unwrap();
        dm.commit(&txn).unwrap();
        let err = dm.tpc_vote(&txn).unwrap_err();
        assert!(
            matches!(redis_source(&err), tm::redis::Error::Aborted { .. }),
            "{key}: {err}"
        );
        dm.tpc_abort(&txn).unwrap();
        assert!(tm_keys(&server).is_empty(), "{key}");
        assert_eq!(store.get::<i64>(key).unwrap(), None, "{key}");
        tm.abort().ok();
    }
}

#[test]
fn redis_recoverable_is_stable_and_idempotent() {
    let server = TestServer::builder().fsync_always(true).start();
    let store = Store::open(&server.url()).unwrap();
    let reopened = Store::open(&server.url()).unwrap();
    assert_eq!(store.resource_id(), reopened.resource_id());
    // The id is the store's own, kept in Redis: not its address's spelling.
    assert!(
        store.resource_id().starts_with("redis:"),
        "{}",
        store.resource_id()
    );
    assert!(!store.resource_id().contains(&server.port().to_string()));

    let prepare = |key: &str| -> TxId {
        let tm = TransactionManager::builder()
            .explicit(true)
            .independent(true)
            .build();
        let txn = tm.begin().unwrap();
        let r = store.join(&txn).unwrap();
        r.set(key, "prepared").unwrap();
        let dm = r.data_manager();
        dm.tpc_begin(&txn).unwrap();
        dm.commit(&txn).unwrap();
        dm.tpc_vote(&txn).unwrap();
        txn.id()
    };
    let to_commit = prepare("{c}:k");
    let to_abort = prepare("a");
    let mut want = vec![to_commit, to_abort];
    want.sort();
    let listed: Vec<TxId> = reopened
        .in_doubt()
        .unwrap()
        .into_iter()
        .map(|r| r.txid)
        .collect();
    assert_eq!(listed, want);
    let parsed: TxId = to_commit.to_string().parse().unwrap();
    assert_eq!(parsed, to_commit);

    reopened.commit_prepared(&to_commit).unwrap();
    reopened.commit_prepared(&to_commit).unwrap();
    reopened.abort_prepared(&to_abort).unwrap();
    reopened.abort_prepared(&to_abort).unwrap();
    assert_eq!(
        store.get::<String>("{c}:k").unwrap().as_deref(),
        Some("prepared")
    );
    assert_eq!(store.get::<String>("a").unwrap(), None);
    assert!(reopened.in_doubt().unwrap().is_empty());
    assert!(tm_keys(&server).is_empty());
}

#[test]
fn redis_prepared_without_a_decision_is_presumed_aborted_by_recover() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::builder().fsync_always(true).start();
    let store = Store::open(&server.url()).unwrap();
    let log = file_log(&dir);
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(log.clone())
        .build();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.set("k", 1).unwrap();
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();
    let reopened = Store::open(&server.url()).unwrap();
    // Younger than the default grace: left for a later pass.
    let report = recover(log.as_ref(), &[&reopened]).unwrap();
    assert_eq!(report.deferred.len(), 1, "{report:?}");
    assert_eq!(reopened.in_doubt().unwrap().len(), 1);
    // The coordinator is gone: with no grace, fenced and aborted.
    let now = RecoveryOptions::new().grace(Duration::ZERO);
    let report = recover_with(log.as_ref(), &[&reopened], &now).unwrap();
    assert_eq!(
        report.aborted,
        vec![(reopened.resource_id(), txn.id())],
        "{report:?}"
    );
    assert!(reopened.in_doubt().unwrap().is_empty());
    assert_eq!(store.get::<i64>("k").unwrap(), None);
    assert!(tm_keys(&server).is_empty());
    // The fence: the late coordinator cannot commit any more.
    let decision = tm::Decision::new(txn.id(), vec![reopened.resource_id()], Default::default());
    assert!(matches!(
        log.record_commit(&decision),
        Err(Error::Fenced { .. })
    ));
    tm.abort().ok();
}

#[test]
fn redis_prepared_by_a_manager_without_a_log_is_foreign_never_presumed_aborted() {
    // The old rule aborted any record with no decision; a record that names
    // no log may belong to a live coordinator of any process, so it is left
    // alone and reported (taking it over is an operator's action).
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::builder().fsync_always(true).start();
    let store = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.set("k", 1).unwrap();
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();
    let log = file_log(&dir);
    let reopened = Store::open(&server.url()).unwrap();
    let now = RecoveryOptions::new().grace(Duration::ZERO);
    let report = recover_with(log.as_ref(), &[&reopened], &now).unwrap();
    assert!(report.aborted.is_empty(), "{report:?}");
    assert_eq!(report.foreign.len(), 1, "{report:?}");
    assert_eq!(report.foreign[0].1.txid, txn.id());
    assert!(!report.nothing_in_doubt());
    assert_eq!(reopened.in_doubt().unwrap().len(), 1);
    // Still prepared: its coordinator can finish it.
    dm.tpc_finish(&txn).unwrap();
    assert_eq!(store.get::<i64>("k").unwrap(), Some(1));
    assert!(tm_keys(&server).is_empty());
    tm.abort().ok();
}

// ------------------------------------------------- SQLite + Redis + Memory --

struct Three {
    _dir: tempfile::TempDir,
    server: TestServer,
    db: Database,
    redis: Store,
    mem: MemoryStore<i64>,
}

fn three() -> Three {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite(&dir);
    let server = TestServer::start();
    let redis = Store::open(&server.url()).unwrap();
    Three {
        _dir: dir,
        server,
        db,
        redis,
        mem: MemoryStore::new(),
    }
}

impl Three {
    /// A manager whose decisions ride inside SQLite's commit.
    fn manager(&self) -> TransactionManagerBuilder {
        with_sqlite_log(&self.db)
    }

    fn write(&self, txn: &tm::Transaction, k: &str, v: i64) -> Result<(), BoxError> {
        self.db
            .join(txn)?
            .execute("INSERT INTO kv VALUES (?1, ?2)", rusqlite::params![k, v])?;
        self.redis.join(txn)?.set(k, v)?;
        self.mem.join(txn)?.put(k, v)?;
        Ok(())
    }

    fn assert_only(&self, keys: &[&str]) {
        let want: Vec<(String, i64)> = keys.iter().map(|k| row(k, 1)).collect();
        assert_eq!(rows(&self.db), want);
        for k in ["a", "b", "c", "d"] {
            let expected = keys.contains(&k).then_some(1);
            assert_eq!(self.redis.get::<i64>(k).unwrap(), expected, "redis {k}");
            assert_eq!(self.mem.committed(k), expected, "memory {k}");
        }
        assert!(tm_keys(&self.server).is_empty());
    }
}

#[test]
fn savepoint_rolls_back_sqlite_redis_and_memory_together() {
    let s = three();
    let tm = s.manager().build();
    let txn = tm.begin().unwrap();
    s.write(&txn, "a", 1).unwrap();
    let sp = txn.savepoint().unwrap();
    s.write(&txn, "b", 1).unwrap();
    sp.rollback().unwrap();
    s.write(&txn, "c", 1).unwrap();
    sp.rollback().unwrap();
    s.write(&txn, "d", 1).unwrap();
    tm.commit().unwrap();
    s.assert_only(&["a", "d"]);
}

#[test]
fn nested_atomic_failure_undoes_only_the_inner_block_in_all_three_stores() {
    let s = three();
    let tm = s.manager().build();
    tm.atomic(|txn| {
        s.write(txn, "a", 1)?;
        let inner: Result<(), BoxError> = tm.atomic(|txn| {
            s.write(txn, "b", 1)?;
            let innermost: Result<(), BoxError> = tm.atomic(|txn| {
                s.write(txn, "c", 1)?;
                Err("innermost fails".into())
            });
            assert!(innermost.is_err());
            Err("inner fails".into())
        });
        assert!(inner.is_err());
        tm.atomic(|txn| s.write(txn, "d", 1))?;
        Ok::<_, BoxError>(())
    })
    .unwrap();
    s.assert_only(&["a", "d"]);
    assert!(!tm.in_transaction());
}

#[test]
fn resources_joined_after_a_savepoint_leave_on_rollback_and_can_join_again() {
    let s = three();
    let tm = s.manager().build();
    let txn = tm.begin().unwrap();
    s.mem.join(&txn).unwrap().put("a", 1).unwrap();
    let sp = txn.savepoint().unwrap();
    // SQLite and Redis join only now.
    s.write(&txn, "b", 1).unwrap();
    sp.rollback().unwrap();
    s.write(&txn, "c", 1).unwrap();
    tm.commit().unwrap();
    assert_eq!(rows(&s.db), vec![row("c", 1)]);
    assert_eq!(s.redis.get::<i64>("b").unwrap(), None);
    assert_eq!(s.redis.get::<i64>("c").unwrap(), Some(1));
    assert_eq!(s.mem.committed("a"), Some(1));
    assert_eq!(s.mem.committed("b"), None);
    assert!(tm_keys(&s.server).is_empty());
}

#[test]
fn sqlite_failing_at_its_commit_aborts_the_redis_prepare_and_leaves_nothing() {
    let s = three();
    s.db.with_connection(|c| {
        c.execute_batch(
            "CREATE TABLE parent (id INTEGER PRIMARY KEY);
             CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)",
        )
    })
    .unwrap();
    let tm = s.manager().build();
    let err = tm
        .run(|txn| {
            s.redis.join(txn)?.set("a", 1)?;
            s.mem.join(txn)?.put("a", 1)?;
            let conn = s.db.join(txn)?;
            conn.execute_batch("PRAGMA foreign_keys = ON")?;
            conn.execute("INSERT INTO kv VALUES ('a', 1)", [])?;
            conn.execute("INSERT INTO child VALUES (42)", [])?;
            Ok::<_, BoxError>(())
        })
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&s.db.path().display().to_string()), "{text}");
    s.assert_only(&[]);
}

#[test]
fn run_retries_a_redis_conflict_in_a_transaction_with_sqlite_and_commits_once() {
    let s = three();
    raw_set(&s.server, "n", "0");
    let tm = s
        .manager()
        .explicit(false)
        .backoff(tm::Backoff::None)
        .build();
    let attempts = Cell::new(0);
    tm.run(|txn| {
        attempts.set(attempts.get() + 1);
        let r = s.redis.join(txn)?;
        let n: i64 = r.get("n")?.unwrap_or(0);
        r.set("n", n + 1)?;
        s.db.join(txn)?.execute(
            "INSERT INTO kv VALUES ('attempt', ?1) ON CONFLICT(k) DO UPDATE SET v = excluded.v",
            [attempts.get() as i64],
        )?;
        if attempts.get() == 1 {
            raw_set(&s.server, "n", "10");
        }
        Ok::<_, BoxError>(())
    })
    .unwrap();
    assert_eq!(attempts.get(), 2);
    assert_eq!(s.redis.get::<i64>("n").unwrap(), Some(11));
    assert_eq!(rows(&s.db), vec![row("attempt", 2)]);
}

#[test]
fn errors_name_the_resource_and_the_phase() {
    let s = three();
    // Redis: an invalid staged write, refused at the vote with SQLite joined.
    raw_set(&s.server, "s", "text");
    let tm = s.manager().build();
    let err = tm
        .run(|txn| {
            s.db.join(txn)?
                .execute("INSERT INTO kv VALUES ('x', 1)", [])?;
            s.redis.join(txn)?.lpush("s", "v")?;
            Ok::<_, BoxError>(())
        })
        .unwrap_err();
    let text = tm::Report(&*err).to_string();
    assert!(text.contains(s.redis.server()), "{text}");
    assert!(text.contains("tpc_vote"), "{text}");
    assert!(text.contains("LPUSH"), "{text}");
    assert!(rows(&s.db).is_empty());
}

#[test]
fn redis_get_of_a_non_string_key_is_wrongtype_not_none() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    raw(&server, &["HSET", "h", "f", "v"]);
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    // GET of a hash is WRONGTYPE in Redis: answering None would let the
    // caller "initialise" the key and silently overwrite the hash.
    let err = r.get::<String>("h").unwrap_err();
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
    assert!(err.to_string().contains("GET"), "{err}");
    // MGET's own rule: nil for a key that is not a string.
    assert_eq!(r.mget::<String, _>(&["h"]).unwrap(), vec![None]);
    tm.abort().unwrap();
}

#[test]
fn redis_exists_after_a_buffered_expire_sees_a_non_string_key() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    raw(&server, &["HSET", "h", "f", "v"]);
    raw_set(&server, "s", "v");
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.expire("h", Duration::from_secs(100)).unwrap();
    r.expire("s", Duration::from_secs(100)).unwrap();
    r.expire("none", Duration::from_secs(100)).unwrap();
    assert!(r.exists("h").unwrap(), "a positive expiry keeps the hash");
    assert!(r.exists("s").unwrap());
    assert!(!r.exists("none").unwrap());
    tm.commit().unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg("h")
        .query(&mut server.connection())
        .unwrap();
    assert!(ttl > 0);
}

#[test]
fn redis_queued_command_too_large_for_lua_is_refused_before_the_decision() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let other = TestDataManager::new("zz-other", &CallLog::new());
    let tm = with_file_log(&dir).build();
    let sadd = |n: usize| {
        let mut cmd = redis::cmd("SADD");
        cmd.arg("big");
        for i in 0..n {
            cmd.arg(i);
        }
        cmd
    };
    // Big, but within what a Redis function can pass on: applied.
    let fits = sadd(6000);
    tm.run(|txn| {
        txn.join(other.clone())?;
        store.join(txn)?.queue(&fits, &["big"])?;
        Ok::<_, Error>(())
    })
    .unwrap();
    let n: usize = redis::cmd("SCARD")
        .arg("big")
        .query(&mut server.connection())
        .unwrap();
    assert_eq!(n, 6000);
    // Too big: refused when queued, never a partial (heuristic) apply.
    let too_big = sadd(10_000);
    let err = tm
        .run(|txn| {
            txn.join(other.clone())?;
            let r = store.join(txn)?;
            r.set("before", 1)?;
            r.queue(&too_big, &["big"])?;
            Ok::<_, Error>(())
        })
        .unwrap_err();
    assert!(!err.is_heuristic(), "{err}");
    assert!(
        matches!(redis_source(&err), tm::redis::Error::InvalidArgument(_)),
        "{err}"
    );
    assert_eq!(store.get::<i64>("before").unwrap(), None);
    assert!(tm_keys(&server).is_empty());
}

#[test]
fn redis_write_to_a_key_in_tms_own_key_space_is_refused_and_locks_stay_intact() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let other = TestDataManager::new("zz-other", &CallLog::new());
    let tm = with_file_log(&dir).build();
    let err = tm
        .run(|txn| {
            txn.join(other.clone())?;
            let r = store.join(txn)?;
            r.set("x", "data")?;
            // The very key tm uses as x's write lock.
            r.set("tm:{}:lock:x", "user value")?;
            Ok::<_, Error>(())
        })
        .unwrap_err();
    let e = redis_source(&err);
    assert!(matches!(e, tm::redis::Error::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("tm:{}:lock:x"), "{e}");
    assert_eq!(store.get::<String>("x").unwrap(), None);
    // Keys under the prefix that are not tm's own stay usable.
    tm.run(|txn| {
        txn.join(other.clone())?;
        let r = store.join(txn)?;
        r.set("x", "data")?;
        r.set("tm:{u1}:counter", 1)?;
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(store.get::<String>("x").unwrap().as_deref(), Some("data"));
    assert_eq!(store.get::<i64>("tm:{u1}:counter").unwrap(), Some(1));
    assert!(tm_keys(&server)
        .iter()
        .all(|k| k.as_slice() == b"tm:{u1}:counter"));
}

#[test]
fn redis_commit_prepared_finishes_every_record_of_the_transaction() {
    // Two Stores opened separately on one server (not clones) in one
    // transaction, with keys of different hash tags: two records.
    let server = TestServer::builder().fsync_always(true).start();
    let a = Store::open(&server.url()).unwrap();
    let b = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    for (store, key) in [(&a, "{u1}:x"), (&b, "{u2}:y")] {
        let r = store.join(&txn).unwrap();
        r.set(key, 1).unwrap();
        let dm = r.data_manager();
        dm.tpc_begin(&txn).unwrap();
        dm.commit(&txn).unwrap();
        dm.tpc_vote(&txn).unwrap();
    }
    let recovery = Store::open(&server.url()).unwrap();
    assert_eq!(recovery.in_doubt().unwrap()[0].txid, txn.id());
    recovery.commit_prepared(&txn.id()).unwrap();
    assert!(recovery.in_doubt().unwrap().is_empty());
    assert_eq!(a.get::<i64>("{u1}:x").unwrap(), Some(1));
    assert_eq!(a.get::<i64>("{u2}:y").unwrap(), Some(1));
    assert!(tm_keys(&server).is_empty());
    tm.abort().ok();
}
