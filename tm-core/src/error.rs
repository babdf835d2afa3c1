//! The one error type of tm-core.

use crate::phase::Phase;
use crate::txid::TxId;

/// A boxed error as adapters hand it to tm (`Send + Sync`, so it crosses threads).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything tm-core can report.
///
/// Each cause is said once: in the message, or as [`source()`](std::error::Error::source),
/// never both, so a printed chain does not repeat itself ([`Report`] prints
/// one).
///
/// Variants about a resource carry its name (its [`sort_key`]) and the phase;
/// [`Error::Conflict`] and [`Error::Transient`] are retryable
/// (see [`Error::is_retryable`]).
///
/// [`sort_key`]: crate::DataManager::sort_key
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another transaction changed what this one read or holds a lock on it.
    /// Retryable.
    #[error("conflict in {resource} at {phase}: {detail}")]
    Conflict {
        /// The resource that detected the conflict.
        resource: String,
        /// The phase in which it was detected.
        phase: Phase,
        /// What conflicted (a key, a row, a lock holder).
        detail: String,
    },
    /// A failure that may well go away on a retry (busy database, reset
    /// connection before the vote). Retryable.
    #[error("transient failure in {resource} at {phase}: {detail}")]
    Transient {
        /// The resource that failed.
        resource: String,
        /// The phase in which it failed.
        phase: Phase,
        /// What happened.
        detail: String,
    },
    /// The transaction was doomed: it cannot commit and must be aborted.
    #[error("the transaction is doomed: it can only be aborted")]
    Doomed,
    /// An explicit manager was asked for its transaction outside `begin()`.
    #[error("no transaction: call begin() first (explicit transaction manager)")]
    NoTransaction,
    /// A transaction is already active where none may be (`begin()` on an
    /// explicit manager, `run`, `ensure_no_transaction`).
    #[error("a transaction is already active on this manager and thread")]
    AlreadyInTransaction,
    /// An earlier commit of this transaction failed: abort it first.
    #[error("an earlier commit of this transaction failed: abort() it first")]
    CommitFailed,
    /// The transaction is finished (committed or aborted); its handle can no
    /// longer be used for that.
    #[error("the transaction is finished (committed, committing or aborted)")]
    Closed,
    /// A resource cannot take part in a savepoint.
    #[error("resource {resource} does not support savepoints")]
    SavepointNotSupported {
        /// The resource without savepoint support.
        resource: String,
    },
    /// The savepoint was invalidated (an earlier one was rolled back to, or the
    /// transaction ended).
    #[error("invalid savepoint: an earlier savepoint was rolled back or the transaction ended")]
    InvalidSavepoint,
    /// The outcome is mixed or unknown: some resources committed and others
    /// did not, or a resource cannot tell. `in_doubt` ones either stay
    /// prepared, and are finished (committed) by [`recover`](crate::recover)
    /// from the logged decision, or are a one-phase commit whose reply was
    /// lost (it may or may not have happened); `rolled_back` ones lost their
    /// part for good (a second one-phase resource that refused after the
    /// first committed, a prepared record that recovery aborted or that was
    /// lost). A resource named both committed and rolled back committed in
    /// part (e.g. a Redis write that failed while the others were applied;
    /// its log says which).
    #[error(
        "heuristic outcome: committed {committed:?}, rolled back {rolled_back:?}, in doubt \
         {in_doubt:?} (a prepared one is committed by recovery from the logged decision; a \
         one-phase commit whose reply was lost may or may not have happened)"
    )]
    Heuristic {
        /// Resources that committed.
        committed: Vec<String>,
        /// Resources whose part is rolled back or gone.
        rolled_back: Vec<String>,
        /// Resources whose outcome is not known yet: still prepared
        /// (recovery will commit them), or a one-phase commit whose reply
        /// was lost.
        in_doubt: Vec<String>,
    },
    /// Recovery recorded an abort of this transaction before its commit
    /// decision (the fence): nothing was committed, and the commit is
    /// refused. Seen by a coordinator that stalled past the recovery grace
    /// period; the transaction is aborted everywhere.
    #[error("transaction {txid} was aborted by recovery before its commit decision (fenced): nothing was committed")]
    Fenced {
        /// The transaction.
        txid: TxId,
    },
    /// A resource was asked to finish a prepared transaction whose record is
    /// gone, and it was not finished by this transaction: a missing record
    /// is never success.
    #[error("resource {resource}: the prepared record of {txid} is gone: {missing}")]
    RecordMissing {
        /// The resource.
        resource: String,
        /// The transaction.
        txid: TxId,
        /// What the resource knows of its end.
        missing: Missing,
    },
    /// The transaction's set of participants could not be recovered
    /// correctly after a crash, so the commit is refused before anything is
    /// prepared. The message says what to do.
    #[error("commit refused before anything was prepared: {0}")]
    UnsafeSetup(String),
    /// An adapter's own error, with its source kept.
    #[error("resource {resource} failed")]
    Resource {
        /// The resource that failed.
        resource: String,
        /// The adapter's error.
        #[source]
        source: BoxError,
    },
    /// A resource panicked inside a protocol call; tm caught it and ended the
    /// transaction like after any other failure.
    #[error("resource {resource} panicked at {phase}: {message}")]
    Panicked {
        /// The resource that panicked.
        resource: String,
        /// The phase it was in.
        phase: Phase,
        /// The panic payload, if it was a string.
        message: String,
    },
    /// The decision log could not be read or written.
    #[error("decision log {log} failed")]
    DecisionLog {
        /// The log (for a file: its path).
        log: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// Another thread is in the middle of an operation on this transaction
    /// (a savepoint); this one was refused rather than interleaved with it.
    #[error("the transaction is busy: {0}")]
    Busy(&'static str),
    /// This thread is inside a transaction of another manager: a
    /// transaction of this one would commit on its own, whatever the outer
    /// one does (e.g. the thread-local `tm::atomic` inside an explicit
    /// manager's `run`).
    #[error(
        "this thread is inside transaction {outer} of {outer_manager}; a transaction of \
         {manager} would commit on its own. Use the same manager (nest with atomic), or ask for \
         an independent transaction with TransactionManagerBuilder::independent(true)"
    )]
    Nested {
        /// The manager asked to begin.
        manager: String,
        /// The manager whose transaction is active on this thread.
        outer_manager: String,
        /// That transaction.
        outer: TxId,
    },
    /// A caller's argument was not acceptable (e.g. `attempts_n(0)`).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Why a prepared record is gone ([`Error::RecordMissing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Missing {
    /// Aborted: recovery (or an abort) left a tombstone.
    Aborted,
    /// Neither a receipt of its commit nor a tombstone: lost, e.g. by a
    /// failover to a replica that lacked it or a restore of older data.
    Lost,
    /// Committed: a receipt of its commit is left. Seen by an abort
    /// ([`Recoverable::abort_prepared`](crate::Recoverable::abort_prepared)):
    /// the transaction cannot be aborted any more.
    Committed,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Missing::Aborted => "it was aborted (a tombstone is left)",
            Missing::Lost => {
                "lost: neither a receipt of its commit nor a tombstone (a failover, or a restore of older data?)"
            }
            Missing::Committed => {
                "it was committed (a receipt of its commit is left), so it cannot be aborted"
            }
        })
    }
}

impl Error {
    /// Wraps an adapter error for `resource`.
    pub fn resource(resource: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Resource {
            resource: resource.into(),
            source: source.into(),
        }
    }

    /// A conflict detected by `resource` in `phase`.
    pub fn conflict(resource: impl Into<String>, phase: Phase, detail: impl Into<String>) -> Self {
        Error::Conflict {
            resource: resource.into(),
            phase,
            detail: detail.into(),
        }
    }

    /// A transient failure of `resource` in `phase`.
    pub fn transient(resource: impl Into<String>, phase: Phase, detail: impl Into<String>) -> Self {
        Error::Transient {
            resource: resource.into(),
            phase,
            detail: detail.into(),
        }
    }

    /// `true` for [`Error::Conflict`], [`Error::Transient`] and
    /// [`Error::Fenced`] (nothing was committed, so a retry is safe): the
    /// errors tm itself retries without asking any resource.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Conflict { .. } | Error::Transient { .. } | Error::Fenced { .. }
        )
    }

    /// `true` when the outcome is mixed ([`Error::Heuristic`]): never retry it.
    pub fn is_heuristic(&self) -> bool {
        matches!(self, Error::Heuristic { .. })
    }

    /// The resource this error is about, when it is about one.
    pub fn resource_name(&self) -> Option<&str> {
        match self {
            Error::Conflict { resource, .. }
            | Error::Transient { resource, .. }
            | Error::SavepointNotSupported { resource }
            | Error::Resource { resource, .. }
            | Error::RecordMissing { resource, .. }
            | Error::Panicked { resource, .. } => Some(resource),
            _ => None,
        }
    }
}

/// An error and its `source()` chain on one line, `: `-separated: what to
/// print for a person. tm's errors say each cause once (in the message or
/// in `source()`), so nothing repeats.
///
/// ```
/// use tm_core::{Error, Report};
/// let io = std::io::Error::other("disk full");
/// let err = Error::DecisionLog { log: "decisions.log".into(), source: Box::new(io) };
/// assert_eq!(Report(&err).to_string(), "decision log decisions.log failed: disk full");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Report<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}
