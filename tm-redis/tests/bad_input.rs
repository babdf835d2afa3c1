//! Bad input: unreachable servers, writes that cannot run, odd keys and
//! values, big values.

use std::time::Duration;

use tm_core::testing::{CallLog, TestDataManager};
use tm_core::{Error as TmError, TransactionManager};
use tm_redis::testing::TestServer;
use tm_redis::{Error, Options, Store};

mod support;

use support::redis_error;

/// Commits `stage` on `store`, one-phase or (with a second resource)
/// two-phase; aborts on failure.
fn commit_with(
    store: &Store,
    two_phase: bool,
    stage: impl Fn(&tm_redis::RedisHandle),
) -> Result<(), TmError> {
    let (_dir, tm) = support::logged_manager();
    let txn = tm.begin()?;
    stage(&store.join(&txn)?);
    if two_phase {
        txn.join(TestDataManager::new("zz-other", &CallLog::new()))?;
    }
    let result = tm.commit();
    if result.is_err() {
        tm.abort()?;
    }
    result
}

#[test]
fn unreachable_server_fails_open_naming_the_url() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}/");
    let err = Store::open_with(
        &url,
        Options::default().connect_timeout(Duration::from_millis(300)),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(err.is_connection_refusal(), "{err}");
    assert!(err.to_string().contains(&url), "{err}");
    assert!(err.is_retryable());
}

#[test]
fn password_is_not_shown_in_errors() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = Store::open(&format!("redis://user:secret@127.0.0.1:{port}/")).unwrap_err();
    assert!(!err.to_string().contains("secret"), "{err}");
}

#[test]
fn not_a_url_is_an_invalid_argument() {
    let err = Store::open("http://nope").unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

/// A `{` or `}` in the prefix would become (or break) the hash tag of
/// every tm key; an empty prefix puts tm's keys among the user's.
#[test]
fn prefix_with_a_brace_or_empty_is_refused_at_open_naming_it() {
    let server = TestServer::start();
    for prefix in ["app{1}:", "a{", "b}:", ""] {
        let err = Store::open_with(&server.url(), Options::default().prefix(prefix)).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(_)),
            "{prefix:?}: {err}"
        );
        assert!(
            err.to_string().contains(&format!("{prefix:?}")),
            "{prefix:?}: {err}"
        );
    }
    Store::open_with(&server.url(), Options::default().prefix("app:tm:")).unwrap();
}

#[test]
fn wrongtype_write_is_caught_at_vote_and_nothing_is_written() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    redis::cmd("SET")
        .arg("s")
        .arg("string")
        .exec(&mut server.connection())
        .unwrap();
    for two_phase in [false, true] {
        let err = commit_with(&store, two_phase, |r| {
            r.set("first", "written?").unwrap();
            r.lpush("s", "x").unwrap();
        })
        .unwrap_err();
        let e = redis_error(&err);
        assert!(matches!(e, Error::Invalid { op: 2, .. }), "{e}");
        assert!(
            e.to_string().contains("WRONGTYPE") && e.to_string().contains("LPUSH"),
            "{e}"
        );
        assert!(!e.is_retryable());
        assert_eq!(
            store.get::<String>("first").unwrap(),
            None,
            "validated before the first write"
        );
    }
}

#[test]
fn validation_simulates_the_staged_commands_in_order() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    redis::cmd("SET")
        .arg("k")
        .arg("string")
        .exec(&mut server.connection())
        .unwrap();
    // DEL then HSET is valid...
    commit_with(&store, true, |r| {
        r.del("k").unwrap();
        r.hset("k", "f", "v").unwrap();
    })
    .unwrap();
    // ...SET then HSET is not.
    let err = commit_with(&store, true, |r| {
        r.set("k2", "v").unwrap();
        r.hset("k2", "f", "v").unwrap();
    })
    .unwrap_err();
    assert!(
        matches!(redis_error(&err), Error::Invalid { op: 2, .. }),
        "{err}"
    );
    assert_eq!(store.get::<String>("k2").unwrap(), None);
}

#[test]
fn out_of_range_incrby_is_caught_at_vote() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let mut con = server.connection();
    redis::cmd("SET")
        .arg("max")
        .arg(i64::MAX - 1)
        .exec(&mut con)
        .unwrap();
    redis::cmd("SET")
        .arg("min")
        .arg(i64::MIN + 1)
        .exec(&mut con)
        .unwrap();
    redis::cmd("SET")
        .arg("text")
        .arg("12abc")
        .exec(&mut con)
        .unwrap();
    redis::cmd("SET")
        .arg("big")
        .arg("9223372036854775808")
        .exec(&mut con)
        .unwrap();
    for two_phase in [false, true] {
        for (key, by) in [
            ("max", 2),
            ("min", -2),
            ("text", 1),
            ("big", 0),
            ("max", i64::MAX),
        ] {
            let err = commit_with(&store, two_phase, |r| r.incr_by(key, by).unwrap()).unwrap_err();
            assert!(
                matches!(redis_error(&err), Error::Invalid { .. }),
                "{key} {by}: {err}"
            );
        }
        // Two increments that overflow only together.
        let err = commit_with(&store, two_phase, |r| {
            r.incr_by("fresh", i64::MAX).unwrap();
            r.incr_by("fresh", 1).unwrap();
        })
        .unwrap_err();
        let text = tm_core::Report(&err).to_string();
        assert!(text.contains("overflow"), "{text}");
    }
    // The exact edges are fine.
    commit_with(&store, true, |r| {
        r.incr_by("max", 1).unwrap();
        r.incr_by("min", -1).unwrap();
        r.incr_by("edge", i64::MIN).unwrap();
        r.incr_by("neg", -5).unwrap();
        r.incr_by("neg", 3).unwrap();
    })
    .unwrap();
    assert_eq!(store.get::<i64>("max").unwrap(), Some(i64::MAX));
    assert_eq!(store.get::<i64>("min").unwrap(), Some(i64::MIN));
    assert_eq!(store.get::<i64>("edge").unwrap(), Some(i64::MIN));
    assert_eq!(store.get::<i64>("neg").unwrap(), Some(-2));
}

#[test]
fn empty_key_and_empty_value_work() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    for two_phase in [false, true] {
        commit_with(&store, two_phase, |r| {
            r.set("", "").unwrap();
            r.hset("h", "", "").unwrap();
        })
        .unwrap();
        assert_eq!(store.get::<Vec<u8>>("").unwrap(), Some(Vec::new()));
    }
    let tm = TransactionManager::explicit();
    tm.run(|txn| {
        let r = store.join(txn)?;
        assert_eq!(r.get::<Vec<u8>>("")?, Some(Vec::new()));
        r.set("", "again")?;
        Ok::<_, TmError>(())
    })
    .unwrap();
    assert_eq!(store.get::<String>("").unwrap().as_deref(), Some("again"));
}

#[test]
fn keys_and_values_with_all_256_byte_values_round_trip() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let all: Vec<u8> = (0..=255).collect();
    for two_phase in [false, true] {
        let tag = if two_phase { b"2" } else { b"1" };
        commit_with(&store, two_phase, |r| {
            let mut key = tag.to_vec();
            key.extend_from_slice(&all);
            r.set(&key, all.as_slice()).unwrap();
            for b in 0..=255u8 {
                r.set([tag[0], b], &[b, b'{', b'}', b]).unwrap();
                r.hset(b"hash", [tag[0], b], vec![b; 3]).unwrap();
            }
        })
        .unwrap();
        let mut key = tag.to_vec();
        key.extend_from_slice(&all);
        assert_eq!(store.get::<Vec<u8>>(&key).unwrap(), Some(all.clone()));
        for b in 0..=255u8 {
            assert_eq!(
                store.get::<Vec<u8>>([tag[0], b]).unwrap(),
                Some(vec![b, b'{', b'}', b])
            );
        }
        let field: Vec<u8> = redis::cmd("HGET")
            .arg("hash")
            .arg(&[tag[0], 0xff][..])
            .query(&mut server.connection())
            .unwrap();
        assert_eq!(field, vec![0xff; 3]);
    }
    let left = support::tm_keys(&server);
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn one_mebibyte_value_round_trips() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let value: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for two_phase in [false, true] {
        let key = format!("big{two_phase}");
        commit_with(&store, two_phase, |r| {
            r.set(&key, value.as_slice()).unwrap()
        })
        .unwrap();
        assert_eq!(
            store.get::<Vec<u8>>(&key).unwrap().as_deref(),
            Some(value.as_slice())
        );
    }
}

#[test]
fn queued_command_failing_at_apply_is_reported_as_partial() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    redis::cmd("SET")
        .arg("text")
        .arg("abc")
        .exec(&mut server.connection())
        .unwrap();
    // One phase: applied in part is a heuristic outcome too (it was
    // `Resource` before), naming the server as both committed and rolled
    // back.
    let err = commit_with(&store, false, |r| {
        r.set("applied", "1").unwrap();
        r.queue(redis::cmd("INCR").arg("text"), &["text"]).unwrap();
    })
    .unwrap_err();
    let server_name = [store.server().to_owned()];
    assert_eq!(
        support::heuristic(&err),
        (&server_name[..], &server_name[..], &[][..])
    );
    assert_eq!(
        store.get::<String>("applied").unwrap().as_deref(),
        Some("1")
    );
    // Two phase: it happens after the decision, so it is heuristic.
    let err = commit_with(&store, true, |r| {
        r.set("applied2", "1").unwrap();
        r.queue(redis::cmd("INCR").arg("text"), &["text"]).unwrap();
    })
    .unwrap_err();
    // Applied in part, not "in doubt" (the record is gone: recovery has
    // nothing to finish).
    let (committed, rolled_back, in_doubt) = support::heuristic(&err);
    assert!(committed.contains(&server_name[0]), "{err}");
    assert!(rolled_back.contains(&server_name[0]), "{err}");
    assert!(in_doubt.is_empty(), "{err}");
    assert_eq!(
        store.get::<String>("applied2").unwrap().as_deref(),
        Some("1")
    );
    let left = support::tm_keys(&server);
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn invalid_arguments_are_refused_at_once() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    assert!(matches!(
        r.zadd("z", "m", f64::NAN),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        r.set_ex("k", "v", Duration::ZERO),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        r.queue(&redis::Cmd::new(), &["k"]),
        Err(Error::InvalidArgument(_))
    ));
    tm.abort().unwrap();
}

#[test]
fn a_server_without_durable_settings_fails_open_when_durability_is_required() {
    let server = TestServer::start(); // appendfsync everysec
    let options = Options {
        require_durable_prepare: true,
        ..Options::default()
    };
    let err = Store::open_with(&server.url(), options).unwrap_err();
    assert!(err.to_string().contains("appendfsync"), "{err}");
    // Without the requirement it opens, and reports what is missing.
    let store = Store::open(&server.url()).unwrap();
    assert!(!store.durability().is_durable());
    let durable = TestServer::builder().fsync_always(true).start();
    let store = Store::open_with(
        &durable.url(),
        Options {
            require_durable_prepare: true,
            ..Options::default()
        },
    )
    .unwrap();
    assert!(store.durability().is_durable(), "{}", store.durability());
}

/// Found by tests/differential.rs: Redis refuses `PEXPIRE`/`SET PX` whose
/// deadline (now + ttl) leaves the 64-bit range ("invalid expire time"),
/// even on a missing key. The vote did not simulate that, so the write
/// failed only at apply, after the decision (a partial apply). Now such an
/// expiry is refused when it is staged.
#[test]
fn expiry_beyond_what_redis_takes_is_refused_when_staged_not_at_apply() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    for huge in [
        Duration::from_millis(i64::MAX as u64),
        Duration::from_millis(u64::MAX),
        Duration::MAX,
        tm_redis::MAX_TTL + Duration::from_millis(1),
    ] {
        let tm = TransactionManager::explicit();
        let txn = tm.begin().unwrap();
        let r = store.join(&txn).unwrap();
        assert!(
            matches!(r.expire("k", huge), Err(Error::InvalidArgument(_))),
            "expire {huge:?}"
        );
        assert!(
            matches!(r.set_ex("k", "v", huge), Err(Error::InvalidArgument(_))),
            "set_ex {huge:?}"
        );
        tm.abort().unwrap();
    }
    // The longest accepted expiry commits, one-phase and two-phase.
    for two_phase in [false, true] {
        commit_with(&store, two_phase, |r| {
            r.set_ex("k", "v", tm_redis::MAX_TTL).unwrap();
            r.set("j", "w").unwrap();
            r.expire("j", tm_redis::MAX_TTL).unwrap();
        })
        .unwrap();
        let mut con = server.connection();
        for key in ["k", "j"] {
            let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut con).unwrap();
            assert!(ttl > 0, "{key}: {ttl}");
        }
    }
}

/// An outside client changes a locked key's type between the vote and the
/// finish: the finish cannot apply that write. Never silent: the
/// transaction's finish is `Heuristic`, and recovery's `commit_prepared`
/// of such a record is `PartialApply` naming the write and the key.
#[test]
fn an_outside_write_between_vote_and_finish_is_never_a_silent_partial_apply() {
    use tm_core::Recoverable;
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm = support::manager();
    // Through the transaction's own finish.
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.set("s", "1").unwrap();
    r.hset("h", "f", "v").unwrap();
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();
    support::raw(&server, &["SET", "h", "outside"]);
    let err = dm.tpc_finish(&txn).unwrap_err();
    assert!(err.is_heuristic(), "{err}");
    tm.abort().ok();
    assert_eq!(store.get::<String>("s").unwrap().as_deref(), Some("1"));
    assert_eq!(
        store.get::<String>("h").unwrap().as_deref(),
        Some("outside")
    );

    // Through recovery: the coordinator stalls after the vote (kept open,
    // as if crashed), and recovery finishes the record.
    let stalled = support::manager();
    let txn = stalled.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.hset("h2", "f", "v").unwrap();
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();
    let id = txn.id();
    support::raw(&server, &["SET", "h2", "outside"]);
    let err = store.commit_prepared(&id).unwrap_err();
    match support::redis_error(&err) {
        Error::PartialApply { failures, .. } => {
            assert_eq!(failures.len(), 1, "{failures:?}");
            assert!(failures[0].starts_with("1 h2: WRONGTYPE"), "{failures:?}");
        }
        other => panic!("expected PartialApply, got {other}"),
    }
}
