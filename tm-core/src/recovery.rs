//! Crash recovery: finishing what a crash, a stall or a failed finish left
//! prepared, without ever hurting a live transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use tracing::{error, info, info_span, warn};

use crate::decision_log::{Decision, DecisionLog, LogId, Outcome};
use crate::error::{Error, Result};
use crate::txid::TxId;

/// A resource that can prepare durably, and so can be finished after a crash.
pub trait Recoverable: Send + Sync {
    /// Names the resource, stably across restarts and across spellings of
    /// its address (e.g. an id kept in the store itself).
    fn resource_id(&self) -> String;
    /// The transactions prepared here and neither committed nor aborted,
    /// each with its coordinator's log and its age.
    fn in_doubt(&self) -> Result<Vec<InDoubt>>;
    /// Commits a prepared transaction. Idempotent: `Ok` if this resource
    /// holds a receipt of its commit. A record that is gone otherwise is
    /// [`Error::RecordMissing`] (aborted, or lost), never `Ok`.
    fn commit_prepared(&self, txid: &TxId) -> Result<()>;
    /// Aborts a prepared transaction and leaves a tombstone, so that a late
    /// prepare of it is refused. Idempotent: `Ok` if already aborted, or
    /// gone without a trace. A transaction this resource already committed
    /// (a receipt of its commit) is [`Error::RecordMissing`] with
    /// [`Missing::Committed`](crate::Missing::Committed), never `Ok`: an
    /// abort reported for it would be false.
    fn abort_prepared(&self, txid: &TxId) -> Result<()>;
}

/// A prepared record, as [`Recoverable::in_doubt`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InDoubt {
    /// The transaction.
    pub txid: TxId,
    /// The decision log of the coordinator that prepared it; `None` for a
    /// record prepared without one (never resolved automatically).
    pub log: Option<LogId>,
    /// How long ago it was prepared, by the store's own clock.
    pub age: Duration,
}

impl InDoubt {
    /// A record of `txid`, prepared by the coordinator of `log`, `age` ago.
    pub fn new(txid: TxId, log: Option<LogId>, age: Duration) -> Self {
        InDoubt { txid, log, age }
    }
}

/// How [`recover_with`] works.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RecoveryOptions {
    /// Undecided records younger than this are left for a later pass
    /// (default 5 s). Decided ones are committed at any age.
    pub grace: Duration,
    /// Logs of *dead* coordinators whose records this recovery may resolve
    /// as its own: undecided ones are aborted (no fence is possible in a log
    /// that is gone: make sure its coordinator is dead). Empty by default.
    pub take_over: Vec<LogId>,
    /// Report what would be done, and do nothing (no fence, no commit, no
    /// abort, no forget).
    pub dry_run: bool,
}

impl Default for RecoveryOptions {
    fn default() -> Self {
        RecoveryOptions {
            grace: Duration::from_secs(5),
            take_over: Vec::new(),
            dry_run: false,
        }
    }
}

impl RecoveryOptions {
    /// The default options: 5 s grace, no take-over, not a dry run.
    pub fn new() -> Self {
        Self::default()
    }
    /// Sets [`grace`](Self::grace).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }
    /// Adds a dead coordinator's log to [`take_over`](Self::take_over).
    pub fn take_over(mut self, log: LogId) -> Self {
        self.take_over.push(log);
        self
    }
    /// Sets [`dry_run`](Self::dry_run).
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }
}

/// What [`recover`] did (or, in a dry run, would do). Entries are
/// `(resource_id, txid)`.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// The log recovered for.
    pub log: Option<LogId>,
    /// Whether this was a dry run (nothing was changed).
    pub dry_run: bool,
    /// Committed: a commit decision was logged.
    pub committed: Vec<(String, TxId)>,
    /// Aborted: no decision, older than the grace period; the abort was
    /// recorded first (fenced presumed abort).
    pub aborted: Vec<(String, TxId)>,
    /// Decided, and the resource holds a receipt: finished before.
    pub already_finished: Vec<(String, TxId)>,
    /// Decided, but the resource has neither the record nor a receipt: its
    /// part is lost (a failover, a restore). The decision is kept.
    pub lost: Vec<(String, TxId)>,
    /// Records of other logs, left alone.
    pub foreign: Vec<(String, InDoubt)>,
    /// Own undecided records younger than the grace period, left for a later
    /// pass.
    pub deferred: Vec<(String, InDoubt)>,
    /// Decisions forgotten because every participant has finished.
    pub forgotten: Vec<TxId>,
    /// Failures; the affected transactions stay in doubt for the next pass.
    pub errors: Vec<(String, Error)>,
}

impl RecoveryReport {
    /// `true` when nothing failed and nothing was lost.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty() && self.lost.is_empty()
    }

    /// `true` when nothing is left in doubt: clean, with no foreign or
    /// deferred record.
    pub fn nothing_in_doubt(&self) -> bool {
        self.is_clean() && self.foreign.is_empty() && self.deferred.is_empty()
    }

    /// `true` when this pass found nothing at all to do or report.
    pub fn is_empty(&self) -> bool {
        self.nothing_in_doubt()
            && self.committed.is_empty()
            && self.aborted.is_empty()
            && self.already_finished.is_empty()
            && self.forgotten.is_empty()
    }
}

impl fmt::Display for RecoveryReport {
    /// One line: `nothing in doubt`, or the counts of each kind.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dry_run {
            f.write_str("dry run: ")?;
        }
        if self.is_empty() {
            return f.write_str("nothing in doubt");
        }
        let parts = [
            ("committed", self.committed.len()),
            ("aborted", self.aborted.len()),
            ("already finished", self.already_finished.len()),
            ("lost", self.lost.len()),
            ("foreign (left alone)", self.foreign.len()),
            ("too young (left for a later pass)", self.deferred.len()),
            ("decisions forgotten", self.forgotten.len()),
            ("errors", self.errors.len()),
        ];
        let mut first = true;
        for (name, n) in parts.into_iter().filter(|(_, n)| *n > 0) {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{n} {name}")?;
        }
        Ok(())
    }
}

/// [`recover_with`] with the default [`RecoveryOptions`] (5 s grace).
///
/// The rules, each after the transaction managers that learned them the
/// hard way:
///
/// * **Ownership.** Every prepared record names the [`LogId`] of the
///   coordinator that prepared it. [`recover`] resolves only the records of
///   its own log; all others are reported as [`foreign`](RecoveryReport::foreign)
///   and left alone (Narayana's node filter, Atomikos' name prefix). Taking
///   over a dead coordinator's records is an explicit operator action
///   ([`RecoveryOptions::take_over`]).
/// * **Grace.** A record younger than [`RecoveryOptions::grace`] (its age
///   measured by the store's own clock) is left for a later pass, so a
///   normal pass never aborts a live coordinator's work.
/// * **Fenced presumed abort.** Before aborting an undecided record,
///   recovery records the abort in the log ([`DecisionLog::record_abort`]);
///   a coordinator that arrives later with its commit gets
///   [`Error::Fenced`] and aborts cleanly. If the commit was recorded first,
///   recovery commits instead. Recovery is therefore safe at any moment,
///   from any process sharing the log, as often as you like.
/// * **A missing record is never success.** A decided transaction whose
///   record is gone is reported as [`already_finished`](RecoveryReport::already_finished)
///   only when the resource holds a receipt of its commit; otherwise it is
///   [`lost`](RecoveryReport::lost), and its decision is kept.
///
///
/// ```
/// use tm_core::{recover, FileDecisionLog, MemoryStore, Recoverable};
/// let dir = tempfile::tempdir()?;
/// let log = FileDecisionLog::open(dir.path().join("decisions"))?;
/// let store = MemoryStore::<i32>::named("accounts");
/// let report = recover(&log, &[&store as &dyn Recoverable])?;
/// assert!(report.nothing_in_doubt());
/// assert_eq!(report.to_string(), "nothing in doubt");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn recover(log: &dyn DecisionLog, resources: &[&dyn Recoverable]) -> Result<RecoveryReport> {
    recover_with(log, resources, &RecoveryOptions::default())
}

/// Finishes the in-doubt transactions of `log` found in `resources`:
/// commits those with a commit decision, fences and aborts those without
/// one once they are older than the grace period, reports the records of
/// other logs as foreign, and forgets the decisions whose participants have
/// all finished. See [`recover`] for the rules.
///
/// Safe at any moment, from any process, while transactions run.
///
/// Errors in one resource do not stop the others; they are collected in
/// [`RecoveryReport::errors`]. Only a failure to read the log is `Err`.
pub fn recover_with(
    log: &dyn DecisionLog,
    resources: &[&dyn Recoverable],
    options: &RecoveryOptions,
) -> Result<RecoveryReport> {
    let own = log.id();
    let span = info_span!("recover", log = %own, dry_run = options.dry_run);
    let _entered = span.enter();
    let decisions: BTreeMap<TxId, Decision> =
        log.pending()?.into_iter().map(|d| (d.txid, d)).collect();
    let mut pass = Pass {
        log,
        options,
        report: RecoveryReport {
            log: Some(own),
            dry_run: options.dry_run,
            ..RecoveryReport::default()
        },
        unfinished: BTreeSet::new(),
        fenced: BTreeMap::new(),
    };
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for res in resources {
        let rid = res.resource_id();
        let listed = match res.in_doubt() {
            Ok(listed) => listed,
            Err(err) => {
                error!(resource = %rid, error = %err, "listing in-doubt transactions failed");
                pass.unfinished.extend(decisions.keys().copied());
                pass.report.errors.push((rid, err));
                continue;
            }
        };
        seen.insert(rid.clone());
        let listed_ids: BTreeSet<TxId> = listed.iter().map(|r| r.txid).collect();
        for record in listed {
            let mine = record.log == Some(own)
                || record.log.is_some_and(|l| options.take_over.contains(&l));
            if !mine {
                pass.report.foreign.push((rid.clone(), record));
            } else if decisions.contains_key(&record.txid) {
                pass.commit(*res, &rid, record.txid, true);
            } else if record.age < options.grace {
                pass.report.deferred.push((rid.clone(), record));
            } else {
                pass.presume_abort(*res, &rid, &record);
            }
        }
        // Decided transactions this resource takes part in but no longer
        // holds: finished before (a receipt), or lost.
        for (txid, decision) in &decisions {
            if !listed_ids.contains(txid) && decision.participants.contains(&rid) {
                pass.commit(*res, &rid, *txid, false);
            }
        }
    }
    for (txid, decision) in &decisions {
        if pass.unfinished.contains(txid) || options.dry_run {
            continue;
        }
        // A participant that recovery was not given may still hold it.
        if !decision.participants.iter().all(|p| seen.contains(p)) {
            continue;
        }
        match log.forget(txid) {
            Ok(()) => pass.report.forgotten.push(*txid),
            Err(err) => pass.report.errors.push(("decision log".to_owned(), err)),
        }
    }
    let report = pass.report;
    if report.is_empty() {
        info!("nothing in doubt");
    } else {
        info!(%report, "recovery pass done");
    }
    Ok(report)
}

/// One recovery pass's state.
struct Pass<'a> {
    log: &'a dyn DecisionLog,
    options: &'a RecoveryOptions,
    report: RecoveryReport,
    /// Decided transactions still in doubt somewhere after this pass: their
    /// decision must be kept.
    unfinished: BTreeSet<TxId>,
    /// The fence's answer per transaction, asked once per pass.
    fenced: BTreeMap<TxId, Outcome>,
}

impl Pass<'_> {
    /// Commits a decided transaction at `res`; `listed`: `res` listed it in
    /// doubt (otherwise this asks whether it finished before).
    fn commit(&mut self, res: &dyn Recoverable, rid: &str, txid: TxId, listed: bool) {
        let entry = (rid.to_owned(), txid);
        if self.options.dry_run {
            if listed {
                self.report.committed.push(entry);
            }
            return;
        }
        match res.commit_prepared(&txid) {
            Ok(()) if listed => {
                info!(resource = %rid, %txid, "committed in-doubt transaction (decision logged)");
                self.report.committed.push(entry);
            }
            Ok(()) => self.report.already_finished.push(entry),
            Err(Error::RecordMissing { missing, .. }) => {
                error!(resource = %rid, %txid, ?missing, "a decided transaction's prepared record is gone: its part is lost");
                self.unfinished.insert(txid);
                self.report.lost.push(entry);
            }
            Err(err) => {
                error!(resource = %rid, %txid, error = %err, "commit_prepared failed");
                self.unfinished.insert(txid);
                self.report.errors.push((rid.to_owned(), err));
            }
        }
    }

    /// An own, undecided record past the grace period: fence, then abort
    /// (or commit, if the coordinator's decision came first).
    fn presume_abort(&mut self, res: &dyn Recoverable, rid: &str, record: &InDoubt) {
        let txid = record.txid;
        let taken_over = record.log != Some(self.log.id());
        if self.options.dry_run {
            self.report.aborted.push((rid.to_owned(), txid));
            return;
        }
        let outcome = if taken_over {
            // The owner's log is gone: the operator's word is the fence.
            Ok(Outcome::Aborted)
        } else if let Some(outcome) = self.fenced.get(&txid) {
            Ok(*outcome)
        } else {
            self.log.record_abort(&txid)
        };
        match outcome {
            Ok(outcome) => {
                self.fenced.insert(txid, outcome);
                match outcome {
                    Outcome::Committed => {
                        info!(resource = %rid, %txid, "the fence found a commit decision: committing");
                        self.commit(res, rid, txid, true);
                    }
                    _ => match res.abort_prepared(&txid) {
                        Ok(()) => {
                            info!(resource = %rid, %txid, age = ?record.age, "aborted in-doubt transaction (no decision: fenced presumed abort)");
                            self.report.aborted.push((rid.to_owned(), txid));
                        }
                        Err(err) => {
                            error!(resource = %rid, %txid, error = %err, "abort_prepared failed");
                            self.report.errors.push((rid.to_owned(), err));
                        }
                    },
                }
            }
            Err(err) => {
                warn!(resource = %rid, %txid, error = %err, "could not record the abort (the fence); leaving the record for a later pass");
                self.report.errors.push(("decision log".to_owned(), err));
            }
        }
    }
}

/// What an operator asks [`resolve`] to do with one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Resolution {
    /// Commit it everywhere it is prepared.
    Commit,
    /// Abort it everywhere it is prepared.
    Abort,
}

/// An operator's decision on one in-doubt transaction, applied to every
/// resource that holds it. With `log` (the transaction's own log), the
/// decision goes through the fence first: committing a transaction whose
/// abort is recorded, or aborting one whose commit is recorded, is refused
/// with [`Error::InvalidArgument`]. Without a log (its coordinator's log is
/// gone) the operator's word is final. Returns the resources changed.
pub fn resolve(
    log: Option<&dyn DecisionLog>,
    resources: &[&dyn Recoverable],
    txid: &TxId,
    resolution: Resolution,
) -> Result<Vec<String>> {
    let holders: Vec<&dyn Recoverable> = resources
        .iter()
        .copied()
        .filter(|r| {
            r.in_doubt()
                .map(|l| l.iter().any(|d| d.txid == *txid))
                .unwrap_or(false)
        })
        .collect();
    if let Some(log) = log {
        match resolution {
            Resolution::Commit => {
                let participants = holders.iter().map(|r| r.resource_id()).collect();
                let decision = Decision::new(*txid, participants, BTreeMap::new());
                match log.record_commit(&decision) {
                    Ok(()) => {}
                    Err(Error::Fenced { .. }) => {
                        return Err(Error::InvalidArgument(format!(
                            "{txid} cannot be committed: its abort is recorded in log {}",
                            log.id()
                        )))
                    }
                    Err(err) => return Err(err),
                }
            }
            Resolution::Abort => {
                if log.record_abort(txid)? == Outcome::Committed {
                    return Err(Error::InvalidArgument(format!(
                        "{txid} cannot be aborted: its commit is recorded in log {}",
                        log.id()
                    )));
                }
            }
        }
    }
    let mut changed = Vec::new();
    for res in holders {
        match resolution {
            Resolution::Commit => res.commit_prepared(txid)?,
            Resolution::Abort => res.abort_prepared(txid)?,
        }
        changed.push(res.resource_id());
    }
    if let (Some(log), Resolution::Commit) = (log, resolution) {
        log.forget(txid)?;
    }
    Ok(changed)
}
