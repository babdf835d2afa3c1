//! Helpers shared by every test file of tm-core (each file uses a part).
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tm_core::testing::{CallLog, TestDataManager};
use tm_core::{
    Backoff, DataManager, Decision, DecisionLog, Error, LogId, Outcome, Phase, Result,
    Synchronizer, Transaction, TransactionManager, TxId,
};

/// An explicit manager that retries without sleeping.
/// Independent: tests interleave several managers' transactions on one
/// thread to make conflicts (nesting is refused otherwise, and tested so).
pub fn tm() -> TransactionManager {
    TransactionManager::builder()
        .explicit(true)
        .backoff(Backoff::None)
        .independent(true)
        .build()
}

/// [`tm`], allowing several one-phase resources in one transaction (the
/// protocol-order tests use them; the refusal is tested on its own).
pub fn tm_many_last() -> TransactionManager {
    TransactionManager::builder()
        .explicit(true)
        .backoff(Backoff::None)
        .independent(true)
        .allow_multiple_last_resources(true)
        .build()
}

/// Builds an expected call sequence.
pub fn seq(calls: &[(&str, Phase)]) -> Vec<(String, Phase)> {
    calls.iter().map(|(n, p)| (n.to_string(), *p)).collect()
}

/// Joins `dms` (in this order) to a new transaction of a fresh explicit
/// manager (several one-phase resources allowed) and commits it.
pub fn commit_with(dms: &[Arc<TestDataManager>]) -> (TransactionManager, Transaction, Result<()>) {
    let tm = tm_many_last();
    let txn = tm.begin().unwrap();
    for dm in dms {
        txn.join(dm.clone()).unwrap();
    }
    let result = txn.commit();
    (tm, txn, result)
}

/// The phases that end a resource's part in a transaction.
pub fn is_ending(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Abort | Phase::TpcAbort | Phase::TpcFinish | Phase::CommitOnePhase
    )
}

/// How many endings `name` got. A one-phase (last) resource's successful
/// `tpc_finish` after its vote is its ending too.
pub fn endings(log: &CallLog, name: &str) -> usize {
    log.phases_of(name)
        .into_iter()
        .filter(|p| is_ending(*p))
        .count()
}

/// Asserts the error is a resource error of `resource` (Fault::Error).
#[track_caller]
pub fn assert_resource_error(err: &Error, resource: &str) {
    match err {
        Error::Resource { resource: r, .. } => assert_eq!(r, resource, "{err}"),
        other => panic!("expected Error::Resource for {resource}, got {other:?}"),
    }
}

/// A synchronizer that records `(event, txn id)` in order.
#[derive(Default)]
pub struct RecordingSynch {
    pub events: Mutex<Vec<(&'static str, TxId)>>,
}

impl RecordingSynch {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub fn names(&self) -> Vec<&'static str> {
        self.events.lock().iter().map(|(e, _)| *e).collect()
    }
    pub fn clear(&self) {
        self.events.lock().clear();
    }
}

impl Synchronizer for RecordingSynch {
    fn new_transaction(&self, txn: &Transaction) {
        self.events.lock().push(("new", txn.id()));
    }
    fn before_completion(&self, txn: &Transaction) {
        self.events.lock().push(("before", txn.id()));
    }
    fn after_completion(&self, txn: &Transaction) {
        self.events.lock().push(("after", txn.id()));
    }
}

/// A synchronizer that writes its calls into a [`CallLog`] (name `synch`,
/// `Phase::Commit` for before_completion, `Phase::TpcFinish` for after).
pub struct LoggingSynch(pub CallLog);

impl Synchronizer for LoggingSynch {
    fn before_completion(&self, _txn: &Transaction) {
        self.0.record("synch:before", Phase::Work);
    }
    fn after_completion(&self, _txn: &Transaction) {
        self.0.record("synch:after", Phase::Work);
    }
}

/// A decision log that keeps decisions in memory, records its calls in a
/// [`CallLog`] (`decision-log:record` / `decision-log:forget`, phase
/// `Work`), and fails `record_commit` on request.
pub struct RecordingDecisionLog {
    pub calls: CallLog,
    pub decisions: Mutex<Vec<Decision>>,
    pub pending: Mutex<Vec<Decision>>,
    pub fail_record: AtomicBool,
    pub aborted: Mutex<Vec<TxId>>,
    pub id: LogId,
}

impl RecordingDecisionLog {
    pub fn new(calls: &CallLog) -> Arc<Self> {
        Arc::new(RecordingDecisionLog {
            calls: calls.clone(),
            decisions: Mutex::new(Vec::new()),
            pending: Mutex::new(Vec::new()),
            fail_record: AtomicBool::new(false),
            aborted: Mutex::new(Vec::new()),
            id: LogId::new(),
        })
    }
}

impl DecisionLog for RecordingDecisionLog {
    fn id(&self) -> LogId {
        self.id
    }
    fn record_commit(&self, decision: &Decision) -> Result<()> {
        self.calls.record("decision-log:record", Phase::Work);
        if self.fail_record.load(Ordering::SeqCst) {
            return Err(Error::DecisionLog {
                log: "recording".into(),
                source: "disk full".into(),
            });
        }
        if self.aborted.lock().contains(&decision.txid) {
            return Err(Error::Fenced {
                txid: decision.txid,
            });
        }
        self.decisions.lock().push(decision.clone());
        self.pending.lock().push(decision.clone());
        Ok(())
    }
    fn record_abort(&self, txid: &TxId) -> Result<Outcome> {
        self.calls.record("decision-log:abort", Phase::Work);
        if self.pending.lock().iter().any(|d| d.txid == *txid) {
            return Ok(Outcome::Committed);
        }
        self.aborted.lock().push(*txid);
        Ok(Outcome::Aborted)
    }
    fn forget(&self, txid: &TxId) -> Result<()> {
        self.calls.record("decision-log:forget", Phase::Work);
        self.pending.lock().retain(|d| d.txid != *txid);
        Ok(())
    }
    fn pending(&self) -> Result<Vec<Decision>> {
        Ok(self.pending.lock().clone())
    }
}

/// An adapter error that only a [`BusyDm`] calls retryable.
#[derive(Debug, thiserror::Error)]
#[error("database is busy")]
pub struct Busy;

/// An error that wraps another as its `source()` (not transparently).
#[derive(Debug, thiserror::Error)]
#[error("while {context}")]
pub struct Wrapped {
    pub context: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// A data manager whose `should_retry` says yes to [`Busy`] and counts the
/// questions; everything else succeeds.
#[derive(Default)]
pub struct BusyDm {
    pub asked: AtomicU64,
    pub aborted: AtomicU64,
}

impl BusyDm {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
}

impl DataManager for BusyDm {
    fn sort_key(&self) -> &str {
        "busy"
    }
    fn abort(&self, _: &Transaction) -> Result<()> {
        self.aborted.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn tpc_begin(&self, _: &Transaction) -> Result<()> {
        Ok(())
    }
    fn commit(&self, _: &Transaction) -> Result<()> {
        Ok(())
    }
    fn tpc_vote(&self, _: &Transaction) -> Result<()> {
        Ok(())
    }
    fn tpc_finish(&self, _: &Transaction) -> Result<()> {
        Ok(())
    }
    fn tpc_abort(&self, _: &Transaction) -> Result<()> {
        Ok(())
    }
    fn should_retry(&self, err: &(dyn std::error::Error + 'static)) -> bool {
        self.asked.fetch_add(1, Ordering::SeqCst);
        err.is::<Busy>()
    }
}

/// Runs `f` with a tracing subscriber that captures every event on this
/// thread, and returns the events as `(level, "field=value ...")`.
pub fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, Vec<(tracing::Level, String)>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let subscriber = Capture {
        events: events.clone(),
        next: AtomicU64::new(1),
    };
    let out = tracing::subscriber::with_default(subscriber, f);
    let events = events.lock().clone();
    (out, events)
}

/// Whether some captured event at `level` contains every one of `needles`.
pub fn logged(
    events: &[(tracing::Level, String)],
    level: tracing::Level,
    needles: &[&str],
) -> bool {
    events
        .iter()
        .any(|(l, text)| *l == level && needles.iter().all(|n| text.contains(n)))
}

struct Capture {
    events: Arc<Mutex<Vec<(tracing::Level, String)>>>,
    next: AtomicU64,
}

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        use std::fmt::Write;
        let _ = write!(self.0, "{}={} ", field.name(), value);
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(self.next.fetch_add(1, Ordering::Relaxed))
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        self.events
            .lock()
            .push((*event.metadata().level(), fields.0));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}
