//! A process SIGKILLed inside an open joined transaction leaves the
//! database unchanged and usable.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use support::{child, child_role, item_names, manager, open, BoxError};

const READY: &str = "TM_SQLITE_CHILD_READY";

#[cfg(unix)]
#[test]
fn a_process_killed_inside_an_open_joined_transaction_leaves_the_database_unchanged_and_usable() {
    const NAME: &str = "a_process_killed_inside_an_open_joined_transaction_leaves_the_database_unchanged_and_usable";
    if let Some(path) = child_role() {
        let db = tm_sqlite::Database::open(path).unwrap();
        let tm = manager();
        let txn = tm.begin().unwrap();
        let conn = db.join(&txn).unwrap();
        conn.execute("UPDATE counter SET n = 999", []).unwrap();
        // Enough data to spill uncommitted pages into the WAL.
        let blob = vec![7u8; 8192];
        for i in 0..2000 {
            conn.execute(
                "INSERT INTO item (name) VALUES (?1)",
                [format!("{i}-{}", blob.len())],
            )
            .unwrap();
            conn.execute("INSERT INTO blobs VALUES (?1)", [&blob])
                .unwrap();
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "{READY}").unwrap();
        out.flush().unwrap();
        // Wait for the SIGKILL, inside the transaction. Should the parent
        // die first, its end of stdin closes and this child leaves too.
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
        std::process::exit(3);
    }

    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path());
    db.with_connection(|c| c.execute_batch("CREATE TABLE blobs (b BLOB)"))
        .unwrap();
    support::increment(&db, &manager(), 1);
    let before = item_names(db.path());

    let mut victim = child(NAME, db.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let stdout = victim.stdout.take().unwrap();
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.trim_end().ends_with(READY));
    assert!(ready, "the child died before it was ready");
    // The child's uncommitted pages reached the WAL file (cache spill).
    let wal = std::fs::metadata(db.path().with_extension("db-wal"))
        .unwrap()
        .len();
    assert!(wal > 1 << 20, "WAL is only {wal} bytes");
    victim.kill().unwrap(); // SIGKILL
    let status = victim.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{status}"
    );

    // Unchanged...
    assert_eq!(support::counter(db.path()), 1);
    assert_eq!(item_names(db.path()), before);
    let ok: String = support::independent(db.path())
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    // ...and usable: the dead writer's lock is gone.
    let tm = manager();
    tm.run(|txn| {
        db.join(txn)?
            .execute("INSERT INTO item (name) VALUES ('after')", [])?;
        Ok::<_, BoxError>(())
    })
    .unwrap();
    support::increment(&db, &tm, 1);
    assert_eq!(support::counter(db.path()), 2);
    assert_eq!(
        item_names(db.path()).last().map(String::as_str),
        Some("after")
    );
}
