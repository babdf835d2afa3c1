//! With replicas, the vote waits for them (`WAIT`, pipelined) before it
//! answers yes, and `durability()` says so. A real primary and a real
//! replica (`--replicaof`); a lagging replica is one stopped with SIGSTOP.

use std::time::{Duration, Instant};

use tm_redis::{testing::TestServer, Error, Options, Store};

mod support;
use support::manager;

fn records_on(server: &TestServer) -> Vec<String> {
    redis::cmd("KEYS")
        .arg("tm:*:prepared:*")
        .query(&mut server.connection())
        .unwrap()
}

#[test]
fn durability_reports_replicas_and_that_votes_wait_for_them() {
    let primary = TestServer::builder().fsync_always(true).start();
    let alone = Store::open(&primary.url()).unwrap();
    assert_eq!(alone.durability().replicas, Some(0));
    assert!(alone.durability().is_durable(), "{}", alone.durability());

    let _replica = TestServer::builder()
        .fsync_always(true)
        .replica_of(&primary)
        .start();
    let store = Store::open(&primary.url()).unwrap();
    let d = store.durability();
    assert_eq!(d.replicas, Some(1));
    assert_eq!(d.replicas_waited, 1);
    assert!(d.prepares_reach_replicas());
    assert!(d.is_durable(), "{d}");
    assert!(d.to_string().contains("wait for 1 of 1 replicas"), "{d}");

    // Choosing not to wait is reported: a failover may lose prepares.
    let lax = Store::open_with(&primary.url(), Options::default().wait_replicas(Some(0))).unwrap();
    assert!(!lax.durability().prepares_reach_replicas());
    assert!(!lax.durability().is_durable());
    assert!(
        lax.durability().to_string().contains("1 replicas"),
        "{}",
        lax.durability()
    );
}

#[test]
fn an_acknowledged_vote_is_on_the_replica() {
    let primary = TestServer::builder().fsync_always(true).start();
    let replica = TestServer::builder()
        .fsync_always(true)
        .replica_of(&primary)
        .start();
    let store = Store::open(&primary.url()).unwrap();
    let tm = manager();
    for i in 0..50 {
        let txn = tm.begin().unwrap();
        let r = store.join(&txn).unwrap();
        if i % 2 == 0 {
            // A read: the vote goes inside WATCH/MULTI/EXEC, WAIT after it.
            assert_eq!(r.get::<i64>(format!("k{i}")).unwrap(), None);
        }
        r.set(format!("k{i}"), i).unwrap();
        let dm = r.data_manager();
        dm.tpc_begin(&txn).unwrap();
        dm.tpc_vote(&txn).unwrap();
        // WAIT returned: the replica has it, at once, every time.
        let on_replica = records_on(&replica);
        assert_eq!(
            on_replica,
            vec![format!("tm:{{}}:prepared:{}", txn.id())],
            "round {i}"
        );
        dm.tpc_finish(&txn).unwrap();
        tm.abort().ok();
    }
}

/// The bug: with a replica behind, the vote answered yes with the prepare
/// only on the primary; a failover then would have lost it.
#[test]
fn a_vote_the_replica_does_not_acknowledge_is_not_a_yes() {
    let primary = TestServer::builder().fsync_always(true).start();
    let replica = TestServer::builder()
        .fsync_always(true)
        .replica_of(&primary)
        .start();
    let store = Store::open_with(
        &primary.url(),
        Options::default().replica_timeout(Duration::from_millis(300)),
    )
    .unwrap();
    replica.pause();
    let tm = manager();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.set("a", "1").unwrap();
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    let started = Instant::now();
    let err = dm.tpc_vote(&txn).unwrap_err();
    let waited = started.elapsed();
    replica.resume();
    let redis_err = support::redis_error(&err);
    assert!(
        matches!(
            redis_err,
            Error::NotReplicated {
                acked: 0,
                wanted: 1,
                ..
            }
        ),
        "{redis_err}"
    );
    assert!(waited >= Duration::from_millis(250), "it waited {waited:?}");
    // The prepare happened on the primary; the abort cleans it up.
    dm.tpc_abort(&txn).unwrap();
    assert!(support::tm_keys(&primary).is_empty());
    assert_eq!(store.get::<String>("a").unwrap(), None);
}

/// Through the manager: two Redis primaries, one with a stopped replica:
/// the commit fails before its decision and nothing is written anywhere.
#[test]
fn a_commit_with_a_lagging_replica_aborts_everywhere() {
    let primary = TestServer::builder().fsync_always(true).start();
    let replica = TestServer::builder()
        .fsync_always(true)
        .replica_of(&primary)
        .start();
    let other = TestServer::builder().fsync_always(true).start();
    let store = Store::open_with(
        &primary.url(),
        Options::default().replica_timeout(Duration::from_millis(200)),
    )
    .unwrap();
    let second = Store::open(&other.url()).unwrap();
    let (_dir, tm) = support::logged_manager();
    replica.pause();
    let txn = tm.begin().unwrap();
    store.join(&txn).unwrap().set("a", "1").unwrap();
    second.join(&txn).unwrap().set("b", "1").unwrap();
    let err = tm.commit().unwrap_err();
    replica.resume();
    assert!(!err.is_heuristic(), "{err}");
    tm.abort().ok();
    assert_eq!(store.get::<String>("a").unwrap(), None);
    assert_eq!(second.get::<String>("b").unwrap(), None);
    assert!(support::tm_keys(&primary).is_empty());
    assert!(support::tm_keys(&other).is_empty());
}
