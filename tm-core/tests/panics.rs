//! A panic in any call into a resource or a decision log is a failure of
//! that call: the transaction ends exactly as if the call had returned an
//! error, every resource gets its one ending, the panic is blamed on the
//! right resource, and the manager stays usable on that thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tm_core::testing::{CallLog, Phase, TestDataManager};
use tm_core::{
    DataManager, Decision, DecisionLog, Error, LogId, Outcome, ResourceSavepoint, Result, Status,
    Transaction, TransactionManager, TxId,
};

/// Which of its non-protocol methods a [`Wrapped`] resource panics in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Site {
    SortKey,
    CanPrepare,
    RecoveryId,
    PreparesDurably,
}

/// A TestDataManager that panics in one of the methods tm asks outside the
/// protocol calls, once armed.
struct Wrapped {
    inner: Arc<TestDataManager>,
    site: Site,
    armed: AtomicBool,
}

impl Wrapped {
    fn new(name: &str, log: &CallLog, site: Site) -> Arc<Wrapped> {
        Arc::new(Wrapped {
            inner: TestDataManager::new(name, log),
            site,
            armed: AtomicBool::new(false),
        })
    }
    fn trip(&self, site: Site) {
        if self.site == site && self.armed.load(Ordering::SeqCst) {
            panic!("{site:?} exploded");
        }
    }
}

impl DataManager for Wrapped {
    fn sort_key(&self) -> &str {
        self.trip(Site::SortKey);
        self.inner.sort_key()
    }
    fn abort(&self, t: &Transaction) -> Result<()> {
        self.inner.abort(t)
    }
    fn tpc_begin(&self, t: &Transaction) -> Result<()> {
        self.inner.tpc_begin(t)
    }
    fn commit(&self, t: &Transaction) -> Result<()> {
        self.inner.commit(t)
    }
    fn tpc_vote(&self, t: &Transaction) -> Result<()> {
        self.inner.tpc_vote(t)
    }
    fn tpc_finish(&self, t: &Transaction) -> Result<()> {
        self.inner.tpc_finish(t)
    }
    fn tpc_abort(&self, t: &Transaction) -> Result<()> {
        self.inner.tpc_abort(t)
    }
    fn savepoint(&self, t: &Transaction) -> Result<Box<dyn ResourceSavepoint>> {
        self.inner.savepoint(t)
    }
    fn can_prepare(&self) -> bool {
        self.trip(Site::CanPrepare);
        true
    }
    fn recovery_id(&self) -> Option<String> {
        self.trip(Site::RecoveryId);
        Some(format!("test:{}", self.inner.name()))
    }
    fn prepares_durably(&self) -> bool {
        self.trip(Site::PreparesDurably);
        false
    }
}

/// A decision log that panics in `record_commit` or `forget` when asked.
struct PanickingLog {
    id: LogId,
    in_record: bool,
    in_forget: bool,
}

impl DecisionLog for PanickingLog {
    fn id(&self) -> LogId {
        self.id
    }
    fn record_commit(&self, _: &Decision) -> Result<()> {
        assert!(!self.in_record, "record_commit exploded");
        Ok(())
    }
    fn record_abort(&self, _: &TxId) -> Result<Outcome> {
        Ok(Outcome::Aborted)
    }
    fn forget(&self, _: &TxId) -> Result<()> {
        assert!(!self.in_forget, "forget exploded");
        Ok(())
    }
    fn pending(&self) -> Result<Vec<Decision>> {
        Ok(Vec::new())
    }
}

fn endings(log: &CallLog, name: &str) -> Vec<Phase> {
    log.phases_of(name)
        .into_iter()
        .filter(|p| {
            matches!(
                p,
                Phase::Abort | Phase::TpcAbort | Phase::TpcFinish | Phase::CommitOnePhase
            )
        })
        .collect()
}

/// Commits `victim` beside `other` on a fresh manager; the victim is armed
/// just before the commit.
fn commit_with_a_panic(site: Site) -> (CallLog, Error, TransactionManager) {
    let log = CallLog::new();
    let tm = TransactionManager::explicit();
    let victim = Wrapped::new("victim", &log, site);
    let txn = tm.begin().unwrap();
    txn.join(victim.clone()).unwrap();
    txn.join(TestDataManager::new("other", &log)).unwrap();
    victim.armed.store(true, Ordering::SeqCst);
    let err = txn.commit().unwrap_err();
    assert_eq!(txn.status(), Status::CommitFailed, "{site:?}");
    // The manager stays usable: the failed transaction aborts, and a new
    // one begins and commits.
    tm.abort().unwrap();
    assert_eq!(txn.status(), Status::Aborted);
    victim.armed.store(false, Ordering::SeqCst);
    (log, err, tm)
}

#[test]
fn a_panic_in_sort_key_fails_the_commit_and_ends_every_resource_once() {
    let (log, err, tm) = commit_with_a_panic(Site::SortKey);
    match &err {
        Error::Panicked {
            resource, message, ..
        } => {
            assert!(resource.contains("#1"), "{err}");
            assert!(message.contains("SortKey exploded"), "{err}");
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert_eq!(endings(&log, "victim"), [Phase::Abort]);
    assert_eq!(endings(&log, "other"), [Phase::Abort]);
    let txn = tm.begin().unwrap();
    txn.commit().unwrap();
}

#[test]
fn a_panic_in_can_prepare_is_blamed_on_its_own_resource() {
    let (log, err, _tm) = commit_with_a_panic(Site::CanPrepare);
    match &err {
        Error::Panicked { resource, .. } => assert_eq!(resource, "victim", "{err}"),
        other => panic!("expected Panicked, got {other:?}"),
    }
    // Nothing began: every resource got `abort`, once.
    assert_eq!(endings(&log, "victim"), [Phase::Abort]);
    assert_eq!(endings(&log, "other"), [Phase::Abort]);
}

#[test]
fn a_panic_in_recovery_id_or_prepares_durably_fails_before_the_decision() {
    for site in [Site::RecoveryId, Site::PreparesDurably] {
        let log = CallLog::new();
        let dlog = Arc::new(PanickingLog {
            id: LogId::new(),
            in_record: false,
            in_forget: false,
        });
        let tm = TransactionManager::builder()
            .explicit(true)
            .decision_log(dlog)
            .build();
        let victim = Wrapped::new("victim", &log, site);
        let txn = tm.begin().unwrap();
        txn.join(victim.clone()).unwrap();
        txn.join(TestDataManager::new("other", &log)).unwrap();
        victim.armed.store(true, Ordering::SeqCst);
        let err = txn.commit().unwrap_err();
        match &err {
            Error::Panicked { resource, .. } => assert_eq!(resource, "victim", "{site:?}: {err}"),
            other => panic!("{site:?}: expected Panicked, got {other:?}"),
        }
        for name in ["victim", "other"] {
            let ends = endings(&log, name);
            assert_eq!(ends.len(), 1, "{site:?} {name}: {ends:?}");
            assert_ne!(ends[0], Phase::TpcFinish, "{site:?} {name}");
        }
        tm.abort().unwrap();
        assert!(!tm.in_transaction());
    }
}

#[test]
fn a_panic_in_record_commit_aborts_everything_like_a_failed_log() {
    let log = CallLog::new();
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(Arc::new(PanickingLog {
            id: LogId::new(),
            in_record: true,
            in_forget: false,
        }))
        .build();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.join(TestDataManager::new("b", &log)).unwrap();
    let err = txn.commit().unwrap_err();
    match &err {
        Error::Panicked {
            resource, phase, ..
        } => {
            assert_eq!(resource, "decision log");
            assert_eq!(*phase, Phase::TpcVote);
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert_eq!(endings(&log, "a"), [Phase::TpcAbort]);
    assert_eq!(endings(&log, "b"), [Phase::TpcAbort]);
    tm.abort().unwrap();
    tm.begin().unwrap().commit().unwrap();
}

#[test]
fn a_panic_in_forget_after_a_complete_commit_is_only_logged() {
    let log = CallLog::new();
    let tm = TransactionManager::builder()
        .explicit(true)
        .decision_log(Arc::new(PanickingLog {
            id: LogId::new(),
            in_record: false,
            in_forget: true,
        }))
        .build();
    let txn = tm.begin().unwrap();
    txn.join(TestDataManager::new("a", &log)).unwrap();
    txn.join(TestDataManager::new("b", &log)).unwrap();
    txn.commit().unwrap();
    assert_eq!(txn.status(), Status::Committed);
    assert_eq!(endings(&log, "a"), [Phase::TpcFinish]);
    assert!(!tm.in_transaction());
}

#[test]
fn a_panic_in_commit_one_phase_fails_the_commit_and_the_manager_stays_usable() {
    let log = CallLog::new();
    let tm = TransactionManager::explicit();
    let txn = tm.begin().unwrap();
    txn.join(
        TestDataManager::new("only", &log)
            .fail_at(Phase::CommitOnePhase, tm_core::testing::Fault::Panic),
    )
    .unwrap();
    let err = txn.commit().unwrap_err();
    assert!(
        matches!(&err, Error::Panicked { resource, phase: Phase::CommitOnePhase, .. } if resource == "only"),
        "{err}"
    );
    tm.abort().unwrap();
    assert_eq!(endings(&log, "only"), [Phase::CommitOnePhase]);
    tm.begin().unwrap().commit().unwrap();
}
