//! `tm-recover`, the operator tool, run as a real process against a real
//! SQLite file and redis-server: list, dry run, recover, operator commit
//! and abort through the fence, take-over, exit codes.

#![cfg(feature = "cli")]

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::sync::Arc;

use tm::redis::testing::TestServer;
use tm::redis::Store;
use tm::sqlite::{Database, SqliteDecisionLog};
use tm::{Decision, DecisionLog, FileDecisionLog, Recoverable, TransactionManager, TxId};

fn tool(args: &[&str]) -> (i32, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_tm-recover"))
        .args(args)
        .output()
        .expect("run tm-recover");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    (status.code().unwrap_or(-1), text)
}

/// Prepares `key = 1` in Redis under `log`'s manager and stops there (the
/// coordinator "died" after its vote); with `decide`, the commit decision
/// is recorded too.
fn prepare(store: &Store, log: Arc<dyn DecisionLog>, key: &str, decide: bool) -> TxId {
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(log.clone())
        .independent(true) // each "dead" coordinator's transaction stays open
        .build();
    let txn = tm.begin().unwrap();
    let h = store.join(&txn).unwrap();
    h.set(key, 1).unwrap();
    let dm = h.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();
    if decide {
        log.record_commit(&Decision::new(
            txn.id(),
            vec![store.resource_id()],
            BTreeMap::from([("user".to_owned(), "alice".to_owned())]),
        ))
        .unwrap();
    }
    let id = txn.id();
    std::mem::forget(txn); // a dead coordinator ends nothing
    std::mem::forget(tm);
    id
}

#[test]
fn the_operator_lists_recovers_and_resolves_in_doubt_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("app.db");
    let db = Database::open(&db_path).unwrap();
    let log: Arc<dyn DecisionLog> = Arc::new(SqliteDecisionLog::new(&db).unwrap());
    let server = TestServer::start();
    let url = server.url();
    let store = Store::open(&url).unwrap();
    let foreign: Arc<dyn DecisionLog> =
        Arc::new(FileDecisionLog::open(dir.path().join("other.log")).unwrap());
    let dead_path = dir.path().join("dead.log");
    let dead: Arc<dyn DecisionLog> = Arc::new(FileDecisionLog::open(&dead_path).unwrap());
    let dead_id = dead.id().to_string();

    let decided = prepare(&store, log.clone(), "decided", true);
    let undecided = prepare(&store, log.clone(), "undecided", false);
    let other = prepare(&store, foreign.clone(), "other", false);
    let orphan = prepare(&store, dead.clone(), "orphan", false);
    drop(dead);
    let base = [
        "--sqlite",
        db_path.to_str().unwrap(),
        "--redis",
        url.as_str(),
    ];
    let with =
        |more: &[&str]| -> Vec<String> { base.iter().chain(more).map(|s| s.to_string()).collect() };
    let run = |more: &[&str]| {
        let args = with(more);
        tool(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let (code, out) = run(&["list"]);
    assert_eq!(code, 1, "{out}");
    for id in [decided, undecided, other, orphan] {
        assert!(out.contains(&id.to_string()), "{id} missing: {out}");
    }
    assert!(out.contains("(foreign)"), "{out}");
    assert!(out.contains("decision:     commit"), "{out}");
    assert!(out.contains("user:         alice"), "{out}");
    assert!(out.contains("4 in doubt"), "{out}");

    // A dry run changes nothing.
    let (code, out) = run(&["recover", "--grace", "0", "--dry-run"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("dry run: "), "{out}");
    assert_eq!(store.in_doubt().unwrap().len(), 4);

    // Recovery of this log: the decided one commits, the undecided one is
    // fenced and aborted, the other logs' are left alone.
    let (code, out) = run(&["recover", "--grace", "0"]);
    assert_eq!(code, 1, "foreign records are left in doubt: {out}");
    assert!(out.contains(&format!("committed {decided}")), "{out}");
    assert!(out.contains(&format!("aborted {undecided}")), "{out}");
    assert!(out.contains(&format!("foreign {other}")), "{out}");
    assert_eq!(store.get::<i64>("decided").unwrap(), Some(1));
    assert_eq!(store.get::<i64>("undecided").unwrap(), None);
    // The fence: the undecided one's commit is refused from now on.
    let (code, out) = run(&["commit", &undecided.to_string()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not in doubt"), "{out}");

    // The dead coordinator's records, by explicit take-over only.
    let (code, out) = run(&["take-over", &dead_id]);
    assert!(out.contains(&format!("aborted {orphan}")), "{code} {out}");

    // The operator's word on a live log's record: abort it.
    let (code, out) = run(&["abort", &other.to_string()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("aborted at"), "{out}");
    let (code, out) = run(&["list"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("nothing in doubt"), "{out}");
}

#[test]
fn usage_and_set_up_errors_are_clear_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.db");
    let (code, out) = tool(&["--sqlite", missing.to_str().unwrap(), "list"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("nope.db") && out.contains("no such database"),
        "{out}"
    );
    let (code, out) = tool(&["list"]);
    assert_eq!(code, 2, "{out}");
    let db_path = dir.path().join("app.db");
    Database::open(&db_path).unwrap();
    let (code, out) = tool(&["--sqlite", db_path.to_str().unwrap(), "commit"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--all"), "{out}");
    let (code, out) = tool(&["--sqlite", db_path.to_str().unwrap(), "abort", "not-a-txid"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not-a-txid"), "{out}");
    let (code, out) = tool(&["--sqlite", db_path.to_str().unwrap(), "take-over", "xyz"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("log id"), "{out}");
}
