//! The one error type of tm-sqlite.

use std::path::{Path, PathBuf};

use rusqlite::ErrorCode;
use tm_core::Phase;

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What tm-sqlite reports. Every variant names the database path and the
/// phase, and says its cause once: SQLite's own failures show SQLite's
/// message and extended result code in the message and keep the
/// [`rusqlite::Error`] for [`rusqlite_error`](Error::rusqlite_error) (not as
/// `source()`, which would say it twice); an I/O failure is the `source()`.
///
/// Inside a transaction it reaches callers wrapped in
/// [`tm_core::Error::Resource`] (resource `sqlite:<path>`), so
/// `err.source()` downcasts to this type.
///
/// ```
/// use tm_sqlite::{Database, Error};
/// let dir = tempfile::tempdir()?;
/// let err = Database::open(dir.path().join("missing-dir").join("app.db")).unwrap_err();
/// assert_eq!(err.phase(), tm_core::Phase::Open);
/// assert_eq!(err.sqlite_error_code(), Some(rusqlite::ErrorCode::CannotOpen));
/// assert!(err.to_string().contains("missing-dir"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// SQLite refused an operation.
    #[error("sqlite:{} at {phase}: {cause}{}", .path.display(), code_suffix(.cause))]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What tm-sqlite was doing.
        phase: Phase,
        /// SQLite's error (shown in the message).
        cause: rusqlite::Error,
    },
    /// The resource was asked to end again after it had ended (finished
    /// twice, finished after a rollback, rolled back after its commit): tm
    /// gives each resource exactly one ending, so this is a protocol
    /// violation, never a no-op.
    #[error(
        "sqlite:{} at {phase}: this transaction's SQLite part has already ended ({ended}); \
         it cannot be ended again",
        .path.display()
    )]
    AlreadyEnded {
        /// The database file.
        path: PathBuf,
        /// The ending that was refused.
        phase: Phase,
        /// How it had ended.
        ended: Ending,
    },
    /// The last resource's `COMMIT` ran, but making it durable (an fsync of
    /// the file named in the message) failed: the commit is visible, and it
    /// may not survive a power loss.
    #[error(
        "sqlite:{} at {phase}: the COMMIT ran but could not be made durable (fsync of {}); \
         it is visible now and may be lost by a power failure",
        .path.display(), .file.display()
    )]
    NotDurable {
        /// The database file.
        path: PathBuf,
        /// Where (the last resource's vote).
        phase: Phase,
        /// The file whose sync failed.
        file: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// What tm-sqlite keeps in its own tables is not what it wrote (e.g. a
    /// decision log id that does not parse).
    #[error("sqlite:{} at {phase}: {detail}", .path.display())]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What was being read.
        phase: Phase,
        /// What is wrong, and where.
        detail: String,
    },
    /// The SQLite transaction was ended behind tm's back: `COMMIT`,
    /// `ROLLBACK` or `BEGIN` run by hand on the joined connection (or SQLite
    /// rolled it back itself after an I/O or memory error). tm refuses to
    /// commit: what the connection holds is no longer this transaction.
    #[error(
        "sqlite:{} at {phase}: the SQLite transaction was ended outside tm \
         (COMMIT, ROLLBACK or BEGIN run by hand on the joined connection, or SQLite rolled it back after an error); \
         nothing more is committed: let tm begin and end transactions",
        .path.display()
    )]
    EndedOutsideTm {
        /// The database file.
        path: PathBuf,
        /// Where it was found out (the vote).
        phase: Phase,
    },
    /// The joined connection was used after its transaction ended (a
    /// [`Conn`](crate::Conn) kept across commit or abort).
    #[error(
        "sqlite:{} at {phase}: the connection's transaction has ended; \
         do not keep the guard across commit or abort: join the next transaction instead",
        .path.display()
    )]
    TransactionEnded {
        /// The database file.
        path: PathBuf,
        /// What was attempted.
        phase: Phase,
    },
}

/// How a transaction's SQLite part ended ([`Error::AlreadyEnded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Ending {
    /// Its `COMMIT` ran.
    Committed,
    /// It was rolled back (or its `COMMIT` failed and rolled it back).
    RolledBack,
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ending::Committed => "committed",
            Ending::RolledBack => "rolled back",
        })
    }
}

fn code_suffix(err: &rusqlite::Error) -> String {
    match err.sqlite_error() {
        Some(e) => format!(" (SQLite {:?}, extended code {})", e.code, e.extended_code),
        None => String::new(),
    }
}

impl Error {
    pub(crate) fn sqlite(path: &Path, phase: Phase, cause: rusqlite::Error) -> Self {
        Error::Sqlite {
            path: path.to_path_buf(),
            phase,
            cause,
        }
    }

    /// The database file.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// let path = dir.path().join("nope").join("x.db");
    /// let err = tm_sqlite::Database::open(&path).unwrap_err();
    /// assert_eq!(err.path(), path.as_path());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn path(&self) -> &Path {
        match self {
            Error::Sqlite { path, .. }
            | Error::EndedOutsideTm { path, .. }
            | Error::TransactionEnded { path, .. }
            | Error::AlreadyEnded { path, .. }
            | Error::NotDurable { path, .. }
            | Error::Corrupt { path, .. } => path,
        }
    }

    /// The phase in which it happened ([`Phase::Open`], [`Phase::Work`] for
    /// `BEGIN`, [`Phase::TpcVote`] / [`Phase::CommitOnePhase`] for `COMMIT`, ...).
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// let err = tm_sqlite::Database::open(dir.path().join("nope").join("x.db")).unwrap_err();
    /// assert_eq!(err.phase(), tm_core::Phase::Open);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn phase(&self) -> Phase {
        match self {
            Error::Sqlite { phase, .. }
            | Error::EndedOutsideTm { phase, .. }
            | Error::TransactionEnded { phase, .. }
            | Error::AlreadyEnded { phase, .. }
            | Error::NotDurable { phase, .. }
            | Error::Corrupt { phase, .. } => *phase,
        }
    }

    /// SQLite's primary result code, when SQLite reported one.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// let err = tm_sqlite::Database::open(dir.path().join("nope").join("x.db")).unwrap_err();
    /// assert_eq!(err.sqlite_error_code(), Some(rusqlite::ErrorCode::CannotOpen));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn sqlite_error_code(&self) -> Option<ErrorCode> {
        self.rusqlite_error()?.sqlite_error_code()
    }

    /// SQLite's extended result code (e.g. 517, `SQLITE_BUSY_SNAPSHOT`;
    /// 2067, `SQLITE_CONSTRAINT_UNIQUE`), when SQLite reported one.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// let err = tm_sqlite::Database::open(dir.path().join("nope").join("x.db")).unwrap_err();
    /// assert_eq!(err.extended_code(), Some(14)); // SQLITE_CANTOPEN
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn extended_code(&self) -> Option<i32> {
        Some(self.rusqlite_error()?.sqlite_error()?.extended_code)
    }

    /// The underlying rusqlite error, if SQLite refused something.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// let err = tm_sqlite::Database::open(dir.path().join("nope").join("x.db")).unwrap_err();
    /// assert!(err.rusqlite_error().is_some());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn rusqlite_error(&self) -> Option<&rusqlite::Error> {
        match self {
            Error::Sqlite { cause, .. } => Some(cause),
            _ => None,
        }
    }

    /// `true` for `SQLITE_BUSY` (including `BUSY_SNAPSHOT`) and
    /// `SQLITE_LOCKED`: another connection was in the way, and the whole
    /// transaction is worth retrying.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// let err = tm_sqlite::Database::open(dir.path().join("nope").join("x.db")).unwrap_err();
    /// assert!(!err.is_retryable());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_retryable(&self) -> bool {
        self.rusqlite_error().is_some_and(is_busy_or_locked)
    }

    /// `true` for a constraint violation (`UNIQUE`, `NOT NULL`, `CHECK`,
    /// foreign key...): not retryable.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// let err = tm_sqlite::Database::open(dir.path().join("nope").join("x.db")).unwrap_err();
    /// assert!(!err.is_constraint_violation());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_constraint_violation(&self) -> bool {
        self.sqlite_error_code() == Some(ErrorCode::ConstraintViolation)
    }
}

fn is_busy_or_locked(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// Whether `err`, or any error in its `source()` chain, is an SQLite
/// failure worth retrying the transaction for: `SQLITE_BUSY` (including
/// `BUSY_SNAPSHOT`, `BUSY_RECOVERY`) or `SQLITE_LOCKED`. It looks for a
/// [`rusqlite::Error`] or a tm-sqlite [`Error`], however the caller wrapped
/// them (a boxed error, `anyhow`, an application enum with `#[source]`).
///
/// This is what [`Database`](crate::Database)'s resources answer to
/// [`DataManager::should_retry`](tm_core::DataManager::should_retry).
///
/// ```
/// use rusqlite::ffi;
/// let busy = rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_BUSY), None);
/// let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(busy);
/// assert!(tm_sqlite::is_retryable(&*boxed));
///
/// let syntax = rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_ERROR), None);
/// assert!(!tm_sqlite::is_retryable(&syntax));
/// ```
pub fn is_retryable(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut link = Some(err);
    while let Some(e) = link {
        if let Some(e) = e.downcast_ref::<rusqlite::Error>() {
            if is_busy_or_locked(e) {
                return true;
            }
        }
        if let Some(e) = e.downcast_ref::<Error>() {
            if e.is_retryable() {
                return true;
            }
        }
        link = e.source();
    }
    false
}
