//! Recovery: a missing record is never success (receipts, tombstones, lost
//! records), ownership of records by decision log, and the grace period.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tm_core::{
    recover, recover_with, DataManager, Decision, DecisionLog, Error as TmError, FileDecisionLog,
    Missing, Recoverable, RecoveryOptions, Transaction, TransactionManager,
};
use tm_redis::testing::TestServer;
use tm_redis::{Error, Options, Store};

mod support;
use support::{decision_log, in_doubt_ids, logged_manager, raw};

/// A store that gives up reconnecting quickly: transactions these tests
/// leave open are aborted when the thread ends, after the server is gone.
fn store_of(server: &TestServer) -> Store {
    Store::open_with(
        &server.url(),
        Options::default().reconnect_deadline(Duration::from_millis(50)),
    )
    .unwrap()
}

/// Votes `store`'s handle of a new transaction of `tm` that sets `key`.
fn prepare(
    tm: &TransactionManager,
    store: &Store,
    key: &str,
) -> (Transaction, Arc<dyn DataManager>) {
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.set(key, "1").unwrap();
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();
    (txn, dm)
}

/// A new explicit manager on `log` (one transaction at a time each).
fn manager(log: &Arc<FileDecisionLog>) -> TransactionManager {
    TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .decision_log(log.clone())
        .build()
}

fn missing(err: &TmError) -> Option<Missing> {
    match err {
        TmError::RecordMissing { missing, .. } => Some(*missing),
        _ => None,
    }
}

/// The keys of `kind` (`prepared`, `applied`, `aborted`) tm left for `txid`.
fn tm_keys_of(server: &TestServer, kind: &str, txn: &Transaction) -> Vec<String> {
    let mut con = server.connection();
    redis::cmd("KEYS")
        .arg(format!("tm:*:{kind}:{}", txn.id()))
        .query(&mut con)
        .unwrap()
}

/// The bug: a finish that found no record answered "already finished", so
/// `commit()` returned `Ok` with the Redis half gone.
#[test]
fn finish_after_recovery_aborted_the_record_is_record_missing_aborted_not_ok() {
    let server = TestServer::start();
    let store = store_of(&server);
    let (_dir, tm) = logged_manager();
    let (txn, dm) = prepare(&tm, &store, "a");
    store.abort_prepared(&txn.id()).unwrap(); // "recovery"
    let err = dm.tpc_finish(&txn).unwrap_err();
    assert_eq!(missing(&err), Some(Missing::Aborted), "{err:?}");
    assert!(err.to_string().contains(store.server()), "{err}");
    assert_eq!(store.get::<String>("a").unwrap(), None);
}

/// Aborts the Redis part behind the coordinator's back at its own vote
/// (after Redis voted): what a failover or an operator could do.
struct AbortRedisAtVote {
    store: Store,
}

impl DataManager for AbortRedisAtVote {
    fn sort_key(&self) -> &str {
        "zz-abort-redis-at-vote"
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
    fn tpc_vote(&self, txn: &Transaction) -> tm_core::Result<()> {
        self.store.abort_prepared(&txn.id())
    }
    fn tpc_finish(&self, _: &Transaction) -> tm_core::Result<()> {
        Ok(())
    }
    fn tpc_abort(&self, _: &Transaction) -> tm_core::Result<()> {
        Ok(())
    }
}

#[test]
fn commit_whose_redis_record_was_aborted_before_finish_is_heuristic_not_ok() {
    let server = TestServer::start();
    let store = store_of(&server);
    let (_dir, tm) = logged_manager();
    let txn = tm.begin().unwrap();
    store.join(&txn).unwrap().set("a", "1").unwrap();
    txn.join(Arc::new(AbortRedisAtVote {
        store: store.clone(),
    }))
    .unwrap();
    let err = tm.commit().unwrap_err();
    match &err {
        TmError::Heuristic {
            committed,
            rolled_back,
            in_doubt,
        } => {
            assert_eq!(committed, &vec!["zz-abort-redis-at-vote".to_owned()]);
            assert_eq!(rolled_back, &vec![store.server().to_owned()]);
            assert!(in_doubt.is_empty(), "{err}");
        }
        other => panic!("expected a heuristic outcome, got {other:?}"),
    }
    tm.abort().unwrap();
    assert_eq!(store.get::<String>("a").unwrap(), None);
}

#[test]
fn commit_prepared_tells_a_receipt_a_tombstone_and_a_lost_record_apart() {
    let server = TestServer::start();
    let store = store_of(&server);
    let (_dir, log) = decision_log();

    // Applied: the receipt makes a second commit Ok.
    let tm_applied = manager(&log);
    let (applied, _dm) = prepare(&tm_applied, &store, "a");
    store.commit_prepared(&applied.id()).unwrap();
    store.commit_prepared(&applied.id()).unwrap();
    assert_eq!(tm_keys_of(&server, "applied", &applied).len(), 1);

    // Aborted: the tombstone tells.
    let tm_aborted = manager(&log);
    let (aborted, _dm) = prepare(&tm_aborted, &store, "b");
    store.abort_prepared(&aborted.id()).unwrap();
    let err = store.commit_prepared(&aborted.id()).unwrap_err();
    assert_eq!(missing(&err), Some(Missing::Aborted), "{err:?}");

    // Lost: the record gone with no trace (a failover to a replica that
    // lacked it, a restore of older data).
    let tm_lost = manager(&log);
    let (lost, _dm) = prepare(&tm_lost, &store, "c");
    for key in tm_keys_of(&server, "prepared", &lost) {
        raw(&server, &["DEL", &key]);
    }
    let err = store.commit_prepared(&lost.id()).unwrap_err();
    assert_eq!(missing(&err), Some(Missing::Lost), "{err:?}");
    assert!(err.to_string().contains("lost"), "{err}");

    // Applied, then both record and receipt gone: lost too, never Ok.
    for key in tm_keys_of(&server, "applied", &applied) {
        raw(&server, &["DEL", &key]);
    }
    let err = store.commit_prepared(&applied.id()).unwrap_err();
    assert_eq!(missing(&err), Some(Missing::Lost), "{err:?}");
}

#[test]
fn finish_of_a_record_lost_by_hand_is_record_missing_lost() {
    let server = TestServer::start();
    let store = store_of(&server);
    let (_dir, tm) = logged_manager();
    let (txn, dm) = prepare(&tm, &store, "{u1}:a"); // a tagged record
    for key in tm_keys_of(&server, "prepared", &txn) {
        raw(&server, &["DEL", &key]);
    }
    let err = dm.tpc_finish(&txn).unwrap_err();
    assert_eq!(missing(&err), Some(Missing::Lost), "{err:?}");
}

#[test]
fn finish_sent_twice_is_ok_by_its_receipt() {
    let server = TestServer::start();
    let store = store_of(&server);
    let (_dir, tm) = logged_manager();
    let (txn, dm) = prepare(&tm, &store, "a");
    // Recovery finished it first (e.g. the finish reply was lost).
    store.commit_prepared(&txn.id()).unwrap();
    dm.tpc_finish(&txn).unwrap();
    assert_eq!(store.get::<String>("a").unwrap().as_deref(), Some("1"));
}

#[test]
fn receipts_and_tombstones_expire_after_their_configured_ttl() {
    let server = TestServer::start();
    let day = Duration::from_secs(24 * 3600);
    assert_eq!(Options::default().receipt_ttl, day);
    assert_eq!(Options::default().tombstone_ttl, day);
    let options = Options::default()
        .receipt_ttl(Duration::from_secs(100))
        .tombstone_ttl(Duration::from_secs(200));
    let store = Store::open_with(&server.url(), options).unwrap();
    let (_dir, log) = decision_log();
    let tm_applied = manager(&log);
    let (applied, _dm) = prepare(&tm_applied, &store, "a");
    store.commit_prepared(&applied.id()).unwrap();
    let tm_aborted = manager(&log);
    let (aborted, _dm) = prepare(&tm_aborted, &store, "b");
    store.abort_prepared(&aborted.id()).unwrap();
    let pttl = |key: &str| -> i64 {
        let v = raw(&server, &["PTTL", key]);
        redis::from_redis_value(v).unwrap()
    };
    let receipt = &tm_keys_of(&server, "applied", &applied)[0];
    assert!(
        (90_000..=100_000).contains(&pttl(receipt)),
        "{}",
        pttl(receipt)
    );
    let tombstone = &tm_keys_of(&server, "aborted", &aborted)[0];
    assert!(
        (190_000..=200_000).contains(&pttl(tombstone)),
        "{}",
        pttl(tombstone)
    );
}

/// A prepare of an aborted transaction arriving late (a duplicate on a
/// second connection of the same transaction) meets the tombstone.
#[test]
fn late_prepare_of_an_aborted_transaction_is_refused_by_its_tombstone() {
    let server = TestServer::start();
    let store = store_of(&server);
    let (_dir, tm) = logged_manager();
    let (txn, dm) = prepare(&tm, &store, "a");
    dm.tpc_abort(&txn).unwrap();
    // The same transaction's prepare, through a second Store on the server.
    let late = store_of(&server);
    let r = late.join(&txn).unwrap();
    r.set("a", "late").unwrap();
    let ldm = r.data_manager();
    ldm.tpc_begin(&txn).unwrap();
    ldm.commit(&txn).unwrap();
    let err = ldm.tpc_vote(&txn).unwrap_err();
    let TmError::Resource { source, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(
        matches!(source.downcast_ref::<Error>(), Some(Error::Aborted { .. })),
        "{err}"
    );
    ldm.tpc_abort(&txn).unwrap();
    assert!(in_doubt_ids(&store).is_empty(), "no orphan record");
    assert_eq!(store.get::<String>("a").unwrap(), None);
}

#[test]
fn a_record_names_its_log_and_age_and_only_its_own_log_resolves_it() {
    let server = TestServer::start();
    let store = store_of(&server);
    let (_dir_a, log_a) = decision_log();
    let (_dir_b, log_b) = decision_log();
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .decision_log(log_a.clone())
        .build();
    let (txn, _dm) = prepare(&tm, &store, "a");
    assert_eq!(txn.log_id(), Some(log_a.id()));
    std::thread::sleep(Duration::from_millis(50));

    let listed = store.in_doubt().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].txid, txn.id());
    assert_eq!(listed[0].log, Some(log_a.id()));
    assert!(
        listed[0].age >= Duration::from_millis(50) && listed[0].age < Duration::from_secs(10),
        "{:?}",
        listed[0].age
    );

    let zero = RecoveryOptions::new().grace(Duration::ZERO);
    let report = recover_with(log_b.as_ref(), &[&store as &dyn Recoverable], &zero).unwrap();
    assert!(report.aborted.is_empty(), "{report:?}");
    assert_eq!(report.foreign.len(), 1, "{report:?}");
    let (rid, record) = &report.foreign[0];
    assert_eq!(rid, &store.resource_id());
    assert_eq!((record.txid, record.log), (txn.id(), Some(log_a.id())));
    assert_eq!(in_doubt_ids(&store), vec![txn.id()], "left alone");

    let report = recover_with(log_a.as_ref(), &[&store as &dyn Recoverable], &zero).unwrap();
    assert_eq!(report.aborted, vec![(store.resource_id(), txn.id())]);
    assert!(report.nothing_in_doubt(), "{report:?}");
    assert!(in_doubt_ids(&store).is_empty());
}

#[test]
fn a_fresh_undecided_record_is_deferred_an_old_one_aborted_behind_the_fence() {
    let server = TestServer::start();
    let store = store_of(&server);
    let (_dir, log) = decision_log();
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .decision_log(log.clone())
        .build();
    let (txn, dm) = prepare(&tm, &store, "a");

    // Within the default 5 s grace: a live coordinator's work.
    let report = recover(log.as_ref(), &[&store as &dyn Recoverable]).unwrap();
    assert_eq!(report.deferred.len(), 1, "{report:?}");
    assert_eq!(report.deferred[0].1.txid, txn.id());
    assert_eq!(in_doubt_ids(&store), vec![txn.id()]);

    // Past the grace: fenced, then aborted.
    let zero = RecoveryOptions::new().grace(Duration::ZERO);
    let report = recover_with(log.as_ref(), &[&store as &dyn Recoverable], &zero).unwrap();
    assert_eq!(report.aborted, vec![(store.resource_id(), txn.id())]);
    assert!(in_doubt_ids(&store).is_empty());
    // The stalled coordinator arrives with its commit: refused by the fence.
    let decision = Decision::new(txn.id(), vec![store.resource_id()], BTreeMap::new());
    let err = log.record_commit(&decision).unwrap_err();
    assert!(matches!(err, TmError::Fenced { .. }), "{err:?}");
    // And its finish, were it sent anyway, is not Ok.
    let err = dm.tpc_finish(&txn).unwrap_err();
    assert_eq!(missing(&err), Some(Missing::Aborted), "{err:?}");
}

#[test]
fn a_record_prepared_without_a_log_is_listed_without_owner_and_left_alone() {
    let server = TestServer::start();
    let store = store_of(&server);
    let tm = TransactionManager::builder()
        .explicit(true)
        .independent(true)
        .independent(true)
        .build();
    let (txn, _dm) = prepare(&tm, &store, "a");
    let listed = store.in_doubt().unwrap();
    assert_eq!((listed[0].txid, listed[0].log), (txn.id(), None));
    let (_dir, log) = decision_log();
    let zero = RecoveryOptions::new().grace(Duration::ZERO);
    let report = recover_with(log.as_ref(), &[&store as &dyn Recoverable], &zero).unwrap();
    assert_eq!(report.foreign.len(), 1, "{report:?}");
    assert_eq!(in_doubt_ids(&store), vec![txn.id()]);
}

#[test]
fn recovery_reports_a_decided_transaction_already_finished_by_its_receipt_or_lost() {
    let server = TestServer::start();
    let store = store_of(&server);
    let (_dir, log) = decision_log();
    let tm_done = manager(&log);
    let (done, _dm) = prepare(&tm_done, &store, "a");
    store.commit_prepared(&done.id()).unwrap();
    let tm_lost = manager(&log);
    let (lost, _dm) = prepare(&tm_lost, &store, "b");
    for key in tm_keys_of(&server, "prepared", &lost) {
        raw(&server, &["DEL", &key]);
    }
    for txn in [&done, &lost] {
        let decision = Decision::new(txn.id(), vec![store.resource_id()], BTreeMap::new());
        log.record_commit(&decision).unwrap();
    }
    let report = recover(log.as_ref(), &[&store as &dyn Recoverable]).unwrap();
    let rid = store.resource_id();
    assert_eq!(report.already_finished, vec![(rid.clone(), done.id())]);
    assert_eq!(report.lost, vec![(rid, lost.id())]);
    assert!(!report.is_clean());
    let pending: Vec<_> = log.pending().unwrap().iter().map(|d| d.txid).collect();
    assert_eq!(pending, vec![lost.id()], "the lost one's decision is kept");
}

/// The bug: aborting a transaction that was already applied (a receipt,
/// no record) answered `Ok` and left a tombstone beside the receipt, so a
/// report said "aborted" of a committed transaction.
#[test]
fn aborting_an_applied_transaction_is_never_ok() {
    let server = TestServer::start();
    let store = store_of(&server);
    let (_dir, log) = decision_log();
    let tm = manager(&log);
    let (txn, dm) = prepare(&tm, &store, "a");
    dm.tpc_finish(&txn).unwrap();
    let err = store.abort_prepared(&txn.id()).unwrap_err();
    assert_eq!(missing(&err), Some(Missing::Committed), "{err}");
    assert!(
        tm_keys_of(&server, "aborted", &txn).is_empty(),
        "no tombstone beside the receipt"
    );
    assert_eq!(store.get::<String>("a").unwrap().as_deref(), Some("1"));
    // And what was never prepared here still aborts to `Ok` (a tombstone).
    let (other, _dm) = prepare(&manager(&log), &store, "b");
    store.abort_prepared(&other.id()).unwrap();
    store.abort_prepared(&other.id()).unwrap();
    assert_eq!(store.get::<String>("b").unwrap(), None);
}
