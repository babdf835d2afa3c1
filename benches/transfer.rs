//! The price of atomicity: one transfer that debits an account row in SQLite
//! and credits a key in Redis.
//!
//! * `plain`: the hand-written sequence — a rusqlite `BEGIN IMMEDIATE` /
//!   `UPDATE` / `COMMIT`, then a Redis `INCRBY` on a plain connection. Not
//!   atomic: a crash between the two loses the credit.
//! * `tm_lrc`: one tm transaction over `tm::sqlite::Database` and
//!   `tm::redis::Store`, no decision log: Redis prepares (durable vote), SQLite
//!   commits last (last-resource commit), Redis applies.
//! * `tm_llr`: the same with a `SqliteDecisionLog` on the same database
//!   (logging last resource, the configuration that recovery needs): the
//!   decision row is written inside SQLite's own commit, and forgotten after
//!   Redis has applied.
//!
//! Same redis-server, same SQLite settings (WAL, `synchronous = NORMAL`,
//! busy timeout 5 s), same run. Redis is started twice from
//! `tm_redis::testing`: AOF with `appendfsync everysec` (the test server's
//! default) and with `appendfsync always` (what a durable prepare needs).
//! After criterion's report the ratios `tm / plain` are printed, computed
//! from the medians of this run.
//!
//! ```text
//! cargo bench -p tm-benches --bench transfer
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use parking_lot::Mutex;
use tm::redis::testing::TestServer;
use tm::redis::Store;
use tm::sqlite::{Database, Options, SqliteDecisionLog, Synchronous};
use tm::TransactionManager;

const SCHEMA: &str =
    "CREATE TABLE IF NOT EXISTS account (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)";
const DEBIT: &str = "UPDATE account SET balance = balance - 1 WHERE id = 1";
const CREDIT_KEY: &str = "bench:account:2";

/// Benchmark ids that ran in this process (so that stale estimates of an
/// earlier, differently filtered run are not used for the ratios).
static RAN: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Per scenario: the interleaved measurement.
static INTERLEAVED: Mutex<Vec<(String, Interleaved)>> = Mutex::new(Vec::new());

/// Per variant: the median time per transfer over the rounds, and the median
/// over the rounds of (this variant / the first variant) in the same round.
struct Interleaved {
    rounds: usize,
    per_round: usize,
    variants: Vec<(String, f64, f64)>,
    /// Per variant, ns per transfer in each round.
    times: Vec<Vec<f64>>,
}

impl Interleaved {
    /// The median over the rounds of variant `a` / variant `b` in the same
    /// round.
    fn ratio(&self, a: usize, b: usize) -> f64 {
        let mut r: Vec<f64> = self.times[a]
            .iter()
            .zip(&self.times[b])
            .map(|(x, y)| x / y)
            .collect();
        median(&mut r)
    }
}

/// A named transfer to time.
type Variant<'a> = (&'a str, Box<dyn FnMut() + 'a>);

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs the variants in turns (a short batch each, the order rotating every
/// round) for about `budget`, so that load from other processes on a shared
/// machine falls on all of them alike; ratios are taken within a round.
fn interleaved(variants: &mut [Variant<'_>], budget: Duration) -> Interleaved {
    // Calibrate: a batch of each variant should take about 10 ms.
    let mut slowest = Duration::ZERO;
    for (_, f) in variants.iter_mut() {
        let t0 = Instant::now();
        for _ in 0..20 {
            f();
        }
        slowest = slowest.max(t0.elapsed() / 20);
    }
    let per_round =
        ((Duration::from_millis(10).as_nanos() / slowest.as_nanos().max(1)) as usize).clamp(5, 500);
    let n = variants.len();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); n];
    let start = Instant::now();
    let mut round = 0;
    while start.elapsed() < budget || round < 10 {
        let mut this = vec![0.0; n];
        for k in 0..n {
            let i = (round + k) % n;
            let f = &mut variants[i].1;
            let t0 = Instant::now();
            for _ in 0..per_round {
                f();
            }
            this[i] = t0.elapsed().as_nanos() as f64 / per_round as f64;
        }
        for i in 0..n {
            times[i].push(this[i]);
        }
        round += 1;
    }
    let base = times[0].clone();
    let variants = variants
        .iter()
        .zip(&times)
        .map(|((name, _), t)| {
            let mut ratios: Vec<f64> = t.iter().zip(&base).map(|(a, b)| a / b).collect();
            let mut t = t.clone();
            (name.to_string(), median(&mut t), median(&mut ratios))
        })
        .collect();
    Interleaved {
        rounds: round,
        per_round,
        variants,
        times,
    }
}

fn report_interleaved() {
    let results = INTERLEAVED.lock();
    if results.is_empty() {
        return;
    }
    println!("\nprice of atomicity, interleaved (variants take turns; ratio = median over rounds of tm / plain in the same round)");
    println!("| redis appendfsync | rounds x transfers | plain SQLite then Redis | tm, no decision log | ratio | tm + SqliteDecisionLog (LLR) | ratio |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (label, r) in results.iter() {
        let v = &r.variants;
        println!(
            "| {label} | {} x {} | {:.1} µs | {:.1} µs | {:.2}x | {:.1} µs | {:.2}x |",
            r.rounds,
            r.per_round,
            v[0].1 / 1e3,
            v[1].1 / 1e3,
            v[1].2,
            v[2].1 / 1e3,
            v[2].2
        );
    }
}

fn ran(id: String) {
    RAN.lock().insert(id);
}

fn seed(conn: &rusqlite::Connection) {
    conn.execute_batch(SCHEMA).unwrap();
    conn.execute(
        "INSERT OR REPLACE INTO account (id, balance) VALUES (1, 1000000000000)",
        [],
    )
    .unwrap();
}

/// A plain rusqlite connection with the settings `tm::sqlite::Options`
/// gives its own connections by default.
fn plain_sqlite(path: &Path) -> rusqlite::Connection {
    let defaults = Options::default();
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(defaults.busy_timeout).unwrap();
    let mode: String = conn
        .query_row(
            &format!("PRAGMA journal_mode = {}", defaults.journal_mode.as_str()),
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        mode.to_ascii_lowercase(),
        defaults.journal_mode.as_str().to_ascii_lowercase()
    );
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {}",
        defaults.synchronous.as_str()
    ))
    .unwrap();
    conn
}

fn scenario(c: &mut Criterion, label: &str, fsync_always: bool, test_mode: bool) {
    let server = TestServer::builder().fsync_always(fsync_always).start();
    let dir = tempfile::tempdir().unwrap();

    // The hand-written sequence: its own file, the same settings.
    let mut plain_db = plain_sqlite(&dir.path().join("plain.db"));
    seed(&plain_db);
    let mut plain_redis = server.connection();

    // tm: one Database (pool) and one Store, the decision log (for tm_llr)
    // in that same Database.
    let db = Database::open_with(dir.path().join("tm.db"), Options::default()).unwrap();
    db.with_connection(|c| {
        seed(c);
        Ok(())
    })
    .unwrap();
    let store = Store::open(&server.url()).unwrap();
    let log = Arc::new(SqliteDecisionLog::new(&db).unwrap());
    // No decision log: a refused set-up unless opted out (it cannot be
    // recovered after a crash); measured as the cost without the log.
    let tm_lrc = TransactionManager::builder()
        .explicit(true)
        .allow_unrecoverable(true)
        .build();
    let tm_llr = TransactionManager::builder()
        .explicit(true)
        .decision_log(log.clone())
        .build();

    let transfer = |tm: &TransactionManager| {
        let txn = tm.begin().unwrap();
        db.join(&txn).unwrap().execute(DEBIT, []).unwrap();
        store.join(&txn).unwrap().incr_by(CREDIT_KEY, 1).unwrap();
        txn.commit().unwrap();
    };

    let plain = |db: &mut rusqlite::Connection, redis: &mut redis::Connection| {
        let tx = db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        tx.prepare_cached(DEBIT).unwrap().execute([]).unwrap();
        tx.commit().unwrap();
        redis::cmd("INCRBY")
            .arg(CREDIT_KEY)
            .arg(1)
            .exec(redis)
            .unwrap();
    };

    let mut group = c.benchmark_group(format!("transfer_{label}"));
    group
        .measurement_time(Duration::from_secs(4))
        .sample_size(30);
    group.bench_function("plain", |b| {
        ran(format!("transfer_{label}/plain"));
        b.iter(|| plain(&mut plain_db, &mut plain_redis))
    });
    group.bench_function("tm_lrc", |b| {
        ran(format!("transfer_{label}/tm_lrc"));
        b.iter(|| transfer(&tm_lrc))
    });
    group.bench_function("tm_llr", |b| {
        ran(format!("transfer_{label}/tm_llr"));
        b.iter(|| transfer(&tm_llr))
    });
    group.finish();

    if !test_mode {
        let mut variants: [Variant<'_>; 3] = [
            ("plain", Box::new(|| plain(&mut plain_db, &mut plain_redis))),
            ("tm_lrc", Box::new(|| transfer(&tm_lrc))),
            ("tm_llr", Box::new(|| transfer(&tm_llr))),
        ];
        let result = interleaved(&mut variants, Duration::from_secs(6));
        drop(variants);
        INTERLEAVED.lock().push((label.to_owned(), result));
    }

    // Both sides did the same work: every debit has its credit.
    let debited: i64 = db
        .with_connection(|c| {
            c.query_row("SELECT 1000000000000 - balance FROM account", [], |r| {
                r.get(0)
            })
        })
        .unwrap();
    let plain_debited: i64 = plain_db
        .query_row("SELECT 1000000000000 - balance FROM account", [], |r| {
            r.get(0)
        })
        .unwrap();
    let credited: i64 = redis::cmd("GET")
        .arg(CREDIT_KEY)
        .query::<Option<i64>>(&mut plain_redis)
        .unwrap()
        .unwrap_or(0);
    assert_eq!(debited + plain_debited, credited, "money lost in {label}");
    assert!(tm::DecisionLog::pending(&*log).unwrap().is_empty());
}

/// The durable transfers, measured in one interleaved run, and per tm
/// variant tm-sqlite's extra fsyncs per transfer.
static DURABLE: Mutex<Option<(Interleaved, FsyncsPerTransfer)>> = Mutex::new(None);

type FsyncsPerTransfer = Vec<(String, f64)>;

/// An fsync of SQLite's WAL file, as tm-sqlite does after the last
/// resource's `COMMIT` when `synchronous` is below FULL.
fn sync_wal(db_path: &Path) {
    let mut wal = db_path.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::File::open(wal).unwrap().sync_data().unwrap();
}

/// Everything durable: Redis with `appendfsync always`, every SQLite commit
/// on disk before the transfer returns.
///
/// * `raw_full`: by hand, durably but not atomically: `BEGIN IMMEDIATE` /
///   `UPDATE` / `COMMIT` with `synchronous = FULL`, then `MULTI / INCRBY /
///   EXEC`. The base of the ratios.
/// * `raw_normal_sync`: the same with `synchronous = NORMAL` and one fsync
///   of the WAL file after the `COMMIT` (what tm-sqlite does).
/// * `floor`: the two-phase floor: `raw_full` plus one more durable Redis
///   round trip first (`MULTI / SET / EXEC` of a marker, as a prepare).
/// * `tm`: tm with `SqliteDecisionLog` on the same database (logging last
///   resource), Redis durable prepare, the default `Options`
///   (`synchronous = NORMAL`, tm adds the fsync of the decision commit).
/// * `tm_full`: the same with `synchronous = FULL` (SQLite syncs the
///   `COMMIT` itself; tm adds none).
fn durable_scenario(c: &mut Criterion, test_mode: bool) {
    let server = TestServer::builder().fsync_always(true).start();
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();

    let raw = |name: &str, synchronous: Synchronous| {
        let path = dir.path().join(name);
        let conn = plain_sqlite(&path);
        conn.execute_batch(&format!("PRAGMA synchronous = {}", synchronous.as_str()))
            .unwrap();
        seed(&conn);
        (conn, path)
    };
    let (mut full_db, _) = raw("raw_full.db", Synchronous::Full);
    let (mut normal_db, normal_path) = raw("raw_normal.db", Synchronous::Normal);
    let (mut floor_db, _) = raw("floor.db", Synchronous::Full);
    let mut redis_con = server.connection();

    let tm_side = |name: &str, options: Options| {
        let db = Database::open_with(dir.path().join(name), options).unwrap();
        db.with_connection(|c| {
            seed(c);
            Ok(())
        })
        .unwrap();
        let log = Arc::new(SqliteDecisionLog::new(&db).unwrap());
        let tm = TransactionManager::builder()
            .explicit(true)
            .decision_log(log.clone())
            .build();
        (db, log, tm)
    };
    let (db, log, tm) = tm_side("tm.db", Options::default());
    let (db_full, log_full, tm_full) = tm_side(
        "tm_full.db",
        Options::default().synchronous(Synchronous::Full),
    );
    let store = Store::open(&server.url()).unwrap();

    let sqlite_debit = |db: &mut rusqlite::Connection| {
        let tx = db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        tx.prepare_cached(DEBIT).unwrap().execute([]).unwrap();
        tx.commit().unwrap();
    };
    let redis_credit = |redis: &mut redis::Connection| {
        redis::pipe()
            .atomic()
            .cmd("INCRBY")
            .arg(CREDIT_KEY)
            .arg(1)
            .ignore()
            .exec(redis)
            .unwrap();
    };
    let transfer = |tm: &TransactionManager, db: &Database| {
        let txn = tm.begin().unwrap();
        db.join(&txn).unwrap().execute(DEBIT, []).unwrap();
        store.join(&txn).unwrap().incr_by(CREDIT_KEY, 1).unwrap();
        txn.commit().unwrap();
    };

    // Shared by the closures below, one at a time.
    let redis_con = std::cell::RefCell::new(&mut redis_con);
    let mut raw_full = || {
        sqlite_debit(&mut full_db);
        redis_credit(&mut redis_con.borrow_mut());
    };
    let mut raw_normal_sync = || {
        sqlite_debit(&mut normal_db);
        sync_wal(&normal_path);
        redis_credit(&mut redis_con.borrow_mut());
    };
    let mut floor = || {
        redis::pipe()
            .atomic()
            .set("bench:prepared", 1)
            .ignore()
            .exec(&mut **redis_con.borrow_mut())
            .unwrap();
        sqlite_debit(&mut floor_db);
        redis_credit(&mut redis_con.borrow_mut());
    };
    let mut tm_default = || transfer(&tm, &db);
    let mut tm_synchronous_full = || transfer(&tm_full, &db_full);

    let mut group = c.benchmark_group("transfer_durable");
    group
        .measurement_time(Duration::from_secs(4))
        .sample_size(20);
    group.bench_function("raw_full", |b| b.iter(&mut raw_full));
    group.bench_function("raw_normal_sync", |b| b.iter(&mut raw_normal_sync));
    group.bench_function("floor", |b| b.iter(&mut floor));
    group.bench_function("tm", |b| b.iter(&mut tm_default));
    group.bench_function("tm_full", |b| b.iter(&mut tm_synchronous_full));
    group.finish();

    let (syncs0, syncs_full0) = (db.durable_syncs(), db_full.durable_syncs());
    let (debits0, debits_full0) = (debited(&db), debited(&db_full));
    if !test_mode {
        let mut variants: [Variant<'_>; 5] = [
            ("raw_full", Box::new(&mut raw_full)),
            ("raw_normal_sync", Box::new(&mut raw_normal_sync)),
            ("floor", Box::new(&mut floor)),
            ("tm", Box::new(&mut tm_default)),
            ("tm_full", Box::new(&mut tm_synchronous_full)),
        ];
        let result = interleaved(&mut variants, Duration::from_secs(8));
        drop(variants);
        // tm-sqlite's extra fsyncs per transfer during the interleaved run.
        let per = |syncs: u64, debits: i64| syncs as f64 / (debits.max(1)) as f64;
        let syncs = vec![
            (
                "tm".to_owned(),
                per(db.durable_syncs() - syncs0, debited(&db) - debits0),
            ),
            (
                "tm_full".to_owned(),
                per(
                    db_full.durable_syncs() - syncs_full0,
                    debited(&db_full) - debits_full0,
                ),
            ),
        ];
        *DURABLE.lock() = Some((result, syncs));
    }
    for log in [&log, &log_full] {
        assert!(tm::DecisionLog::pending(&**log).unwrap().is_empty());
    }
}

/// How many transfers debited this database's account.
fn debited(db: &Database) -> i64 {
    db.with_connection(|c| {
        c.query_row("SELECT 1000000000000 - balance FROM account", [], |r| {
            r.get(0)
        })
    })
    .unwrap()
}

fn report_durable() {
    let durable = DURABLE.lock();
    let Some((r, syncs)) = durable.as_ref() else {
        return;
    };
    println!(
        "\ndurable transfer, interleaved ({} rounds x {} transfers; ratios = median over rounds, same round)",
        r.rounds, r.per_round
    );
    println!("| variant | per transfer | / raw_full | / floor | tm-sqlite fsyncs per transfer |");
    println!("|---|---:|---:|---:|---:|");
    for (i, (name, t, _)) in r.variants.iter().enumerate() {
        let syncs = syncs
            .iter()
            .find(|(n, _)| n == name)
            .map_or("–".to_owned(), |(_, s)| format!("{s:.2}"));
        println!(
            "| {name} | {:.1} µs | {:.3} | {:.3} | {syncs} |",
            t / 1e3,
            r.ratio(i, 0),
            r.ratio(i, 2)
        );
    }
}

/// Where criterion writes its estimates (its own rule).
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    // Cargo runs a bench in its package's folder (benches/), so a relative
    // "target" would miss the workspace's target dir: take it from the
    // `CARGO_TARGET_TMPDIR` (`<target>/tmp`) this bench was built with.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            Path::new(env!("CARGO_TARGET_TMPDIR"))
                .parent()
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(|| PathBuf::from("target"));
    target.join("criterion")
}

/// The median (ns) from criterion's `estimates.json`, without a JSON crate.
fn median_ns(id: &str) -> Option<f64> {
    let path = criterion_dir().join(id).join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let rest = &text[text.find("\"median\"")?..];
    let rest = &rest[rest.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    let end = rest.find([',', '}'])?;
    rest[..end].trim().parse().ok()
}

fn report_ratios() {
    let ran = RAN.lock().clone();
    let mut lines = Vec::new();
    for label in ["everysec", "fsync_always"] {
        let id = |v: &str| format!("transfer_{label}/{v}");
        if !ran.contains(&id("plain")) {
            continue;
        }
        let Some(plain) = median_ns(&id("plain")) else {
            continue;
        };
        for v in ["tm_lrc", "tm_llr"] {
            if !ran.contains(&id(v)) {
                continue;
            }
            if let Some(t) = median_ns(&id(v)) {
                lines.push(format!(
                    "| {label} | {:.1} µs | {v} {:.1} µs | {:.2}x |",
                    plain / 1e3,
                    t / 1e3,
                    t / plain
                ));
            }
        }
    }
    if !lines.is_empty() {
        println!("\nprice of atomicity, criterion (medians of this run; ratio = tm / plain)");
        println!("| redis appendfsync | plain SQLite then Redis | tm | ratio |");
        println!("|---|---:|---:|---:|");
        for l in lines {
            println!("{l}");
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    // `cargo test --benches` runs bench binaries with `--test`.
    let test_mode = std::env::args().any(|a| a == "--test");
    scenario(&mut c, "everysec", false, test_mode);
    scenario(&mut c, "fsync_always", true, test_mode);
    durable_scenario(&mut c, test_mode);
    c.final_summary();
    report_ratios();
    report_interleaved();
    report_durable();
}
