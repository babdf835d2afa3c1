use tm_core::TransactionManager;
use tm_redis::{testing::TestServer, Store};

#[test]
fn smoke() {
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    r.set("a", "1").unwrap();
    r.incr_by("a", 5).unwrap();
    assert_eq!(r.get::<i64>("a").unwrap(), Some(6));
    tm.commit().unwrap();
    assert_eq!(store.get::<i64>("a").unwrap(), Some(6));
    let txn = tm.begin().unwrap();
    let r = store.join(&txn).unwrap();
    let v: i64 = r.get("a").unwrap().unwrap();
    r.set("a", v + 1).unwrap();
    let dm = r.data_manager();
    dm.tpc_begin(&txn).unwrap();
    dm.commit(&txn).unwrap();
    dm.tpc_vote(&txn).unwrap();
    dm.tpc_finish(&txn).unwrap();
    assert_eq!(store.get::<i64>("a").unwrap(), Some(7));
}
