//! The transaction manager: which transaction is current, and the ways to run
//! work in one (`run`, `atomic`, `attempts`).

use std::cell::RefCell;
use std::fmt;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tracing::error;

use crate::attempts::{Attempts, Backoff};
use crate::data_manager::Synchronizer;
use crate::decision_log::{DecisionLog, LogId};
use crate::error::{Error, Result};
use crate::retry::{abort_logged, is_retryable_in, run_in, TxError};
use crate::savepoint::Savepoint;
use crate::transaction::Transaction;

/// What every transaction of one manager shares with it.
pub(crate) struct Shared {
    id: u64,
    name: Option<String>,
    /// Transactions may begin while another manager's is active on the
    /// thread.
    independent: bool,
    explicit: bool,
    retry_attempt_count: AtomicU32,
    pub(crate) backoff: Mutex<Backoff>,
    pub(crate) decision_log: Option<Arc<dyn DecisionLog>>,
    /// The log's id, read once.
    pub(crate) log_id: Option<LogId>,
    pub(crate) allow_unrecoverable: bool,
    pub(crate) allow_multiple_last_resources: bool,
    synchs: RwLock<Arc<[Arc<dyn Synchronizer>]>>,
    /// Lets the common case (no synchronizer) skip the lock.
    has_synchs: AtomicBool,
}

static NEXT_MANAGER: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's current transaction, per manager (few managers per
    /// thread: a vector beats a map).
    static CURRENT: RefCell<Vec<(u64, Transaction)>> = const { RefCell::new(Vec::new()) };
}

impl Shared {
    pub(crate) fn synchs(&self) -> Arc<[Arc<dyn Synchronizer>]> {
        self.synchs.read().clone()
    }

    pub(crate) fn has_synchs(&self) -> bool {
        self.has_synchs.load(Ordering::Acquire)
    }

    pub(crate) fn synchs_if_any(&self) -> Option<Arc<[Arc<dyn Synchronizer>]>> {
        if self.has_synchs() {
            Some(self.synchs())
        } else {
            None
        }
    }

    fn current(&self) -> Option<Transaction> {
        CURRENT.with(|c| {
            let mut c = c.borrow_mut();
            let pos = c.iter().position(|(id, _)| *id == self.id)?;
            if c[pos].1.status().is_finished() {
                // Finished on another thread: the manager forgets it lazily.
                c.swap_remove(pos);
                return None;
            }
            Some(c[pos].1.clone())
        })
    }

    fn set_current(&self, txn: Transaction) {
        CURRENT.with(|c| {
            let mut c = c.borrow_mut();
            match c.iter_mut().find(|(id, _)| *id == self.id) {
                Some(slot) => slot.1 = txn,
                None => c.push((self.id, txn)),
            }
        })
    }

    /// The manager as messages name it.
    pub(crate) fn label(&self) -> String {
        match &self.name {
            Some(name) => format!("manager {name:?} (#{})", self.id),
            None => format!("manager #{}", self.id),
        }
    }

    /// Refuses to begin while this thread is inside another manager's
    /// transaction, unless this manager is independent.
    fn check_nesting(&self) -> Result<()> {
        if self.independent {
            return Ok(());
        }
        let outer = CURRENT.with(|c| {
            c.borrow()
                .iter()
                .find(|(id, t)| *id != self.id && !t.status().is_finished())
                .map(|(_, t)| t.clone())
        });
        match outer {
            Some(outer) if !outer.manager_is_independent() => Err(Error::Nested {
                manager: self.label(),
                outer_manager: outer.manager_label(),
                outer: outer.id(),
            }),
            _ => Ok(()),
        }
    }

    pub(crate) fn is_independent(&self) -> bool {
        self.independent
    }

    /// Called by a transaction once it is committed or aborted.
    pub(crate) fn forget(&self, txn: &Transaction) {
        // `try_with`: a transaction may end while thread-locals are torn down.
        let _ = CURRENT.try_with(|c| {
            let mut c = c.borrow_mut();
            if let Some(pos) = c.iter().position(|(id, t)| *id == self.id && t == txn) {
                c.swap_remove(pos);
            }
        });
    }
}

/// Makes and tracks transactions: ZODB's `TransactionManager`.
///
/// A cheap handle (`Clone`, `Send + Sync`). Each thread has its own current
/// transaction in a manager, so one manager can be shared by worker threads,
/// each running its own transactions; synchronizers, the retry count, the
/// backoff and the decision log are shared.
///
/// * **Implicit** ([`new`](Self::new), the default): `get()` starts a
///   transaction when there is none; `begin()` aborts the current one first.
/// * **Explicit** ([`explicit`](Self::explicit)): `get()` without `begin()` is
///   [`Error::NoTransaction`]; `begin()` inside a transaction is
///   [`Error::AlreadyInTransaction`].
///
/// ```
/// use tm_core::{MemoryStore, TransactionManager};
///
/// let tm = TransactionManager::explicit();
/// let store = MemoryStore::<i64>::new();
/// let total = tm.run(|txn| {
///     let h = store.join(txn)?;
///     let n = h.get("n")?.unwrap_or(0) + 1;
///     h.put("n", n)?;
///     Ok::<_, tm_core::Error>(n)
/// })?;
/// assert_eq!(total, 1);
/// assert_eq!(store.committed("n"), Some(1));
/// # Ok::<(), tm_core::Error>(())
/// ```
#[derive(Clone)]
pub struct TransactionManager {
    shared: Arc<Shared>,
}

impl fmt::Debug for TransactionManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionManager")
            .field("explicit", &self.shared.explicit)
            .field("retry_attempt_count", &self.retry_attempt_count())
            .field("current", &self.shared.current().map(|t| t.id()))
            .finish()
    }
}

impl Default for TransactionManager {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds a [`TransactionManager`].
///
/// ```
/// use tm_core::{Backoff, TransactionManager};
/// let tm = TransactionManager::builder()
///     .explicit(true)
///     .retry_attempt_count(5)
///     .backoff(Backoff::None)
///     .build();
/// assert_eq!(tm.retry_attempt_count(), 5);
/// ```
#[derive(Default)]
#[must_use]
pub struct TransactionManagerBuilder {
    explicit: bool,
    retry_attempt_count: Option<u32>,
    backoff: Option<Backoff>,
    decision_log: Option<Arc<dyn DecisionLog>>,
    allow_unrecoverable: bool,
    allow_multiple_last_resources: bool,
    name: Option<String>,
    independent: bool,
}

impl fmt::Debug for TransactionManagerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionManagerBuilder")
            .field("explicit", &self.explicit)
            .field("retry_attempt_count", &self.retry_attempt_count)
            .field("backoff", &self.backoff)
            .field("decision_log", &self.decision_log.as_ref().map(|l| l.id()))
            .field("allow_unrecoverable", &self.allow_unrecoverable)
            .field("name", &self.name)
            .field("independent", &self.independent)
            .field(
                "allow_multiple_last_resources",
                &self.allow_multiple_last_resources,
            )
            .finish()
    }
}

impl TransactionManagerBuilder {
    /// Explicit mode (see [`TransactionManager`]).
    pub fn explicit(mut self, explicit: bool) -> Self {
        self.explicit = explicit;
        self
    }
    /// How many attempts `run` and `attempts()` make (default 3).
    pub fn retry_attempt_count(mut self, n: u32) -> Self {
        self.retry_attempt_count = Some(n);
        self
    }
    /// The pause between attempts (default: jittered exponential).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }
    /// Record every two-phase commit decision durably in `log`.
    pub fn decision_log(mut self, log: Arc<dyn DecisionLog>) -> Self {
        self.decision_log = Some(log);
        self
    }
    /// Lets transactions commit whose resources could not be recovered
    /// correctly after a crash: a resource that prepares durably beside
    /// others with no decision log, or a one-phase resource beside them with
    /// the log kept outside it. Off by default: such a commit is refused
    /// with [`Error::UnsafeSetup`] before anything is prepared. A crash
    /// during such a commit leaves prepared records that only an operator
    /// can resolve.
    pub fn allow_unrecoverable(mut self, allow: bool) -> Self {
        self.allow_unrecoverable = allow;
        self
    }
    /// Lets a transaction have more than one one-phase resource
    /// (`can_prepare() == false`). Off by default, as Narayana's
    /// `allowMultipleLastResources`: if the second refuses after the first
    /// committed, the outcome is mixed ([`Error::Heuristic`]).
    pub fn allow_multiple_last_resources(mut self, allow: bool) -> Self {
        self.allow_multiple_last_resources = allow;
        self
    }
    /// A name for messages and logs (e.g. in [`Error::Nested`]).
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }
    /// Lets this manager's transactions begin while the thread is inside
    /// another manager's transaction (and lets others begin inside its
    /// own): they are deliberately independent, each committing on its
    /// own. Off by default: such nesting is [`Error::Nested`], because it
    /// is usually a mistake (the thread-local `tm::atomic` inside an
    /// explicit manager's `run` would commit on its own, once per retry).
    pub fn independent(mut self, independent: bool) -> Self {
        self.independent = independent;
        self
    }
    /// The manager.
    pub fn build(self) -> TransactionManager {
        let log_id = self.decision_log.as_ref().map(|l| l.id());
        TransactionManager {
            shared: Arc::new(Shared {
                id: NEXT_MANAGER.fetch_add(1, Ordering::Relaxed),
                name: self.name,
                independent: self.independent,
                explicit: self.explicit,
                retry_attempt_count: AtomicU32::new(self.retry_attempt_count.unwrap_or(3)),
                backoff: Mutex::new(self.backoff.unwrap_or_default()),
                decision_log: self.decision_log,
                log_id,
                allow_unrecoverable: self.allow_unrecoverable,
                allow_multiple_last_resources: self.allow_multiple_last_resources,
                synchs: RwLock::new(Arc::from(Vec::new())),
                has_synchs: AtomicBool::new(false),
            }),
        }
    }
}

impl TransactionManager {
    /// An implicit manager (like `transaction.TransactionManager()`).
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// An explicit manager (like `TransactionManager(explicit=True)`).
    pub fn explicit() -> Self {
        Self::builder().explicit(true).build()
    }

    /// A builder for the other settings.
    pub fn builder() -> TransactionManagerBuilder {
        TransactionManagerBuilder::default()
    }

    /// Whether the manager is explicit.
    pub fn is_explicit(&self) -> bool {
        self.shared.explicit
    }

    /// The configured decision log.
    pub fn decision_log(&self) -> Option<Arc<dyn DecisionLog>> {
        self.shared.decision_log.clone()
    }

    /// Begins a transaction and makes it this thread's current one.
    ///
    /// Explicit mode: [`Error::AlreadyInTransaction`] if one is active.
    /// Implicit mode: the current one, if any, is aborted first.
    pub fn begin(&self) -> Result<Transaction> {
        if let Some(current) = self.shared.current() {
            if self.shared.explicit {
                return Err(Error::AlreadyInTransaction);
            }
            if let Err(err) = current.abort() {
                error!(error = %err, txn = %current.id(), "abort of the previous transaction in begin() failed");
            }
        }
        self.start()
    }

    fn start(&self) -> Result<Transaction> {
        self.shared.check_nesting()?;
        let txn = Transaction::new(self.shared.clone());
        self.shared.set_current(txn.clone());
        if let Some(synchs) = self.shared.synchs_if_any() {
            for s in synchs.iter() {
                s.new_transaction(&txn);
            }
        }
        Ok(txn)
    }

    /// This thread's current transaction. Implicit mode starts one if there
    /// is none; explicit mode gives [`Error::NoTransaction`].
    pub fn get(&self) -> Result<Transaction> {
        match self.shared.current() {
            Some(txn) => Ok(txn),
            None if self.shared.explicit => Err(Error::NoTransaction),
            None => self.start(),
        }
    }

    /// Whether this thread has a current transaction (including a failed
    /// commit not yet aborted).
    pub fn in_transaction(&self) -> bool {
        self.shared.current().is_some()
    }

    /// Commits the current transaction (implicit mode: `Ok` with none).
    pub fn commit(&self) -> Result<()> {
        self.get()?.commit()
    }

    /// Aborts the current transaction (implicit mode: `Ok` with none).
    pub fn abort(&self) -> Result<()> {
        self.get()?.abort()
    }

    /// Dooms the current transaction.
    pub fn doom(&self) -> Result<()> {
        self.get()?.doom()
    }

    /// Whether the current transaction is doomed (`false` with none).
    pub fn is_doomed(&self) -> bool {
        self.shared.current().is_some_and(|t| t.is_doomed())
    }

    /// A savepoint of the current transaction.
    pub fn savepoint(&self) -> Result<Savepoint> {
        self.get()?.savepoint()
    }

    /// Registers a synchronizer; if a transaction is active on this thread it
    /// gets `new_transaction` at once.
    pub fn register_synch(&self, s: Arc<dyn Synchronizer>) {
        {
            let mut synchs = self.shared.synchs.write();
            if synchs.iter().any(|x| Arc::ptr_eq(x, &s)) {
                return;
            }
            let mut v: Vec<_> = synchs.iter().cloned().collect();
            v.push(s.clone());
            *synchs = Arc::from(v);
            self.shared.has_synchs.store(true, Ordering::Release);
        }
        if let Some(txn) = self.shared.current() {
            s.new_transaction(&txn);
        }
    }

    /// Unregisters a synchronizer (by identity).
    pub fn unregister_synch(&self, s: &Arc<dyn Synchronizer>) {
        let mut synchs = self.shared.synchs.write();
        let v: Vec<_> = synchs
            .iter()
            .filter(|x| !Arc::ptr_eq(x, s))
            .cloned()
            .collect();
        self.shared
            .has_synchs
            .store(!v.is_empty(), Ordering::Release);
        *synchs = Arc::from(v);
    }

    /// How many attempts `run` and `attempts()` make (default 3).
    pub fn retry_attempt_count(&self) -> u32 {
        self.shared.retry_attempt_count.load(Ordering::Relaxed)
    }

    /// Sets how many attempts `run` and `attempts()` make.
    pub fn set_retry_attempt_count(&self, n: u32) {
        self.shared.retry_attempt_count.store(n, Ordering::Relaxed);
    }

    /// The pause between attempts.
    pub fn backoff(&self) -> Backoff {
        self.shared.backoff.lock().clone()
    }

    /// Sets the pause between attempts.
    pub fn set_backoff(&self, backoff: Backoff) {
        *self.shared.backoff.lock() = backoff;
    }

    /// [`retry_attempt_count`](Self::retry_attempt_count) attempts.
    pub fn attempts(&self) -> Attempts {
        self.attempts_n(self.retry_attempt_count())
    }

    /// `n` attempts. `n == 0` yields one attempt whose `run` fails with
    /// [`Error::InvalidArgument`] without calling the closure.
    ///
    /// ```
    /// use tm_core::{MemoryStore, TransactionManager};
    /// let tm = TransactionManager::explicit();
    /// let store = MemoryStore::<u32>::new();
    /// for attempt in tm.attempts_n(5) {
    ///     let done = attempt.run(|txn| {
    ///         store.join(txn)?.put("k", 7)?;
    ///         Ok::<_, tm_core::Error>(())
    ///     })?;
    ///     if done.is_some() { break; }
    /// }
    /// assert_eq!(store.committed("k"), Some(7));
    /// # Ok::<(), tm_core::Error>(())
    /// ```
    pub fn attempts_n(&self, n: u32) -> Attempts {
        Attempts::new(std::rc::Rc::new(self.clone()), n)
    }

    /// Begins, runs `f`, commits; retries retryable failures (up to
    /// [`retry_attempt_count`](Self::retry_attempt_count) attempts, with the
    /// backoff between them). Refuses to start inside an active transaction
    /// ([`Error::AlreadyInTransaction`]). Always leaves the manager with no
    /// transaction. A panic in `f` aborts the transaction and propagates.
    pub fn run<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnMut(&Transaction) -> Result<T, E>,
        E: TxError,
    {
        self.run_with_note(None, f)
    }

    /// Like [`run`](Self::run), noting `name` on each attempt's transaction.
    pub fn run_named<T, E, F>(&self, name: &str, f: F) -> Result<T, E>
    where
        F: FnMut(&Transaction) -> Result<T, E>,
        E: TxError,
    {
        self.run_with_note(Some(name), f)
    }

    fn run_with_note<T, E, F>(&self, name: Option<&str>, mut f: F) -> Result<T, E>
    where
        F: FnMut(&Transaction) -> Result<T, E>,
        E: TxError,
    {
        self.ensure_no_transaction()?;
        let mut attempts = self.attempts();
        loop {
            let Some(attempt) = attempts.next() else {
                // Attempts always yield until a success or a returned error.
                return Err(Error::InvalidArgument("no attempt was made".to_owned()).into());
            };
            if let Some(value) = attempt.run_noted(name, &mut f)? {
                return Ok(value);
            }
        }
    }

    /// Runs `f` atomically, like Django's `atomic`: the outermost call is a
    /// transaction (begin, `f`, commit on `Ok`, abort on `Err`; no retry), a
    /// nested call is a savepoint rolled back when `f` returns `Err`.
    ///
    /// ```
    /// use tm_core::{MemoryStore, TransactionManager};
    /// let tm = TransactionManager::explicit();
    /// let store = MemoryStore::<i32>::new();
    /// tm.atomic(|txn| {
    ///     store.join(txn)?.put("kept", 1)?;
    ///     let inner: Result<(), tm_core::Error> = tm.atomic(|txn| {
    ///         store.join(txn)?.put("undone", 2)?;
    ///         Err(tm_core::Error::InvalidArgument("changed my mind".into()))
    ///     });
    ///     assert!(inner.is_err());
    ///     Ok::<_, tm_core::Error>(())
    /// })?;
    /// assert_eq!(store.committed("kept"), Some(1));
    /// assert_eq!(store.committed("undone"), None);
    /// # Ok::<(), tm_core::Error>(())
    /// ```
    pub fn atomic<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Transaction) -> Result<T, E>,
        E: TxError,
    {
        if let Some(txn) = self.shared.current() {
            return self.atomic_nested(&txn, f);
        }
        let txn = self.begin()?;
        run_in(&txn, f).map_err(|failure| {
            abort_logged(&txn);
            failure.into_error()
        })
    }

    fn atomic_nested<T, E, F>(&self, txn: &Transaction, f: F) -> Result<T, E>
    where
        F: FnOnce(&Transaction) -> Result<T, E>,
        E: TxError,
    {
        // Optimistic: a resource without savepoints only matters if we must
        // roll back, and then the whole transaction fails (CommitFailed).
        let sp = txn.savepoint_optimistic()?;
        match catch_unwind(AssertUnwindSafe(|| f(txn))) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                if let Err(rollback) = sp.rollback() {
                    error!(error = %rollback, "rolling back a nested atomic block failed");
                }
                Err(err)
            }
            Err(payload) => {
                if let Err(rollback) = sp.rollback() {
                    error!(error = %rollback, "rolling back a panicking nested atomic block failed");
                }
                resume_unwind(payload)
            }
        }
    }

    /// Whether `err` is worth retrying: [`Error::Conflict`] or
    /// [`Error::Transient`] anywhere in its `source()` chain, or a link that
    /// a resource joined to the current transaction says to retry
    /// ([`DataManager::should_retry`](crate::DataManager::should_retry)).
    /// [`Error::Heuristic`] is never retryable.
    pub fn is_retryable(&self, err: &(dyn std::error::Error + 'static)) -> bool {
        is_retryable_in(self.shared.current().as_ref(), err)
    }

    /// [`Error::AlreadyInTransaction`] if this thread has a current
    /// transaction.
    pub fn ensure_no_transaction(&self) -> Result<()> {
        if self.in_transaction() {
            Err(Error::AlreadyInTransaction)
        } else {
            Ok(())
        }
    }
}

impl crate::attempts::Source for TransactionManager {
    fn begin_attempt(&self) -> Result<Transaction> {
        self.ensure_no_transaction()?;
        self.begin()
    }

    fn backoff(&self) -> Backoff {
        TransactionManager::backoff(self)
    }
}
