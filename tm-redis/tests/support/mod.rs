//! Shared helpers of the tm-redis integration tests.
#![allow(dead_code)] // each test file uses a part

use std::sync::Arc;

use tm_core::{FileDecisionLog, Recoverable, TransactionManager, TxId};
use tm_redis::Store;

/// A decision log of its own in a fresh temporary directory (keep the
/// directory alive as long as the log).
pub fn decision_log() -> (tempfile::TempDir, Arc<FileDecisionLog>) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let log = FileDecisionLog::open(dir.path().join("decisions")).expect("open the decision log");
    (dir, Arc::new(log))
}

/// The txids `store` lists in doubt.
pub fn in_doubt_ids(store: &Store) -> Vec<TxId> {
    store
        .in_doubt()
        .expect("in_doubt")
        .into_iter()
        .map(|r| r.txid)
        .collect()
}

/// Runs one plain Redis command on a connection of its own.
pub fn raw(server: &tm_redis::testing::TestServer, args: &[&str]) -> redis::Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut server.connection()).expect("raw command")
}

/// An explicit manager with a decision log of its own, as a transaction
/// with Redis beside another resource needs (keep the directory alive).
pub fn logged_manager() -> (tempfile::TempDir, TransactionManager) {
    let (dir, log) = decision_log();
    // Independent: tests leave "crashed" coordinators' transactions open
    // on the thread while another manager recovers or retries.
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .decision_log(log)
        .build();
    (dir, tm)
}

/// Every key tm itself left on the server, tombstones, receipts and the
/// store id aside (lossy UTF-8).
pub fn tm_keys(server: &tm_redis::testing::TestServer) -> Vec<String> {
    let mut con = server.connection();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("tm:*").query(&mut con).unwrap();
    keys.iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .filter(|k| {
            !k.contains(":aborted:") && !k.contains(":applied:") && !k.ends_with("}:store-id")
        })
        .collect()
}

/// An explicit, independent manager (tests interleave several on one
/// thread).
pub fn manager() -> TransactionManager {
    TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .build()
}

/// The lists of a `Heuristic` error: committed, rolled back, in doubt.
/// Panics on any other error.
pub fn heuristic(err: &tm_core::Error) -> (&[String], &[String], &[String]) {
    match err {
        tm_core::Error::Heuristic {
            committed,
            rolled_back,
            in_doubt,
        } => (committed, rolled_back, in_doubt),
        other => panic!("expected Heuristic, got {other:?}"),
    }
}

/// The tm-redis error inside a `Resource` error. Panics on any other.
pub fn redis_error(err: &tm_core::Error) -> &tm_redis::Error {
    match err {
        tm_core::Error::Resource { source, .. } => source
            .downcast_ref::<tm_redis::Error>()
            .expect("a tm-redis error"),
        other => panic!("not a resource error: {other:?}"),
    }
}
