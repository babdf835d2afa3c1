//! Adversarial key names: user keys shaped like tm's own keys must never
//! make recovery misfire (a WRONGTYPE from a lock taken for a record, a user
//! key taken for a record or a receipt).

use std::time::Duration;

use tm_core::{Error as TmError, Missing, Recoverable, TransactionManager, TxId};
use tm_redis::testing::TestServer;
use tm_redis::{Options, Store};

mod support;
use support::{in_doubt_ids, logged_manager};

/// Names with braces, tm's kinds and the prefix itself, some shaped like a
/// record, receipt or tombstone of `txid` (or like the lock of one).
fn odd_keys(txid: &TxId) -> Vec<String> {
    let mut keys: Vec<String> = [
        "{",
        "}",
        "{}",
        "}{",
        "a{b}c",
        "{{x}",
        ":prepared:",
        ":lock:",
        ":rlock:",
        "tm:",
        "tm:{",
        "tm:}",
        "tm:{}",
        "tm:x}:lock:y",
        "x}:records",
        "x}:store-id",
        "tm:x}:records",
        "{}:records",
        ":records",
    ]
    .iter()
    .map(|k| k.to_string())
    .collect();
    for kind in ["prepared", "applied", "aborted", "lock"] {
        keys.push(format!("x}}:{kind}:{txid}"));
        keys.push(format!("tm:x}}:{kind}:{txid}"));
        keys.push(format!("{{t}}x}}:{kind}:{txid}"));
        keys.push(format!("tm:{{x}}y}}:{kind}:{txid}"));
    }
    keys
}

fn store_of(server: &TestServer) -> Store {
    Store::open_with(
        &server.url(),
        Options::default().reconnect_deadline(Duration::from_millis(50)),
    )
    .unwrap()
}

/// A transaction id no transaction on the server has used.
fn unused_txid() -> TxId {
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    let id = txn.id();
    tm.abort().unwrap();
    id
}

#[test]
fn user_keys_shaped_like_tm_keys_commit_and_never_misfire_in_recovery() {
    let server = TestServer::start();
    let store = store_of(&server);
    let ghost = unused_txid(); // never prepared anywhere
    let (_dir, tm) = logged_manager();

    // One phase: every odd name, as a string, and as a hash with the fields
    // of a record (`k`, `w`, `l`, `t`).
    tm.run(|txn| {
        let r = store.join(txn)?;
        for k in odd_keys(&ghost) {
            r.set(&k, "v")?;
            r.hset(format!("{k}-h"), "k", "x")?;
        }
        for kind in ["prepared", "applied", "aborted"] {
            r.hset(format!("tm:{{z}}y}}:{kind}:{ghost}"), "k", "x")?;
        }
        Ok::<_, TmError>(())
    })
    .unwrap();
    for k in odd_keys(&ghost) {
        assert_eq!(
            store.get::<String>(&k).unwrap().as_deref(),
            Some("v"),
            "{k}"
        );
    }
    assert_eq!(in_doubt_ids(&store), Vec::<TxId>::new());

    // Two phase, left in doubt: the transaction's locks are on keys shaped
    // like records of itself and receipts of `ghost`.
    let txn = tm.begin().unwrap();
    let id = txn.id();
    let r = store.join(&txn).unwrap();
    let mut keys = odd_keys(&id);
    keys.extend(odd_keys(&ghost));
    for k in &keys {
        r.set(k, "2").unwrap();
    }
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();

    assert_eq!(in_doubt_ids(&store), vec![id]);
    // A lock on `x}:applied:<ghost>` is no receipt of ghost.
    match store.commit_prepared(&ghost) {
        Err(TmError::RecordMissing { missing, .. }) => assert_eq!(missing, Missing::Lost),
        other => panic!("ghost: {other:?}"),
    }
    store.commit_prepared(&id).unwrap();
    for k in &keys {
        assert_eq!(store.get::<String>(k).unwrap().as_deref(), Some("2"), "{k}");
    }
    assert_eq!(in_doubt_ids(&store), Vec::<TxId>::new());
    // The transaction was committed behind its (hand-driven) coordinator's
    // back: its abort now says so instead of answering `Ok`.
    let err = tm.abort().unwrap_err();
    assert!(err.to_string().contains("committed"), "{err}");

    // tm's own names stay out of reach (a receipt above all: it would be
    // taken for "applied before").
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    for kind in ["lock", "rlock", "prepared", "aborted", "applied"] {
        let k = format!("tm:{{x}}:{kind}:{ghost}");
        assert!(
            matches!(r.set(&k, "1"), Err(tm_redis::Error::InvalidArgument(_))),
            "{k}"
        );
    }
    // And the store's own keys: its id and the index of records.
    for k in ["tm:{}:store-id", "tm:{}:records"] {
        assert!(
            matches!(r.set(k, "1"), Err(tm_redis::Error::InvalidArgument(_))),
            "{k}"
        );
        assert!(
            matches!(
                r.queue(redis::cmd("DEL").arg(k), &[k]),
                Err(tm_redis::Error::InvalidArgument(_))
            ),
            "{k}"
        );
    }
    tm.abort().unwrap();
}

/// Another client put a value of the wrong type under one of tm's lock
/// keys. Before: the prepare took the first read locks, then died on a
/// WRONGTYPE in Lua, leaving read locks with no record.
#[test]
fn wrong_typed_lock_key_fails_the_vote_cleanly_leaving_no_lock_or_record() {
    for (planted, kind) in [
        ("tm:{}:rlock:b", "string"), // a read lock of a key only read
        ("tm:{}:lock:c", "hash"),    // the write lock of a key written
        ("tm:{}:rlock:c", "string"), // the read lock of a key written
    ] {
        let server = TestServer::start();
        let store = store_of(&server);
        let mut con = server.connection();
        if kind == "hash" {
            redis::cmd("HSET")
                .arg(planted)
                .arg("f")
                .arg("v")
                .exec(&mut con)
                .unwrap();
        } else {
            redis::cmd("SET")
                .arg(planted)
                .arg("v")
                .exec(&mut con)
                .unwrap();
        }
        let (_dir, tm) = logged_manager();
        let txn = tm.begin().unwrap();
        let r = store.join(&txn).unwrap();
        r.get::<String>("a").unwrap();
        r.get::<String>("b").unwrap();
        r.set("c", "1").unwrap();
        let dm = r.data_manager();
        dm.tpc_begin(&txn).unwrap();
        dm.commit(&txn).unwrap();
        let err = dm.tpc_vote(&txn).unwrap_err();
        let left: Vec<String> = support::tm_keys(&server)
            .into_iter()
            .filter(|k| k != planted)
            .collect();
        assert!(left.is_empty(), "{planted}: left {left:?}");
        assert!(format!("{err:?}").contains(planted), "{planted}: {err:?}");
        assert_eq!(store.get::<String>("c").unwrap(), None);
        tm.abort().unwrap();
    }
}
