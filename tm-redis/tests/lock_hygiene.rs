//! Lock hygiene: a prepare checks everything before its first write (the
//! record index included), refuses to land later than a tombstone lasts,
//! and removes orphan locks. An orphan lock (its holder has no prepared
//! record) can never be released by apply or abort; the first prepare that
//! meets one removes it (atomically, only if the holder still has no
//! record); a live holder's lock is never touched.

use std::time::Duration;

use tm_core::{Error as TmError, TransactionManager};
use tm_redis::{testing::TestServer, Error, Options, Store};

mod support;
use support::{manager, raw, redis_error};

fn write_k(tm: &TransactionManager, store: &Store, two_phase: bool) -> Result<(), TmError> {
    let txn = tm.begin()?;
    let r = store.join(&txn)?;
    r.set("k", "mine")?;
    let dm = r.data_manager();
    let result = (|| {
        if two_phase {
            dm.tpc_begin(&txn)?;
            dm.tpc_vote(&txn)?;
            dm.tpc_finish(&txn)
        } else {
            tm.commit()
        }
    })();
    if result.is_err() || two_phase {
        tm.abort().ok();
    }
    result
}

/// The bug: an orphan lock blocked its key for ever (every retry conflicted).
#[test]
fn an_orphan_write_lock_is_removed_by_the_prepare_that_meets_it() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    raw(&server, &["SET", "tm:{}:lock:k", "ghost-7"]);
    let tm = manager();
    let err = write_k(&tm, &store, true).unwrap_err();
    assert!(err.to_string().contains("orphan"), "{err}");
    assert_eq!(
        raw(&server, &["EXISTS", "tm:{}:lock:k"]),
        redis::Value::Int(0)
    );
    write_k(&tm, &store, true).unwrap();
    assert_eq!(store.get::<String>("k").unwrap().as_deref(), Some("mine"));
    // One phase too.
    raw(&server, &["SET", "tm:{}:lock:k", "ghost-8"]);
    assert!(write_k(&tm, &store, false).is_err());
    write_k(&tm, &store, false).unwrap();
}

#[test]
fn an_orphan_read_lock_member_is_removed_and_live_readers_stay() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    // A live reader of k, prepared (with its record).
    let reader_tm = manager();
    let reader = reader_tm.begin().unwrap();
    let rr = store.join(&reader).unwrap();
    assert_eq!(rr.get::<String>("k").unwrap(), None);
    let rdm = rr.data_manager();
    rdm.tpc_begin(&reader).unwrap();
    rdm.tpc_vote(&reader).unwrap();
    // And a ghost reader with no record.
    raw(&server, &["SADD", "tm:{}:rlock:k", "ghost-9"]);
    let tm = manager();
    // While the live reader is prepared, the writer conflicts, whichever
    // reader the check meets first, and the live reader's lock stays.
    let err = write_k(&tm, &store, true).unwrap_err();
    assert!(matches!(err, TmError::Conflict { .. }), "{err}");
    let members = |server: &TestServer| -> Vec<String> {
        let mut m: Vec<String> = redis::cmd("SMEMBERS")
            .arg("tm:{}:rlock:k")
            .query(&mut server.connection())
            .unwrap();
        m.sort();
        m
    };
    assert!(members(&server).contains(&reader.id().to_string()));
    rdm.tpc_finish(&reader).unwrap();
    // Then the ghost, if the first conflict did not already meet and remove
    // it, is met now and removed; the retry succeeds.
    if members(&server) == vec!["ghost-9".to_owned()] {
        let err = write_k(&tm, &store, true).unwrap_err();
        assert!(err.to_string().contains("orphan"), "{err}");
    } else {
        assert!(err.to_string().contains("orphan"), "{err}");
    }
    assert!(members(&server).is_empty());
    write_k(&tm, &store, true).unwrap();
}

#[test]
fn a_live_write_lock_is_never_taken_for_an_orphan() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let holder_tm = manager();
    let holder = holder_tm.begin().unwrap();
    let h = store.join(&holder).unwrap();
    h.set("k", "theirs").unwrap();
    let hdm = h.data_manager();
    hdm.tpc_begin(&holder).unwrap();
    hdm.tpc_vote(&holder).unwrap();
    let tm = manager();
    for _ in 0..3 {
        let err = write_k(&tm, &store, true).unwrap_err();
        assert!(
            matches!(err, TmError::Conflict { .. }) && !err.to_string().contains("orphan"),
            "{err}"
        );
    }
    hdm.tpc_finish(&holder).unwrap();
    assert_eq!(store.get::<String>("k").unwrap().as_deref(), Some("theirs"));
}

/// An outside client's value under the record index: refused before the
/// first write, naming the key, with no lock left.
#[test]
fn a_wrong_typed_record_index_is_refused_before_anything_is_written() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    raw(&server, &["SET", "tm:{}:records", "not a set"]);
    let tm = manager();
    let err = write_k(&tm, &store, true).unwrap_err();
    match redis_error(&err) {
        Error::LockKeyType { key, found, .. } => {
            assert_eq!(key, "tm:{}:records");
            assert_eq!(found, "string");
        }
        other => panic!("expected LockKeyType, got {other}"),
    }
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("tm:*")
        .query(&mut server.connection())
        .unwrap();
    let mut left: Vec<String> = left
        .into_iter()
        .filter(|k| !k.contains(":aborted:") && !k.ends_with(":store-id"))
        .collect();
    left.sort();
    assert_eq!(left, vec!["tm:{}:records".to_owned()]);
}

/// A prepare that reaches the server later than a tombstone lasts is
/// refused (the tombstone of its abort may be gone). Here the tombstone
/// lasts 50 ms and the server hangs 300 ms with the prepare in its socket.
#[test]
fn a_prepare_later_than_a_tombstone_lasts_is_refused() {
    let server = TestServer::start();
    let store = Store::open_with(
        &server.url(),
        Options::default().tombstone_ttl(Duration::from_millis(50)),
    )
    .unwrap();
    let tm = manager();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.set("k", "late").unwrap();
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    server.pause();
    let resume = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            server.resume();
        });
        dm.tpc_vote(&txn)
    });
    let err = resume.unwrap_err();
    assert!(
        matches!(redis_error(&err), Error::PrepareTooLate { .. }),
        "{err}"
    );
    dm.tpc_abort(&txn).unwrap();
    tm.abort().ok();
    assert!(support::tm_keys(&server).is_empty());
    // On time, the same store prepares.
    write_k(&tm, &store, true).unwrap();
}
