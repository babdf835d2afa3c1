//! The retry machinery shared by `run`, `atomic` and `Attempt::run`: the
//! error types closures may return ([`TxError`], [`tx_error!`](crate::tx_error)),
//! running a closure in a transaction, and the retry decision. It knows
//! transactions, not managers: `manager` and `attempts` both build on it.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use tracing::error;

use crate::error::Error;
use crate::status::Status;
use crate::transaction::Transaction;

/// An error type that closures given to [`TransactionManager::run`](crate::TransactionManager::run),
/// [`atomic`](crate::TransactionManager::atomic) and [`Attempt::run`](crate::Attempt::run)
/// may return: it can hold a [`tm_core::Error`](Error), and tm can look inside
/// it to decide whether to retry.
///
/// Implemented for [`Error`], `Box<dyn std::error::Error + Send + Sync>`,
/// `Box<dyn std::error::Error>` and (feature `anyhow`) `anyhow::Error`. For
/// an application error enum, one line: [`tx_error!`](crate::tx_error).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot carry tm's errors out of a transaction closure",
    label = "the closure's error type must implement `tm::TxError`",
    note = "for an application error enum, add `tm::tx_error!({Self} => Tm, Sqlite, Redis);` naming the variants that hold tm or adapter errors (needs `From<tm::Error>`); or return `tm::Error` / `Box<dyn std::error::Error + Send + Sync>`"
)]
pub trait TxError: From<Error> {
    /// The error as a `std::error::Error`, to walk its `source()` chain.
    fn as_std_error(&self) -> Option<&(dyn std::error::Error + 'static)>;

    /// The error this value holds directly in a variant that
    /// [`tx_error!`](crate::tx_error) was told about (`=> Tm, Sqlite, ..`):
    /// a tm error or an adapter's (SQLITE_BUSY, a Redis conflict). The retry
    /// decision walks its chain too: a variant marked
    /// `#[error(transparent)]` forwards `source()` *past* the error it
    /// holds, so the value's own chain would never show it.
    fn held(&self) -> Option<&(dyn std::error::Error + 'static)> {
        None
    }

    /// The tm [`Error`] this value holds directly, if any.
    fn tm_error(&self) -> Option<&Error> {
        self.held().and_then(|e| e.downcast_ref::<Error>())
    }
}

impl TxError for Error {
    fn as_std_error(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self)
    }
    fn tm_error(&self) -> Option<&Error> {
        Some(self)
    }
}

impl TxError for Box<dyn std::error::Error + Send + Sync + 'static> {
    fn as_std_error(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&**self)
    }
}

impl TxError for Box<dyn std::error::Error + 'static> {
    fn as_std_error(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&**self)
    }
}

#[cfg(feature = "anyhow")]
impl TxError for anyhow::Error {
    fn as_std_error(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.as_ref())
    }
}

/// Implements [`TxError`] for an application error type that implements
/// `std::error::Error + From<tm_core::Error>`.
///
/// `tx_error!(AppError => Tm, Sqlite, Redis)` also names the variants that
/// hold a [`tm_core::Error`](Error) or an adapter's error (each a one-field
/// tuple variant), so that a retryable error in them (a conflict,
/// SQLITE_BUSY, a Redis `LOADING`) is retried even when the variant is
/// `#[error(transparent)]` — thiserror's most common pattern, which hides
/// the held error from the `source()` chain. `tx_error!(AppError)` relies on
/// the chain alone: use it when every such error is a variant's `#[source]`
/// (`#[from]` without `transparent`).
///
/// ```
/// use tm_core::{Error, Phase, TransactionManager, Backoff};
///
/// #[derive(Debug, thiserror::Error)]
/// enum AppError {
///     #[error("insufficient funds")]
///     Funds,
///     #[error(transparent)]
///     Tm(#[from] tm_core::Error),
/// }
/// tm_core::tx_error!(AppError => Tm);
///
/// let tm = TransactionManager::builder().explicit(true).backoff(Backoff::None).build();
/// let r: Result<(), AppError> = tm.run(|_txn| Err(AppError::Funds));
/// assert!(matches!(r, Err(AppError::Funds)));
///
/// let mut tries = 0;
/// tm.run(|_txn| {
///     tries += 1;
///     if tries == 1 {
///         return Err(AppError::from(Error::conflict("store", Phase::Work, "k")));
///     }
///     Ok(())
/// })?;
/// assert_eq!(tries, 2);
/// # Ok::<(), AppError>(())
/// ```
#[macro_export]
macro_rules! tx_error {
    ($ty:ty => $($variant:ident),+ $(,)?) => {
        impl $crate::TxError for $ty {
            fn as_std_error(&self) -> ::std::option::Option<&(dyn ::std::error::Error + 'static)> {
                ::std::option::Option::Some(self)
            }
            #[allow(unreachable_patterns)]
            fn held(&self) -> ::std::option::Option<&(dyn ::std::error::Error + 'static)> {
                match self {
                    $(Self::$variant(e) => ::std::option::Option::Some(e),)+
                    _ => ::std::option::Option::None,
                }
            }
        }
    };
    // The first version's spelling: `=> Tm | Other`.
    ($ty:ty => $first:ident $(| $rest:ident)+) => {
        $crate::tx_error!($ty => $first $(, $rest)+);
    };
    ($($ty:ty),+ $(,)?) => {$(
        impl $crate::TxError for $ty {
            fn as_std_error(&self) -> ::std::option::Option<&(dyn ::std::error::Error + 'static)> {
                ::std::option::Option::Some(self)
            }
        }
    )+};
}

/// Why running work in one transaction failed. The transaction is left
/// open, so that the caller can still ask its resources whether to retry
/// before aborting it.
pub(crate) enum RunFailure<E> {
    /// The caller's closure returned an error.
    Work(E),
    /// The commit failed (tm's own error, before it becomes an `E` that may
    /// hide it behind an `#[error(transparent)]` variant).
    Commit(Error),
}

impl<E: TxError> RunFailure<E> {
    pub(crate) fn into_error(self) -> E {
        match self {
            RunFailure::Work(err) => err,
            RunFailure::Commit(err) => err.into(),
        }
    }

    /// Decided before the abort, which forgets the resources.
    pub(crate) fn is_retryable(&self, txn: &Transaction) -> bool {
        match self {
            RunFailure::Commit(err) => is_retryable_in(Some(txn), err),
            RunFailure::Work(err) => {
                err.held().is_some_and(|e| is_retryable_in(Some(txn), e))
                    || err
                        .as_std_error()
                        .is_some_and(|e| is_retryable_in(Some(txn), e))
            }
        }
    }
}

/// Runs `f` in `txn` and commits on `Ok`: the one place that turns a
/// closure into a committed transaction (`atomic`, `Attempt::run`). A panic
/// in `f` aborts the transaction and propagates.
pub(crate) fn run_in<T, E, F>(txn: &Transaction, f: F) -> Result<T, RunFailure<E>>
where
    F: FnOnce(&Transaction) -> Result<T, E>,
{
    match catch_unwind(AssertUnwindSafe(|| f(txn))) {
        Err(payload) => {
            abort_logged(txn);
            resume_unwind(payload)
        }
        Ok(Err(err)) => Err(RunFailure::Work(err)),
        Ok(Ok(value)) => txn.commit().map(|()| value).map_err(RunFailure::Commit),
    }
}

pub(crate) fn abort_logged(txn: &Transaction) {
    if matches!(txn.status(), Status::Committed | Status::Aborted) {
        return;
    }
    if let Err(err) = txn.abort() {
        error!(error = %err, txn = %txn.id(), "abort failed");
    }
}

pub(crate) fn is_retryable_in(
    txn: Option<&Transaction>,
    err: &(dyn std::error::Error + 'static),
) -> bool {
    let resources = txn.map(|t| t.resources()).unwrap_or_default();
    let mut link: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = link {
        if let Some(tm_err) = e.downcast_ref::<Error>() {
            if tm_err.is_heuristic() {
                return false;
            }
            if tm_err.is_retryable() {
                return true;
            }
        }
        if resources.iter().any(|dm| dm.should_retry(e)) {
            return true;
        }
        link = e.source();
    }
    false
}
