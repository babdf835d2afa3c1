//! An application written against the facade only: `tm::sqlite::rusqlite`
//! and `tm::redis::redis` are the crates tm was built with, and an app's
//! own thiserror enum with `#[error(transparent)]` adapter variants still
//! gets its retryable errors retried.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tm::redis::redis;
use tm::sqlite::rusqlite;
use tm::sqlite::{Begin, Database, Options};
use tm::{Backoff, TransactionManager};

/// The most common thiserror shape: every foreign error transparent.
#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error(transparent)]
    Tm(#[from] tm::Error),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Redis(#[from] tm::redis::Error),
    #[error("insufficient funds")]
    Funds,
}
tm::tx_error!(AppError => Tm, Sqlite, Redis);

fn database(dir: &tempfile::TempDir) -> Database {
    Database::open_with(
        dir.path().join("app.db"),
        Options::default()
            .busy_timeout(Duration::from_millis(20))
            .begin(Begin::Deferred)
            .setup_sql("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)"),
    )
    .unwrap()
}

#[test]
fn sqlite_busy_held_in_a_transparent_variant_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let db = database(&dir);
    // Another process holds the write lock during the first attempt.
    let blocker = rusqlite::Connection::open(db.path()).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let tm = TransactionManager::builder()
        .explicit(true)
        .backoff(Backoff::None)
        .build();
    let tries = AtomicU32::new(0);
    let mut blocker = Some(blocker);
    tm.run(|txn| -> Result<(), AppError> {
        if tries.fetch_add(1, Ordering::SeqCst) == 1 {
            // The second attempt: the other writer is gone.
            if let Some(b) = blocker.take() {
                b.execute_batch("ROLLBACK").unwrap();
            }
        }
        let conn = db.join(txn)?;
        conn.execute("INSERT INTO t VALUES (?1, ?2)", rusqlite::params!["a", 1])?;
        Ok(())
    })
    .unwrap();
    assert_eq!(
        tries.load(Ordering::SeqCst),
        2,
        "SQLITE_BUSY was not retried"
    );

    // An app error of its own is not retried.
    let tries = AtomicU32::new(0);
    let r = tm.run(|_| -> Result<(), AppError> {
        tries.fetch_add(1, Ordering::SeqCst);
        Err(AppError::Funds)
    });
    assert!(matches!(r, Err(AppError::Funds)));
    assert_eq!(tries.load(Ordering::SeqCst), 1);
}

#[test]
fn the_reexported_redis_crate_talks_to_a_store() {
    let server = tm::redis::testing::TestServer::start();
    let store = tm::redis::Store::open(&server.url()).unwrap();
    let mut conn = store.client().get_connection().unwrap();
    let () = redis::cmd("SET").arg("k").arg(5).query(&mut conn).unwrap();
    let tm = TransactionManager::explicit();
    let v = tm
        .run(|txn| -> Result<i64, AppError> {
            let h = store.join(txn)?;
            Ok(h.get::<i64>("k")?.unwrap_or(0))
        })
        .unwrap();
    assert_eq!(v, 5);
}
