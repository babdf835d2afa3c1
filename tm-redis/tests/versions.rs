//! Rolling upgrades: the function library is versioned, so an old and a new
//! tm on one server each load and call their own, and a record the old one
//! prepared is recovered by the new one. `fixtures/tm_v1.lua` is the
//! library tm-redis shipped before versioning (library `tm`, functions
//! `tm_prepare`...), byte for byte.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::Value;
use tm_core::{
    recover_with, Decision, DecisionLog, Recoverable, RecoveryOptions, TransactionManager,
};
use tm_redis::{testing::TestServer, Store};

mod support;

const V1: &str = include_str!("fixtures/tm_v1.lua");

fn libraries(server: &TestServer) -> Vec<String> {
    let list: Vec<Value> = redis::cmd("FUNCTION")
        .arg("LIST")
        .query(&mut server.connection())
        .unwrap();
    let mut names = Vec::new();
    for lib in list {
        let fields: Vec<(String, Value)> = match lib {
            Value::Array(items) => items
                .chunks(2)
                .filter_map(|p| match (&p[0], &p[1]) {
                    (Value::BulkString(k), v) => {
                        Some((String::from_utf8_lossy(k).into_owned(), v.clone()))
                    }
                    (Value::SimpleString(k), v) => Some((k.clone(), v.clone())),
                    _ => None,
                })
                .collect(),
            Value::Map(items) => items
                .into_iter()
                .filter_map(|(k, v)| match k {
                    Value::BulkString(k) => Some((String::from_utf8_lossy(&k).into_owned(), v)),
                    Value::SimpleString(k) => Some((k, v)),
                    _ => None,
                })
                .collect(),
            _ => continue,
        };
        for (k, v) in fields {
            if k == "library_name" {
                names.push(redis::from_redis_value::<String>(v).unwrap());
            }
        }
    }
    names.sort();
    names
}

fn load_v1(server: &TestServer) {
    support::raw(server, &["FUNCTION", "LOAD", "REPLACE", V1]);
}

/// v1's one-phase commit of `SET key value`, called as v1 calls it.
fn v1_set(server: &TestServer, key: &str, value: &str) -> Value {
    let lock = format!("tm:{{}}:lock:{key}");
    let rlock = format!("tm:{{}}:rlock:{key}");
    support::raw(
        server,
        &[
            "FCALL",
            "tm_commit",
            "3",
            key,
            &lock,
            &rlock,
            "old-1",
            "0",
            "SET",
            "1",
            "1",
            "1",
            value,
        ],
    )
}

/// The bug: both versions were the library `tm`, so whichever process
/// opened last replaced the other's functions (`FUNCTION LOAD REPLACE`).
#[test]
fn an_old_and_a_new_library_are_loaded_side_by_side() {
    let server = TestServer::start();
    load_v1(&server); // an old tm process opened first
    let store = Store::open(&server.url()).unwrap();
    load_v1(&server); // and restarts during the upgrade
    assert_eq!(
        libraries(&server),
        vec!["tm".to_owned(), "tm_v2".to_owned()]
    );

    // Each version still calls its own functions.
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    tm.run(|txn| {
        store.join(txn)?.set("new", "2")?;
        Ok::<_, tm_core::Error>(())
    })
    .unwrap();
    assert_eq!(store.get::<String>("new").unwrap().as_deref(), Some("2"));
    assert_eq!(v1_set(&server, "old", "1"), Value::Array(vec![]));
    assert_eq!(store.get::<String>("old").unwrap().as_deref(), Some("1"));

    // A new store opening again (REPLACE of its own version) leaves v1 be.
    Store::open(&server.url()).unwrap();
    assert_eq!(v1_set(&server, "old", "3"), Value::Array(vec![]));
    assert_eq!(
        libraries(&server),
        vec!["tm".to_owned(), "tm_v2".to_owned()]
    );
}

/// The key list v1 kept in a record: `nread`, `n`, each key length-prefixed.
fn key_list(nread: u32, keys: &[&str]) -> Vec<u8> {
    let mut out = nread.to_be_bytes().to_vec();
    out.extend_from_slice(&(keys.len() as u32).to_be_bytes());
    for k in keys {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k.as_bytes());
    }
    out
}

/// A record v1 prepared (not in v2's index) is listed and finished by v2's
/// recovery: committed from the log's decision, locks released.
#[test]
fn a_record_the_old_version_prepared_is_recovered_by_the_new() {
    let server = TestServer::builder().fsync_always(true).start();
    load_v1(&server);
    let (_dir, log) = support::decision_log();
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build();
    let txid = tm.begin().unwrap().id();
    tm.abort().unwrap();
    let id = txid.to_string();
    let record = format!("tm:{{}}:prepared:{id}");
    let tombstone = format!("tm:{{}}:aborted:{id}");
    let receipt = format!("tm:{{}}:applied:{id}");
    let blob = key_list(0, &["k"]);
    let mut prepare = redis::cmd("FCALL");
    prepare
        .arg("tm_prepare")
        .arg(7)
        .arg(&record)
        .arg(&tombstone)
        .arg(&tombstone)
        .arg(&receipt)
        .arg("k")
        .arg("tm:{}:lock:k")
        .arg("tm:{}:rlock:k")
        .arg(&id)
        .arg(0)
        .arg(blob)
        .arg(log.id().to_string())
        .arg("SET")
        .arg(1)
        .arg(1)
        .arg(1)
        .arg("from-v1");
    let ok: i64 = prepare.query(&mut server.connection()).unwrap();
    assert_eq!(ok, 1);

    let store = Store::open(&server.url()).unwrap();
    assert_eq!(support::in_doubt_ids(&store), vec![txid]);
    log.record_commit(&Decision::new(
        txid,
        vec![store.resource_id()],
        BTreeMap::new(),
    ))
    .unwrap();
    let report = recover_with(
        log.as_ref(),
        &[&store as &dyn Recoverable],
        &RecoveryOptions::new().grace(Duration::ZERO),
    )
    .unwrap();
    assert_eq!(
        report.committed,
        vec![(store.resource_id(), txid)],
        "{report}"
    );
    assert_eq!(
        store.get::<String>("k").unwrap().as_deref(),
        Some("from-v1")
    );
    assert!(
        support::tm_keys(&server).is_empty(),
        "{:?}",
        support::tm_keys(&server)
    );
    assert!(support::in_doubt_ids(&store).is_empty());
}
