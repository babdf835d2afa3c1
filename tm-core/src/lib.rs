//! # tm-core: a ZODB-style two-phase transaction manager
//!
//! Join several stores (anything that implements [`DataManager`]) to one
//! [`Transaction`] and get one atomic outcome: every store commits or none
//! does. Conflicts are retried ([`TransactionManager::run`],
//! [`TransactionManager::attempts`]), savepoints span every store, hooks and
//! synchronizers observe the life of each transaction, and — what the Python
//! `transaction` package never had — a durable [`DecisionLog`] plus
//! [`recover`] finish whatever a crash left half done.
//!
//! ```
//! use tm_core::{MemoryStore, TransactionManager};
//!
//! let accounts = MemoryStore::<i64>::named("accounts");
//! let audit = MemoryStore::<String>::named("audit");
//! let tm = TransactionManager::new();
//!
//! tm.run(|txn| {
//!     let a = accounts.join(txn)?;
//!     let log = audit.join(txn)?;
//!     let balance = a.get("alice")?.unwrap_or(0);
//!     a.put("alice", balance + 10)?;
//!     log.put("last", "alice +10".to_string())?;
//!     Ok::<_, tm_core::Error>(())
//! })?;
//!
//! assert_eq!(accounts.committed("alice"), Some(10));
//! assert_eq!(audit.committed("last").as_deref(), Some("alice +10"));
//! # Ok::<(), tm_core::Error>(())
//! ```
//!
//! ## Where things are
//!
//! * The protocol a resource implements, and every guarantee tm gives it, is
//!   written once, in [`data_manager`].
//! * Durability and recovery: [`DecisionLog`] (with the fence,
//!   [`DecisionLog::record_abort`]), [`FileDecisionLog`], [`recover`] and
//!   [`recover_with`] (ownership, grace, fenced presumed abort),
//!   [`RecoveryService`] (recovery on a thread you own).
//! * [`Status`] and the one rule by which it changes.
//! * [`testing`]: fault injection for your own code's failure paths.

#![warn(missing_docs)]

mod attempts;
pub mod data_manager;
mod decision_log;
mod error;
mod file_log;
mod manager;
mod memory;
mod phase;
mod recovery;
mod recovery_service;
mod retry;
mod savepoint;
mod status;
pub mod testing;
mod transaction;
mod txid;

pub use attempts::{Attempt, Attempts, Backoff};
pub use data_manager::{DataManager, Phase, ResourceSavepoint, Synchronizer};
pub use decision_log::{Decision, DecisionLog, LogId, Outcome};
pub use error::{BoxError, Error, Missing, Report, Result};
pub use file_log::FileDecisionLog;
pub use manager::{TransactionManager, TransactionManagerBuilder};
pub use memory::{MemoryHandle, MemoryStore};
pub use recovery::{
    recover, recover_with, resolve, InDoubt, Recoverable, RecoveryOptions, RecoveryReport,
    Resolution,
};
pub use recovery_service::{RecoveryService, RecoveryServiceBuilder};
pub use retry::TxError;
pub use savepoint::Savepoint;
pub use status::Status;
pub use transaction::Transaction;
pub use txid::{BuildTxIdHasher, ParseTxIdError, TxId, TxIdHasher, TxIdMap};

thread_local! {
    static THREAD_MANAGER: std::cell::RefCell<TransactionManager> =
        std::cell::RefCell::new(TransactionManager::new());
}

/// This thread's default manager (implicit, like `transaction.manager`):
/// each thread has its own.
///
/// ```
/// let txn = tm_core::begin()?;
/// assert_eq!(tm_core::get()?, txn);
/// tm_core::abort()?;
/// # Ok::<(), tm_core::Error>(())
/// ```
pub fn manager() -> TransactionManager {
    THREAD_MANAGER.with(|m| m.borrow().clone())
}

/// Replaces this thread's default manager, e.g. with one that has a
/// decision log or more retry attempts; returns the previous one. A
/// transaction still open on the previous manager stays with it.
///
/// ```
/// use tm_core::{Backoff, TransactionManager};
/// tm_core::set_manager(
///     TransactionManager::builder().retry_attempt_count(10).backoff(Backoff::None).build(),
/// );
/// assert_eq!(tm_core::manager().retry_attempt_count(), 10);
/// ```
pub fn set_manager(tm: TransactionManager) -> TransactionManager {
    THREAD_MANAGER.with(|m| std::mem::replace(&mut *m.borrow_mut(), tm))
}

/// [`TransactionManager::begin`] on this thread's [`manager`].
pub fn begin() -> Result<Transaction> {
    manager().begin()
}

/// [`TransactionManager::get`] on this thread's [`manager`].
pub fn get() -> Result<Transaction> {
    manager().get()
}

/// [`TransactionManager::commit`] on this thread's [`manager`].
pub fn commit() -> Result<()> {
    manager().commit()
}

/// [`TransactionManager::abort`] on this thread's [`manager`].
pub fn abort() -> Result<()> {
    manager().abort()
}

/// [`TransactionManager::doom`] on this thread's [`manager`].
pub fn doom() -> Result<()> {
    manager().doom()
}

/// [`TransactionManager::savepoint`] on this thread's [`manager`].
pub fn savepoint() -> Result<Savepoint> {
    manager().savepoint()
}

/// [`TransactionManager::run`] on this thread's [`manager`].
pub fn run<T, E, F>(f: F) -> Result<T, E>
where
    F: FnMut(&Transaction) -> Result<T, E>,
    E: TxError,
{
    manager().run(f)
}

/// [`TransactionManager::atomic`] on this thread's [`manager`].
pub fn atomic<T, E, F>(f: F) -> Result<T, E>
where
    F: FnOnce(&Transaction) -> Result<T, E>,
    E: TxError,
{
    manager().atomic(f)
}

/// [`TransactionManager::attempts`] on this thread's [`manager`].
pub fn attempts() -> Attempts {
    manager().attempts()
}
