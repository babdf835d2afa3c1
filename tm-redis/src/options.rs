//! `Options` for [`Store::open_with`](crate::Store::open_with) and the
//! durability report.

use std::fmt;
use std::time::Duration;

/// Settings of a [`Store`](crate::Store). Start from `Options::default()` and
/// change what you need:
///
/// ```
/// use std::time::Duration;
/// use tm_redis::Options;
/// let options = Options::default()
///     .prefix("app:tm:")
///     .connect_timeout(Duration::from_millis(500))
///     .require_durable_prepare(true);
/// assert_eq!(options.prefix, "app:tm:");
/// ```
#[derive(Debug, Clone)]
// Not `#[non_exhaustive]`, on purpose: struct-update syntax
// (`Options { field, ..Options::default() }`) must work outside the crate.
// New fields always get a default, so that syntax stays compatible.
pub struct Options {
    /// Prefix of every key tm itself stores (locks, prepared records,
    /// tombstones). Default `tm:`. Must not be empty, nor contain `{` or
    /// `}` (tm puts the hash tag right after it): `open` refuses such a
    /// prefix with [`Error::InvalidArgument`](crate::Error::InvalidArgument).
    pub prefix: String,
    /// Idle connections kept for reuse. Default 8.
    pub pool_size: usize,
    /// Connect timeout. Default 5 s.
    pub connect_timeout: Duration,
    /// Read and write timeout of every command. Default 5 s.
    pub response_timeout: Duration,
    /// How long a new connection is retried (with backoff) while the
    /// server cannot be reached, before the operation fails with
    /// [`Error::Unavailable`](crate::Error::Unavailable), which is not
    /// retryable. Rides out a restart; never retries a dead server forever.
    /// Not used by `open`, which fails at once. Default 3 s.
    pub reconnect_deadline: Duration,
    /// Fail `open` when the server's settings would lose a prepare (AOF off,
    /// `appendfsync` not `always`, an eviction policy that may evict tm's
    /// keys). Default `false`: such a server is reported by
    /// [`Store::durability`](crate::Store::durability) and warned about once.
    pub require_durable_prepare: bool,
    /// How long an abort's tombstone refuses a late prepare of the same
    /// transaction, and tells a late finish that it was aborted. Make it
    /// outlive the longest plausible late prepare. Default 24 hours.
    pub tombstone_ttl: Duration,
    /// How long a finish's receipt tells a finish sent again (or recovery)
    /// that the transaction was applied. A finish arriving later than that
    /// finds neither record nor receipt and is reported lost
    /// ([`tm_core::Missing::Lost`]): a false alarm, never a false success.
    /// Default 24 hours.
    pub receipt_ttl: Duration,
    /// How many replicas a vote waits for (`WAIT`, pipelined after the
    /// prepare: no extra round trip) before it answers yes. `None` (the
    /// default): as many as were connected when the store opened, so a
    /// failover to any of them keeps every acknowledged prepare. A vote
    /// they do not acknowledge within [`replica_timeout`](Self::replica_timeout)
    /// fails with [`Error::NotReplicated`](crate::Error::NotReplicated).
    pub wait_replicas: Option<usize>,
    /// How long a vote waits for the replicas. Default 1 s.
    pub replica_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            prefix: "tm:".to_owned(),
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(5),
            reconnect_deadline: Duration::from_secs(3),
            require_durable_prepare: false,
            tombstone_ttl: Duration::from_secs(24 * 3600),
            receipt_ttl: Duration::from_secs(24 * 3600),
            wait_replicas: None,
            replica_timeout: Duration::from_secs(1),
        }
    }
}

impl Options {
    /// Sets [`Options::prefix`].
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_owned();
        self
    }

    /// Sets [`Options::pool_size`].
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n;
        self
    }

    /// Sets [`Options::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`Options::response_timeout`].
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Sets [`Options::reconnect_deadline`].
    pub fn reconnect_deadline(mut self, deadline: Duration) -> Self {
        self.reconnect_deadline = deadline;
        self
    }

    /// Sets [`Options::require_durable_prepare`].
    pub fn require_durable_prepare(mut self, on: bool) -> Self {
        self.require_durable_prepare = on;
        self
    }

    /// Sets [`Options::tombstone_ttl`].
    pub fn tombstone_ttl(mut self, ttl: Duration) -> Self {
        self.tombstone_ttl = ttl;
        self
    }

    /// Sets [`Options::receipt_ttl`].
    pub fn receipt_ttl(mut self, ttl: Duration) -> Self {
        self.receipt_ttl = ttl;
        self
    }

    /// Sets [`Options::wait_replicas`].
    pub fn wait_replicas(mut self, n: Option<usize>) -> Self {
        self.wait_replicas = n;
        self
    }

    /// Sets [`Options::replica_timeout`].
    pub fn replica_timeout(mut self, timeout: Duration) -> Self {
        self.replica_timeout = timeout;
        self
    }
}

/// The server's durability settings as found at open (`CONFIG GET`). `None`
/// where the server would not tell (e.g. `CONFIG` renamed away).
///
/// ```
/// use tm_redis::{testing::TestServer, Store};
/// let server = TestServer::builder().fsync_always(true).start();
/// let store = Store::open(&server.url())?;
/// assert!(store.durability().is_durable(), "{}", store.durability());
/// # Ok::<(), tm_redis::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Durability {
    /// `appendonly`.
    pub appendonly: Option<bool>,
    /// `appendfsync` (`always`, `everysec`, `no`).
    pub appendfsync: Option<String>,
    /// `maxmemory-policy`.
    pub maxmemory_policy: Option<String>,
    /// `maxmemory` in bytes (0: no limit, so nothing is ever evicted).
    pub maxmemory: Option<u64>,
    /// Replicas connected when the store opened (`INFO replication`).
    pub replicas: Option<usize>,
    /// How many replicas each vote waits for
    /// ([`Options::wait_replicas`]); prepares reach the replicas when this
    /// is at least [`replicas`](Self::replicas).
    pub replicas_waited: usize,
}

impl Durability {
    /// Nothing known yet.
    pub(crate) fn unknown() -> Durability {
        Durability {
            appendonly: None,
            appendfsync: None,
            maxmemory_policy: None,
            maxmemory: None,
            replicas: None,
            replicas_waited: 0,
        }
    }

    /// Whether every vote waits until the prepare reached every replica
    /// connected at open (`true` with none).
    pub fn prepares_reach_replicas(&self) -> bool {
        self.replicas_waited >= self.replicas.unwrap_or(0)
    }

    /// What would lose an acknowledged prepare; empty when durable.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match self.appendonly {
            Some(true) => {}
            Some(false) => problems.push("appendonly is off".to_owned()),
            None => problems.push("appendonly is unknown".to_owned()),
        }
        match self.appendfsync.as_deref() {
            Some("always") => {}
            Some(other) => problems.push(format!(
                "appendfsync is {other} (an OS crash can lose acknowledged prepares; use always)"
            )),
            None => problems.push("appendfsync is unknown".to_owned()),
        }
        // Locks and records have no TTL, but tombstones and receipts do: a
        // `volatile-*` policy may evict them, and then a late prepare lands
        // after its abort, or a finished transaction reads as lost.
        match (self.maxmemory_policy.as_deref(), self.maxmemory) {
            (Some("noeviction"), _) | (_, Some(0)) => {}
            (Some(p), _) if p.starts_with("volatile-") => problems.push(format!(
                "maxmemory-policy is {p} with a maxmemory limit (may evict tm's tombstones and receipts, which have a TTL; use noeviction)"
            )),
            (Some(other), _) => problems.push(format!(
                "maxmemory-policy is {other} with a maxmemory limit (may evict locks and prepared records; use noeviction)"
            )),
            (None, _) => problems.push("maxmemory-policy is unknown".to_owned()),
        }
        if !self.prepares_reach_replicas() {
            problems.push(format!(
                "{} replicas, and votes wait for {} (a failover to one that lacks a prepare loses it)",
                self.replicas.unwrap_or(0),
                self.replicas_waited
            ));
        }
        problems
    }

    /// `true` when an acknowledged prepare survives a crash of the server or
    /// its machine, and is never evicted.
    pub fn is_durable(&self) -> bool {
        self.problems().is_empty()
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let problems = self.problems();
        if problems.is_empty() {
            f.write_str("durable (appendonly yes, appendfsync always, no eviction of tm keys")?;
            match self.replicas {
                Some(n) if n > 0 => write!(
                    f,
                    ", votes wait for {} of {n} replicas)",
                    self.replicas_waited
                ),
                _ => f.write_str(", no replicas)"),
            }
        } else {
            f.write_str(&problems.join("; "))
        }
    }
}
