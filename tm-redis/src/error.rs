//! The one error type of tm-redis.

use tm_core::Phase;

use crate::options::Durability;

/// Everything tm-redis can report. Each variant names the server (its URL
/// without password), and where it applies the phase and the command.
///
/// Predicates answer the usual questions without matching:
/// [`is_retryable`](Error::is_retryable), [`is_conflict`](Error::is_conflict),
/// [`is_timeout`](Error::is_timeout),
/// [`is_connection_refusal`](Error::is_connection_refusal),
/// [`is_connection_dropped`](Error::is_connection_dropped),
/// [`is_loading`](Error::is_loading).
///
/// It converts into [`tm_core::Error`] (so `?` works in a `tm.run` closure):
/// a conflict becomes [`tm_core::Error::Conflict`], an error of tm itself
/// stays what it was, everything else becomes [`tm_core::Error::Resource`]
/// with this error as its source.
///
/// ```
/// use tm_redis::{Error, Store};
/// let err = Store::open("redis://127.0.0.1:1/").unwrap_err();
/// assert!(err.is_connection_refusal());
/// assert!(err.to_string().contains("redis://127.0.0.1:1/"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server could not be reached (at open, or for a new connection).
    #[error("cannot connect to redis at {url}: {cause}")]
    Connect {
        /// The server's URL (without password).
        url: String,
        /// The client's error (said in the message; its own `source()`
        /// repeats it, so it is not this error's source).
        cause: redis::RedisError,
    },
    /// The server could not be reached again within
    /// [`Options::reconnect_deadline`](crate::Options::reconnect_deadline)
    /// (it died, or the network is down). Not retryable: the retries are
    /// spent.
    #[error("{server}: unreachable at {phase}; gave up reconnecting after {waited:?}; last error: {cause}")]
    Unavailable {
        /// The server.
        server: String,
        /// The protocol phase.
        phase: Phase,
        /// How long reconnecting was tried.
        waited: std::time::Duration,
        /// The last connect error (said in the message).
        cause: redis::RedisError,
    },
    /// A command failed: the connection broke or timed out, or the server
    /// answered with an error.
    #[error("{server}: {command} failed at {phase}: {cause}")]
    Command {
        /// The server.
        server: String,
        /// The protocol phase.
        phase: Phase,
        /// The command (its name, or the function called).
        command: String,
        /// The client's error (said in the message; its own `source()`
        /// repeats it, so it is not this error's source).
        cause: redis::RedisError,
    },
    /// Another transaction changed a key this one read, or holds a lock that
    /// this one needs. Retryable.
    #[error("{server}: conflict at {phase}: {detail}")]
    Conflict {
        /// The server.
        server: String,
        /// The protocol phase.
        phase: Phase,
        /// Which key, and which transaction holds it.
        detail: String,
    },
    /// The staged writes cannot run (a WRONGTYPE or an out-of-range INCRBY,
    /// found by simulating them at the vote); nothing was written.
    #[error("{server}: write #{op} ({command}) refused at {phase}: {detail}")]
    Invalid {
        /// The server.
        server: String,
        /// The protocol phase.
        phase: Phase,
        /// The number of the staged write (1-based, in staging order).
        op: usize,
        /// The staged command.
        command: String,
        /// The server's reason.
        detail: String,
    },
    /// One of tm's lock keys holds a value of another type, written by a
    /// client other than tm: the vote (or one-phase commit) refused before
    /// writing anything. Not retryable: remove the key.
    #[error("{server}: lock key {key} holds a {found}, not a tm lock (written by another client?); refused at {phase}")]
    LockKeyType {
        /// The server.
        server: String,
        /// The protocol phase.
        phase: Phase,
        /// The lock key (lossy UTF-8).
        key: String,
        /// The type found there.
        found: String,
    },
    /// The transaction was already aborted on the server (a tombstone): a
    /// prepare arriving after its abort refuses.
    #[error("{server}: transaction {txid} was already aborted; its prepare is refused")]
    Aborted {
        /// The server.
        server: String,
        /// The transaction.
        txid: String,
    },
    /// The transaction was already prepared on the server (or already
    /// applied): a second prepare of it is refused.
    #[error(
        "{server}: transaction {txid} is already prepared or applied; a second prepare is refused"
    )]
    AlreadyPrepared {
        /// The server.
        server: String,
        /// The transaction.
        txid: String,
    },
    /// The prepare reached the server later than
    /// [`Options::tombstone_ttl`](crate::Options::tombstone_ttl) after it
    /// was sent (by the client's clock against the server's): an abort's
    /// tombstone may be gone, so it is refused; nothing was written.
    #[error("{server}: the prepare of {txid} arrived more than {limit:?} after it was sent (or the client's clock is that far behind the server's); refused")]
    PrepareTooLate {
        /// The server.
        server: String,
        /// The transaction.
        txid: String,
        /// The limit.
        limit: std::time::Duration,
    },
    /// The vote was applied on the primary but not acknowledged by the
    /// replicas it waits for (`WAIT`) within
    /// [`Options::replica_timeout`](crate::Options::replica_timeout): a
    /// failover could lose it, so it is not taken as a yes. The prepare is
    /// aborted (or left to recovery).
    #[error("{server}: {acked} of {wanted} replicas acknowledged at {phase} within {waited:?}; not taken as done")]
    NotReplicated {
        /// The server (the primary).
        server: String,
        /// The protocol phase.
        phase: Phase,
        /// How many replicas acknowledged.
        acked: usize,
        /// How many it waits for.
        wanted: usize,
        /// How long it waited.
        waited: std::time::Duration,
    },
    /// tm's Redis functions were missing (e.g. a `FUNCTION FLUSH`); they have
    /// been loaded again. Retryable.
    #[error("{server}: function {function} missing at {phase}; library reloaded")]
    FunctionMissing {
        /// The server.
        server: String,
        /// The protocol phase.
        phase: Phase,
        /// The function called.
        function: String,
    },
    /// A write failed while the write-set was applied (a queued command,
    /// see `RedisHandle::queue`, or a write to a key an outside client
    /// changed since the vote): the other writes were applied. Reported by
    /// recovery's `commit_prepared`; a transaction's own finish or one-phase
    /// commit reports it as [`tm_core::Error::Heuristic`] instead.
    #[error(
        "{server}: transaction {txid} applied in part at {phase}; failed writes: {failures:?}"
    )]
    PartialApply {
        /// The server.
        server: String,
        /// The protocol phase.
        phase: Phase,
        /// The transaction.
        txid: String,
        /// `"<write number> <key>: <server error>"` for each failed write.
        failures: Vec<String>,
    },
    /// A read of a key this transaction has written, where the result of the
    /// buffered writes is not well defined without the server (e.g. `HGET`
    /// after a buffered `HSET`). Read before writing, or keep the value.
    #[error("{server}: {command} of key {key} after this transaction's own buffered writes to it is not supported")]
    ReadAfterWrite {
        /// The server.
        server: String,
        /// The read command.
        command: String,
        /// The key (lossy UTF-8).
        key: String,
    },
    /// `Options::require_durable_prepare` is set and the server's settings
    /// would lose prepares.
    #[error("{server}: prepares are not durable: {durability}")]
    NotDurable {
        /// The server.
        server: String,
        /// What was found.
        durability: Durability,
    },
    /// The server answered something tm's functions never send.
    #[error("{server}: unexpected reply to {command} at {phase}: {reply}")]
    UnexpectedReply {
        /// The server.
        server: String,
        /// The protocol phase.
        phase: Phase,
        /// The command.
        command: String,
        /// The reply, debug-printed.
        reply: String,
    },
    /// An argument tm-redis cannot use (e.g. a value that is not one Redis
    /// argument, a NaN score, a bad URL).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An error of the transaction itself (e.g. joining a finished one).
    #[error(transparent)]
    Transaction(#[from] tm_core::Error),
}

impl Error {
    /// The underlying client error, if any.
    pub fn redis_error(&self) -> Option<&redis::RedisError> {
        match self {
            Error::Connect { cause: source, .. }
            | Error::Command { cause: source, .. }
            | Error::Unavailable { cause: source, .. } => Some(source),
            _ => None,
        }
    }

    /// A conflict with another transaction (retry the transaction).
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }

    /// A read or connect timeout.
    pub fn is_timeout(&self) -> bool {
        self.redis_error().is_some_and(|e| e.is_timeout())
    }

    /// The server refused the connection (not running, wrong port).
    pub fn is_connection_refusal(&self) -> bool {
        self.redis_error()
            .is_some_and(|e| e.is_connection_refusal())
    }

    /// The connection broke (reset, closed, I/O error).
    pub fn is_connection_dropped(&self) -> bool {
        self.redis_error()
            .is_some_and(|e| e.is_connection_dropped() || e.is_io_error())
    }

    /// The server is loading its data (`LOADING`, e.g. just restarted): it
    /// refused the command without running it.
    pub fn is_loading(&self) -> bool {
        self.redis_error().is_some_and(|e| {
            e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
        })
    }

    /// The phase in which it happened, when known.
    pub fn phase(&self) -> Option<Phase> {
        match self {
            Error::Command { phase, .. }
            | Error::Conflict { phase, .. }
            | Error::Invalid { phase, .. }
            | Error::LockKeyType { phase, .. }
            | Error::FunctionMissing { phase, .. }
            | Error::PartialApply { phase, .. }
            | Error::NotReplicated { phase, .. }
            | Error::UnexpectedReply { phase, .. }
            | Error::Unavailable { phase, .. } => Some(*phase),
            Error::Connect { .. } => Some(Phase::Open),
            _ => None,
        }
    }

    /// Worth retrying the whole transaction: a conflict (a changed read, a
    /// key held by another prepared transaction), missing functions (now
    /// reloaded), a server still loading its data (`LOADING`: it ran
    /// nothing), or a connection that broke or timed out before the vote
    /// (nothing was promised yet).
    pub fn is_retryable(&self) -> bool {
        if self.is_loading() {
            return true;
        }
        if let Error::Unavailable { .. } = self {
            return false;
        }
        match self {
            Error::Conflict { .. } | Error::FunctionMissing { .. } => true,
            Error::Connect { cause: source, .. } => {
                source.is_io_error() || source.is_connection_dropped()
            }
            Error::Command {
                phase,
                cause: source,
                ..
            } => {
                let before_vote = matches!(
                    phase,
                    Phase::Work
                        | Phase::TpcBegin
                        | Phase::Commit
                        | Phase::Savepoint
                        | Phase::Rollback
                );
                before_vote
                    && (source.is_io_error()
                        || source.is_connection_dropped()
                        || source.is_timeout())
            }
            Error::Transaction(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// The server the error is about, when it is about one.
    pub fn server(&self) -> Option<&str> {
        match self {
            Error::Connect { url, .. } => Some(url),
            Error::Command { server, .. }
            | Error::Conflict { server, .. }
            | Error::Invalid { server, .. }
            | Error::LockKeyType { server, .. }
            | Error::Aborted { server, .. }
            | Error::AlreadyPrepared { server, .. }
            | Error::PrepareTooLate { server, .. }
            | Error::NotReplicated { server, .. }
            | Error::FunctionMissing { server, .. }
            | Error::PartialApply { server, .. }
            | Error::ReadAfterWrite { server, .. }
            | Error::NotDurable { server, .. }
            | Error::UnexpectedReply { server, .. }
            | Error::Unavailable { server, .. } => Some(server),
            _ => None,
        }
    }
}

impl From<Error> for tm_core::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Transaction(e) => e,
            Error::Conflict {
                server,
                phase,
                detail,
            } => tm_core::Error::conflict(server, phase, detail),
            other => {
                let resource = other.server().unwrap_or("redis").to_owned();
                tm_core::Error::resource(resource, other)
            }
        }
    }
}

/// `Result` with tm-redis's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
