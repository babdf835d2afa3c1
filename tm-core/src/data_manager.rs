//! The protocol: what a resource (a *data manager*) must do, and when tm calls it.
//!
//! This file is the protocol's one home. Every guarantee tm gives a data
//! manager, and every promise it asks for, is stated here.
//!
//! # The life of a resource in one transaction
//!
//! A data manager is joined to a [`Transaction`] with
//! [`Transaction::join`](crate::Transaction::join) (joining the same `Arc`
//! twice joins it once). From then on it receives **exactly one ending**:
//!
//! * [`commit_one_phase`](DataManager::commit_one_phase) — when it is the only
//!   resource of a committing transaction;
//! * [`tpc_finish`](DataManager::tpc_finish) — after a successful two-phase
//!   commit;
//! * [`tpc_abort`](DataManager::tpc_abort) — when the commit failed before
//!   the decision and this resource's `tpc_begin` had been called (even if
//!   `tpc_begin` itself failed: it may have half-begun);
//! * [`abort`](DataManager::abort) — when the transaction is aborted outside
//!   two-phase commit, or the commit failed before this resource's
//!   `tpc_begin` was called.
//!
//! A resource whose `tpc_finish` fails *after the decision* gets no ending in
//! this process: it stays prepared (in doubt), is named in
//! [`Error::Heuristic`]'s `in_doubt`, and is finished later by
//! [`recover`](crate::recover) (or a [`RecoveryService`](crate::RecoveryService)).
//! tm never rolls back a participant after the decision. One exception,
//! allowed only with
//! [`allow_multiple_last_resources`](crate::TransactionManagerBuilder::allow_multiple_last_resources):
//! a *second* one-phase resource that refuses after the first committed gets
//! `tpc_abort` and is named in `rolled_back`.
//!
//! # Two-phase commit, in order
//!
//! For a transaction with two or more resources, sorted by
//! [`sort_key`](DataManager::sort_key) (stable: ties keep join order):
//!
//! 0. the set-up is checked, before anything is prepared: a resource that
//!    [`prepares_durably`](DataManager::prepares_durably) beside others needs
//!    a decision log; a one-phase resource beside it must
//!    [host](DataManager::hosted_log) that log; at most one one-phase
//!    resource, unless allowed ([`Error::UnsafeSetup`] otherwise);
//! 1. `tpc_begin` on every resource;
//! 2. `commit` on every resource (stage the changes);
//! 3. `tpc_vote` on every resource that [`can_prepare`](DataManager::can_prepare);
//! 4. the decision: when a decision log is configured and some resource can
//!    prepare, it is recorded ([`DecisionLog::record_commit`](crate::DecisionLog::record_commit);
//!    [`Error::Fenced`] if recovery recorded an abort first: everything is
//!    aborted as in a failure before the decision);
//! 5. `tpc_vote` then `tpc_finish` on each resource that cannot prepare (the
//!    *last resource*: its own commit is the decision, and the decision
//!    record rides inside it). If it fails, the fence settles whether it
//!    committed after all ([`DecisionLog::record_abort`](crate::DecisionLog::record_abort));
//! 6. `tpc_finish` on every other resource. A finish that finds its prepared
//!    record gone returns [`Error::RecordMissing`] (never `Ok`): aborted, or
//!    lost.
//!
//! A failure before the decision ends every resource once: `tpc_abort` for
//! those whose `tpc_begin` ran, `abort` for the others.
//!
//! Panics in any call tm makes into a resource (the protocol methods, and
//! `sort_key`, `can_prepare`, `recovery_id`, `prepares_durably`,
//! `hosted_log`) are caught and treated as an error of that resource in
//! that phase ([`Error::Panicked`]).
//!
//! # Threads
//!
//! Calls for one transaction come from the thread that commits, aborts or
//! takes a savepoint of it, never concurrently: the transaction's status
//! admits one such operation at a time (see `status.rs`). Different transactions may call the same data manager
//! object from different threads, hence `Send + Sync`.

use crate::error::{Error, Result};
use crate::transaction::Transaction;

pub use crate::phase::Phase;

/// A resource taking part in transactions: the ZODB `IDataManager` protocol.
///
/// The required methods are the two-phase commit protocol; the provided ones
/// have defaults that suit most resources.
///
/// # Example
///
/// A resource that only logs what it is asked:
///
/// ```
/// use std::sync::Arc;
/// use tm_core::{DataManager, Transaction, TransactionManager, Result};
///
/// struct Printer;
/// impl DataManager for Printer {
///     fn sort_key(&self) -> &str { "printer" }
///     fn abort(&self, _: &Transaction) -> Result<()> { Ok(()) }
///     fn tpc_begin(&self, _: &Transaction) -> Result<()> { Ok(()) }
///     fn commit(&self, _: &Transaction) -> Result<()> { Ok(()) }
///     fn tpc_vote(&self, _: &Transaction) -> Result<()> { Ok(()) }
///     fn tpc_finish(&self, txn: &Transaction) -> Result<()> {
///         tracing::info!(txn = %txn.id(), "committed");
///         Ok(())
///     }
///     fn tpc_abort(&self, _: &Transaction) -> Result<()> { Ok(()) }
/// }
///
/// let tm = TransactionManager::explicit();
/// let txn = tm.begin()?;
/// txn.join(Arc::new(Printer))?;
/// tm.commit()?;
/// # Ok::<(), tm_core::Error>(())
/// ```
pub trait DataManager: Send + Sync {
    /// The commit order: resources are called sorted by this key (ties keep
    /// join order). It also names the resource in errors and logs, so make it
    /// say which store this is (e.g. `sqlite:/var/db/app.db`).
    fn sort_key(&self) -> &str;

    /// Abort outside two-phase commit: the transaction is being aborted and
    /// `tpc_begin` was never called on this resource. Discard every change.
    fn abort(&self, txn: &Transaction) -> Result<()>;

    /// Two-phase commit begins. Called once, before `commit`.
    fn tpc_begin(&self, txn: &Transaction) -> Result<()>;

    /// Phase 1: stage this transaction's changes so they can be voted on.
    fn commit(&self, txn: &Transaction) -> Result<()>;

    /// Vote: after `Ok(())` the resource **promises** that `tpc_finish` will
    /// succeed, even after a crash (a durable prepare). Conflicts found here
    /// are reported as [`Error::Conflict`].
    ///
    /// For a resource that cannot prepare (`can_prepare() == false`) the vote
    /// comes after every other vote and the decision; its `tpc_vote` +
    /// `tpc_finish` pair is the decision.
    fn tpc_vote(&self, txn: &Transaction) -> Result<()>;

    /// Phase 2: make the changes permanent and release what the vote held.
    ///
    /// A failure here, after the decision, leaves the resource in doubt: tm
    /// reports [`Error::Heuristic`] and never calls `tpc_abort` on it.
    /// Two failures say more: [`Error::RecordMissing`] (the prepared state
    /// is gone: rolled back), and [`Error::Heuristic`] from the resource
    /// itself (it finished only in part: named both committed and rolled
    /// back).
    fn tpc_finish(&self, txn: &Transaction) -> Result<()>;

    /// Undo everything since `tpc_begin` (including a prepare). Must be safe
    /// to call whatever part of the commit ran, including a failed
    /// `tpc_begin`.
    fn tpc_abort(&self, txn: &Transaction) -> Result<()>;

    /// Remember the current state so that it can be rolled back to.
    ///
    /// The default refuses with [`Error::SavepointNotSupported`].
    fn savepoint(&self, txn: &Transaction) -> Result<Box<dyn ResourceSavepoint>> {
        let _ = txn;
        Err(Error::SavepointNotSupported {
            resource: self.sort_key().to_owned(),
        })
    }

    /// Whether `err` (a link of a failure's `source()` chain) is worth retrying
    /// the whole transaction for. Asked before anything is aborted. The
    /// default says no; [`Error::Conflict`] and [`Error::Transient`] are
    /// retried without asking.
    fn should_retry(&self, err: &(dyn std::error::Error + 'static)) -> bool {
        let _ = err;
        false
    }

    /// `false` for a store that cannot prepare durably (e.g. SQLite): it is
    /// voted and finished last, after the decision (last-resource commit).
    fn can_prepare(&self) -> bool {
        true
    }

    /// Commit in one step, when this is the transaction's only resource.
    ///
    /// A failure is this resource's ending: it must leave nothing behind. The
    /// default runs `tpc_begin`, `commit`, `tpc_vote`, `tpc_finish`, and
    /// `tpc_abort` if one of the first three fails.
    fn commit_one_phase(&self, txn: &Transaction) -> Result<()> {
        let staged = self
            .tpc_begin(txn)
            .and_then(|()| self.commit(txn))
            .and_then(|()| self.tpc_vote(txn));
        if let Err(err) = staged {
            if let Err(cleanup) = self.tpc_abort(txn) {
                tracing::error!(resource = self.sort_key(), error = %cleanup, "tpc_abort after a failed one-phase commit failed");
            }
            return Err(err);
        }
        self.tpc_finish(txn)
    }

    /// The id under which this resource appears in the decision log's
    /// participant list: a [`Recoverable`](crate::Recoverable) resource
    /// returns its [`resource_id`](crate::Recoverable::resource_id), so that
    /// [`recover`](crate::recover) knows when every participant has finished.
    /// The default (`None`) means the resource cannot be recovered and is not
    /// listed.
    fn recovery_id(&self) -> Option<String> {
        None
    }

    /// Whether this resource's prepared state survives a crash of this
    /// process (a durable prepare, as tm-redis's). A transaction with such a
    /// resource beside others needs a decision log, or the commit is refused
    /// ([`Error::UnsafeSetup`]): after a crash,
    /// nothing could tell recovery whether to commit or abort it.
    ///
    /// Default: `recovery_id().is_some()`. An in-memory resource that is
    /// recoverable only within its process (like [`MemoryStore`](crate::MemoryStore))
    /// says `false`.
    fn prepares_durably(&self) -> bool {
        self.recovery_id().is_some()
    }

    /// The decision log whose records commit atomically *inside* this
    /// resource's own commit (a logging last resource, e.g. tm-sqlite's
    /// `SqliteDecisionLog` on the same database), if any.
    ///
    /// A one-phase resource (`can_prepare() == false`) beside resources that
    /// prepare durably must host the manager's decision log, or the commit is
    /// refused: its own commit is the decision, and a log kept elsewhere could
    /// say "committed" for a transaction whose last resource rolled back.
    fn hosted_log(&self) -> Option<crate::LogId> {
        None
    }
}

/// A data manager's savepoint: rolling it back restores the resource to the
/// state it had when the savepoint was taken. It may be rolled back to more
/// than once.
pub trait ResourceSavepoint: Send {
    /// Restore the resource to this savepoint.
    fn rollback(&self) -> Result<()>;
}

/// Observes every transaction of a manager (ZODB's `ISynchronizer`).
///
/// `before_completion` and `after_completion` bracket every commit (successful
/// or not) and every abort.
pub trait Synchronizer: Send + Sync {
    /// A transaction began (or was already active when this synchronizer was
    /// registered).
    fn new_transaction(&self, txn: &Transaction) {
        let _ = txn;
    }
    /// A commit or an abort is about to start.
    fn before_completion(&self, txn: &Transaction) {
        let _ = txn;
    }
    /// A commit or an abort has ended (look at `txn.status()`).
    fn after_completion(&self, txn: &Transaction) {
        let _ = txn;
    }
}
