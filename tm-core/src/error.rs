//! The one error type of tm-core.

use crate::data_manager::Phase;

/// A boxed error as adapters hand it to tm (`Send + Sync`, so it crosses threads).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything tm-core can report.
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
    /// The outcome is mixed: after the commit decision some resources
    /// committed and others failed to. The failed ones stay prepared (in
    /// doubt) and are finished by [`recover`](crate::recover).
    #[error(
        "heuristic outcome after the commit decision: committed {committed:?}, failed {failed:?}"
    )]
    Heuristic {
        /// Resources that committed.
        committed: Vec<String>,
        /// Resources that failed to commit; they are in doubt.
        failed: Vec<String>,
    },
    /// An adapter's own error, with its source kept.
    #[error("resource {resource}: {source}")]
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
    #[error("decision log {log}: {source}")]
    DecisionLog {
        /// The log (for a file: its path).
        log: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// A caller's argument was not acceptable (e.g. `attempts_n(0)`).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
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

    /// `true` for [`Error::Conflict`] and [`Error::Transient`]: the errors tm
    /// itself retries without asking any resource.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Conflict { .. } | Error::Transient { .. })
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
            | Error::Panicked { resource, .. } => Some(resource),
            _ => None,
        }
    }
}
