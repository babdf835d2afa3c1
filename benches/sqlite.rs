//! tm-sqlite overhead: one INSERT + commit per transaction through tm versus
//! the same loop on raw rusqlite, on a temp file, in the same run.
//!
//! * `insert_commit/wal_normal`: WAL + synchronous=NORMAL (no fsync per commit:
//!   the case where tm's own cost shows most);
//! * `insert_commit/wal_full`: WAL + synchronous=FULL (an fsync per commit);
//! * `read_only`: a deferred transaction running one SELECT.
//!
//! Both sides use `BEGIN IMMEDIATE` (`DEFERRED` for the read-only case) and a
//! cached INSERT statement; tm's side is `begin` + `join` + `commit` (and
//! `tm.run` for the retry loop on top).

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use rusqlite::{Connection, TransactionBehavior};
use tm::sqlite::{Begin, Database, Options, Synchronous};
use tm::TransactionManager;

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS item (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)";
const INSERT: &str = "INSERT INTO item (v) VALUES (?1)";
const SELECT: &str = "SELECT count(*) FROM item WHERE id < 100";

fn raw(path: &Path, synchronous: Synchronous) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
        .unwrap();
    conn.execute_batch(&format!("PRAGMA synchronous = {}", synchronous.as_str()))
        .unwrap();
    conn.execute_batch(SCHEMA).unwrap();
    conn
}

fn tm_db(path: &Path, synchronous: Synchronous, begin: Begin) -> Database {
    let db = Database::open_with(
        path,
        Options::default().synchronous(synchronous).begin(begin),
    )
    .unwrap();
    db.with_connection(|c| c.execute_batch(SCHEMA)).unwrap();
    db
}

fn insert_commit(c: &mut Criterion, label: &str, synchronous: Synchronous) {
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group(format!("insert_commit/{label}"));

    let mut conn = raw(&dir.path().join("raw.db"), synchronous);
    let mut i = 0i64;
    group.bench_function("raw_rusqlite", |b| {
        b.iter(|| {
            i += 1;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .unwrap();
            tx.prepare_cached(INSERT).unwrap().execute([i]).unwrap();
            tx.commit().unwrap();
        })
    });

    let db = tm_db(&dir.path().join("tm.db"), synchronous, Begin::Immediate);
    let tm = TransactionManager::explicit();
    let mut i = 0i64;
    group.bench_function("tm", |b| {
        b.iter(|| {
            i += 1;
            let txn = tm.begin().unwrap();
            db.join(&txn)
                .unwrap()
                .prepare_cached(INSERT)
                .unwrap()
                .execute([i])
                .unwrap();
            txn.commit().unwrap();
        })
    });

    let mut i = 0i64;
    group.bench_function("tm_run", |b| {
        b.iter(|| {
            i += 1;
            tm.run(|txn| {
                db.join(txn)?.prepare_cached(INSERT)?.execute([i])?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
            .unwrap();
        })
    });
    group.finish();
}

fn insert_commit_normal(c: &mut Criterion) {
    insert_commit(c, "wal_normal", Synchronous::Normal);
}

fn insert_commit_full(c: &mut Criterion) {
    insert_commit(c, "wal_full", Synchronous::Full);
}

fn read_only(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("read_only/wal_normal");

    let mut conn = raw(&dir.path().join("raw.db"), Synchronous::Normal);
    for i in 0..1000 {
        conn.execute(INSERT, [i]).unwrap();
    }
    group.bench_function("raw_rusqlite", |b| {
        b.iter(|| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Deferred)
                .unwrap();
            let n: i64 = tx
                .prepare_cached(SELECT)
                .unwrap()
                .query_row([], |r| r.get(0))
                .unwrap();
            tx.commit().unwrap();
            black_box(n)
        })
    });

    let db = tm_db(
        &dir.path().join("tm.db"),
        Synchronous::Normal,
        Begin::Deferred,
    );
    db.with_connection(|c| {
        for i in 0..1000 {
            c.execute(INSERT, [i])?;
        }
        Ok(())
    })
    .unwrap();
    let tm = TransactionManager::explicit();
    group.bench_function("tm", |b| {
        b.iter(|| {
            let txn = tm.begin().unwrap();
            let n: i64 = db
                .join(&txn)
                .unwrap()
                .prepare_cached(SELECT)
                .unwrap()
                .query_row([], |r| r.get(0))
                .unwrap();
            txn.commit().unwrap();
            black_box(n)
        })
    });
    group.finish();
}

criterion_group!(benches, insert_commit_normal, insert_commit_full, read_only);
criterion_main!(benches);
