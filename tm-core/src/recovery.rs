//! Crash recovery: finishing what a crash left prepared.

use std::collections::{BTreeMap, BTreeSet};

use tracing::{error, info, info_span};

use crate::decision_log::DecisionLog;
use crate::error::{Error, Result};
use crate::txid::TxId;

/// A resource that can prepare durably, and so can be finished after a crash.
pub trait Recoverable: Send + Sync {
    /// Names the resource, stably across restarts (e.g. server + db + prefix).
    fn resource_id(&self) -> String;
    /// The transactions prepared here and neither committed nor aborted.
    fn in_doubt(&self) -> Result<Vec<TxId>>;
    /// Commits a prepared transaction. Idempotent: `Ok` if already committed.
    fn commit_prepared(&self, txid: &TxId) -> Result<()>;
    /// Aborts a prepared transaction. Idempotent: `Ok` if already gone.
    fn abort_prepared(&self, txid: &TxId) -> Result<()>;
}

/// What [`recover`] did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// `(resource_id, txid)` committed because a decision was logged.
    pub committed: Vec<(String, TxId)>,
    /// `(resource_id, txid)` aborted: no decision (presumed abort).
    pub aborted: Vec<(String, TxId)>,
    /// Decisions forgotten because every participant has finished.
    pub forgotten: Vec<TxId>,
    /// Failures; the affected transactions stay in doubt for the next run.
    pub errors: Vec<(String, Error)>,
}

impl RecoveryReport {
    /// `true` when nothing failed.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Finishes every in-doubt transaction of `resources`: commits those with a
/// commit decision in `log`, aborts the others (presumed abort), then forgets
/// the decisions whose participants have all finished.
///
/// Run it at start-up, before new transactions begin: a transaction that is
/// prepared but not yet decided *right now* would be aborted.
///
/// Errors in one resource do not stop the others; they are collected in
/// [`RecoveryReport::errors`]. Only a failure to read the log is returned
/// as `Err`.
///
/// ```
/// use std::sync::Arc;
/// use tm_core::{recover, FileDecisionLog, MemoryStore, Recoverable};
/// let dir = tempfile::tempdir()?;
/// let log = FileDecisionLog::open(dir.path().join("decisions"))?;
/// let store = MemoryStore::<i32>::named("accounts");
/// let report = recover(&log, &[&store as &dyn Recoverable])?;
/// assert!(report.is_clean());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn recover(log: &dyn DecisionLog, resources: &[&dyn Recoverable]) -> Result<RecoveryReport> {
    let span = info_span!("recover");
    let _entered = span.enter();
    let decisions: BTreeMap<TxId, _> = log.pending()?.into_iter().map(|d| (d.txid, d)).collect();
    let mut report = RecoveryReport::default();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    // Transactions still in doubt somewhere after this pass.
    let mut unfinished: BTreeSet<TxId> = BTreeSet::new();
    for res in resources {
        let rid = res.resource_id();
        seen.insert(rid.clone());
        let in_doubt = match res.in_doubt() {
            Ok(ids) => ids,
            Err(err) => {
                error!(resource = %rid, error = %err, "listing in-doubt transactions failed");
                unfinished.extend(decisions.keys().copied());
                report.errors.push((rid, err));
                continue;
            }
        };
        for txid in in_doubt {
            if decisions.contains_key(&txid) {
                match res.commit_prepared(&txid) {
                    Ok(()) => {
                        info!(resource = %rid, %txid, "committed in-doubt transaction (decision logged)");
                        report.committed.push((rid.clone(), txid));
                    }
                    Err(err) => {
                        error!(resource = %rid, %txid, error = %err, "commit_prepared failed");
                        unfinished.insert(txid);
                        report.errors.push((rid.clone(), err));
                    }
                }
            } else {
                match res.abort_prepared(&txid) {
                    Ok(()) => {
                        info!(resource = %rid, %txid, "aborted in-doubt transaction (no decision: presumed abort)");
                        report.aborted.push((rid.clone(), txid));
                    }
                    Err(err) => {
                        error!(resource = %rid, %txid, error = %err, "abort_prepared failed");
                        report.errors.push((rid.clone(), err));
                    }
                }
            }
        }
    }
    for (txid, decision) in &decisions {
        if unfinished.contains(txid) {
            continue;
        }
        // A participant that recovery was not given may still hold it.
        let all_seen = decision.participants.iter().all(|p| seen.contains(p));
        if !all_seen {
            continue;
        }
        match log.forget(txid) {
            Ok(()) => report.forgotten.push(*txid),
            Err(err) => report.errors.push(("decision log".to_owned(), err)),
        }
    }
    Ok(report)
}
