//! A store's identity (`resource_id`) is an id kept in Redis itself, so
//! that every spelling of one server (and db, and prefix) agrees, and a
//! restart keeps it.

use tm_core::Recoverable;
use tm_redis::testing::TestServer;
use tm_redis::{Options, Store};

#[test]
fn resource_id_is_the_servers_own_store_id_whatever_the_url_spelling() {
    let mut server = TestServer::start();
    let port = server.port();
    let a = Store::open(&format!("redis://127.0.0.1:{port}/")).unwrap();
    let b = Store::open(&format!("redis://localhost:{port}/0")).unwrap();
    assert_eq!(a.resource_id(), b.resource_id());

    // Another db, another prefix, another server: another store.
    let db1 = Store::open(&format!("redis://127.0.0.1:{port}/1")).unwrap();
    assert_ne!(a.resource_id(), db1.resource_id());
    let app = Store::open_with(&server.url(), Options::default().prefix("app:")).unwrap();
    assert_ne!(a.resource_id(), app.resource_id());
    let other = TestServer::start();
    assert_ne!(
        a.resource_id(),
        Store::open(&other.url()).unwrap().resource_id()
    );

    // The id is data of the server (in its AOF): a restart keeps it.
    let before = a.resource_id();
    drop((a, b, db1, app));
    server.kill_and_restart();
    assert_eq!(Store::open(&server.url()).unwrap().resource_id(), before);
}
