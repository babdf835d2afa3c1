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
use tm::sqlite::{Database, Options, SqliteDecisionLog};
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
    let tm_lrc = TransactionManager::explicit();
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
    c.final_summary();
    report_ratios();
    report_interleaved();
}
