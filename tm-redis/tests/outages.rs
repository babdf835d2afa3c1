//! Outages: a restarting server (`LOADING`), a dead server.

use std::time::{Duration, Instant};

use tm_core::{Error as TmError, TransactionManager};
use tm_redis::testing::TestServer;
use tm_redis::{Error, Options, Store};

mod support;
use support::raw;

use support::redis_error;

/// Reads and writes `n` in a transaction of `tm`; on failure, answers
/// whether tm would retry it (asked before the abort, while the
/// transaction's resources can still be asked).
fn read_and_write(tm: &TransactionManager, store: &Store) -> Result<(), (TmError, bool)> {
    let result = (|| {
        let r = store.join(&tm.begin()?)?;
        let n: i64 = r.get("n")?.unwrap_or(0);
        r.set("n", n + 1)?;
        tm.commit()
    })();
    result.map_err(|err| {
        let retry = tm.is_retryable(&err);
        tm.abort().unwrap();
        (err, retry)
    })
}

#[test]
fn loading_after_a_restart_is_retryable_and_a_retry_succeeds() {
    let mut server = TestServer::builder()
        .option("enable-debug-command", "yes")
        .option("key-load-delay", "20") // µs a key: ~2 s for 100k keys
        // Answer clients (LOADING) while loading, not only every 2 MB.
        .option("loading-process-events-interval-bytes", "1024")
        .start();
    let store = Store::open(&server.url()).unwrap();
    raw(&server, &["DEBUG", "POPULATE", "100000"]);
    // Into the AOF's RDB base, which is what key-load-delay slows down.
    raw(&server, &["BGREWRITEAOF"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info: String = redis::from_redis_value(raw(&server, &["INFO", "persistence"])).unwrap();
        if info.contains("aof_rewrite_in_progress:0") && info.contains("aof_rewrite_scheduled:0") {
            break;
        }
        assert!(Instant::now() < deadline, "AOF rewrite did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.restart_loading();

    let tm = TransactionManager::explicit();
    let (err, retry) = read_and_write(&tm, &store).unwrap_err();
    assert!(redis_error(&err).is_loading(), "{err:?}");
    assert!(redis_error(&err).is_retryable(), "{err}");
    assert!(retry, "tm would not retry {err}");
    assert!(err.to_string().contains(store.server()), "{err}");

    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err((err, retry)) = read_and_write(&tm, &store) {
        assert!(retry, "tm would not retry {err}");
        assert!(Instant::now() < deadline, "still failing: {err}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(store.get::<i64>("n").unwrap(), Some(1));
}

#[test]
fn a_killed_server_fails_the_next_operation_within_the_deadline_naming_the_server() {
    assert_eq!(
        Options::default().reconnect_deadline,
        Duration::from_secs(3)
    );
    let mut server = TestServer::start();
    let deadline = Duration::from_millis(800);
    let options = Options::default().reconnect_deadline(deadline);
    let store = Store::open_with(&server.url(), options).unwrap();
    let tm = TransactionManager::builder()
        .explicit(true)
        .retry_attempt_count(20)
        .build();
    read_and_write(&tm, &store).unwrap();
    server.kill(); // SIGKILL

    let started = Instant::now();
    let (err, retry) = read_and_write(&tm, &store).unwrap_err();
    let took = started.elapsed();
    assert!(took < deadline + Duration::from_secs(1), "{took:?}");
    assert!(err.to_string().contains(store.server()), "{err}");
    let redis = redis_error(&err);
    assert!(
        matches!(
            redis,
            Error::Unavailable {
                phase: tm_core::Phase::Work,
                ..
            }
        ),
        "{redis:?}"
    );
    assert!(
        !retry,
        "retrying a dead server is what hung the bank: {err}"
    );

    // tm.run with 20 attempts gives up after one deadline, not twenty.
    let started = Instant::now();
    let result = tm.run(|txn| {
        let r = store.join(txn)?;
        r.set("n", 1)?;
        Ok::<_, TmError>(())
    });
    assert!(result.is_err());
    assert!(
        started.elapsed() < deadline + Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_server_restarted_within_the_deadline_is_ridden_out() {
    let mut server = TestServer::builder().fsync_always(true).start();
    let store = Store::open(&server.url()).unwrap(); // 3 s deadline
    let tm = TransactionManager::explicit();
    read_and_write(&tm, &store).unwrap();
    server.kill_and_restart();
    // The pooled connections are dead; a new one is found.
    read_and_write(&tm, &store).unwrap();
    assert_eq!(store.get::<i64>("n").unwrap(), Some(2));
}

/// The bug: a one-phase commit whose reply was lost (here: the server hung
/// past the response timeout, then ran it) was an ordinary `Resource`
/// failure, so an app would think nothing happened and retry. It is
/// `Heuristic`, the server in doubt: and indeed the write landed.
#[test]
fn a_one_phase_commit_whose_reply_is_lost_is_heuristic() {
    let server = TestServer::start();
    let store = Store::open_with(
        &server.url(),
        Options::default().response_timeout(Duration::from_millis(300)),
    )
    .unwrap();
    let tm = support::manager();
    let txn = tm.begin().unwrap();
    store.join(&txn).unwrap().set("k", "v").unwrap();
    server.pause();
    let err = tm.commit().unwrap_err();
    server.resume();
    let server_name = [store.server().to_owned()];
    assert_eq!(
        support::heuristic(&err),
        (&[][..], &[][..], &server_name[..])
    );
    assert!(!tm.is_retryable(&err));
    tm.abort().ok();
    // The call was sent: the resumed server ran it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.get::<String>("k").unwrap().is_none() {
        assert!(Instant::now() < deadline, "the write never landed");
        std::thread::sleep(Duration::from_millis(20));
    }
}
