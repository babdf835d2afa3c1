//! # tm-redis: Redis as a durable, preparable tm resource
//!
//! Redis has no `PREPARE`; this crate gives it one, so that a transaction
//! over Redis and SQLite (or two Redis servers) is atomic, serializable and
//! survives crashes.
//!
//! ```
//! use tm_core::TransactionManager;
//! use tm_redis::{testing::TestServer, Store};
//!
//! let server = TestServer::start();
//! let store = Store::open(&server.url())?;
//! let tm = TransactionManager::new();
//! tm.run(|txn| {
//!     let r = store.join(txn)?;
//!     let balance: i64 = r.get("alice")?.unwrap_or(0);
//!     r.set("alice", balance + 10)?;
//!     r.rpush("audit", "alice +10")?;
//!     Ok::<_, tm_core::Error>(())
//! })?;
//! assert_eq!(store.get::<i64>("alice")?, Some(10));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## How a transaction runs
//!
//! * **Reads** go to the server on the transaction's own connection, with a
//!   `WATCH` of their keys pipelined before them (one round trip).
//! * **Writes** are buffered in the transaction ([`RedisHandle`]).
//! * **One-phase commit** (Redis is the transaction's only resource): one
//!   call of the function `tm_v2_commit` — lock check, validation, writes —
//!   inside `MULTI`/`EXEC` on the watching connection (alone when nothing was
//!   read). One round trip. A changed read is [`Error::Conflict`].
//! * **Vote** (two-phase commit): `MULTI`, `FCALL tm_v2_prepare`, `EXEC` on the
//!   watching connection. `tm_prepare` refuses at once (never waits) if
//!   another transaction holds a write lock on a key read or written, or a
//!   read lock on a key written; simulates the staged writes in order (types,
//!   exact 64-bit `INCRBY` range) so they cannot fail later; then takes a
//!   shared read lock on each key only read, an exclusive write lock on each
//!   key written, and stores the write-set (cmsgpack, binary-safe) in the
//!   transaction's record. With `appendonly yes` + `appendfsync always` the
//!   reply means the prepare is on disk; with replicas, a `WAIT` pipelined
//!   after it means it reached them too (see *Replication*).
//! * **Finish**: `FCALL tm_v2_apply` (flag `allow-oom`, so it works at
//!   `maxmemory`): replays the record, releases the locks, deletes the
//!   record. Idempotent. A read-only participant is finished too: that
//!   releases its read locks.
//! * **Abort**: `FCALL tm_v2_abort` (`allow-oom`): releases the locks and the
//!   record of a prepare, and leaves a tombstone (for
//!   [`Options::tombstone_ttl`]) so that a prepare of the same transaction
//!   arriving late refuses.
//!
//! ## Keys tm stores
//!
//! All under [`Options::prefix`] (default `tm:`), with a hash tag first so a
//! transaction's keys can share a slot when Redis Cluster support comes:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `<prefix>{<tag>}:lock:<key>` | string | the txid of the prepared writer of `<key>` |
//! | `<prefix>{<tag>}:rlock:<key>` | set | the txids of prepared readers of `<key>` |
//! | `<prefix>{<tag>}:prepared:<txid>` | hash | `k` key list, `w` write-set, `l` the coordinator's [`tm_core::LogId`] (empty: none), `t` the server's `TIME` at prepare (µs) |
//! | `<prefix>{}:aborted:<txid>` | string, TTL | tombstone of an abort ([`Options::tombstone_ttl`]) |
//! | `<prefix>{}:applied:<txid>` | string, TTL | receipt of an apply ([`Options::receipt_ttl`]) |
//! | `<prefix>{}:records` | set | the names of the store's prepared records (recovery's index) |
//! | `<prefix>{}:store-id` | string | the store's identity ([`tm_core::Recoverable::resource_id`]) |
//!
//! For a lock, `<tag>` is the data key's own hash tag (empty if it has
//! none); for a record, the tag all the transaction's keys share (else
//! empty). Tombstones and receipts are under the empty tag, so recovery
//! finds them by name without knowing the record's tag. Locks and records
//! have no TTL: only finish and abort remove them. A write by a
//! transaction to any of these names is refused.
//!
//! ## Recovery
//!
//! [`Store`] is [`tm_core::Recoverable`]: `in_doubt` reads the store's
//! index of prepared records (`SSCAN`, never a keyspace `SCAN`; records
//! prepared by a tm before the index are put in it by one `SCAN` per
//! store) and lists each with its owner (the log id of the coordinator that
//! prepared it, from [`tm_core::Transaction::log_id`]) and its age, measured
//! by the server's clock (`TIME` now minus `TIME` at prepare: one `TIME` per
//! listing, never the client's clock). `commit_prepared` / `abort_prepared`
//! are apply / abort, both idempotent.
//!
//! A missing record is never taken for success. A finish (`tpc_finish` or
//! `commit_prepared`) that finds no record answers from what is left: the
//! apply's receipt (finished before: `Ok`), a tombstone
//! ([`tm_core::Error::RecordMissing`] with [`tm_core::Missing::Aborted`]),
//! or neither ([`tm_core::Missing::Lost`]: e.g. a failover to a replica
//! that lacked the record). Receipts and tombstones live for
//! [`Options::receipt_ttl`] and [`Options::tombstone_ttl`] (24 h each by
//! default): a finish arriving later than that is reported lost, a false
//! alarm but never a false success. Limit: a command buffered with [`RedisHandle::queue`] cannot
//! be simulated at the vote; if it fails when applied, the rest is applied
//! and the finish fails with [`Error::PartialApply`] (a heuristic outcome).
//!
//! ## Replication
//!
//! A vote waits for the replicas (`WAIT n`, pipelined after the prepare:
//! no extra round trip) that were connected when the store opened, or
//! [`Options::wait_replicas`] of them. A vote they do not acknowledge
//! within [`Options::replica_timeout`] is not a yes:
//! [`Error::NotReplicated`], and the transaction aborts. So a failover to a
//! replica never loses an acknowledged prepare. [`Store::durability`]
//! reports the replicas and whether votes reach them. Not waited for: the
//! finish (a failover that loses it leaves the record on the replica, and
//! recovery applies it again) and the one-phase commit (like a plain Redis
//! write). `WAITAOF` (Redis 7.2) is not used yet: on 7.0 a replica
//! acknowledges what it received, not what it fsynced.
//!
//! ## Outages
//!
//! A connection that cannot be made is retried within
//! [`Options::reconnect_deadline`], then reported as
//! [`Error::Unavailable`] naming the server. `LOADING` (a restarting
//! server) is retryable. A one-phase commit whose reply is lost (a timeout
//! or a reset after sending) is [`tm_core::Error::Heuristic`] with the
//! server in doubt: it may have happened.
//!
//! ## Lock hygiene
//!
//! The prepare checks everything it will touch before its first write
//! (lock keys' and the index's types included), so a Lua error can never
//! leave half a prepare. A prepare arriving at the server later than
//! [`Options::tombstone_ttl`] after it was sent (client clock against the
//! server's) is refused ([`Error::PrepareTooLate`]): an abort's tombstone
//! always outlives a prepare that could land. A lock whose holder has no
//! record (an orphan: left by an older tm, or by a record deleted behind
//! tm's back) is removed by the first prepare that meets it, atomically and
//! only if the holder still has no record; that prepare conflicts
//! (retryable) and its retry gets through.
//!
//! ## Rolling upgrades
//!
//! The function library is versioned: library `tm_v2`, functions
//! `tm_v2_prepare`, `tm_v2_apply`, `tm_v2_abort`, `tm_v2_commit`,
//! `tm_v2_release_orphan`. Two tm versions on one server each load
//! (`FUNCTION LOAD REPLACE` of their own name) and call their own; locks,
//! records and write-sets keep one format, so each sees the other's locks
//! and recovers the other's records.
//!
//! ## Outside writers
//!
//! tm's isolation holds among tm transactions. A client writing a key
//! behind tm's back is not stopped: Redis has no lock an outside client
//! must honour. Between a transaction's vote and its finish, such a write
//! breaks the vote's promise: the staged writes then land on top of it
//! (a `SET` overwrites it; an `INCRBY` adds to it). Where the apply can
//! see it, it is never silent: a staged write that fails (e.g. the outside
//! client changed the key's type) is applied in part and reported as
//! [`tm_core::Error::Heuristic`] (one phase) or [`Error::PartialApply`]
//! (the finish), naming the write and its key in the log. Write those keys
//! only through tm, or accept that outside writes are last-writer-wins
//! against it. A read of a key (`WATCH`) does see an outside write before
//! the vote: the vote then fails with a conflict.
//!
//! ## Limits
//!
//! * Share one [`Store`] (clone it) per server and prefix. Two stores
//!   opened separately on the same server and prefix are two resources to
//!   tm: in one transaction, the second one's prepare meets the first one's
//!   locks and fails.
//! * Locks are per prefix: stores with different prefixes on the same
//!   server do not see each other's locks, so they are not isolated from
//!   each other on shared keys.
//! * Keys read inside a savepoint that is rolled back stay watched (and read
//!   locked at the vote) until the transaction ends.
//!
//! ## Durability
//!
//! [`Store::durability`] reports the server's `appendonly`, `appendfsync`,
//! `maxmemory` and `maxmemory-policy`, and its replicas. A prepare is
//! durable with AOF on, `appendfsync always`, nothing evicted (`noeviction`,
//! or no `maxmemory`: a `volatile-*` policy may evict tombstones and
//! receipts, which have a TTL) and every replica waited for; otherwise
//! `open` warns once, or fails with [`Options::require_durable_prepare`].

#![warn(missing_docs)]

mod conn;
mod error;
mod handle;
mod keys;
mod manager;
mod ops;
mod options;
mod overlay;
mod recovery;
mod store;
pub mod testing;
mod vote;
mod wire;

pub use error::{Error, Result};
pub use handle::{RedisHandle, MAX_TTL};
pub use options::{Durability, Options};
pub use store::Store;

/// The `redis` crate tm-redis was built with, for raw commands on
/// [`Store::client`] without pinning a version of your own.
pub use redis;
