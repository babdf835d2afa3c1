//! `tm-recover`: list and resolve in-doubt transactions, as an operator.
//!
//! ```text
//! tm-recover --sqlite app.db --redis redis://127.0.0.1:6379/ list
//! tm-recover --sqlite app.db --redis redis://127.0.0.1:6379/ recover --grace 30
//! tm-recover --log decisions.log --redis URL commit TXID...
//! tm-recover --sqlite app.db --redis URL abort --all --dry-run
//! tm-recover --sqlite app.db --redis URL take-over LOGID
//! ```
//!
//! The decision log is the one of the coordinator whose transactions are
//! resolved: `--sqlite PATH` for a `SqliteDecisionLog` kept in that
//! database (shared by every process on it), or `--log FILE` for a
//! `FileDecisionLog` (held by one process at a time: the tool cannot open
//! it while its owner runs). Exit codes: 0 nothing left in doubt, 1 something
//! is left in doubt or failed, 2 usage or set-up error.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tm::{
    recover_with, resolve, DecisionLog, FileDecisionLog, InDoubt, LogId, Recoverable,
    RecoveryOptions, Resolution, TxId,
};

#[derive(Parser, Debug)]
#[command(
    name = "tm-recover",
    version,
    about = "List and resolve tm's in-doubt transactions"
)]
struct Cli {
    #[command(flatten)]
    stores: Stores,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Stores {
    /// The SQLite database that holds the decision log (tm_decisions).
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "log",
        required_unless_present = "log"
    )]
    sqlite: Option<std::path::PathBuf>,
    /// A FileDecisionLog file (its owning process must not be running).
    #[arg(long, value_name = "FILE")]
    log: Option<std::path::PathBuf>,
    /// A Redis participant (repeat for several).
    #[arg(long = "redis", value_name = "URL")]
    redis: Vec<String>,
    /// The key prefix of the Redis stores.
    #[arg(long, default_value = "tm:")]
    prefix: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List in-doubt transactions: owner log, age, participants, decision,
    /// user and note. Foreign ones (another log's) are marked.
    List,
    /// Run recovery for this log: commit the decided, fence and abort the
    /// undecided older than the grace period, leave foreign ones alone.
    Recover {
        /// Undecided records younger than this (seconds) are left alone.
        #[arg(long, default_value_t = 5.0)]
        grace: f64,
        /// Report what would be done, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Commit in-doubt transactions (through the fence: refused if their
    /// abort is recorded).
    Commit(Pick),
    /// Abort in-doubt transactions (through the fence: refused if their
    /// commit is recorded).
    Abort(Pick),
    /// Resolve a dead coordinator's records as this log's own: decided
    /// ones commit, undecided ones abort. Make sure it is dead.
    TakeOver {
        /// The dead coordinator's log id (32 hex digits, from `list`).
        log_id: String,
        /// Report what would be done, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Args, Debug)]
struct Pick {
    /// Transaction ids (from `list`).
    txids: Vec<String>,
    /// Every in-doubt transaction of this log.
    #[arg(long, conflicts_with = "txids")]
    all: bool,
    /// Report what would be done, change nothing.
    #[arg(long)]
    dry_run: bool,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("tm-recover: {}", chain(&*err));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes (tm's errors say each cause once).
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    tm::Report(err).to_string()
}

struct Opened {
    log: Arc<dyn DecisionLog>,
    stores: Vec<tm::redis::Store>,
}

impl Opened {
    fn open(s: &Stores) -> Result<Opened, BoxError> {
        let log: Arc<dyn DecisionLog> = match (&s.sqlite, &s.log) {
            (Some(path), _) => {
                if !path.exists() {
                    return Err(format!("{}: no such database", path.display()).into());
                }
                let db = tm::sqlite::Database::open(path)?;
                Arc::new(tm::sqlite::SqliteDecisionLog::new(&db)?)
            }
            (None, Some(path)) => {
                if !path.exists() {
                    return Err(format!("{}: no such decision log", path.display()).into());
                }
                Arc::new(FileDecisionLog::open(path)?)
            }
            (None, None) => return Err("give --sqlite PATH or --log FILE".into()),
        };
        let stores = s
            .redis
            .iter()
            .map(|url| {
                tm::redis::Store::open_with(url, tm::redis::Options::default().prefix(&s.prefix))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Opened { log, stores })
    }

    fn resources(&self) -> Vec<&dyn Recoverable> {
        self.stores.iter().map(|s| s as &dyn Recoverable).collect()
    }

    /// Every in-doubt record, by transaction: (record, resource ids).
    fn in_doubt(&self) -> Result<BTreeMap<TxId, (InDoubt, Vec<String>)>, BoxError> {
        let mut all: BTreeMap<TxId, (InDoubt, Vec<String>)> = BTreeMap::new();
        for res in self.resources() {
            let rid = res.resource_id();
            for record in res.in_doubt()? {
                all.entry(record.txid)
                    .or_insert_with(|| (record.clone(), Vec::new()))
                    .1
                    .push(rid.clone());
            }
        }
        Ok(all)
    }
}

fn run(cli: Cli) -> Result<bool, BoxError> {
    let opened = Opened::open(&cli.stores)?;
    let own = opened.log.id();
    match cli.command {
        Command::List => list(&opened, own),
        Command::Recover { grace, dry_run } => {
            if !(0.0..=86_400.0 * 365.0).contains(&grace) {
                return Err(format!("--grace {grace}: give seconds between 0 and a year").into());
            }
            let options = RecoveryOptions::new()
                .grace(Duration::from_secs_f64(grace))
                .dry_run(dry_run);
            report(&opened, &options)
        }
        Command::TakeOver { log_id, dry_run } => {
            let dead: LogId = log_id.parse()?;
            if dead == own {
                return Err(format!("{dead} is this log itself: use `recover`").into());
            }
            let options = RecoveryOptions::new()
                .grace(Duration::ZERO)
                .take_over(dead)
                .dry_run(dry_run);
            report(&opened, &options)
        }
        Command::Commit(pick) => decide(&opened, own, pick, Resolution::Commit),
        Command::Abort(pick) => decide(&opened, own, pick, Resolution::Abort),
    }
}

fn list(opened: &Opened, own: LogId) -> Result<bool, BoxError> {
    let decisions: BTreeMap<TxId, tm::Decision> = opened
        .log
        .pending()?
        .into_iter()
        .map(|d| (d.txid, d))
        .collect();
    let records = opened.in_doubt()?;
    println!("decision log {own}");
    if records.is_empty() {
        println!("nothing in doubt");
        return Ok(true);
    }
    for (txid, (record, holders)) in &records {
        let owner = match record.log {
            Some(l) if l == own => format!("{l}"),
            Some(l) => format!("{l} (foreign)"),
            None => "none (prepared without a decision log; foreign)".to_owned(),
        };
        let decision = decisions.get(txid);
        println!("{txid}");
        println!("  owner log:    {owner}");
        println!("  age:          {:.1} s", record.age.as_secs_f64());
        println!("  prepared at:  {}", holders.join(", "));
        match decision {
            Some(d) => {
                println!(
                    "  decision:     commit (participants: {})",
                    d.participants.join(", ")
                );
                if let Some(user) = d.metadata.get("user") {
                    println!("  user:         {user}");
                }
                if let Some(note) = d.metadata.get("description") {
                    println!("  note:         {}", note.replace('\n', " / "));
                }
            }
            None => println!(
                "  decision:     none recorded (recovery presumes abort, after the grace period)"
            ),
        }
    }
    println!("{} in doubt", records.len());
    Ok(false)
}

fn report(opened: &Opened, options: &RecoveryOptions) -> Result<bool, BoxError> {
    let report = recover_with(&*opened.log, &opened.resources(), options)?;
    println!("{report}");
    for (rid, txid) in &report.committed {
        println!("  committed {txid} at {rid}");
    }
    for (rid, txid) in &report.aborted {
        println!("  aborted {txid} at {rid}");
    }
    for (rid, txid) in &report.lost {
        println!("  LOST {txid} at {rid}: decided, but the record and its receipt are gone");
    }
    for (rid, r) in &report.foreign {
        let owner = r.log.map_or_else(|| "no log".to_owned(), |l| l.to_string());
        println!(
            "  foreign {} at {rid} (log {owner}, {:.1} s old): left alone",
            r.txid,
            r.age.as_secs_f64()
        );
    }
    for (rid, r) in &report.deferred {
        println!(
            "  too young {} at {rid} ({:.1} s old): left for a later pass",
            r.txid,
            r.age.as_secs_f64()
        );
    }
    for (what, err) in &report.errors {
        println!("  error at {what}: {}", chain(err));
    }
    Ok(report.nothing_in_doubt() && (!options.dry_run || report.is_empty()))
}

fn decide(opened: &Opened, own: LogId, pick: Pick, how: Resolution) -> Result<bool, BoxError> {
    let records = opened.in_doubt()?;
    let txids: Vec<TxId> = if pick.all {
        records
            .iter()
            .filter(|(_, (r, _))| r.log == Some(own))
            .map(|(t, _)| *t)
            .collect()
    } else if pick.txids.is_empty() {
        return Err("name transactions (from `list`) or give --all".into());
    } else {
        pick.txids
            .iter()
            .map(|t| t.parse::<TxId>().map_err(|e| format!("{t:?}: {e}").into()))
            .collect::<Result<_, BoxError>>()?
    };
    let (verb, done) = match how {
        Resolution::Commit => ("commit", "committed"),
        _ => ("abort", "aborted"),
    };
    let mut ok = true;
    for txid in txids {
        let Some((record, holders)) = records.get(&txid) else {
            println!("{txid}: not in doubt at any given store");
            ok = false;
            continue;
        };
        if pick.dry_run {
            println!("{txid}: would {verb} at {}", holders.join(", "));
            continue;
        }
        // Through the fence when the record is this log's; another log's
        // (or none) is the operator's word alone.
        let log = (record.log == Some(own)).then_some(&*opened.log);
        match resolve(log, &opened.resources(), &txid, how) {
            Ok(changed) => println!("{txid}: {done} at {}", changed.join(", ")),
            Err(err) => {
                println!("{txid}: not {done}: {}", chain(&err));
                ok = false;
            }
        }
    }
    Ok(ok && !pick.dry_run)
}
