//! Commit, abort, savepoints and nested `atomic` on real tables, checked
//! through an independent connection.

mod support;

use support::{insert, item_names, manager, open, pool_is_clean, BoxError};
use tm_core::{Error, MemoryStore, Status};

#[test]
fn committed_rows_are_visible_to_an_independent_connection() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager();
    tm.run(|txn| {
        let conn = db.join(txn)?;
        insert(&conn, "a")?;
        insert(&conn, "b")?;
        Ok::<_, BoxError>(())
    })
    .unwrap();
    assert_eq!(item_names(db.path()), ["a", "b"]);
    assert!(pool_is_clean(&db));
}

#[test]
fn uncommitted_rows_are_invisible_to_others_and_gone_after_abort() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager();
    let txn = tm.begin().unwrap();
    insert(&db.join(&txn).unwrap(), "a").unwrap();
    assert!(item_names(db.path()).is_empty());
    txn.abort().unwrap();
    assert_eq!(txn.status(), Status::Aborted);
    assert!(item_names(db.path()).is_empty());
    assert!(pool_is_clean(&db));
}

#[test]
fn a_second_join_in_the_same_transaction_returns_the_same_connection() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager();
    let txn = tm.begin().unwrap();
    insert(&db.join(&txn).unwrap(), "a").unwrap();
    // The first guard is gone; the row is still in the transaction.
    let n: i64 = db
        .join(&txn)
        .unwrap()
        .query_row("SELECT count(*) FROM item", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    // Two guards at once on one thread share the connection.
    let first = db.join(&txn).unwrap();
    let second = db.join(&txn).unwrap();
    insert(&second, "b").unwrap();
    let n: i64 = first
        .query_row("SELECT count(*) FROM item", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 2);
    drop((first, second));
    txn.commit().unwrap();
    assert_eq!(item_names(db.path()), ["a", "b"]);
}

#[test]
fn dropping_the_guard_neither_commits_nor_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager();
    let txn = tm.begin().unwrap();
    insert(&db.join(&txn).unwrap(), "kept").unwrap();
    assert!(
        item_names(db.path()).is_empty(),
        "not committed by the drop"
    );
    txn.commit().unwrap();
    assert_eq!(item_names(db.path()), ["kept"]);
}

#[test]
fn concurrent_transactions_on_other_threads_get_other_connections() {
    let dir = tempfile::tempdir().unwrap();
    let db = support::open_with(
        dir.path(),
        tm_sqlite::Options::default().begin(tm_sqlite::Begin::Deferred),
    );
    let tm = manager();
    let txn = tm.begin().unwrap();
    insert(&db.join(&txn).unwrap(), "mine").unwrap();
    let (db2, tm2) = (db.clone(), tm.clone());
    let seen = std::thread::spawn(move || {
        let other = tm2.begin().unwrap();
        let conn = db2.join(&other).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM item", [], |r| r.get(0))
            .unwrap();
        drop(conn);
        other.commit().unwrap();
        n
    })
    .join()
    .unwrap();
    assert_eq!(
        seen, 0,
        "the other thread does not see this uncommitted row"
    );
    txn.commit().unwrap();
}

#[test]
fn savepoint_rollback_undoes_only_the_work_after_it_and_can_be_repeated() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager();
    let txn = tm.begin().unwrap();
    insert(&db.join(&txn).unwrap(), "before").unwrap();
    let sp = txn.savepoint().unwrap();
    insert(&db.join(&txn).unwrap(), "after-1").unwrap();
    sp.rollback().unwrap();
    insert(&db.join(&txn).unwrap(), "after-2").unwrap();
    sp.rollback().unwrap();
    insert(&db.join(&txn).unwrap(), "after-3").unwrap();
    txn.commit().unwrap();
    assert_eq!(item_names(db.path()), ["before", "after-3"]);
}

#[test]
fn rolling_back_to_an_earlier_savepoint_invalidates_later_ones() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager();
    let txn = tm.begin().unwrap();
    db.join(&txn).unwrap();
    let first = txn.savepoint().unwrap();
    insert(&db.join(&txn).unwrap(), "x").unwrap();
    let second = txn.savepoint().unwrap();
    insert(&db.join(&txn).unwrap(), "y").unwrap();
    first.rollback().unwrap();
    assert!(matches!(second.rollback(), Err(Error::InvalidSavepoint)));
    insert(&db.join(&txn).unwrap(), "z").unwrap();
    txn.commit().unwrap();
    assert_eq!(item_names(db.path()), ["z"]);
}

#[test]
fn dropped_savepoints_are_released_without_disturbing_live_ones() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager();
    let txn = tm.begin().unwrap();
    db.join(&txn).unwrap();
    let outer = txn.savepoint().unwrap();
    insert(&db.join(&txn).unwrap(), "a").unwrap();
    let middle = txn.savepoint().unwrap();
    let inner = txn.savepoint().unwrap();
    drop(middle); // not on top: kept until `inner` goes
    insert(&db.join(&txn).unwrap(), "b").unwrap();
    inner.rollback().unwrap();
    drop(inner); // releases inner and middle
    insert(&db.join(&txn).unwrap(), "c").unwrap();
    outer.rollback().unwrap();
    insert(&db.join(&txn).unwrap(), "d").unwrap();
    txn.commit().unwrap();
    assert_eq!(item_names(db.path()), ["d"]);
}

#[test]
fn a_savepoint_spans_sqlite_and_another_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let store = MemoryStore::<i64>::new();
    let tm = manager();
    let txn = tm.begin().unwrap();
    insert(&db.join(&txn).unwrap(), "a").unwrap();
    store.join(&txn).unwrap().put("k", 1).unwrap();
    let sp = txn.savepoint().unwrap();
    insert(&db.join(&txn).unwrap(), "b").unwrap();
    store.join(&txn).unwrap().put("k", 2).unwrap();
    sp.rollback().unwrap();
    txn.commit().unwrap();
    assert_eq!(item_names(db.path()), ["a"]);
    assert_eq!(store.committed("k"), Some(1));
}

#[test]
fn nested_atomic_failure_undoes_only_the_inner_block() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager();
    tm.atomic(|txn| {
        insert(&*db.join(txn)?, "outer")?;
        let inner: Result<(), BoxError> = tm.atomic(|txn| {
            insert(&*db.join(txn)?, "inner")?;
            Err("inner block fails".into())
        });
        assert!(inner.is_err());
        tm.atomic(|txn| {
            insert(&*db.join(txn)?, "inner-ok")?;
            Ok::<_, BoxError>(())
        })?;
        Ok::<_, BoxError>(())
    })
    .unwrap();
    assert_eq!(item_names(db.path()), ["outer", "inner-ok"]);
}

#[test]
fn outer_atomic_failure_rolls_everything_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager();
    let r: Result<(), BoxError> = tm.atomic(|txn| {
        insert(&*db.join(txn)?, "outer")?;
        tm.atomic(|txn| {
            insert(&*db.join(txn)?, "inner")?;
            Ok::<_, BoxError>(())
        })?;
        Err("outer fails".into())
    });
    assert!(r.is_err());
    assert!(item_names(db.path()).is_empty());
    assert!(!tm.in_transaction());
    assert!(pool_is_clean(&db));
}

#[test]
fn a_read_only_deferred_transaction_commits_and_returns_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let db = support::open_with(
        dir.path(),
        tm_sqlite::Options::default().begin(tm_sqlite::Begin::Deferred),
    );
    let tm = manager();
    let n = tm
        .run(|txn| {
            let n: i64 = db
                .join(txn)?
                .query_row("SELECT count(*) FROM item", [], |r| r.get(0))?;
            Ok::<_, BoxError>(n)
        })
        .unwrap();
    assert_eq!(n, 0);
    assert!(pool_is_clean(&db));
}

#[test]
fn join_then_begin_failure_leaves_the_resource_joined_so_the_abort_reaches_it() {
    // A resource joined before BEGIN: after a failed join the transaction
    // still lists it, and aborting leaves no connection behind.
    let dir = tempfile::tempdir().unwrap();
    let db = support::open_with(
        dir.path(),
        tm_sqlite::Options::default().busy_timeout(std::time::Duration::from_millis(1)),
    );
    let blocker = support::independent(db.path());
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let tm = manager();
    let txn = tm.begin().unwrap();
    let err = db.join(&txn).unwrap_err();
    assert!(tm.is_retryable(&err), "{err}");
    assert_eq!(txn.resource_names(), [db.name().to_owned()]);
    txn.abort().unwrap();
    blocker.execute_batch("ROLLBACK").unwrap();
    assert!(pool_is_clean(&db));
}

#[test]
fn the_pool_keeps_at_most_pool_size_idle_connections() {
    let dir = tempfile::tempdir().unwrap();
    let db = support::open_with(
        dir.path(),
        tm_sqlite::Options::default()
            .pool_size(2)
            .begin(tm_sqlite::Begin::Deferred),
    );
    let tms: Vec<_> = (0..4).map(|_| manager()).collect();
    let txns: Vec<_> = tms.iter().map(|tm| tm.begin().unwrap()).collect();
    for txn in &txns {
        db.join(txn).unwrap();
    }
    for txn in &txns {
        txn.commit().unwrap();
    }
    assert_eq!(db.idle_connections(), 2);
}

#[test]
fn options_can_be_written_with_struct_update_syntax() {
    let dir = tempfile::tempdir().unwrap();
    let options = tm_sqlite::Options {
        begin: tm_sqlite::Begin::Deferred,
        pool_size: 2,
        ..tm_sqlite::Options::default()
    };
    let db = tm_sqlite::Database::open_with(dir.path().join("o.db"), options).unwrap();
    assert_eq!(db.options().pool_size, 2);
    assert!(matches!(db.options().begin, tm_sqlite::Begin::Deferred));
}

#[test]
fn a_transaction_left_open_by_with_connection_is_rolled_back_before_pooling() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    db.with_connection(|c| {
        c.execute_batch("BEGIN")?;
        insert(c, "left open")
    })
    .unwrap();
    assert!(pool_is_clean(&db));
    assert!(item_names(db.path()).is_empty());
}
