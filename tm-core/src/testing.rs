//! Test helpers for your own code's failure paths: a data manager that
//! records every call into a shared [`CallLog`] and fails where told to.
//!
//! ```
//! use tm_core::{Error, Phase, TransactionManager};
//! use tm_core::testing::{CallLog, Fault, TestDataManager};
//!
//! let log = CallLog::new();
//! let a = TestDataManager::new("a", &log);
//! let b = TestDataManager::new("b", &log).fail_at(Phase::TpcVote, Fault::Error);
//! let tm = TransactionManager::explicit();
//! let txn = tm.begin()?;
//! txn.join(a)?;
//! txn.join(b)?;
//! assert!(txn.commit().is_err());
//! assert_eq!(log.entries(), vec![
//!     ("a".to_string(), Phase::TpcBegin), ("b".to_string(), Phase::TpcBegin),
//!     ("a".to_string(), Phase::Commit),   ("b".to_string(), Phase::Commit),
//!     ("a".to_string(), Phase::TpcVote),  ("b".to_string(), Phase::TpcVote),
//!     ("a".to_string(), Phase::TpcAbort), ("b".to_string(), Phase::TpcAbort),
//! ]);
//! # Ok::<(), tm_core::Error>(())
//! ```

use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

pub use crate::data_manager::Phase;
use crate::data_manager::{DataManager, ResourceSavepoint};
use crate::decision_log::LogId;
use crate::error::{Error, Result};
use crate::transaction::Transaction;

/// A shared, ordered record of `(resource name, phase)` calls. Clones share
/// the record, so several data managers (and managers) show one global order.
#[derive(Clone, Default)]
pub struct CallLog {
    entries: Arc<Mutex<Vec<(String, Phase)>>>,
}

impl fmt::Debug for CallLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.entries.lock().iter()).finish()
    }
}

impl CallLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every call so far, in order.
    pub fn entries(&self) -> Vec<(String, Phase)> {
        self.entries.lock().clone()
    }

    /// The calls made to one resource, in order.
    pub fn phases_of(&self, name: &str) -> Vec<Phase> {
        self.entries
            .lock()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .collect()
    }

    /// Forgets every entry.
    pub fn clear(&self) {
        self.entries.lock().clear();
    }

    /// Records a call (for your own test data managers).
    pub fn record(&self, name: &str, phase: Phase) {
        self.entries.lock().push((name.to_owned(), phase));
    }
}

/// How a [`TestDataManager`] fails at a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Returns [`Error::Resource`] (not retryable).
    Error,
    /// Returns [`Error::Conflict`] (retryable).
    Conflict,
    /// Panics.
    Panic,
    /// Returns [`Error::Heuristic`] naming itself both committed and
    /// rolled back: it did its part only in part (as at `tpc_finish` a
    /// store whose write-set applied with failures).
    Partial,
}

#[derive(Clone, Copy)]
struct Rule {
    phase: Phase,
    fault: Fault,
    /// `None`: every time; `Some(n)`: the next `n` times.
    times: Option<u32>,
}

/// A data manager that records every call in a [`CallLog`] and fails at the
/// phases it is told to. Builder methods take and return `Arc<Self>`.
pub struct TestDataManager {
    name: String,
    sort_key: String,
    log: CallLog,
    rules: Mutex<Vec<Rule>>,
    savepoints: bool,
    one_phase: bool,
    durable: bool,
    hosted_log: Option<LogId>,
}

impl fmt::Debug for TestDataManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDataManager")
            .field("name", &self.name)
            .field("sort_key", &self.sort_key)
            .finish()
    }
}

impl TestDataManager {
    /// The error of [`Fault::Partial`].
    fn partial(&self) -> Error {
        Error::Heuristic {
            committed: vec![self.name.clone()],
            rolled_back: vec![self.name.clone()],
            in_doubt: Vec::new(),
        }
    }

    /// A data manager named `name` (also its sort key) recording into `log`.
    pub fn new(name: &str, log: &CallLog) -> Arc<Self> {
        Arc::new(TestDataManager {
            name: name.to_owned(),
            sort_key: name.to_owned(),
            log: log.clone(),
            rules: Mutex::new(Vec::new()),
            savepoints: true,
            one_phase: false,
            durable: false,
            hosted_log: None,
        })
    }

    fn rebuild(self: Arc<Self>, f: impl FnOnce(&mut TestDataManager)) -> Arc<Self> {
        let mut me = match Arc::try_unwrap(self) {
            Ok(me) => me,
            Err(shared) => TestDataManager {
                name: shared.name.clone(),
                sort_key: shared.sort_key.clone(),
                log: shared.log.clone(),
                rules: Mutex::new(shared.rules.lock().clone()),
                savepoints: shared.savepoints,
                one_phase: shared.one_phase,
                durable: shared.durable,
                hosted_log: shared.hosted_log,
            },
        };
        f(&mut me);
        Arc::new(me)
    }

    /// Fails with `fault` every time `phase` is called (several phases may be
    /// given by chaining).
    pub fn fail_at(self: Arc<Self>, phase: Phase, fault: Fault) -> Arc<Self> {
        self.add_rule(phase, fault, None);
        self
    }

    /// Fails with `fault` the next `times` times `phase` is called, then
    /// succeeds (for retry tests).
    pub fn fail_times(self: Arc<Self>, phase: Phase, fault: Fault, times: u32) -> Arc<Self> {
        self.add_rule(phase, fault, Some(times));
        self
    }

    fn add_rule(&self, phase: Phase, fault: Fault, times: Option<u32>) {
        self.rules.lock().push(Rule {
            phase,
            fault,
            times,
        });
    }

    /// Commits in this order instead of by name.
    pub fn with_sort_key(self: Arc<Self>, key: &str) -> Arc<Self> {
        self.rebuild(|me| me.sort_key = key.to_owned())
    }

    /// Refuses savepoints ([`Error::SavepointNotSupported`]) and logs nothing
    /// when asked for one.
    pub fn without_savepoints(self: Arc<Self>) -> Arc<Self> {
        self.rebuild(|me| me.savepoints = false)
    }

    /// Cannot prepare (`can_prepare() == false`): committed last.
    pub fn one_phase(self: Arc<Self>) -> Arc<Self> {
        self.rebuild(|me| me.one_phase = true)
    }

    /// Says it prepares durably ([`DataManager::prepares_durably`]), like a
    /// real store whose prepare survives a crash: tm then refuses to commit
    /// it beside others without a decision log.
    pub fn durable(self: Arc<Self>) -> Arc<Self> {
        self.rebuild(|me| me.durable = true)
    }

    /// Says the decision log `log` commits inside this resource's own commit
    /// ([`DataManager::hosted_log`]), like tm-sqlite with its
    /// `SqliteDecisionLog`.
    pub fn hosting(self: Arc<Self>, log: LogId) -> Arc<Self> {
        self.rebuild(|me| me.hosted_log = Some(log))
    }

    /// The name given to [`new`](Self::new).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Records `phase`, then fails if a rule says so.
    fn step(&self, phase: Phase) -> Result<()> {
        self.log.record(&self.name, phase);
        let fault = {
            let mut rules = self.rules.lock();
            let mut hit = None;
            for rule in rules.iter_mut().filter(|r| r.phase == phase) {
                match &mut rule.times {
                    None => {
                        hit = Some(rule.fault);
                        break;
                    }
                    Some(0) => {}
                    Some(n) => {
                        *n -= 1;
                        hit = Some(rule.fault);
                        break;
                    }
                }
            }
            hit
        };
        match fault {
            None => Ok(()),
            Some(Fault::Error) => Err(Error::resource(
                self.name.clone(),
                format!("injected failure at {phase}"),
            )),
            Some(Fault::Conflict) => Err(Error::conflict(
                self.name.clone(),
                phase,
                "injected conflict",
            )),
            Some(Fault::Panic) => panic!("{}: injected panic at {phase}", self.name),
            Some(Fault::Partial) => Err(self.partial()),
        }
    }
}

impl DataManager for TestDataManager {
    fn sort_key(&self) -> &str {
        &self.sort_key
    }
    fn abort(&self, _txn: &Transaction) -> Result<()> {
        self.step(Phase::Abort)
    }
    fn tpc_begin(&self, _txn: &Transaction) -> Result<()> {
        self.step(Phase::TpcBegin)
    }
    fn commit(&self, _txn: &Transaction) -> Result<()> {
        self.step(Phase::Commit)
    }
    fn tpc_vote(&self, _txn: &Transaction) -> Result<()> {
        self.step(Phase::TpcVote)
    }
    fn tpc_finish(&self, _txn: &Transaction) -> Result<()> {
        self.step(Phase::TpcFinish)
    }
    fn tpc_abort(&self, _txn: &Transaction) -> Result<()> {
        self.step(Phase::TpcAbort)
    }
    fn commit_one_phase(&self, _txn: &Transaction) -> Result<()> {
        self.step(Phase::CommitOnePhase)
    }
    fn can_prepare(&self) -> bool {
        !self.one_phase
    }
    fn prepares_durably(&self) -> bool {
        self.durable
    }
    fn hosted_log(&self) -> Option<LogId> {
        self.hosted_log
    }
    fn savepoint(&self, _txn: &Transaction) -> Result<Box<dyn ResourceSavepoint>> {
        if !self.savepoints {
            return Err(Error::SavepointNotSupported {
                resource: self.name.clone(),
            });
        }
        self.step(Phase::Savepoint)?;
        Ok(Box::new(TestSavepoint {
            name: self.name.clone(),
            log: self.log.clone(),
            fail: self
                .rules
                .lock()
                .iter()
                .find(|r| r.phase == Phase::Rollback)
                .map(|r| r.fault),
        }))
    }
}

struct TestSavepoint {
    name: String,
    log: CallLog,
    fail: Option<Fault>,
}

impl ResourceSavepoint for TestSavepoint {
    fn rollback(&self) -> Result<()> {
        self.log.record(&self.name, Phase::Rollback);
        match self.fail {
            None => Ok(()),
            Some(Fault::Conflict) => Err(Error::conflict(
                self.name.clone(),
                Phase::Rollback,
                "injected conflict",
            )),
            Some(Fault::Panic) => panic!("{}: injected panic at rollback", self.name),
            Some(Fault::Error | Fault::Partial) => Err(Error::resource(
                self.name.clone(),
                "injected failure at rollback",
            )),
        }
    }
}

/// A data manager that does nothing and always succeeds (savepoints
/// included): a placeholder participant, e.g. to make a single real resource
/// commit in two phases, or to measure tm itself.
///
/// ```
/// use tm_core::testing::NoOpDataManager;
/// use tm_core::TransactionManager;
///
/// let tm = TransactionManager::explicit();
/// let txn = tm.begin()?;
/// txn.join(NoOpDataManager::new("noop"))?;
/// txn.savepoint()?.rollback()?;
/// txn.commit()?;
/// # Ok::<(), tm_core::Error>(())
/// ```
#[derive(Debug)]
pub struct NoOpDataManager {
    sort_key: String,
}

impl NoOpDataManager {
    /// A no-op participant with this sort key.
    pub fn new(sort_key: &str) -> Arc<Self> {
        Arc::new(NoOpDataManager {
            sort_key: sort_key.to_owned(),
        })
    }
}

struct NoOpSavepoint;

impl ResourceSavepoint for NoOpSavepoint {
    fn rollback(&self) -> Result<()> {
        Ok(())
    }
}

impl DataManager for NoOpDataManager {
    fn sort_key(&self) -> &str {
        &self.sort_key
    }
    fn abort(&self, _txn: &Transaction) -> Result<()> {
        Ok(())
    }
    fn tpc_begin(&self, _txn: &Transaction) -> Result<()> {
        Ok(())
    }
    fn commit(&self, _txn: &Transaction) -> Result<()> {
        Ok(())
    }
    fn tpc_vote(&self, _txn: &Transaction) -> Result<()> {
        Ok(())
    }
    fn tpc_finish(&self, _txn: &Transaction) -> Result<()> {
        Ok(())
    }
    fn tpc_abort(&self, _txn: &Transaction) -> Result<()> {
        Ok(())
    }
    fn savepoint(&self, _txn: &Transaction) -> Result<Box<dyn ResourceSavepoint>> {
        Ok(Box::new(NoOpSavepoint))
    }
}
