//! The durable commit decision: what makes a two-phase commit survive a crash.
//!
//! When a transaction has two or more resources and a decision log is
//! configured, tm records the decision (the transaction id and its
//! participants) after every preparable resource voted and before any of
//! them is finished. After a crash, [`recover`](crate::recover) commits the
//! prepared transactions of its own log that have a decision and, once they
//! are older than a grace period, *fences* and aborts the others (presumed
//! abort): [`DecisionLog::record_abort`] records the abort first, so that a
//! coordinator arriving late with its commit gets [`Error::Fenced`] instead
//! of a half-committed transaction.
//!
//! With a resource that cannot prepare (SQLite) among the participants, its
//! own commit is the decision, so the log must live *inside* that resource
//! (`tm_sqlite::SqliteDecisionLog` on the same database: the decision row
//! commits with it). tm refuses the commit otherwise
//! ([`Error::UnsafeSetup`]).
//!
//! [`Error::Fenced`]: crate::Error::Fenced
//! [`Error::UnsafeSetup`]: crate::Error::UnsafeSetup

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::error::Result;
use crate::txid::TxId;

/// A commit decision.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Decision {
    /// The transaction.
    pub txid: TxId,
    /// Its participants that can be recovered: their
    /// [`recovery_id`](crate::DataManager::recovery_id)s (the
    /// [`Recoverable::resource_id`](crate::Recoverable::resource_id)s).
    pub participants: Vec<String>,
    /// User, description and extensions of the transaction.
    pub metadata: BTreeMap<String, String>,
}

impl Decision {
    /// A decision to commit `txid`.
    pub fn new(txid: TxId, participants: Vec<String>, metadata: BTreeMap<String, String>) -> Self {
        Decision {
            txid,
            participants,
            metadata,
        }
    }
}

/// The identity of a decision log: created with the log, kept in it, never
/// reused.
///
/// Every prepared record names the `LogId` of the coordinator that prepared
/// it, so that [`recover`](crate::recover) resolves only its own records and
/// leaves every other log's alone. Its text form is 32 hex digits.
///
/// ```
/// use tm_core::LogId;
/// let id = LogId::new();
/// assert_ne!(id, LogId::new());
/// assert_eq!(id.to_string().parse::<LogId>()?, id);
/// # Ok::<(), tm_core::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LogId(u128);

impl LogId {
    /// A fresh, random id (128 bits from the operating system's randomness,
    /// mixed with the time, the process id and a counter).
    pub fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let half = |salt: u64| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(salt);
            h.write_u128(now);
            h.write_u32(std::process::id());
            h.write_u64(seq);
            h.finish()
        };
        LogId((u128::from(half(1)) << 64) | u128::from(half(2)))
    }

    /// The id as 16 bytes (big-endian), for logs that store it compactly.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// The id from [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        LogId(u128::from_be_bytes(bytes))
    }
}

impl Default for LogId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LogId({self})")
    }
}

impl FromStr for LogId {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(crate::Error::InvalidArgument(format!(
                "{s:?} is not a log id (32 hex digits)"
            )));
        }
        u128::from_str_radix(s, 16)
            .map(LogId)
            .map_err(|e| crate::Error::InvalidArgument(format!("{s:?} is not a log id: {e}")))
    }
}

/// What a decision log holds for a transaction: the answer of
/// [`DecisionLog::record_abort`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// A commit decision was recorded first: the transaction commits.
    Committed,
    /// The abort is recorded: a later `record_commit` is fenced.
    Aborted,
}

/// Where commit decisions are made durable.
///
/// # The fence
///
/// `record_commit` and `record_abort` of one transaction id exclude each
/// other, durably: whichever is recorded first wins, and the other learns
/// it. This is what lets recovery presume abort while the coordinator may
/// still be alive (stalled, or in another process sharing the log).
pub trait DecisionLog: Send + Sync {
    /// The log's identity: created with the log, kept in it, never reused.
    fn id(&self) -> LogId;
    /// Records the decision to commit; it is durable when this returns `Ok`.
    /// [`Error::Fenced`](crate::Error::Fenced) if an abort of that
    /// transaction was recorded first.
    fn record_commit(&self, decision: &Decision) -> Result<()>;
    /// The fence: durably records that `txid` is aborted, unless a commit is
    /// already recorded, in which case it returns [`Outcome::Committed`] and
    /// records nothing. Idempotent.
    fn record_abort(&self, txid: &TxId) -> Result<Outcome>;
    /// The transaction is finished everywhere: its commit decision is no
    /// longer needed. Need not be durable (recovery is idempotent). Recorded
    /// aborts are kept: they are the fence against a late coordinator.
    fn forget(&self, txid: &TxId) -> Result<()>;
    /// The commit decisions not yet forgotten.
    fn pending(&self) -> Result<Vec<Decision>>;
}
