//! [`Phase`]: the step of the protocol an error, a log line or a
//! [`CallLog`](crate::testing::CallLog) entry is about. A leaf module: the
//! error type uses it, and it uses nothing of the crate.

use std::fmt;

/// A step of the protocol: names the phase in errors, logs and [`CallLog`]s.
///
/// [`CallLog`]: crate::testing::CallLog
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Phase {
    /// [`crate::DataManager::abort`].
    Abort,
    /// [`crate::DataManager::tpc_begin`].
    TpcBegin,
    /// [`crate::DataManager::commit`].
    Commit,
    /// [`crate::DataManager::tpc_vote`].
    TpcVote,
    /// [`crate::DataManager::tpc_finish`].
    TpcFinish,
    /// [`crate::DataManager::tpc_abort`].
    TpcAbort,
    /// [`crate::DataManager::commit_one_phase`].
    CommitOnePhase,
    /// [`crate::DataManager::savepoint`].
    Savepoint,
    /// [`crate::ResourceSavepoint::rollback`].
    Rollback,
    /// Work inside the transaction, before commit (reads, staged writes).
    Work,
    /// Opening or connecting to a resource.
    Open,
    /// Crash recovery ([`recover`](crate::recover)).
    Recover,
}

impl Phase {
    /// The protocol's name of the phase (`"tpc_vote"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Abort => "abort",
            Phase::TpcBegin => "tpc_begin",
            Phase::Commit => "commit",
            Phase::TpcVote => "tpc_vote",
            Phase::TpcFinish => "tpc_finish",
            Phase::TpcAbort => "tpc_abort",
            Phase::CommitOnePhase => "commit_one_phase",
            Phase::Savepoint => "savepoint",
            Phase::Rollback => "rollback",
            Phase::Work => "work",
            Phase::Open => "open",
            Phase::Recover => "recover",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
