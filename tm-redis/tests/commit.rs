//! Commit, abort, read-your-writes, savepoints and the write commands,
//! against a real redis-server.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tm_core::testing::{CallLog, TestDataManager};
use tm_core::{Error as TmError, TransactionManager};
use tm_redis::testing::TestServer;
use tm_redis::{Error, Options, Store};

mod support;
use support::tm_keys;

/// Sends one command outside tm (to set up committed data).
fn raw(con: &mut redis::Connection, args: &[&str]) {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.exec(con).unwrap();
}

fn redis_error(err: &TmError) -> &Error {
    match err {
        TmError::Resource { source, .. } => {
            source.downcast_ref::<Error>().expect("a tm-redis error")
        }
        other => panic!("not a resource error: {other:?}"),
    }
}

#[test]
fn one_phase_commit_writes_and_leaves_no_tm_keys() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    tm.run(|txn| {
        let r = store.join(txn)?;
        r.set("a", "1")?;
        r.set("b", 2)?;
        Ok::<_, TmError>(())
    })
    .unwrap();
    assert_eq!(store.get::<String>("a").unwrap().as_deref(), Some("1"));
    assert_eq!(store.get::<i64>("b").unwrap(), Some(2));
    assert!(tm_keys(&server).is_empty());
}

#[test]
fn two_phase_commit_with_another_resource_applies_and_releases_everything() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let log = CallLog::new();
    let (_dir, tm) = support::logged_manager();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    let seen: Option<i64> = r.get("counter").unwrap();
    r.set("counter", seen.unwrap_or(0) + 1).unwrap();
    txn.join(TestDataManager::new("zz-other", &log)).unwrap();
    tm.commit().unwrap();
    assert_eq!(store.get::<i64>("counter").unwrap(), Some(1));
    assert!(tm_keys(&server).is_empty(), "{:?}", tm_keys(&server));
}

#[test]
fn read_only_participant_holds_read_locks_until_finish() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    assert_eq!(r.get::<String>("a").unwrap(), None);
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();
    let mut keys = tm_keys(&server);
    keys.sort();
    assert_eq!(
        keys,
        vec![
            format!("tm:{{}}:prepared:{}", txn.id()),
            "tm:{}:records".to_owned(),
            "tm:{}:rlock:a".to_owned()
        ]
    );

    // A writer of the key read is refused at once while the reader is prepared.
    let tm2 = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let t2 = tm2.begin().unwrap();
    store.join(&t2).unwrap().set("a", "x").unwrap();
    let err = tm2.commit().unwrap_err();
    assert!(matches!(err, TmError::Conflict { .. }), "{err:?}");
    tm2.abort().unwrap();

    dm.tpc_finish(&txn).unwrap();
    assert!(tm_keys(&server).is_empty(), "{:?}", tm_keys(&server));
}

#[test]
fn abort_discards_buffered_writes() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    let _ = r.get::<String>("k").unwrap();
    r.set("k", "v").unwrap();
    tm.abort().unwrap();
    assert_eq!(store.get::<String>("k").unwrap(), None);
    assert!(
        r.set("k", "again").is_err(),
        "a finished transaction takes no writes"
    );
    // The connection that held the WATCH goes back to the pool clean.
    tm.run(|txn| store.join(txn)?.set("k", "w").map_err(TmError::from))
        .unwrap();
    assert_eq!(store.get::<String>("k").unwrap().as_deref(), Some("w"));
}

#[test]
fn string_reads_see_the_transactions_own_writes() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let mut con = server.connection();
    raw(&mut con, &["SET", "n", "40"]);
    raw(&mut con, &["SET", "gone", "x"]);
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.incr_by("n", 2).unwrap(); // blind: the committed base is read
    assert_eq!(r.get::<i64>("n").unwrap(), Some(42));
    r.set("s", "v").unwrap();
    r.del("gone").unwrap();
    assert_eq!(
        r.mget::<String, _>(&["s", "gone", "n", "missing"]).unwrap(),
        vec![Some("v".to_owned()), None, Some("42".to_owned()), None]
    );
    assert!(r.exists("s").unwrap());
    assert!(!r.exists("gone").unwrap());
    r.incr_by("fresh", 5).unwrap();
    r.incr_by("fresh", -1).unwrap();
    assert_eq!(r.get::<i64>("fresh").unwrap(), Some(4));
    r.sadd("set", "m").unwrap();
    assert!(r.exists("set").unwrap());
    tm.commit().unwrap();
    assert_eq!(store.get::<i64>("n").unwrap(), Some(42));
    assert_eq!(store.get::<i64>("fresh").unwrap(), Some(4));
    assert_eq!(store.get::<String>("gone").unwrap(), None);
}

#[test]
fn reads_of_own_non_string_writes_are_refused_not_stale() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.hset("h", "f", "v").unwrap();
    let err = r.hget::<String>("h", "f").unwrap_err();
    assert!(matches!(err, Error::ReadAfterWrite { .. }), "{err}");
    assert!(err.to_string().contains("HGET"));
    assert!(matches!(
        r.get::<String>("h"),
        Err(Error::ReadAfterWrite { .. })
    ));
    r.rpush("l", "x").unwrap();
    assert!(matches!(r.llen("l"), Err(Error::ReadAfterWrite { .. })));
    r.set("s", "v").unwrap();
    assert!(matches!(r.ttl("s"), Err(Error::ReadAfterWrite { .. })));
    tm.abort().unwrap();
}

/// Found by tests/differential.rs: a buffered write that keeps or needs the
/// committed value (a positive expire, INCRBY) made `get` ask the server at
/// once, even when a later write (DEL, SET, expire 0) made that value
/// irrelevant: a key holding a set answered WRONGTYPE instead of the nil the
/// transaction's own writes give; and a removal (ZREM) that may empty such a
/// key answered WRONGTYPE instead of ReadAfterWrite.
#[test]
fn reads_after_a_later_overwrite_do_not_depend_on_the_committed_value() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let mut con = server.connection();
    for key in ["s1", "s2", "s3"] {
        let () = redis::cmd("SADD")
            .arg(key)
            .arg("m")
            .query(&mut con)
            .unwrap();
    }
    let () = redis::cmd("ZADD")
        .arg("z")
        .arg(1)
        .arg("m")
        .query(&mut con)
        .unwrap();
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.expire("s1", Duration::from_secs(100)).unwrap();
    r.expire("s1", Duration::ZERO).unwrap();
    assert_eq!(r.get::<String>("s1").unwrap(), None);
    assert!(!r.exists("s1").unwrap());
    r.expire("s2", Duration::from_secs(100)).unwrap();
    r.set("s2", "v").unwrap();
    assert_eq!(r.get::<String>("s2").unwrap().as_deref(), Some("v"));
    r.del("s3").unwrap();
    r.incr_by("s3", 2).unwrap();
    assert_eq!(r.get::<i64>("s3").unwrap(), Some(2));
    r.expire("z", Duration::from_secs(100)).unwrap();
    r.zrem("z", "m").unwrap();
    assert!(matches!(
        r.get::<String>("z"),
        Err(Error::ReadAfterWrite { .. })
    ));
    tm.commit().unwrap();
    assert_eq!(store.get::<String>("s1").unwrap(), None);
    assert_eq!(store.get::<String>("s2").unwrap().as_deref(), Some("v"));
    assert_eq!(store.get::<i64>("s3").unwrap(), Some(2));
    let exists: bool = redis::cmd("EXISTS").arg("z").query(&mut con).unwrap();
    assert!(!exists);
}

/// A queued command listing no keys was dropped without a word when it was
/// the transaction's only write (nothing to lock, so nothing was sent at
/// the vote or the one-phase commit), and run when there was any other key.
/// It is now always run, one-phase and two-phase.
#[test]
fn queued_command_listing_no_keys_is_not_dropped() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    for (two_phase, key) in [(false, "one"), (true, "two")] {
        let (_dir, tm) = support::logged_manager();
        let txn = tm.begin().unwrap();
        let r = store.join(&txn).unwrap();
        // Should list `key` (to lock it); either way the write must happen.
        r.queue(redis::cmd("APPEND").arg(key).arg("x"), &[] as &[&str])
            .unwrap();
        if two_phase {
            txn.join(TestDataManager::new("zz-other", &CallLog::new()))
                .unwrap();
        }
        tm.commit().unwrap();
        assert_eq!(store.get::<String>(key).unwrap().as_deref(), Some("x"));
    }
    assert!(tm_keys(&server).is_empty(), "{:?}", tm_keys(&server));
}

#[test]
fn every_write_command_is_applied_in_order() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let mut con = server.connection();
    raw(&mut con, &["HSET", "h", "old", "1"]);
    raw(&mut con, &["SADD", "s", "old"]);
    raw(&mut con, &["ZADD", "z", "1", "old"]);
    raw(&mut con, &["SET", "doomed", "x"]);
    for two_phase in [false, true] {
        let (_dir, tm) = support::logged_manager();
        let txn = tm.begin().unwrap();
        let r = store.join(&txn).unwrap();
        r.hset("h", "f", "v").unwrap();
        r.hdel("h", "old").unwrap();
        r.sadd("s", "new").unwrap();
        r.srem("s", "old").unwrap();
        r.lpush("l", "b").unwrap();
        r.lpush("l", "a").unwrap();
        r.rpush("l", "c").unwrap();
        r.zadd("z", "new", 2.5).unwrap();
        r.zrem("z", "old").unwrap();
        r.set_ex("ex", "v", Duration::from_secs(100)).unwrap();
        r.set("later", "v").unwrap();
        r.expire("later", Duration::from_secs(200)).unwrap();
        r.queue(
            redis::cmd("SETRANGE").arg("range").arg(2).arg("yz"),
            &["range"],
        )
        .unwrap();
        r.expire("doomed", Duration::ZERO).unwrap();
        if two_phase {
            txn.join(TestDataManager::new("zz-other", &CallLog::new()))
                .unwrap();
        }
        tm.commit().unwrap();

        let h: HashMap<String, String> = redis::cmd("HGETALL").arg("h").query(&mut con).unwrap();
        assert_eq!(h, HashMap::from([("f".to_owned(), "v".to_owned())]));
        let s: HashSet<String> = redis::cmd("SMEMBERS").arg("s").query(&mut con).unwrap();
        assert_eq!(s, HashSet::from(["new".to_owned()]));
        let l: Vec<String> = redis::cmd("LRANGE")
            .arg("l")
            .arg(0)
            .arg(-1)
            .query(&mut con)
            .unwrap();
        assert_eq!(l[..3], ["a", "b", "c"]);
        let z: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg("z")
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query(&mut con)
            .unwrap();
        assert_eq!(z, vec![("new".to_owned(), 2.5)]);
        let ttl: i64 = redis::cmd("TTL").arg("ex").query(&mut con).unwrap();
        assert!(ttl > 0 && ttl <= 100, "{ttl}");
        let ttl: i64 = redis::cmd("TTL").arg("later").query(&mut con).unwrap();
        assert!(ttl > 100 && ttl <= 200, "{ttl}");
        let range: Vec<u8> = redis::cmd("GET").arg("range").query(&mut con).unwrap();
        assert_eq!(range, b"\0\0yz");
        let doomed: Option<String> = redis::cmd("GET").arg("doomed").query(&mut con).unwrap();
        assert_eq!(doomed, None);
        raw(&mut con, &["DEL", "l"]);
    }
    assert!(tm_keys(&server).is_empty());
}

#[test]
fn transactional_reads_return_committed_data() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let mut con = server.connection();
    raw(&mut con, &["HSET", "h", "f", "v"]);
    raw(&mut con, &["SADD", "s", "a", "b"]);
    raw(&mut con, &["RPUSH", "l", "x", "y"]);
    raw(&mut con, &["ZADD", "z", "1.5", "m"]);
    raw(&mut con, &["SET", "t", "v", "EX", "100"]);
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    tm.run(|txn| {
        let r = store.join(txn)?;
        assert_eq!(r.hget::<String>("h", "f")?.as_deref(), Some("v"));
        assert_eq!(r.hget::<String>("h", "nope")?, None);
        let all: HashMap<String, String> = r.hgetall("h")?;
        assert_eq!(all.len(), 1);
        let members: HashSet<String> = r.smembers("s")?;
        assert_eq!(members.len(), 2);
        assert_eq!(r.scard("s")?, 2);
        assert_eq!(r.lrange::<Vec<String>>("l", 0, -1)?, vec!["x", "y"]);
        assert_eq!(r.llen("l")?, 2);
        assert_eq!(r.zscore("z", "m")?, Some(1.5));
        assert_eq!(r.zscore("z", "none")?, None);
        let ttl = r.ttl("t")?;
        assert!(ttl > 0 && ttl <= 100);
        assert_eq!(r.ttl("absent")?, -2);
        assert!(r.exists("h")?);
        Ok::<_, TmError>(())
    })
    .unwrap();
}

#[test]
fn savepoint_rollback_drops_writes_buffered_since() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.set("kept", "1").unwrap();
    let sp = txn.savepoint().unwrap();
    r.set("dropped", "2").unwrap();
    r.set("kept", "overwritten").unwrap();
    assert_eq!(
        r.get::<String>("kept").unwrap().as_deref(),
        Some("overwritten")
    );
    sp.rollback().unwrap();
    assert_eq!(r.get::<String>("kept").unwrap().as_deref(), Some("1"));
    r.set("after", "3").unwrap();
    sp.rollback().unwrap(); // again
    tm.commit().unwrap();
    assert_eq!(store.get::<String>("kept").unwrap().as_deref(), Some("1"));
    assert_eq!(store.get::<String>("dropped").unwrap(), None);
    assert_eq!(store.get::<String>("after").unwrap(), None);
}

#[test]
fn changed_read_makes_the_commit_a_retryable_conflict() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    assert_eq!(r.get::<String>("a").unwrap(), None);
    redis::cmd("SET")
        .arg("a")
        .arg("other")
        .exec(&mut server.connection())
        .unwrap();
    r.set("b", "derived").unwrap();
    let err = tm.commit().unwrap_err();
    assert!(matches!(err, TmError::Conflict { .. }), "{err:?}");
    assert!(tm.is_retryable(&err));
    assert!(err.to_string().contains(store.server()), "{err}");
    tm.abort().unwrap();
    assert_eq!(store.get::<String>("b").unwrap(), None);
}

#[test]
fn changed_read_refuses_the_vote() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let (_dir, tm) = support::logged_manager();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    let _ = r.get::<String>("a").unwrap();
    r.set("b", "x").unwrap();
    txn.join(TestDataManager::new("zz-other", &CallLog::new()))
        .unwrap();
    redis::cmd("SET")
        .arg("a")
        .arg("other")
        .exec(&mut server.connection())
        .unwrap();
    let err = tm.commit().unwrap_err();
    assert!(matches!(err, TmError::Conflict { .. }), "{err:?}");
    tm.abort().unwrap();
    assert_eq!(store.get::<String>("b").unwrap(), None);
    assert!(tm_keys(&server).is_empty());
}

#[test]
fn durability_is_reported_and_can_be_required() {
    let lax = TestServer::start(); // appendfsync everysec
    let store = Store::open(&lax.url()).unwrap();
    assert!(!store.durability().is_durable());
    assert!(store
        .durability()
        .to_string()
        .contains("appendfsync is everysec"));
    let err =
        Store::open_with(&lax.url(), Options::default().require_durable_prepare(true)).unwrap_err();
    assert!(matches!(err, Error::NotDurable { .. }), "{err}");

    let strict = TestServer::builder().fsync_always(true).start();
    let store = Store::open_with(
        &strict.url(),
        Options::default().require_durable_prepare(true),
    )
    .unwrap();
    assert!(store.durability().is_durable());

    for policy in ["allkeys-lru", "volatile-lru", "volatile-ttl"] {
        let evicting = TestServer::builder()
            .fsync_always(true)
            .option("maxmemory", "100mb")
            .option("maxmemory-policy", policy)
            .start();
        let store = Store::open(&evicting.url()).unwrap();
        assert!(!store.durability().is_durable(), "{policy}");
        assert!(store.durability().to_string().contains(policy), "{policy}");
    }
    // Without a memory limit, nothing is ever evicted, whatever the policy.
    let unlimited = TestServer::builder()
        .fsync_always(true)
        .option("maxmemory-policy", "volatile-lru")
        .start();
    let store = Store::open(&unlimited.url()).unwrap();
    assert!(store.durability().is_durable(), "{}", store.durability());
}

#[test]
fn prefix_and_tags_name_tm_keys() {
    let server = TestServer::start();
    let store = Store::open_with(&server.url(), Options::default().prefix("app:")).unwrap();
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.set("{u1}:a", "1").unwrap();
    r.set("{u1}:b", "2").unwrap();
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();
    let mut con = server.connection();
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("app:*").query(&mut con).unwrap();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "app:{u1}:lock:{u1}:a".to_owned(),
            "app:{u1}:lock:{u1}:b".to_owned(),
            format!("app:{{u1}}:prepared:{}", txn.id()),
            "app:{}:records".to_owned(),
            "app:{}:store-id".to_owned(),
        ]
    );
    dm.tpc_finish(&txn).unwrap();
    // Only the receipt is left, under the empty tag (where recovery finds
    // it without the record), and the store id.
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("app:*").query(&mut con).unwrap();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            format!("app:{{}}:applied:{}", txn.id()),
            "app:{}:store-id".to_owned()
        ]
    );
    assert_eq!(store.get::<i64>("{u1}:b").unwrap(), Some(2));
}

#[test]
fn function_flush_is_repaired_by_reloading() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let mut con = server.connection();
    raw(&mut con, &["FUNCTION", "FLUSH"]);
    // No reads: the one-phase call is simply sent again after the reload.
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    tm.run(|txn| store.join(txn)?.set("a", "1").map_err(TmError::from))
        .unwrap();
    assert_eq!(store.get::<String>("a").unwrap().as_deref(), Some("1"));

    // With reads, the WATCH is used up: a retryable error, then a retry works.
    raw(&mut con, &["FUNCTION", "FLUSH"]);
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    let _ = r.get::<String>("a").unwrap();
    r.set("a", "2").unwrap();
    let err = tm.commit().unwrap_err();
    assert!(
        matches!(redis_error(&err), Error::FunctionMissing { .. }),
        "{err:?}"
    );
    assert!(tm.is_retryable(&err), "{err:?}");
    tm.abort().unwrap();
    let mut attempts = 0;
    tm.run(|txn| {
        attempts += 1;
        let r = store.join(txn)?;
        let _ = r.get::<String>("a")?;
        r.set("a", "3")?;
        Ok::<_, TmError>(())
    })
    .unwrap();
    assert_eq!(attempts, 1, "the library was already reloaded");
    assert_eq!(store.get::<String>("a").unwrap().as_deref(), Some("3"));
}

#[test]
fn handle_and_store_are_send_sync_clone() {
    fn check<T: Send + Sync + Clone>() {}
    check::<Store>();
    check::<tm_redis::RedisHandle>();
}

#[test]
fn function_flush_before_a_blind_vote_is_repaired_without_a_retry() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let mut con = server.connection();
    raw(&mut con, &["FUNCTION", "FLUSH"]);
    // Nothing read: the prepare used up no WATCH and ran nothing, so it is
    // sent again after the reload, as the one-phase call is.
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
    dm.tpc_vote(&txn).unwrap();
    dm.tpc_finish(&txn).unwrap();
    assert_eq!(store.get::<String>("a").unwrap().as_deref(), Some("1"));
    assert!(tm_keys(&server).is_empty(), "{:?}", tm_keys(&server));
    tm.abort().ok();
}

/// `calls` of the commands a client sends to run a transaction, since the
/// last `CONFIG RESETSTAT` (commandstats also counts what a function calls
/// inside the server; those are left out).
fn client_calls(server: &TestServer) -> Vec<(String, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut server.connection())
        .unwrap();
    let mut out: Vec<(String, u64)> = info
        .lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
            ["fcall", "multi", "exec", "watch", "unwatch", "get", "mget"]
                .contains(&name)
                .then(|| (name.to_owned(), calls.parse().unwrap()))
        })
        .collect();
    out.sort();
    out
}

fn reset_stats(server: &TestServer) {
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .exec(&mut server.connection())
        .unwrap();
}

#[test]
fn vote_is_one_multi_fcall_exec_and_finish_one_fcall() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    for read_first in [true, false] {
        let txn = tm.begin().unwrap();
        let r = store.join(&txn).unwrap();
        if read_first {
            let _ = r.get::<i64>("n").unwrap();
        }
        r.set("n", 1).unwrap();
        r.rpush("log", "+1").unwrap();
        let dm = r.data_manager();
        dm.tpc_begin(&txn).unwrap();
        dm.commit(&txn).unwrap();
        reset_stats(&server);
        dm.tpc_vote(&txn).unwrap();
        let vote = if read_first {
            vec![
                ("exec".to_owned(), 1),
                ("fcall".to_owned(), 1),
                ("multi".to_owned(), 1),
            ]
        } else {
            vec![("fcall".to_owned(), 1)]
        };
        assert_eq!(client_calls(&server), vote, "read first: {read_first}");
        reset_stats(&server);
        dm.tpc_finish(&txn).unwrap();
        assert_eq!(
            client_calls(&server),
            vec![("fcall".to_owned(), 1)],
            "read first: {read_first}"
        );
        tm.abort().ok();
        assert_eq!(store.get::<i64>("n").unwrap(), Some(1));
        assert!(tm_keys(&server).is_empty(), "{:?}", tm_keys(&server));
    }
}
