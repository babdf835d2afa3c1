//! One unit of work: the resources joined to it, its hooks, its metadata, and
//! the commit protocol that ends it.
//!
//! The protocol's order and its invariants ("exactly one ending per resource",
//! "never a rollback after the decision") are enforced here, in
//! [`Transaction::commit`] and [`Transaction::abort`]; the contract each
//! resource sees is written down in [`crate::data_manager`].

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tracing::{debug, error, trace, warn};

use crate::data_manager::{DataManager, Phase};
use crate::decision_log::{Decision, LogId};
use crate::error::{Error, Result};
use crate::manager::Shared;
use crate::savepoint::{Savepoint, SavepointEntry};
use crate::status::{AtomicStage, Stage, Status, Step};
use crate::txid::TxId;

type BeforeCommitHook = Box<dyn FnOnce(&Transaction) -> Result<()> + Send>;
type AfterCommitHook = Box<dyn FnOnce(bool, &Transaction) + Send>;
type AbortHook = Box<dyn FnOnce(&Transaction) + Send>;

/// A handle on one transaction. Cheap to clone; all clones are the same
/// transaction. `Send + Sync`.
///
/// Transactions are made by a [`TransactionManager`](crate::TransactionManager)
/// (`begin()` / `get()`), which also keeps the current one per thread.
///
/// ```
/// use tm_core::{MemoryStore, TransactionManager, Status};
///
/// let tm = TransactionManager::explicit();
/// let store = MemoryStore::<i64>::new();
/// let txn = tm.begin()?;
/// txn.note("open the account");
/// store.join(&txn)?.put("alice", 100)?;
/// txn.commit()?;
/// assert_eq!(txn.status(), Status::Committed);
/// assert_eq!(store.committed("alice"), Some(100));
/// # Ok::<(), tm_core::Error>(())
/// ```
pub struct Transaction {
    inner: Arc<Inner>,
}

struct Inner {
    id: TxId,
    shared: Arc<Shared>,
    span: tracing::Span,
    /// Changed only by [`AtomicStage::step`], the one rule.
    stage: AtomicStage,
    /// Live handles: the last one to go aborts an unfinished transaction.
    /// (An `Arc`'s strong count cannot tell: two handles dropped at once
    /// may each see the other.)
    handles: AtomicUsize,
    state: Mutex<State>,
}

impl Clone for Transaction {
    fn clone(&self) -> Self {
        self.inner.handles.fetch_add(1, Ordering::Relaxed);
        Transaction {
            inner: self.inner.clone(),
        }
    }
}

struct State {
    resources: Vec<Arc<dyn DataManager>>,
    /// Set when a failed commit has already given every resource its ending
    /// (or left it in doubt): `abort()` must not call them again. The list is
    /// kept so that the retry decision can still ask them.
    resources_ended: bool,
    /// Ids of the valid savepoints, oldest first.
    savepoints: Vec<u64>,
    next_savepoint: u64,
    /// Metadata, hooks and data: most transactions have none, so they cost
    /// nothing until used.
    extras: Option<Box<Extras>>,
}

#[derive(Default)]
struct Extras {
    description: String,
    user: String,
    extension: BTreeMap<String, String>,
    before_commit: VecDeque<BeforeCommitHook>,
    after_commit: VecDeque<AfterCommitHook>,
    before_abort: VecDeque<AbortHook>,
    after_abort: VecDeque<AbortHook>,
    data: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl State {
    fn extras(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Default::default)
    }

    fn pop_hook<T>(&mut self, queue: impl FnOnce(&mut Extras) -> &mut VecDeque<T>) -> Option<T> {
        self.extras
            .as_deref_mut()
            .and_then(|e| queue(e).pop_front())
    }
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("id", &self.inner.id)
            .field("status", &self.status())
            .finish()
    }
}

impl PartialEq for Transaction {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}
impl Eq for Transaction {}

impl Drop for Transaction {
    /// The last handle of an unfinished transaction aborts it, exactly once,
    /// so that no resource is left holding a connection, a lock or staged
    /// writes (a thread that ends inside a transaction, a forgotten handle).
    /// The manager keeps a handle on its current transaction, so this
    /// happens only once that one is gone too.
    ///
    /// A clone captured by one of the transaction's own hooks or data is a
    /// handle too: it keeps the transaction open until it ends (hooks get
    /// `&Transaction`, so they need none).
    ///
    /// While the thread is panicking, the resources are not called (as
    /// redb, which skips the abort then): the panic may have come from
    /// inside one of them, and a second panic would abort the process. The
    /// resources' own drop then releases what they hold (tm-sqlite's
    /// connection rolls back); the error is logged.
    fn drop(&mut self) {
        if self.inner.handles.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        if !matches!(
            self.inner.stage.stage(),
            Stage::Active | Stage::CommitFailed
        ) {
            return;
        }
        if std::thread::panicking() {
            error!(txn = %self.inner.id, "the last handle of an unfinished transaction was dropped while panicking; its resources are not called");
            return;
        }
        warn!(txn = %self.inner.id, "the last handle of an unfinished transaction was dropped; aborting it");
        // `abort` works on a handle; this one is going, so lend it a count.
        self.inner.handles.fetch_add(1, Ordering::Relaxed);
        let result = self.abort();
        self.inner.handles.fetch_sub(1, Ordering::Relaxed);
        if let Err(err) = result {
            error!(txn = %self.inner.id, error = %err, "abort of a dropped transaction failed");
        }
    }
}

/// Runs one protocol call on one resource, turning a panic into
/// [`Error::Panicked`] so that the other resources still get their ending.
fn call(dm: &Arc<dyn DataManager>, phase: Phase, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let mut f = Some(f);
    each(
        std::slice::from_ref(dm),
        0,
        phase,
        |_| true,
        |_| f.take().map_or(Ok(()), |f| f()),
    )
    .map_err(|(_, err)| err)
}

/// Runs one protocol phase on every resource `pick` selects, going on after
/// failures (an ending must reach everyone): the failures, by index.
fn each_all(
    resources: &[Arc<dyn DataManager>],
    phase: Phase,
    pick: impl Fn(usize) -> bool,
    mut f: impl FnMut(&Arc<dyn DataManager>) -> Result<()>,
) -> Vec<(usize, Error)> {
    let mut failures = Vec::new();
    let mut start = 0;
    while let Err((i, err)) = each(resources, start, phase, &pick, &mut f) {
        failures.push((i, err));
        start = i + 1;
    }
    failures
}

/// Logs the failures of a cleanup that must not stop (the first error of
/// the operation is what the caller reports).
fn log_failures(resources: &[Arc<dyn DataManager>], failures: &[(usize, Error)], what: &str) {
    for (i, err) in failures {
        error!(resource = %name_of(&resources[*i]), error = %err, "{what} failed");
    }
}

/// Runs one protocol phase on the resources from `start` on that `pick`
/// selects, in order, stopping at the first failure (`Err((index, error))`).
/// One `catch_unwind` covers the loop — cheaper than one per call — and a
/// panic is attributed to the resource that was being called.
fn each(
    resources: &[Arc<dyn DataManager>],
    start: usize,
    phase: Phase,
    pick: impl Fn(usize) -> bool,
    mut f: impl FnMut(&Arc<dyn DataManager>) -> Result<()>,
) -> std::result::Result<(), (usize, Error)> {
    let current = std::cell::Cell::new(start);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        for (i, dm) in resources.iter().enumerate().skip(start) {
            current.set(i);
            if !pick(i) {
                continue;
            }
            trace!(resource = dm.sort_key(), phase = phase.as_str(), "call");
            if let Err(err) = f(dm) {
                debug!(resource = dm.sort_key(), phase = phase.as_str(), error = %err, "resource failed");
                return Err((i, err));
            }
        }
        Ok(())
    }));
    match outcome {
        Ok(result) => result,
        Err(payload) => {
            let i = current.get();
            Err((
                i,
                Error::Panicked {
                    resource: name_of(&resources[i]),
                    phase,
                    message: panic_message(&*payload),
                },
            ))
        }
    }
}

/// A resource's name for a report, even if its `sort_key` panics.
pub(crate) fn name_of(dm: &Arc<dyn DataManager>) -> String {
    catch_unwind(AssertUnwindSafe(|| dm.sort_key().to_owned()))
        .unwrap_or_else(|_| "<a resource whose sort_key panicked>".to_owned())
}

/// Runs a call into the decision log, turning a panic into
/// [`Error::Panicked`] (resource `decision log`).
fn guarded_log<T>(phase: Phase, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        Err(Error::Panicked {
            resource: "decision log".to_owned(),
            phase,
            message: panic_message(&*payload),
        })
    })
}

pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Runs a hook that must not stop the others: a panic is logged and swallowed.
fn run_guarded(kind: &'static str, f: impl FnOnce()) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(f)) {
        error!(hook = kind, panic = %panic_message(&*payload), "hook panicked; the remaining hooks still run");
    }
}

impl Transaction {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let id = TxId::new();
        let span = tracing::debug_span!("transaction", id = %id);
        Transaction {
            inner: Arc::new(Inner {
                id,
                shared,
                span,
                stage: AtomicStage::new(),
                handles: AtomicUsize::new(1),
                state: Mutex::new(State {
                    resources: Vec::new(),
                    resources_ended: false,
                    savepoints: Vec::new(),
                    next_savepoint: 0,
                    extras: None,
                }),
            }),
        }
    }

    /// The transaction's id: globally unique, stable across processes.
    pub fn id(&self) -> TxId {
        self.inner.id
    }

    /// The id of the manager's decision log, if it has one: resources that
    /// prepare durably write it into their prepared record, so that
    /// recovery resolves only its own log's records.
    pub fn log_id(&self) -> Option<LogId> {
        self.inner.shared.log_id
    }

    pub(crate) fn manager_label(&self) -> String {
        self.inner.shared.label()
    }

    pub(crate) fn manager_is_independent(&self) -> bool {
        self.inner.shared.is_independent()
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.inner.stage.status()
    }

    /// Applies one status step (see `status.rs`): exactly one of two racing
    /// operations wins.
    fn step(&self, step: Step) -> Result<Stage> {
        self.inner.stage.step(step)
    }

    /// A step the caller knows is allowed now (it holds the stage it leaves).
    fn step_held(&self, step: Step) {
        if let Err(err) = self.step(step) {
            error!(?step, error = %err, "status step refused from a held stage (a tm bug)");
        }
    }

    /// The `tracing` span of this transaction (carries its id); adapters may
    /// enter it for work they do on the transaction's behalf.
    pub fn span(&self) -> &tracing::Span {
        &self.inner.span
    }

    /// Joins a resource to this transaction. Joining the same `Arc` again is a
    /// no-op.
    ///
    /// Allowed while `Active` or `Doomed` (and from before-commit hooks);
    /// [`Error::CommitFailed`] after a failed commit, [`Error::Closed`] while
    /// committing or once finished.
    pub fn join(&self, dm: Arc<dyn DataManager>) -> Result<()> {
        // Under the state lock: commit and abort take the resource list
        // under it after their step, so a join is either in it or refused.
        let mut st = self.inner.state.lock();
        self.inner.stage.check_join()?;
        if st.resources.iter().any(|r| same_resource(r, &dm)) {
            return Ok(());
        }
        trace!(parent: &self.inner.span, resource = dm.sort_key(), "join");
        if st.resources.capacity() == 0 {
            st.resources.reserve_exact(4);
        }
        st.resources.push(dm);
        Ok(())
    }

    /// Whether this very `Arc` is joined.
    pub fn is_joined(&self, dm: &Arc<dyn DataManager>) -> bool {
        self.inner
            .state
            .lock()
            .resources
            .iter()
            .any(|r| same_resource(r, dm))
    }

    /// The sort keys of the joined resources, in join order.
    pub fn resource_names(&self) -> Vec<String> {
        self.inner
            .state
            .lock()
            .resources
            .iter()
            .map(|r| r.sort_key().to_owned())
            .collect()
    }

    pub(crate) fn resources(&self) -> Vec<Arc<dyn DataManager>> {
        self.inner.state.lock().resources.clone()
    }

    /// Dooms the transaction: it can no longer commit ([`Error::Doomed`]),
    /// only abort. Idempotent. [`Error::Closed`] once finished or committing,
    /// [`Error::CommitFailed`] after a failed commit.
    pub fn doom(&self) -> Result<()> {
        self.step(Step::Doom).map(drop)
    }

    /// Whether the transaction is doomed.
    pub fn is_doomed(&self) -> bool {
        self.status() == Status::Doomed
    }

    /// Appends a line to the description (trimmed; empty text is ignored).
    pub fn note(&self, text: &str) {
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        let mut st = self.inner.state.lock();
        let description = &mut st.extras().description;
        if !description.is_empty() {
            description.push('\n');
        }
        description.push_str(text);
    }

    /// The notes, newline-separated.
    pub fn description(&self) -> String {
        let st = self.inner.state.lock();
        st.extras
            .as_ref()
            .map(|e| e.description.clone())
            .unwrap_or_default()
    }

    /// Records who runs the transaction.
    pub fn set_user(&self, user: &str) {
        self.inner.state.lock().extras().user = user.to_owned();
    }

    /// The user set with [`set_user`](Self::set_user) (empty if none).
    pub fn user(&self) -> String {
        let st = self.inner.state.lock();
        st.extras
            .as_ref()
            .map(|e| e.user.clone())
            .unwrap_or_default()
    }

    /// Sets an extension (free-form metadata); the last value wins.
    pub fn set_extension(&self, key: &str, value: &str) {
        self.inner
            .state
            .lock()
            .extras()
            .extension
            .insert(key.to_owned(), value.to_owned());
    }

    /// An extension's value.
    pub fn extension(&self, key: &str) -> Option<String> {
        let st = self.inner.state.lock();
        st.extras.as_ref()?.extension.get(key).cloned()
    }

    /// All extensions, sorted by key.
    pub fn extensions(&self) -> BTreeMap<String, String> {
        let st = self.inner.state.lock();
        st.extras
            .as_ref()
            .map(|e| e.extension.clone())
            .unwrap_or_default()
    }

    /// Stores a value on the transaction, one per type (a second value of the
    /// same type replaces the first).
    pub fn set_data<T: Any + Send + Sync>(&self, value: T) {
        self.inner
            .state
            .lock()
            .extras()
            .data
            .insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// The value of type `T` stored with [`set_data`](Self::set_data).
    pub fn data<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let value = {
            let st = self.inner.state.lock();
            st.extras.as_ref()?.data.get(&TypeId::of::<T>())?.clone()
        };
        value.downcast::<T>().ok()
    }

    /// Adds a hook run at the start of `commit`, in the order added. A hook
    /// may join resources and add hooks (they run too). An error (or panic)
    /// fails the commit.
    pub fn add_before_commit_hook(
        &self,
        f: impl FnOnce(&Transaction) -> Result<()> + Send + 'static,
    ) {
        self.inner
            .state
            .lock()
            .extras()
            .before_commit
            .push_back(Box::new(f));
    }

    /// Adds a hook run after a commit attempt with `true` on success and
    /// `false` on failure. A panic is logged; the other hooks still run.
    pub fn add_after_commit_hook(&self, f: impl FnOnce(bool, &Transaction) + Send + 'static) {
        self.inner
            .state
            .lock()
            .extras()
            .after_commit
            .push_back(Box::new(f));
    }

    /// Adds a hook run by `abort()` before the resources are aborted.
    pub fn add_before_abort_hook(&self, f: impl FnOnce(&Transaction) + Send + 'static) {
        self.inner
            .state
            .lock()
            .extras()
            .before_abort
            .push_back(Box::new(f));
    }

    /// Adds a hook run by `abort()` after the resources are aborted.
    pub fn add_after_abort_hook(&self, f: impl FnOnce(&Transaction) + Send + 'static) {
        self.inner
            .state
            .lock()
            .extras()
            .after_abort
            .push_back(Box::new(f));
    }

    /// Commits: see the crate documentation for the exact protocol.
    ///
    /// Errors: [`Error::Doomed`] (abort it), [`Error::CommitFailed`] (an earlier
    /// commit failed: abort it), [`Error::Closed`] (already finished); the
    /// first failure of a resource or a hook before the decision (the
    /// transaction is then `CommitFailed` and every resource has been ended);
    /// [`Error::Heuristic`] after the decision.
    pub fn commit(&self) -> Result<()> {
        let _entered = self.inner.span.enter();
        self.step(Step::Commit)?;
        // Fast path: with no hooks and no synchronizer, one lock takes the
        // resources and starts the protocol.
        let taken = {
            let mut st = self.inner.state.lock();
            st.savepoints.clear();
            if st.extras.is_none() && !self.inner.shared.has_synchs() {
                self.step_held(Step::StartProtocol);
                Some(std::mem::take(&mut st.resources))
            } else {
                None
            }
        };
        let mut resources = match taken {
            Some(resources) => resources,
            None => self.commit_preamble()?,
        };
        let outcome = match sort(&mut resources) {
            Ok(()) => self.run_protocol(&resources),
            Err(err) => Err(self.abort_before_decision(&resources, 0, err)),
        };
        match outcome {
            Ok(()) => {
                let has_extras = {
                    let mut st = self.inner.state.lock();
                    st.resources = resources;
                    self.step_held(Step::Succeed);
                    st.savepoints.clear();
                    match st.extras.as_deref_mut() {
                        Some(extras) => {
                            extras.before_commit.clear();
                            extras.before_abort.clear();
                            extras.after_abort.clear();
                            true
                        }
                        None => false,
                    }
                };
                debug!("committed");
                if has_extras {
                    self.run_after_commit_hooks(true);
                }
                self.synchs_after_completion();
                if has_extras {
                    self.clear_data();
                }
                self.inner.shared.forget(self);
                Ok(())
            }
            Err(err) => {
                {
                    let mut st = self.inner.state.lock();
                    st.resources = resources;
                    st.resources_ended = true;
                    self.step_held(Step::Fail);
                }
                debug!(error = %err, "commit failed");
                self.run_after_commit_hooks(false);
                self.synchs_after_completion();
                Err(err)
            }
        }
    }

    /// Before-commit hooks and synchronizers' `before_completion`, then the
    /// protocol starts: the resources to commit, or the commit's failure.
    fn commit_preamble(&self) -> Result<Vec<Arc<dyn DataManager>>> {
        // Before-commit hooks, FIFO; hooks added meanwhile run too.
        loop {
            let hook = self.inner.state.lock().pop_hook(|e| &mut e.before_commit);
            let Some(hook) = hook else { break };
            match catch_unwind(AssertUnwindSafe(|| hook(self))) {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Err(self.fail_before_protocol(err)),
                Err(payload) => {
                    let err = Error::Panicked {
                        resource: "before-commit hook".to_owned(),
                        phase: Phase::Commit,
                        message: panic_message(&*payload),
                    };
                    let _ = self.fail_before_protocol(err);
                    if let Err(err) = self.abort() {
                        error!(error = %err, "abort after a panicking before-commit hook failed");
                    }
                    resume_unwind(payload);
                }
            }
        }

        self.synchs_before_completion();

        let mut st = self.inner.state.lock();
        if self.inner.stage.is_doomed() {
            // A hook or synchronizer doomed it: back to work, doomed; only
            // abort is left.
            self.step_held(Step::HooksDoomed);
            drop(st);
            self.synchs_after_completion();
            return Err(Error::Doomed);
        }
        self.step_held(Step::StartProtocol);
        Ok(std::mem::take(&mut st.resources))
    }

    /// A failure before any resource's `tpc_begin`: every resource gets `abort`.
    fn fail_before_protocol(&self, err: Error) -> Error {
        let resources = {
            let mut st = self.inner.state.lock();
            self.step_held(Step::Fail);
            st.resources_ended = true;
            st.resources.clone()
        };
        let failures = each_all(&resources, Phase::Abort, |_| true, |dm| dm.abort(self));
        log_failures(&resources, &failures, "abort after a failed commit");
        debug!(error = %err, "commit failed before two-phase commit");
        self.run_after_commit_hooks(false);
        err
    }

    /// The protocol proper, on resources already sorted. Returns `Ok` only if
    /// every resource committed.
    fn run_protocol(&self, resources: &[Arc<dyn DataManager>]) -> Result<()> {
        match resources {
            [] => return Ok(()),
            [only] => return call(only, Phase::CommitOnePhase, || only.commit_one_phase(self)),
            _ => {}
        }

        // Asked once, under the guard: a panicking `can_prepare` fails the
        // commit as that resource's error, before anything began.
        // In a bit mask up to 64 resources: no allocation per commit.
        let inline = resources.len() <= 64;
        let (mut mask, mut many) = (0u64, Vec::new());
        let mut asked = 0;
        if let Err((_, err)) = each(
            resources,
            0,
            Phase::TpcBegin,
            |_| true,
            |dm| {
                let can = dm.can_prepare();
                if inline {
                    mask |= u64::from(can) << asked;
                } else {
                    many.push(can);
                }
                asked += 1;
                Ok(())
            },
        ) {
            return Err(self.abort_before_decision(resources, 0, err));
        }
        let prepares = |i: usize| if inline { mask >> i & 1 == 1 } else { many[i] };
        if let Err(err) = self.check_setup(resources, &prepares) {
            return Err(self.abort_before_decision(resources, 0, err));
        }
        if let Err((i, err)) = each(
            resources,
            0,
            Phase::TpcBegin,
            |_| true,
            |dm| dm.tpc_begin(self),
        ) {
            // Its own tpc_begin ran (and may have half-begun): tpc_abort.
            return Err(self.abort_before_decision(resources, i + 1, err));
        }
        if let Err((_, err)) = each(resources, 0, Phase::Commit, |_| true, |dm| dm.commit(self)) {
            return Err(self.abort_before_decision(resources, resources.len(), err));
        }
        if let Err((_, err)) = each(resources, 0, Phase::TpcVote, prepares, |dm| {
            dm.tpc_vote(self)
        }) {
            return Err(self.abort_before_decision(resources, resources.len(), err));
        }

        // The decision. With a one-phase (last) resource, it is that
        // resource's own commit, and the log rides inside it (`check_setup`
        // made sure): recorded just before, it commits with it.
        // `logged`: the log holding this transaction's decision, if any.
        let any_prepares = (0..resources.len()).any(prepares);
        let logged = match &self.inner.shared.decision_log {
            Some(log) if any_prepares => {
                let recorded = self
                    .decision(resources)
                    .and_then(|d| guarded_log(Phase::TpcVote, || log.record_commit(&d)));
                if let Err(err) = recorded {
                    return Err(self.abort_before_decision(resources, resources.len(), err));
                }
                Some(log)
            }
            _ => None,
        };

        // The resources that did not commit after the decision, and how they
        // ended; names are only built for a heuristic report (no allocation
        // on success).
        let mut failed: Vec<(usize, Ending)> = Vec::new();
        let mut last_committed = false;
        for (i, dm) in resources.iter().enumerate().filter(|(i, _)| !prepares(*i)) {
            let result = call(dm, Phase::TpcVote, || dm.tpc_vote(self))
                .and_then(|()| call(dm, Phase::TpcFinish, || dm.tpc_finish(self)));
            match result {
                Ok(()) => last_committed = true,
                Err(err) if !last_committed => {
                    // The first last resource failed: its commit was to be
                    // the decision. An error does not prove it rolled back
                    // (an I/O error after the commit record hit the disk),
                    // so when the log rides inside it, end it and ask the
                    // fence: the abort row makes "not committed" final, or
                    // the commit row shows it did commit.
                    match self.settle_uncertain_commit(logged, dm) {
                        Settled::Committed => {
                            warn!(resource = %name_of(dm), error = %err, "the last resource reported a failure, but its commit (the decision) is recorded: finishing the others");
                            last_committed = true;
                            continue;
                        }
                        Settled::Aborted => {
                            return Err(self.abort_before_decision(
                                resources,
                                resources.len(),
                                err,
                            ));
                        }
                        Settled::Fenced => {
                            let others: Vec<Arc<dyn DataManager>> = resources
                                .iter()
                                .filter(|other| !same_resource(other, dm))
                                .cloned()
                                .collect();
                            return Err(self.abort_before_decision(&others, others.len(), err));
                        }
                        Settled::Unknown(why) => {
                            let in_doubt = (0..resources.len())
                                .filter(|&j| prepares(j))
                                .map(|j| name_of(&resources[j]))
                                .chain(std::iter::once(name_of(dm)))
                                .collect();
                            error!(resource = %name_of(dm), error = %err, fence = %why, "the last resource's commit may or may not have happened and the fence could not tell: everything stays prepared for recovery");
                            return Err(Error::Heuristic {
                                committed: Vec::new(),
                                rolled_back: Vec::new(),
                                in_doubt,
                            });
                        }
                    }
                }
                Err(err) => {
                    error!(resource = %name_of(dm), error = %err, "a second one-phase resource failed after the first committed");
                    if let Err(cleanup) = call(dm, Phase::TpcAbort, || dm.tpc_abort(self)) {
                        error!(resource = %name_of(dm), error = %cleanup, "tpc_abort failed");
                    }
                    failed.push((i, Ending::RolledBack));
                }
            }
        }

        for (i, err) in each_all(resources, Phase::TpcFinish, prepares, |dm| {
            dm.tpc_finish(self)
        }) {
            if let Error::RecordMissing { .. } = err {
                error!(resource = %name_of(&resources[i]), error = %err, "tpc_finish after the commit decision found the prepared record gone");
                failed.push((i, Ending::RolledBack));
            } else if let Error::Heuristic { .. } = err {
                error!(resource = %name_of(&resources[i]), error = %err, "tpc_finish applied the resource's part only in part");
                failed.push((i, Ending::Partial));
            } else {
                error!(resource = %name_of(&resources[i]), error = %err, "tpc_finish failed after the commit decision; the resource stays in doubt until recovery commits it");
                failed.push((i, Ending::InDoubt));
            }
        }

        if failed.is_empty() {
            if let Some(log) = logged {
                // Losing this record only makes recovery finish an already
                // finished transaction again, which is idempotent.
                if let Err(err) = guarded_log(Phase::TpcFinish, || log.forget(&self.inner.id)) {
                    warn!(error = %err, "could not forget a completed decision");
                }
            }
            Ok(())
        } else {
            // Reported in the order they were finished: last resources first.
            let order = (0..resources.len())
                .filter(|&i| !prepares(i))
                .chain((0..resources.len()).filter(|&i| prepares(i)));
            let ending = |i: usize| {
                failed
                    .iter()
                    .find(|(j, _)| *j == i)
                    .map_or(Ending::Committed, |(_, e)| *e)
            };
            let named = |want: Ending| -> Vec<String> {
                order
                    .clone()
                    .filter(|&i| {
                        let e = ending(i);
                        e == want || (e == Ending::Partial && want != Ending::InDoubt)
                    })
                    .map(|i| name_of(&resources[i]))
                    .collect()
            };
            let (committed, rolled_back, in_doubt) = (
                named(Ending::Committed),
                named(Ending::RolledBack),
                named(Ending::InDoubt),
            );
            error!(
                ?committed,
                ?rolled_back,
                ?in_doubt,
                "heuristic outcome: the transaction committed only in part"
            );
            Err(Error::Heuristic {
                committed,
                rolled_back,
                in_doubt,
            })
        }
    }

    /// After the first last resource's commit failed: did it commit? With
    /// the log inside it, the fence answers for good; with a log outside
    /// it (only with `allow_unrecoverable`) or none, its error is taken as
    /// a rollback and a logged decision is withdrawn.
    fn settle_uncertain_commit(
        &self,
        logged: Option<&Arc<dyn crate::DecisionLog>>,
        dm: &Arc<dyn DataManager>,
    ) -> Settled {
        let Some(log) = logged else {
            return Settled::Aborted;
        };
        let mut hosted = None;
        let _ = call(dm, Phase::TpcAbort, || {
            hosted = dm.hosted_log();
            Ok(())
        });
        if hosted != Some(log.id()) {
            if let Err(forget) = guarded_log(Phase::Abort, || log.forget(&self.inner.id)) {
                error!(error = %forget, "could not withdraw the commit decision after the last resource failed");
            }
            return Settled::Aborted;
        }
        // End it first: its open transaction would hold the lock the
        // fence's own write needs.
        if let Err(cleanup) = call(dm, Phase::TpcAbort, || dm.tpc_abort(self)) {
            debug!(resource = %name_of(dm), error = %cleanup, "tpc_abort after a failed last-resource commit");
        }
        match guarded_log(Phase::TpcVote, || log.record_abort(&self.inner.id)) {
            Ok(crate::Outcome::Committed) => Settled::Committed,
            Ok(_) => Settled::Fenced,
            Err(err) => Settled::Unknown(err),
        }
    }

    /// Refuses, before anything is prepared, a set of resources that could
    /// not be recovered correctly after a crash (see
    /// [`TransactionManagerBuilder::allow_unrecoverable`](crate::TransactionManagerBuilder::allow_unrecoverable)).
    /// Every call into a resource runs under the guard.
    fn check_setup(
        &self,
        resources: &[Arc<dyn DataManager>],
        prepares: &dyn Fn(usize) -> bool,
    ) -> Result<()> {
        let shared = &self.inner.shared;
        let names = |pick: &dyn Fn(usize) -> bool| {
            (0..resources.len())
                .filter(|&i| pick(i))
                .map(|i| name_of(&resources[i]))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut one_phase = (0..resources.len()).filter(|&i| !prepares(i));
        let last = one_phase.next();
        if one_phase.next().is_some() && !shared.allow_multiple_last_resources {
            return Err(Error::UnsafeSetup(format!(
                "{} cannot prepare (one-phase resources), and only one may commit last: if a \
                 second refused after the first committed, the outcome would be mixed. Use one, or \
                 allow it with TransactionManagerBuilder::allow_multiple_last_resources(true)",
                names(&|i| !prepares(i))
            )));
        }
        if shared.allow_unrecoverable {
            return Ok(());
        }
        let mut durable = None;
        each(resources, 0, Phase::TpcBegin, prepares, |dm| {
            if durable.is_none() && dm.prepares_durably() {
                durable = Some(dm.clone());
            }
            Ok(())
        })
        .map_err(|(_, err)| err)?;
        let Some(durable) = durable else {
            return Ok(());
        };
        let hosted = match last {
            Some(i) => {
                let mut hosted = None;
                call(&resources[i], Phase::TpcBegin, || {
                    hosted = resources[i].hosted_log();
                    Ok(())
                })?;
                hosted
            }
            None => None,
        };
        match (shared.log_id, last) {
            (None, _) => Err(Error::UnsafeSetup(format!(
                "{} prepares durably beside {}, but the manager has no decision log: after a \
                 crash, recovery could not tell whether to commit or abort it. Configure \
                 TransactionManagerBuilder::decision_log (a SqliteDecisionLog on the SQLite \
                 database that takes part, or a FileDecisionLog), or opt out with \
                 allow_unrecoverable(true)",
                name_of(&durable),
                names(&|i| !same_resource(&resources[i], &durable))
            ))),
            (Some(id), Some(last)) if hosted != Some(id) => {
                let last = name_of(&resources[last]);
                Err(Error::UnsafeSetup(format!(
                    "{last} cannot prepare, so its own commit is the decision, but the decision \
                     log {id} is kept outside it: a crash between the two would commit {} while \
                     {last} rolls back. Keep the log inside it (for SQLite: \
                     SqliteDecisionLog::new(&db) on the same Database), or opt out with \
                     allow_unrecoverable(true)",
                    name_of(&durable),
                )))
            }
            _ => Ok(()),
        }
    }

    /// The decision record; `recovery_id` is asked under the guard.
    fn decision(&self, resources: &[Arc<dyn DataManager>]) -> Result<Decision> {
        let mut participants = Vec::with_capacity(resources.len());
        each(
            resources,
            0,
            Phase::TpcVote,
            |_| true,
            |dm| {
                participants.extend(dm.recovery_id());
                Ok(())
            },
        )
        .map_err(|(_, err)| err)?;
        let st = self.inner.state.lock();
        let mut metadata = BTreeMap::new();
        if let Some(extras) = &st.extras {
            metadata.clone_from(&extras.extension);
            if !extras.user.is_empty() {
                metadata.insert("user".to_owned(), extras.user.clone());
            }
            if !extras.description.is_empty() {
                metadata.insert("description".to_owned(), extras.description.clone());
            }
        }
        Ok(Decision::new(self.inner.id, participants, metadata))
    }

    /// Ends every resource after a failure before the decision: `tpc_abort`
    /// for the first `begun` (their `tpc_begin` ran), `abort` for the rest.
    fn abort_before_decision(
        &self,
        resources: &[Arc<dyn DataManager>],
        begun: usize,
        err: Error,
    ) -> Error {
        let (begun, rest) = resources.split_at(begun);
        let failures = each_all(begun, Phase::TpcAbort, |_| true, |dm| dm.tpc_abort(self));
        log_failures(begun, &failures, "tpc_abort after a failed commit");
        let failures = each_all(rest, Phase::Abort, |_| true, |dm| dm.abort(self));
        log_failures(rest, &failures, "abort after a failed commit");
        err
    }

    /// Aborts: before-abort hooks, `abort` on every resource that has not
    /// had its ending, after-abort hooks. The first resource error is
    /// returned after everything ran.
    ///
    /// [`Error::Closed`] (and no resource is called) if the transaction is
    /// already committed or aborted.
    pub fn abort(&self) -> Result<()> {
        let _entered = self.inner.span.enter();
        // Wins against a racing commit, savepoint or abort, or is refused.
        self.step(Step::Abort)?;
        // As ZODB: before-abort hooks first, then the synchronizers.
        self.run_abort_hooks(true);
        self.synchs_before_completion();
        let resources = {
            let mut st = self.inner.state.lock();
            st.savepoints.clear();
            if st.resources_ended {
                Vec::new()
            } else {
                st.resources_ended = true;
                st.resources.clone()
            }
        };
        let failures = each_all(&resources, Phase::Abort, |_| true, |dm| dm.abort(self));
        log_failures(&resources, &failures, "abort");
        self.run_abort_hooks(false);
        {
            let mut st = self.inner.state.lock();
            self.step_held(Step::Aborted);
            st.savepoints.clear();
            if let Some(extras) = st.extras.as_deref_mut() {
                extras.before_commit.clear();
            }
        }
        debug!("aborted");
        self.synchs_after_completion();
        self.clear_data();
        self.inner.shared.forget(self);
        match failures.into_iter().next() {
            Some((_, err)) => Err(err),
            None => Ok(()),
        }
    }

    /// Drops the typed data once hooks and synchronizers no longer need it
    /// (ZODB too frees it only after the after-commit hooks).
    fn clear_data(&self) {
        if let Some(extras) = self.inner.state.lock().extras.as_deref_mut() {
            extras.data.clear();
        }
    }

    fn run_after_commit_hooks(&self, ok: bool) {
        loop {
            let hook = self.inner.state.lock().pop_hook(|e| &mut e.after_commit);
            let Some(hook) = hook else { break };
            run_guarded("after-commit", || hook(ok, self));
        }
    }

    fn run_abort_hooks(&self, before: bool) {
        loop {
            let hook = {
                let mut st = self.inner.state.lock();
                if before {
                    st.pop_hook(|e| &mut e.before_abort)
                } else {
                    st.pop_hook(|e| &mut e.after_abort)
                }
            };
            let Some(hook) = hook else { break };
            run_guarded(
                if before {
                    "before-abort"
                } else {
                    "after-abort"
                },
                || hook(self),
            );
        }
    }

    fn synchs_before_completion(&self) {
        if let Some(synchs) = self.inner.shared.synchs_if_any() {
            for s in synchs.iter() {
                run_guarded("synchronizer", || s.before_completion(self));
            }
        }
    }

    fn synchs_after_completion(&self) {
        if let Some(synchs) = self.inner.shared.synchs_if_any() {
            for s in synchs.iter() {
                run_guarded("synchronizer", || s.after_completion(self));
            }
        }
    }

    /// Takes a savepoint: every joined resource must support savepoints
    /// ([`Error::SavepointNotSupported`] otherwise).
    ///
    /// ```
    /// use tm_core::{MemoryStore, TransactionManager};
    /// let tm = TransactionManager::explicit();
    /// let store = MemoryStore::<i64>::new();
    /// let txn = tm.begin()?;
    /// let h = store.join(&txn)?;
    /// h.put("a", 1)?;
    /// let sp = txn.savepoint()?;
    /// h.put("a", 2)?;
    /// sp.rollback()?;
    /// assert_eq!(h.get("a")?, Some(1));
    /// # Ok::<(), tm_core::Error>(())
    /// ```
    pub fn savepoint(&self) -> Result<Savepoint> {
        self.make_savepoint(false)
    }

    /// Takes a savepoint even if some resource cannot: rolling back to it then
    /// fails ([`Error::SavepointNotSupported`]) instead of taking it.
    pub fn savepoint_optimistic(&self) -> Result<Savepoint> {
        self.make_savepoint(true)
    }

    fn make_savepoint(&self, optimistic: bool) -> Result<Savepoint> {
        // The savepoint stage keeps commit and abort out while resources
        // are asked (a savepoint of a finished transaction is
        // InvalidSavepoint, like rolling one back).
        self.step(Step::EnterSavepoint)?;
        let taken = self.take_savepoint(optimistic);
        self.step_held(Step::LeaveSavepoint);
        taken
    }

    fn take_savepoint(&self, optimistic: bool) -> Result<Savepoint> {
        let resources = self.inner.state.lock().resources.clone();
        let mut entries: Vec<SavepointEntry> = Vec::with_capacity(resources.len());
        for dm in &resources {
            let mut taken = None;
            let result = call(dm, Phase::Savepoint, || {
                taken = Some(dm.savepoint(self)?);
                Ok(())
            });
            match result {
                Ok(()) => entries.push((dm.clone(), taken)),
                Err(Error::SavepointNotSupported { .. }) if optimistic => {
                    entries.push((dm.clone(), None))
                }
                Err(err) => return Err(err),
            }
        }
        let mut st = self.inner.state.lock();
        let id = st.next_savepoint;
        st.next_savepoint += 1;
        st.savepoints.push(id);
        Ok(Savepoint::new(self.clone(), id, entries, resources.len()))
    }

    pub(crate) fn forget_savepoint(&self, id: u64) {
        let mut st = self.inner.state.lock();
        if let Some(pos) = st.savepoints.iter().rposition(|&s| s == id) {
            st.savepoints.remove(pos);
        }
    }

    pub(crate) fn savepoint_is_valid(&self, id: u64) -> bool {
        let st = self.inner.state.lock();
        matches!(self.inner.stage.stage(), Stage::Active | Stage::Savepoint)
            && st.savepoints.contains(&id)
    }

    /// Rolls back to savepoint `id`; see [`Savepoint::rollback`].
    pub(crate) fn rollback_savepoint(
        &self,
        id: u64,
        entries: &[SavepointEntry],
        joined_before: usize,
    ) -> Result<()> {
        let _entered = self.inner.span.enter();
        match self.step(Step::EnterSavepoint) {
            Ok(_) => {}
            Err(Error::Closed) => return Err(Error::InvalidSavepoint),
            Err(err) => return Err(err),
        }
        let joined_after = {
            let mut st = self.inner.state.lock();
            let Some(pos) = st.savepoints.iter().position(|&s| s == id) else {
                drop(st);
                self.step_held(Step::LeaveSavepoint);
                return Err(Error::InvalidSavepoint);
            };
            st.savepoints.truncate(pos + 1);
            let keep = joined_before.min(st.resources.len());
            st.resources.split_off(keep)
        };
        // Resources joined after the savepoint leave the transaction.
        let mut first = each_all(&joined_after, Phase::Abort, |_| true, |dm| dm.abort(self))
            .into_iter()
            .next()
            .map(|(_, err)| err);
        for (dm, sp) in entries {
            let result = match sp {
                Some(sp) => call(dm, Phase::Rollback, || sp.rollback()),
                None => Err(Error::SavepointNotSupported {
                    resource: name_of(dm),
                }),
            };
            if let Err(err) = result {
                first.get_or_insert(err);
            }
        }
        match first {
            None => {
                self.step_held(Step::LeaveSavepoint);
                Ok(())
            }
            Some(err) => {
                error!(error = %err, "savepoint rollback failed; the transaction can only be aborted");
                self.step_held(Step::SavepointFailed);
                Err(err)
            }
        }
    }
}

/// What the fence said of an uncertain last-resource commit.
enum Settled {
    /// The fence found its commit: it is the decision.
    Committed,
    /// No log inside it: its error is taken as a rollback (nothing ended).
    Aborted,
    /// The fence recorded the abort (the resource is ended).
    Fenced,
    /// The fence could not be asked.
    Unknown(Error),
}

/// How a resource ended after the commit decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Committed,
    RolledBack,
    InDoubt,
    /// Committed in part (the resource said so with `Heuristic`): named
    /// both committed and rolled back.
    Partial,
}

/// Sorts by `sort_key`, stable (ties keep join order). A panicking
/// `sort_key` is a failure of that resource, named by its join position
/// (it has no other name).
fn sort(resources: &mut [Arc<dyn DataManager>]) -> Result<()> {
    let asked = std::cell::Cell::new(0);
    catch_unwind(AssertUnwindSafe(|| {
        // Adjacent pairs only: one resource costs no comparison (a string
        // compare is a libc `memcmp` call, measurable at this scale).
        let mut sorted = true;
        let mut previous: Option<&str> = None;
        for (i, dm) in resources.iter().enumerate() {
            asked.set(i);
            let key = dm.sort_key();
            if let Some(previous) = previous {
                sorted &= previous <= key;
            }
            previous = Some(key);
        }
        if !sorted {
            resources.sort_by(|a, b| a.sort_key().cmp(b.sort_key()));
        }
    }))
    .map_err(|payload| Error::Panicked {
        resource: format!("resource #{} (its sort_key panicked)", asked.get() + 1),
        phase: Phase::Commit,
        message: panic_message(&*payload),
    })
}

fn same_resource(a: &Arc<dyn DataManager>, b: &Arc<dyn DataManager>) -> bool {
    // Compare data pointers only: the same object may come with different
    // vtable pointers from different codegen units.
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}
