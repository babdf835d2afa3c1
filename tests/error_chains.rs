//! Every cause is said once: in an error's message or in its `source()`,
//! never both. Real errors from all three crates, printed as whole chains,
//! repeat no text.

use std::error::Error as StdError;
use std::sync::Arc;

use tm::redis::testing::TestServer;
use tm::redis::Store;
use tm::sqlite::{Database, Options, SqliteDecisionLog};
use tm::{BoxError, FileDecisionLog, MemoryStore, Report, TransactionManager};

/// The chain's links, outermost first.
fn links(err: &(dyn StdError + 'static)) -> Vec<String> {
    let mut out = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        out.push(cause.to_string());
        source = cause.source();
    }
    out
}

fn assert_said_once(what: &str, err: &(dyn StdError + 'static)) {
    let links = links(err);
    println!("{what}: {}", Report(err));
    for (i, later) in links.iter().enumerate().skip(1) {
        for earlier in &links[..i] {
            assert!(
                !earlier.contains(later.as_str()),
                "{what}: cause {later:?} is said twice (already in {earlier:?}); chain {links:?}"
            );
        }
    }
}

#[test]
fn chains_from_every_crate_say_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut seen: Vec<(String, BoxError)> = Vec::new();

    // tm-core: a damaged decision log, a second open of one log.
    let path = dir.path().join("log");
    std::fs::write(&path, b"not a decision log at all").unwrap();
    seen.push((
        "bad log".into(),
        FileDecisionLog::open(&path).unwrap_err().into(),
    ));
    let good = dir.path().join("good");
    let _held = FileDecisionLog::open(&good).unwrap();
    seen.push((
        "log held".into(),
        FileDecisionLog::open(&good).unwrap_err().into(),
    ));

    // tm-sqlite: a constraint failure at work, carried out of `run`.
    let db = Database::open_with(
        dir.path().join("app.db"),
        Options::default().setup_sql("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY)"),
    )
    .unwrap();
    let log = Arc::new(SqliteDecisionLog::new(&db).unwrap());
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(log)
        .build();
    let r: Result<(), BoxError> = tm.run(|txn| {
        let c = db.join(txn)?;
        c.execute("INSERT INTO t VALUES ('a')", [])?;
        c.execute("INSERT INTO t VALUES ('a')", [])?;
        Ok(())
    });
    seen.push(("sqlite constraint".into(), r.unwrap_err()));

    // tm-redis: WRONGTYPE at work; a refused connection; both as tm errors.
    let server = TestServer::start();
    let store = Store::open(&server.url()).unwrap();
    let mut conn = store.client().get_connection().unwrap();
    let () = tm::redis::redis::cmd("HSET")
        .arg("h")
        .arg("f")
        .arg("v")
        .query(&mut conn)
        .unwrap();
    let r: Result<(), BoxError> = tm.run(|txn| {
        store.join(txn)?.get::<String>("h")?;
        Ok(())
    });
    seen.push(("redis wrongtype".into(), r.unwrap_err()));
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = Store::open(&format!("redis://127.0.0.1:{closed}/")).unwrap_err();
    seen.push(("redis refused".into(), err.into()));
    let err = tm::Error::resource(
        "redis",
        Store::open(&format!("redis://127.0.0.1:{closed}/")).unwrap_err(),
    );
    seen.push(("wrapped".into(), err.into()));

    // tm-core: a write after the end, an unsafe set-up.
    let m = MemoryStore::<i32>::new();
    let txn = tm.begin().unwrap();
    let h = m.join(&txn).unwrap();
    txn.abort().unwrap();
    seen.push(("closed".into(), h.put("k", 1).unwrap_err().into()));

    for (what, err) in &seen {
        assert_said_once(what, &**err);
    }
    // The chains do carry their causes.
    let all: Vec<String> = seen.iter().map(|(_, e)| Report(&**e).to_string()).collect();
    assert!(all[0].contains("bad magic"), "{}", all[0]);
    assert!(all[1].contains("already open"), "{}", all[1]);
    assert!(all[2].contains("UNIQUE"), "{}", all[2]);
    assert!(all[3].contains("WRONGTYPE"), "{}", all[3]);
    assert!(all[4].to_lowercase().contains("refused"), "{}", all[4]);
}
