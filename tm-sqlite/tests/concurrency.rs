//! Lost updates: two threads, then two OS processes, incrementing one
//! counter 1000 times each (read, then write) through `tm.run`.

mod support;

use support::{child, child_role, counter, increment, manager, open, open_with};

const INCREMENTS: usize = 1000;

#[test]
fn two_threads_incrementing_1000_times_each_make_exactly_2000() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let tm = manager();
    tm.set_retry_attempt_count(10);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| increment(&db, &tm, INCREMENTS));
        }
    });
    assert_eq!(counter(db.path()), 2 * INCREMENTS as i64);
    assert!(support::pool_is_clean(&db));
}

#[test]
fn two_threads_with_deferred_begin_retry_busy_snapshot_and_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let db = open_with(
        dir.path(),
        tm_sqlite::Options::default().begin(tm_sqlite::Begin::Deferred),
    );
    let tm = manager();
    // Deferred read-then-write transactions conflict often; retry until done.
    tm.set_retry_attempt_count(u32::MAX);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| increment(&db, &tm, 200));
        }
    });
    assert_eq!(counter(db.path()), 400);
}

#[test]
fn two_processes_incrementing_1000_times_each_make_exactly_2000() {
    const NAME: &str = "two_processes_incrementing_1000_times_each_make_exactly_2000";
    if let Some(path) = child_role() {
        let db = tm_sqlite::Database::open(path).unwrap();
        let tm = manager();
        tm.set_retry_attempt_count(10);
        increment(&db, &tm, INCREMENTS);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    let children: Vec<_> = (0..2)
        .map(|_| {
            child(NAME, db.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn a child")
        })
        .collect();
    for mut c in children {
        let status = c.wait().unwrap();
        assert!(status.success(), "a child failed: {status}");
    }
    assert_eq!(counter(db.path()), 2 * INCREMENTS as i64);
}
