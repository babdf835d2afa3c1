//! Savepoints across every resource of a transaction (ZODB semantics).

use std::fmt;
use std::sync::Arc;

use crate::data_manager::{DataManager, ResourceSavepoint};
use crate::error::Result;
use crate::transaction::Transaction;

/// A resource of a savepoint and its own savepoint (`None`: taken
/// optimistically from a resource without savepoint support).
pub(crate) type SavepointEntry = (Arc<dyn DataManager>, Option<Box<dyn ResourceSavepoint>>);

/// A point a transaction can be rolled back to, across all its resources.
///
/// * Rolling back restores every resource to the savepoint; resources joined
///   after it are aborted and leave the transaction (they may join again).
/// * It can be rolled back to again; savepoints taken after it become
///   invalid ([`Error::InvalidSavepoint`](crate::Error::InvalidSavepoint)).
/// * Commit and abort invalidate every savepoint.
/// * A failed rollback leaves the transaction `CommitFailed`.
///
/// ```
/// use tm_core::{Error, MemoryStore, TransactionManager};
/// let tm = TransactionManager::explicit();
/// let store = MemoryStore::<&'static str>::new();
/// let txn = tm.begin()?;
/// let h = store.join(&txn)?;
/// let first = txn.savepoint()?;
/// h.put("k", "one")?;
/// let second = txn.savepoint()?;
/// first.rollback()?;
/// assert_eq!(h.get("k")?, None);
/// assert!(!second.is_valid());
/// assert!(matches!(second.rollback(), Err(Error::InvalidSavepoint)));
/// # Ok::<(), tm_core::Error>(())
/// ```
pub struct Savepoint {
    txn: Transaction,
    id: u64,
    entries: Vec<SavepointEntry>,
    joined_before: usize,
}

impl Savepoint {
    pub(crate) fn new(
        txn: Transaction,
        id: u64,
        entries: Vec<SavepointEntry>,
        joined_before: usize,
    ) -> Self {
        Savepoint {
            txn,
            id,
            entries,
            joined_before,
        }
    }

    /// Restores every resource to this savepoint.
    pub fn rollback(&self) -> Result<()> {
        self.txn
            .rollback_savepoint(self.id, &self.entries, self.joined_before)
    }

    /// Whether it can still be rolled back to.
    pub fn is_valid(&self) -> bool {
        self.txn.savepoint_is_valid(self.id)
    }

    /// The transaction it belongs to.
    pub fn transaction(&self) -> &Transaction {
        &self.txn
    }
}

impl Drop for Savepoint {
    fn drop(&mut self) {
        // Like ZODB's weak savepoint index: a dropped savepoint can never be
        // rolled back to, so it leaves the transaction's stack.
        self.txn.forget_savepoint(self.id);
    }
}

impl fmt::Debug for Savepoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Savepoint")
            .field("txn", &self.txn.id())
            .field("id", &self.id)
            .field("valid", &self.is_valid())
            .finish()
    }
}
