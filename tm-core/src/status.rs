//! Transaction status.

use std::fmt;

/// Where a transaction is in its life.
///
/// ```text
/// Active ──doom──▶ Doomed ──abort──▶ Aborted
///   │                 
///   ├──commit──▶ Committing ──▶ Committed
///   │                 └──failure──▶ CommitFailed ──abort──▶ Aborted
///   └──abort──▶ Aborted
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// Work may be done, resources joined, savepoints taken.
    Active,
    /// The commit is running.
    Committing,
    /// The commit succeeded.
    Committed,
    /// The transaction can only be aborted.
    Doomed,
    /// The commit failed; only `abort()` is accepted now.
    CommitFailed,
    /// The transaction was aborted.
    Aborted,
}

impl Status {
    /// `true` once the transaction has ended (committed or aborted).
    pub fn is_finished(self) -> bool {
        matches!(self, Status::Committed | Status::Aborted)
    }

    /// The status as ZODB spells it (`"Commit failed"`), plus `"Aborted"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "Active",
            Status::Committing => "Committing",
            Status::Committed => "Committed",
            Status::Doomed => "Doomed",
            Status::CommitFailed => "Commit failed",
            Status::Aborted => "Aborted",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
