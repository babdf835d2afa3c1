//! One transaction's view of a Redis store: the handle (reads, buffered
//! writes) and the per-transaction data manager (vote = durable prepare).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::{FromRedisValue, ServerError, ToSingleRedisArg, Value};
use tm_core::{DataManager, LogId, Missing, Phase, ResourceSavepoint, Transaction, TxId};
use tracing::{debug, warn};

use crate::conn::{self, Conn};
use crate::error::{Error, Result};
use crate::store::{Store, StoreInner};

/// A staged write: a Redis command on one key (`name key args...`), or a
/// queued command (`name == "*"`, `args` is the whole command).
#[derive(Clone)]
struct Op {
    name: &'static str,
    keys: Vec<usize>,
    args: Vec<Vec<u8>>,
}

impl Op {
    fn command(&self) -> String {
        if self.name == "*" {
            self.args
                .first()
                .map(|a| String::from_utf8_lossy(a).to_uppercase())
                .unwrap_or_default()
        } else {
            self.name.to_owned()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Reading and staging.
    Active,
    /// The vote was refused before anything was written on the server.
    Refused,
    /// The vote's outcome is unknown (the connection failed): it may have
    /// prepared; abort must clean up on the server.
    VoteUnknown,
    /// Prepared on the server (or nothing to prepare: `layout` is `None`).
    Prepared,
    /// Finished, aborted or committed in one phase.
    Ended,
}

#[derive(Default)]
struct Keys {
    names: Vec<Vec<u8>>,
    index: HashMap<Vec<u8>, usize>,
    /// Read from the server (and so WATCHed) by this transaction.
    read: Vec<bool>,
}

impl Keys {
    fn intern(&mut self, key: &[u8]) -> usize {
        if let Some(&i) = self.index.get(key) {
            return i;
        }
        let i = self.names.len();
        self.names.push(key.to_vec());
        self.index.insert(key.to_vec(), i);
        self.read.push(false);
        i
    }
}

struct TxnState {
    keys: Keys,
    ops: Vec<Op>,
    /// The connection holding this transaction's WATCHes (while it has any).
    conn: Option<Conn>,
    watching: bool,
    /// The connection with the WATCHes broke: the reads are no longer
    /// protected and the vote must refuse.
    watches_lost: bool,
    stage: Stage,
    /// What the vote sent (for finish and abort).
    layout: Option<Layout>,
}

/// Why a call to the server has no reply: the error, and whether it may
/// have run all the same (sent, then the connection failed).
type Unsent = (Error, bool);
/// The reply of a vote-like call, or why there is none.
type Sent = std::result::Result<Value, Unsent>;

/// The KEYS of a transaction's function calls: `[record, tombstone,
/// untagged tombstone, receipt,]` then a triple (data key, write lock, read lock) per
/// key, the keys only read first.
pub(crate) struct Layout {
    keys: Vec<Vec<u8>>,
    nread: usize,
    /// Where the triples start in `keys` (4 with a record, else 0).
    base: usize,
}

/// The Redis hash tag of `key` (as Redis Cluster computes it), if any.
fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let close = key[open + 1..].iter().position(|&b| b == b'}')?;
    (close > 0).then(|| &key[open + 1..open + 1 + close])
}

impl Layout {
    pub(crate) fn new(
        store: &StoreInner,
        record_tag: &[u8],
        txid: &TxId,
        data: &[&[u8]],
        nread: usize,
        with_record: bool,
    ) -> Layout {
        let mut keys = Vec::with_capacity(4 + 3 * data.len());
        if with_record {
            let id = txid.to_string();
            keys.push(store.tm_key(record_tag, "prepared", id.as_bytes()));
            keys.push(store.tm_key(record_tag, "aborted", id.as_bytes()));
            // Where `abort_prepared` leaves the tombstone when it finds no
            // record (it cannot know the tag): a late prepare checks it too.
            keys.push(store.tm_key(b"", "aborted", id.as_bytes()));
            keys.push(store.tm_key(record_tag, "applied", id.as_bytes()));
        }
        let base = keys.len();
        for &k in data {
            let tag = hash_tag(k).unwrap_or(b"");
            keys.push(k.to_vec());
            keys.push(store.tm_key(tag, "lock", k));
            keys.push(store.tm_key(tag, "rlock", k));
        }
        Layout { keys, nread, base }
    }

    /// The write lock (`which` 1) or read lock (2) key of triple `j`
    /// (1-based).
    fn lock_key(&self, j: usize, which: usize) -> Option<&[u8]> {
        let at = self.base + 3 * j.checked_sub(1)? + which;
        self.keys.get(at).map(Vec::as_slice)
    }

    /// The data keys, in layout order (read-only ones first).
    fn data(&self) -> impl ExactSizeIterator<Item = &[u8]> + Clone {
        self.keys[self.base..].iter().step_by(3).map(Vec::as_slice)
    }
}

/// The key list stored in a record for recovery: `nread`, `n`, then each key
/// length-prefixed (u32 big-endian).
fn encode_keys<'a>(nread: usize, keys: impl ExactSizeIterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + keys.clone().map(|k| k.len() + 4).sum::<usize>());
    out.extend_from_slice(&(nread as u32).to_be_bytes());
    out.extend_from_slice(&(keys.len() as u32).to_be_bytes());
    for k in keys {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
    }
    out
}

pub(crate) fn decode_keys(blob: &[u8]) -> Option<(usize, Vec<Vec<u8>>)> {
    fn u32_at(b: &[u8], at: usize) -> Option<usize> {
        Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
    }
    let nread = u32_at(blob, 0)?;
    let n = u32_at(blob, 4)?;
    let mut at = 8;
    let mut keys = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let len = u32_at(blob, at)?;
        at += 4;
        keys.push(blob.get(at..at + len)?.to_vec());
        at += len;
    }
    (at == blob.len() && nread <= n).then_some((nread, keys))
}

/// Appends `FCALL <function> <numkeys> KEYS...` announcing `extra` more
/// arguments, which the caller appends.
fn fcall_head(buf: &mut Vec<u8>, function: &str, keys: &[Vec<u8>], extra: usize) {
    conn::cmd(buf, 3 + keys.len() + extra);
    conn::arg(buf, b"FCALL");
    conn::arg(buf, function.as_bytes());
    conn::arg(buf, keys.len().to_string().as_bytes());
    for k in keys {
        conn::arg(buf, k);
    }
}

fn is_function_missing(e: &ServerError) -> bool {
    e.kind() == Some(redis::ServerErrorKind::NoScript)
        || e.details()
            .is_some_and(|d| d.contains("Function not found"))
}

/// Calls an idempotent function (apply, abort) with the layout's KEYS; loads
/// the library again and retries once if it is missing.
fn call_idempotent_function(
    store: &StoreInner,
    function: &str,
    layout: &Layout,
    args: &[&[u8]],
    phase: Phase,
) -> Result<Value> {
    let mut buf = Vec::new();
    fcall_head(&mut buf, function, &layout.keys, args.len());
    for a in args {
        conn::arg(&mut buf, a);
    }
    for attempt in 0..2 {
        let reply = store.call_idempotent(phase, function, &buf, 1)?.remove(0);
        match reply {
            Value::ServerError(e) if attempt == 0 && is_function_missing(&e) => {
                warn!(server = %store.server, function, "tm functions missing; loading them again");
                store.load_functions(phase)?;
            }
            Value::ServerError(e) => return Err(store.command_error(phase, function, e.into())),
            other => return Ok(other),
        }
    }
    unreachable!("the second attempt returns")
}

/// Finishes a prepared transaction: `FCALL tm_apply`. Idempotent: `Ok`
/// when its receipt shows it was applied before. A record gone otherwise is
/// never `Ok`: [`tm_core::Error::RecordMissing`], aborted (a tombstone) or
/// lost (neither).
pub(crate) fn apply(store: &StoreInner, layout: &Layout, txid: &TxId, phase: Phase) -> Result<()> {
    let id = txid.to_string();
    let nread = layout.nread.to_string();
    let ttl = ttl_ms(store.options.receipt_ttl);
    let reply = call_idempotent_function(
        store,
        "tm_apply",
        layout,
        &[id.as_bytes(), nread.as_bytes(), ttl.as_bytes()],
        phase,
    )?;
    match reply {
        Value::Array(failures) if failures.is_empty() => Ok(()),
        Value::Array(failures) => Err(Error::PartialApply {
            server: store.server.clone(),
            phase,
            txid: id,
            failures: failures.iter().map(lossy).collect(),
        }),
        Value::SimpleString(s) if s == "APPLIED" => {
            debug!(server = %store.server, %txid, "apply: no record, and a receipt (applied before)");
            Ok(())
        }
        Value::SimpleString(s) if s == "ABORTED" => {
            Err(store.record_missing(txid, Missing::Aborted))
        }
        Value::SimpleString(s) if s == "LOST" => Err(store.record_missing(txid, Missing::Lost)),
        other => Err(store.unexpected(phase, "tm_apply", &other)),
    }
}

/// A TTL in whole milliseconds, at least 1 (Redis refuses `PX 0`).
fn ttl_ms(ttl: Duration) -> String {
    ttl.as_millis().max(1).to_string()
}

/// Aborts on the server: `FCALL tm_abort` (releases a prepare if there is
/// one, leaves a tombstone). Idempotent.
pub(crate) fn abort(store: &StoreInner, layout: &Layout, txid: &str, phase: Phase) -> Result<()> {
    let nread = layout.nread.to_string();
    let ttl = ttl_ms(store.options.tombstone_ttl);
    call_idempotent_function(
        store,
        "tm_abort",
        layout,
        &[txid.as_bytes(), nread.as_bytes(), ttl.as_bytes()],
        phase,
    )?;
    Ok(())
}

fn lossy(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

pub(crate) fn join(store: &Store, txn: &Transaction) -> Result<RedisHandle> {
    let txid = txn.id();
    let res = {
        let mut open = store.inner.open.lock();
        open.entry(txid)
            .or_insert_with(|| {
                Arc::new_cyclic(|me| RedisTxn {
                    me: me.clone(),
                    store: store.inner.clone(),
                    txid,
                    id: txid.to_string(),
                    state: Mutex::new(TxnState {
                        keys: Keys::default(),
                        ops: Vec::new(),
                        conn: None,
                        watching: false,
                        watches_lost: false,
                        stage: Stage::Active,
                        layout: None,
                    }),
                })
            })
            .clone()
    };
    if let Err(err) = txn.join(res.clone()) {
        store.inner.open.lock().remove(&txid);
        return Err(err.into());
    }
    Ok(RedisHandle { res })
}

/// The per-transaction data manager of a [`Store`].
pub(crate) struct RedisTxn {
    me: Weak<RedisTxn>,
    store: Arc<StoreInner>,
    txid: TxId,
    id: String,
    state: Mutex<TxnState>,
}

/// What this transaction's buffered writes make of a key, for the string
/// reads.
enum Local {
    /// No buffered write to it.
    Untouched,
    /// The result depends on the committed value (e.g. INCRBY first).
    NeedBase,
    /// A string value (or none).
    Value(Option<Vec<u8>>),
    /// It exists, but is not a string.
    Exists,
    /// Not well defined without the server.
    Unsupported,
    /// An INCRBY that will be refused at the vote: (write number, reason).
    BadIncr(usize, &'static str),
}

impl RedisTxn {
    fn server(&self) -> &str {
        &self.store.server
    }

    fn closed() -> Error {
        Error::Transaction(tm_core::Error::Closed)
    }

    /// What the buffered writes make of key `k`, starting from `base` (its
    /// committed string value, when read) or from nothing known. Without a
    /// base it goes on past writes that need one (INCRBY) or keep it
    /// (PEXPIRE): a later SET, DEL or PEXPIRE 0 makes the base irrelevant, and
    /// then the server is not asked (its value might not even be a string).
    fn local(st: &TxnState, k: usize, base: Option<Option<Vec<u8>>>) -> Local {
        /// The key as the writes so far leave it.
        enum Cur {
            /// As on the server (only when no base was given).
            Base,
            /// A string computed from the server's value (INCRBY on `Base`).
            FromBase,
            /// A known string value, or no key.
            Str(Option<Vec<u8>>),
            /// It exists, but is not a string.
            NonString,
        }
        let mut cur = match base {
            Some(v) => Cur::Str(v),
            None => Cur::Base,
        };
        let mut touched = false;
        for (n, op) in st.ops.iter().enumerate() {
            if !op.keys.contains(&k) {
                continue;
            }
            touched = true;
            cur = match op.name {
                "SET" => Cur::Str(Some(op.args[0].clone())),
                "DEL" => Cur::Str(None),
                "INCRBY" => match cur {
                    Cur::Base | Cur::FromBase => Cur::FromBase,
                    Cur::NonString => return Local::Unsupported, // WRONGTYPE at the vote
                    Cur::Str(value) => {
                        let by: i64 = std::str::from_utf8(&op.args[0])
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0);
                        let old = match value {
                            None => Some(0),
                            Some(v) => std::str::from_utf8(&v).ok().and_then(parse_redis_int),
                        };
                        let Some(old) = old else {
                            return Local::BadIncr(
                                n + 1,
                                "value is not an integer or out of range",
                            );
                        };
                        let Some(new) = old.checked_add(by) else {
                            return Local::BadIncr(n + 1, "increment or decrement would overflow");
                        };
                        Cur::Str(Some(new.to_string().into_bytes()))
                    }
                },
                "PEXPIRE" => {
                    let ms: i64 = std::str::from_utf8(&op.args[0])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(1);
                    if ms <= 0 {
                        Cur::Str(None)
                    } else {
                        cur // the value stays (a missing key stays missing)
                    }
                }
                "HSET" | "SADD" | "LPUSH" | "RPUSH" | "ZADD" => match cur {
                    // WRONGTYPE at the vote.
                    Cur::Str(Some(_)) | Cur::FromBase => return Local::Unsupported,
                    Cur::Base | Cur::Str(None) | Cur::NonString => Cur::NonString,
                },
                _ => return Local::Unsupported,
            };
        }
        if !touched {
            return Local::Untouched;
        }
        match cur {
            Cur::Base | Cur::FromBase => Local::NeedBase,
            Cur::Str(v) => Local::Value(v),
            Cur::NonString => Local::Exists,
        }
    }

    fn read_after_write(&self, command: &str, key: &[u8]) -> Error {
        Error::ReadAfterWrite {
            server: self.server().to_owned(),
            command: command.to_owned(),
            key: String::from_utf8_lossy(key).into_owned(),
        }
    }

    fn bad_incr(&self, op: usize, detail: &str) -> Error {
        Error::Invalid {
            server: self.server().to_owned(),
            phase: Phase::Work,
            op,
            command: "INCRBY".to_owned(),
            detail: detail.to_owned(),
        }
    }

    /// Sends a read on the transaction's connection, with `WATCH` of the
    /// keys not yet watched pipelined before it: one round trip.
    fn server_read(
        &self,
        st: &mut TxnState,
        command: &str,
        watch: &[usize],
        packed: &[u8],
    ) -> Result<Value> {
        if st.stage != Stage::Active {
            return Err(Self::closed());
        }
        let new: Vec<usize> = watch
            .iter()
            .copied()
            .filter(|&k| !st.keys.read[k])
            .collect();
        let mut buf = Vec::with_capacity(packed.len() + 32);
        if !new.is_empty() {
            conn::cmd(&mut buf, 1 + new.len());
            conn::arg(&mut buf, b"WATCH");
            for &k in &new {
                conn::arg(&mut buf, &st.keys.names[k]);
            }
        }
        buf.extend_from_slice(packed);
        let count = if new.is_empty() { 1 } else { 2 };
        let mut conn = match st.conn.take() {
            Some(c) => c,
            None => self.store.connection(Phase::Work)?,
        };
        let replies = match conn.request(&buf, count) {
            Ok(r) => r,
            Err(e)
                if conn.pooled
                    && !st.watching
                    && (e.is_io_error() || e.is_connection_dropped()) =>
            {
                // A dead idle connection, and no WATCH lost: a new one will do.
                drop(conn);
                let _ = self.store.command_error(Phase::Work, command, e);
                conn = self.store.connection(Phase::Work)?;
                match conn.request(&buf, count) {
                    Ok(r) => r,
                    Err(source) => {
                        return Err(self.store.command_error(Phase::Work, command, source))
                    }
                }
            }
            Err(source) => {
                if st.watching {
                    st.watches_lost = true;
                    st.watching = false;
                }
                return Err(self.store.command_error(Phase::Work, command, source));
            }
        };
        st.conn = Some(conn);
        if !new.is_empty() {
            st.watching = true;
            for &k in &new {
                st.keys.read[k] = true;
            }
        }
        match replies.into_iter().last() {
            Some(Value::ServerError(e)) => {
                Err(self.store.command_error(Phase::Work, command, e.into()))
            }
            Some(v) => Ok(v),
            None => Err(self.store.unexpected(Phase::Work, command, &Value::Nil)),
        }
    }

    /// A non-string read: only of keys this transaction has not written.
    fn plain_read(&self, command: &str, key: &[u8], extra: &[&[u8]]) -> Result<Value> {
        let mut st = self.state.lock();
        let k = st.keys.intern(key);
        if !matches!(Self::local(&st, k, None), Local::Untouched) {
            return Err(self.read_after_write(command, key));
        }
        let mut buf = Vec::new();
        conn::cmd(&mut buf, 2 + extra.len());
        conn::arg(&mut buf, command.as_bytes());
        conn::arg(&mut buf, key);
        for a in extra {
            conn::arg(&mut buf, a);
        }
        self.server_read(&mut st, command, &[k], &buf)
    }

    /// String values of `keys` as this transaction sees them.
    fn string_values(&self, command: &str, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        let mut st = self.state.lock();
        let idx: Vec<usize> = keys.iter().map(|k| st.keys.intern(k)).collect();
        let mut out: Vec<Option<Option<Vec<u8>>>> = vec![None; keys.len()];
        let mut fetch = Vec::new();
        for (i, &k) in idx.iter().enumerate() {
            match Self::local(&st, k, None) {
                Local::Untouched | Local::NeedBase => fetch.push(i),
                Local::Value(v) => out[i] = Some(v),
                Local::Exists | Local::Unsupported => {
                    return Err(self.read_after_write(command, keys[i]))
                }
                Local::BadIncr(op, why) => return Err(self.bad_incr(op, why)),
            }
        }
        if !fetch.is_empty() {
            let mut buf = Vec::new();
            // One key: GET, so that a key holding another type is WRONGTYPE
            // as in Redis, not the nil that MGET answers for it.
            let single = command != "MGET" && fetch.len() == 1;
            conn::cmd(&mut buf, 1 + fetch.len());
            conn::arg(&mut buf, if single { b"GET" } else { b"MGET" });
            for &i in &fetch {
                conn::arg(&mut buf, keys[i]);
            }
            let watch: Vec<usize> = fetch.iter().map(|&i| idx[i]).collect();
            let reply = self.server_read(&mut st, command, &watch, &buf)?;
            let reply = if single {
                Value::Array(vec![reply])
            } else {
                reply
            };
            let Value::Array(values) = reply else {
                return Err(self.store.unexpected(Phase::Work, command, &reply));
            };
            if values.len() != fetch.len() {
                return Err(self
                    .store
                    .unexpected(Phase::Work, command, &Value::Array(values)));
            }
            for (&i, v) in fetch.iter().zip(values) {
                let base = match v {
                    Value::Nil => None,
                    Value::BulkString(b) => Some(b),
                    other => return Err(self.store.unexpected(Phase::Work, command, &other)),
                };
                out[i] = Some(match Self::local(&st, idx[i], Some(base.clone())) {
                    Local::Untouched => base,
                    Local::Value(v) => v,
                    Local::BadIncr(op, why) => return Err(self.bad_incr(op, why)),
                    _ => return Err(self.read_after_write(command, keys[i])),
                });
            }
        }
        Ok(out.into_iter().map(|v| v.unwrap_or(None)).collect())
    }

    /// Refuses a write to a key in tm's own key space
    /// (`<prefix>{<tag>}:lock:...` and the like): it would overwrite, or be
    /// overwritten by, a lock, a record or a tombstone.
    fn check_user_key(&self, key: &[u8]) -> Result<()> {
        if is_tm_key(&self.store.prefix, key) {
            return Err(Error::InvalidArgument(format!(
                "key {:?} is in tm's own key space (prefix {:?}, `{{tag}}:lock:`, `rlock:`, `prepared:`, `aborted:`, `applied:`); \
                 write it under another name or choose another Options::prefix",
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(&self.store.prefix),
            )));
        }
        Ok(())
    }

    fn stage(&self, name: &'static str, key: &[u8], args: Vec<Vec<u8>>) -> Result<()> {
        self.check_user_key(key)?;
        let mut st = self.state.lock();
        if st.stage != Stage::Active {
            return Err(Self::closed());
        }
        let k = st.keys.intern(key);
        st.ops.push(Op {
            name,
            keys: vec![k],
            args,
        });
        Ok(())
    }

    /// Builds the KEYS (and the triple number of every key) for the vote.
    fn layout(&self, st: &TxnState, with_record: bool) -> (Layout, Vec<usize>) {
        let n = st.keys.names.len();
        let mut written = vec![false; n];
        for op in &st.ops {
            for &k in &op.keys {
                written[k] = true;
            }
        }
        let mut order: Vec<usize> = (0..n).filter(|&k| st.keys.read[k] && !written[k]).collect();
        let nread = order.len();
        order.extend((0..n).filter(|&k| written[k]));
        let mut triple = vec![0usize; n];
        for (pos, &k) in order.iter().enumerate() {
            triple[k] = pos + 1;
        }
        let data: Vec<&[u8]> = order.iter().map(|&k| st.keys.names[k].as_slice()).collect();
        // The record shares the keys' hash tag when they all have the same one.
        let mut tags = data.iter().map(|k| hash_tag(k));
        let first = tags.next().flatten();
        let tag = match first {
            Some(t) if tags.all(|x| x == Some(t)) => t,
            _ => b"",
        };
        (
            Layout::new(&self.store, tag, &self.txid, &data, nread, with_record),
            triple,
        )
    }

    /// Appends the write-set as ARGV: per write `name nkeys triples... nargs args...`.
    fn write_set_len(st: &TxnState) -> usize {
        st.ops
            .iter()
            .map(|op| 3 + op.keys.len() + op.args.len())
            .sum()
    }

    fn append_write_set(buf: &mut Vec<u8>, st: &TxnState, triple: &[usize]) {
        for op in &st.ops {
            conn::arg(buf, op.name.as_bytes());
            conn::arg(buf, op.keys.len().to_string().as_bytes());
            for &k in &op.keys {
                conn::arg(buf, triple[k].to_string().as_bytes());
            }
            conn::arg(buf, op.args.len().to_string().as_bytes());
            for a in &op.args {
                conn::arg(buf, a);
            }
        }
    }

    /// Maps a refusal of tm_prepare / tm_commit to an error.
    fn refusal(
        &self,
        st: &TxnState,
        layout: &Layout,
        phase: Phase,
        function: &str,
        e: ServerError,
    ) -> Error {
        let detail = e.details().unwrap_or("").to_owned();
        match e.code() {
            "TXCONFLICT" => {
                let mut parts = detail.splitn(3, ' ');
                let j: usize = parts.next().and_then(|j| j.parse().ok()).unwrap_or(0);
                let kind = parts.next().unwrap_or("?");
                let holder = parts.next().unwrap_or("?");
                let key = layout
                    .data()
                    .nth(j.wrapping_sub(1))
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                let what = if kind == "read" { "read" } else { "written" };
                Error::Conflict {
                    server: self.server().to_owned(),
                    phase,
                    detail: format!("key {key:?} is {what} by prepared transaction {holder}"),
                }
            }
            "TXINVALID" => {
                let (n, msg) = detail.split_once(' ').unwrap_or(("0", &detail));
                let op: usize = n.parse().unwrap_or(0);
                Error::Invalid {
                    server: self.server().to_owned(),
                    phase,
                    op,
                    command: st
                        .ops
                        .get(op.wrapping_sub(1))
                        .map(Op::command)
                        .unwrap_or_default(),
                    detail: msg.to_owned(),
                }
            }
            "TXLOCKTYPE" => {
                let mut parts = detail.splitn(3, ' ');
                let j: usize = parts.next().and_then(|j| j.parse().ok()).unwrap_or(0);
                let which = if parts.next() == Some("read") { 2 } else { 1 };
                let found = parts.next().unwrap_or("?").to_owned();
                let key = layout
                    .lock_key(j, which)
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                Error::LockKeyType {
                    server: self.server().to_owned(),
                    phase,
                    key,
                    found,
                }
            }
            "TXABORTED" => Error::Aborted {
                server: self.server().to_owned(),
                txid: self.id.clone(),
            },
            _ if is_function_missing(&e) => {
                if let Err(err) = self.store.load_functions(phase) {
                    warn!(server = %self.server(), error = %err, "loading tm functions again failed");
                }
                Error::FunctionMissing {
                    server: self.server().to_owned(),
                    phase,
                    function: function.to_owned(),
                }
            }
            _ => self.store.command_error(phase, function, e.into()),
        }
    }

    /// Sends a vote-like call (tm_prepare or tm_commit): inside MULTI/EXEC on
    /// the watching connection when the transaction read anything, alone
    /// otherwise. `Ok(reply)` is the function's reply; a changed watched key
    /// is a conflict. Alone, a missing function ran nothing and used up no
    /// WATCH: the library is loaded again and the call resent once. In the
    /// `Err`, `true` means the outcome is unknown (sent, no reply).
    fn send_checked(
        &self,
        st: &mut TxnState,
        packed_fcall: &[u8],
        function: &str,
        phase: Phase,
    ) -> Sent {
        if !st.watching {
            let reply = self.send_once(st, packed_fcall, 1, function, phase)?.pop();
            return match reply {
                Some(Value::ServerError(e)) if is_function_missing(&e) => {
                    self.store.load_functions(phase).map_err(|e| (e, false))?;
                    let reply = self.send_once(st, packed_fcall, 1, function, phase)?.pop();
                    Ok(reply.unwrap_or(Value::Nil))
                }
                other => Ok(other.unwrap_or(Value::Nil)),
            };
        }
        let mut buf = Vec::with_capacity(packed_fcall.len() + 32);
        conn::command(&mut buf, &[b"MULTI"]);
        buf.extend_from_slice(packed_fcall);
        conn::command(&mut buf, &[b"EXEC"]);
        st.watching = false;
        let mut replies = self.send_once(st, &buf, 3, function, phase)?.into_iter();
        let _multi = replies.next();
        let queued = replies.next();
        match replies.next() {
            Some(Value::Nil) => Err((
                Error::Conflict {
                    server: self.server().to_owned(),
                    phase,
                    detail: "a key this transaction read was changed by another client".to_owned(),
                },
                false,
            )),
            Some(Value::Array(mut items)) if items.len() == 1 => Ok(items.remove(0)),
            // EXECABORT: the queued call itself was refused.
            Some(Value::ServerError(e)) => Ok(match queued {
                Some(Value::ServerError(q)) => Value::ServerError(q),
                _ => Value::ServerError(e),
            }),
            other => Err((
                self.store
                    .unexpected(phase, "EXEC", &other.unwrap_or(Value::Nil)),
                false,
            )),
        }
    }

    /// One request (`count` commands) on the transaction's connection (or a
    /// pooled one), which then goes back to the pool.
    fn send_once(
        &self,
        st: &mut TxnState,
        buf: &[u8],
        count: usize,
        function: &str,
        phase: Phase,
    ) -> std::result::Result<Vec<Value>, Unsent> {
        let mut conn = match st.conn.take() {
            Some(c) => c,
            None => self.store.connection(phase).map_err(|e| (e, false))?,
        };
        let replies = match conn.request(buf, count) {
            Ok(r) => r,
            // Sent, but the outcome is unknown.
            Err(source) => return Err((self.store.command_error(phase, function, source), true)),
        };
        self.store.release(conn);
        Ok(replies)
    }

    /// The vote (`tm_prepare`, with a record) or the one-phase commit
    /// (`tm_commit`): one call with the layout's KEYS and ARGV `txid nread
    /// [key list] write-set...`. `Ok(None)`: nothing read or written, so
    /// nothing to send.
    fn call_write_set(
        &self,
        st: &mut TxnState,
        phase: Phase,
        log: Option<LogId>,
    ) -> Result<Option<(Layout, Sent)>> {
        if st.stage != Stage::Active {
            return Err(Self::closed());
        }
        if st.watches_lost {
            return Err(self.lost_watches(phase));
        }
        let prepare = phase == Phase::TpcVote;
        let (layout, triple) = self.layout(st, prepare);
        // Nothing read and nothing written. (A queued command listing no
        // keys is still a write: it must not be dropped.)
        if layout.data().len() == 0 && st.ops.is_empty() {
            return Ok(None);
        }
        let function = if prepare { "tm_prepare" } else { "tm_commit" };
        let nread = layout.nread.to_string();
        let blob = prepare.then(|| encode_keys(layout.nread, layout.data()));
        let mut buf = Vec::new();
        fcall_head(
            &mut buf,
            function,
            &layout.keys,
            2 + 2 * usize::from(prepare) + Self::write_set_len(st),
        );
        conn::arg(&mut buf, self.id.as_bytes());
        conn::arg(&mut buf, nread.as_bytes());
        if let Some(blob) = &blob {
            conn::arg(&mut buf, blob);
            // The owner: recovery resolves only its own log's records.
            let log = log.map(|l| l.to_string()).unwrap_or_default();
            conn::arg(&mut buf, log.as_bytes());
        }
        Self::append_write_set(&mut buf, st, &triple);
        let reply = self.send_checked(st, &buf, function, phase);
        Ok(Some((layout, reply)))
    }

    fn end(&self, st: &mut TxnState) {
        st.stage = Stage::Ended;
        st.ops.clear();
        st.layout = None;
        if let Some(mut conn) = st.conn.take() {
            if st.watching {
                conn.stale_watches = true;
            }
            self.store.release(conn);
        }
        st.watching = false;
        self.store.open.lock().remove(&self.txid);
    }

    fn lost_watches(&self, phase: Phase) -> Error {
        Error::Conflict {
            server: self.server().to_owned(),
            phase,
            detail:
                "the connection holding this transaction's WATCHes broke; its reads are unprotected"
                    .to_owned(),
        }
    }

    fn do_vote(&self, st: &mut TxnState, log: Option<LogId>) -> Result<()> {
        let sent = self.call_write_set(st, Phase::TpcVote, log);
        let (layout, reply) = match sent {
            Ok(Some(sent)) => sent,
            Ok(None) => {
                st.stage = Stage::Prepared;
                return Ok(());
            }
            Err(err) => {
                if st.stage == Stage::Active {
                    st.stage = Stage::Refused;
                }
                return Err(err);
            }
        };
        let (stage, result) = match reply {
            Ok(Value::Int(1)) => (Stage::Prepared, Ok(())),
            Ok(Value::ServerError(e)) => (
                Stage::Refused,
                Err(self.refusal(st, &layout, Phase::TpcVote, "tm_prepare", e)),
            ),
            Ok(other) => (
                Stage::VoteUnknown,
                Err(self.store.unexpected(Phase::TpcVote, "tm_prepare", &other)),
            ),
            Err((err, true)) => (Stage::VoteUnknown, Err(err)),
            Err((err, false)) => (Stage::Refused, Err(err)),
        };
        st.stage = stage;
        if stage != Stage::Refused {
            st.layout = Some(layout);
        }
        result
    }

    fn do_commit_one_phase(&self, st: &mut TxnState) -> Result<()> {
        let Some((layout, reply)) = self.call_write_set(st, Phase::CommitOnePhase, None)? else {
            return Ok(());
        };
        match reply.map_err(|(e, _)| e)? {
            Value::Array(failures) if failures.is_empty() => Ok(()),
            Value::Array(failures) => Err(Error::PartialApply {
                server: self.server().to_owned(),
                phase: Phase::CommitOnePhase,
                txid: self.id.clone(),
                failures: failures.iter().map(lossy).collect(),
            }),
            Value::ServerError(e) => {
                Err(self.refusal(st, &layout, Phase::CommitOnePhase, "tm_commit", e))
            }
            other => Err(self
                .store
                .unexpected(Phase::CommitOnePhase, "tm_commit", &other)),
        }
    }

    fn do_abort(&self, st: &mut TxnState, phase: Phase) -> Result<()> {
        let result = match (st.stage, &st.layout) {
            (Stage::Prepared | Stage::VoteUnknown, Some(layout)) => {
                abort(&self.store, layout, &self.id, phase)
            }
            _ => Ok(()),
        };
        match result {
            Ok(()) => {
                self.end(st);
                Ok(())
            }
            Err(err) => {
                // Still prepared (or maybe prepared) on the server: recovery
                // aborts it (presumed abort). Forget it here.
                warn!(server = %self.server(), txid = %self.id, error = %err, "abort on the server failed; the prepare stays until recovery");
                self.end(st);
                Err(err)
            }
        }
    }
}

/// The most arguments (the command's name included) a queued command may
/// have: Lua 5.1 in Redis cannot unpack more than about 8000 values into one
/// `redis.call`.
const MAX_QUEUED_ARGS: usize = 7000;

/// Whether `key` is one tm itself stores: `<prefix>{<tag>}:<kind>:...` with
/// `kind` one of `lock`, `rlock`, `prepared`, `aborted`, `applied`.
fn is_tm_key(prefix: &[u8], key: &[u8]) -> bool {
    let Some(rest) = key.strip_prefix(prefix) else {
        return false;
    };
    let Some(rest) = rest.strip_prefix(b"{") else {
        return false;
    };
    let Some(close) = rest.iter().position(|&b| b == b'}') else {
        return false;
    };
    let rest = &rest[close + 1..];
    [
        &b":lock:"[..],
        b":rlock:",
        b":prepared:",
        b":aborted:",
        b":applied:",
        b":store-id",
    ]
    .iter()
    .any(|kind| rest.starts_with(kind))
}

/// Parses like Redis's `string2ll` (no `+`, no leading zeros, no spaces).
fn parse_redis_int(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
        || s == "-0"
    {
        return None;
    }
    s.parse().ok()
}

impl DataManager for RedisTxn {
    fn sort_key(&self) -> &str {
        &self.store.server
    }

    fn abort(&self, _txn: &Transaction) -> tm_core::Result<()> {
        let mut st = self.state.lock();
        Ok(self.do_abort(&mut st, Phase::Abort)?)
    }

    fn tpc_begin(&self, _txn: &Transaction) -> tm_core::Result<()> {
        match self.state.lock().stage {
            Stage::Active => Ok(()),
            _ => Err(tm_core::Error::Closed),
        }
    }

    fn commit(&self, _txn: &Transaction) -> tm_core::Result<()> {
        Ok(())
    }

    fn tpc_vote(&self, txn: &Transaction) -> tm_core::Result<()> {
        let mut st = self.state.lock();
        Ok(self.do_vote(&mut st, txn.log_id())?)
    }

    fn tpc_finish(&self, _txn: &Transaction) -> tm_core::Result<()> {
        let mut st = self.state.lock();
        if st.stage != Stage::Prepared {
            return Err(Error::UnexpectedReply {
                server: self.server().to_owned(),
                phase: Phase::TpcFinish,
                command: "tpc_finish".to_owned(),
                reply: format!(
                    "called in stage {:?}, not after a successful vote",
                    st.stage
                ),
            }
            .into());
        }
        if let Some(layout) = &st.layout {
            match apply(&self.store, layout, &self.txid, Phase::TpcFinish) {
                Ok(()) => {}
                // Gone for good (aborted or lost): nothing left to finish.
                Err(Error::Transaction(err @ tm_core::Error::RecordMissing { .. })) => {
                    self.end(&mut st);
                    return Err(err);
                }
                // Still prepared: in doubt until recovery.
                Err(err) => return Err(err.into()),
            }
        }
        self.end(&mut st);
        Ok(())
    }

    fn tpc_abort(&self, _txn: &Transaction) -> tm_core::Result<()> {
        let mut st = self.state.lock();
        Ok(self.do_abort(&mut st, Phase::TpcAbort)?)
    }

    fn commit_one_phase(&self, _txn: &Transaction) -> tm_core::Result<()> {
        let mut st = self.state.lock();
        let result = self.do_commit_one_phase(&mut st);
        // Success or failure, this was the ending: nothing is left behind
        // (a refused call wrote nothing).
        self.end(&mut st);
        Ok(result?)
    }

    fn savepoint(&self, _txn: &Transaction) -> tm_core::Result<Box<dyn ResourceSavepoint>> {
        let st = self.state.lock();
        if st.stage != Stage::Active {
            return Err(tm_core::Error::InvalidSavepoint);
        }
        Ok(Box::new(RedisSavepoint {
            res: self.me.clone(),
            len: st.ops.len(),
        }))
    }

    fn should_retry(&self, err: &(dyn std::error::Error + 'static)) -> bool {
        err.downcast_ref::<Error>().is_some_and(Error::is_retryable)
    }

    fn recovery_id(&self) -> Option<String> {
        Some(tm_core::Recoverable::resource_id(&Store {
            inner: self.store.clone(),
        }))
    }

    /// Always (a durable prepare), without building the id `recovery_id`
    /// would allocate: the set-up check asks it on every commit.
    fn prepares_durably(&self) -> bool {
        true
    }
}

struct RedisSavepoint {
    res: Weak<RedisTxn>,
    len: usize,
}

impl ResourceSavepoint for RedisSavepoint {
    fn rollback(&self) -> tm_core::Result<()> {
        let Some(res) = self.res.upgrade() else {
            return Err(tm_core::Error::InvalidSavepoint);
        };
        let mut st = res.state.lock();
        if st.stage != Stage::Active || st.ops.len() < self.len {
            return Err(tm_core::Error::InvalidSavepoint);
        }
        st.ops.truncate(self.len);
        Ok(())
    }
}

/// The longest expiry [`RedisHandle::set_ex`] and [`RedisHandle::expire`]
/// accept: 2^62 ms (about 146 million years). Redis refuses an expiry whose
/// deadline (now + ttl, in ms) leaves the signed 64-bit range, with an error
/// that would only show when the write-set is applied, after the vote; so a
/// longer one is refused when it is staged.
pub const MAX_TTL: Duration = Duration::from_millis(1 << 62);

fn check_ttl(what: &str, ttl: Duration) -> Result<()> {
    if ttl > MAX_TTL {
        return Err(Error::InvalidArgument(format!(
            "{what}: an expiry of {} ms is beyond the {} ms Redis can take",
            ttl.as_millis(),
            MAX_TTL.as_millis()
        )));
    }
    Ok(())
}

fn one_arg<V: ToSingleRedisArg>(value: V) -> Vec<u8> {
    value.to_redis_args().pop().unwrap_or_default()
}

/// A transaction's view of a [`Store`], from [`Store::join`].
///
/// Reads go to the server on the transaction's own connection, each with a
/// `WATCH` of its keys pipelined before it (one round trip); the vote fails
/// with a conflict if any of them changed. Writes are buffered and sent at
/// the vote (two-phase commit) or the one-phase commit. The string reads
/// (`get`, `mget`, `exists`) see this transaction's own buffered writes;
/// the other reads of a key it has written are refused
/// ([`Error::ReadAfterWrite`]) rather than answered with a stale value.
///
/// ```
/// use tm_core::TransactionManager;
/// use tm_redis::{testing::TestServer, Store};
///
/// let server = TestServer::start();
/// let store = Store::open(&server.url())?;
/// let tm = TransactionManager::explicit();
/// let txn = tm.begin()?;
/// let r = store.join(&txn)?;
/// r.set("greeting", "hello")?;
/// r.incr_by("count", 2)?;
/// assert_eq!(r.get::<String>("greeting")?.as_deref(), Some("hello")); // own write
/// assert_eq!(r.get::<i64>("count")?, Some(2));
/// r.hset("user:1", "name", "ada")?;
/// assert!(r.hget::<String>("user:1", "name").is_err()); // not well defined
/// tm.commit()?;
/// assert_eq!(store.get::<String>("greeting")?.as_deref(), Some("hello"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct RedisHandle {
    res: Arc<RedisTxn>,
}

impl fmt::Debug for RedisHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisHandle")
            .field("server", &self.res.store.server)
            .field("txid", &self.res.txid)
            .finish()
    }
}

fn convert<V: FromRedisValue>(store: &StoreInner, command: &str, v: Value) -> Result<V> {
    redis::from_redis_value(v).map_err(|e| store.command_error(Phase::Work, command, e.into()))
}

impl RedisHandle {
    /// The transaction this handle belongs to.
    pub fn txid(&self) -> TxId {
        self.res.txid
    }

    /// The data manager joined to the transaction, for driving the protocol
    /// by hand (tests, custom managers).
    pub fn data_manager(&self) -> Arc<dyn DataManager> {
        self.res.clone()
    }

    // ---- reads ----

    /// `GET`, seeing this transaction's own writes.
    pub fn get<V: FromRedisValue>(&self, key: impl AsRef<[u8]>) -> Result<Option<V>> {
        let v = self.res.string_values("GET", &[key.as_ref()])?.remove(0);
        v.map(|b| convert(&self.res.store, "GET", Value::BulkString(b)))
            .transpose()
    }

    /// `MGET`, seeing this transaction's own writes.
    pub fn mget<V: FromRedisValue, K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<Vec<Option<V>>> {
        let keys: Vec<&[u8]> = keys.iter().map(|k| k.as_ref()).collect();
        self.res
            .string_values("MGET", &keys)?
            .into_iter()
            .map(|v| {
                v.map(|b| convert(&self.res.store, "MGET", Value::BulkString(b)))
                    .transpose()
            })
            .collect()
    }

    /// `EXISTS` of one key, seeing this transaction's own writes.
    pub fn exists(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let key = key.as_ref();
        let mut st = self.res.state.lock();
        let k = st.keys.intern(key);
        match RedisTxn::local(&st, k, None) {
            Local::Exists => Ok(true),
            Local::Value(v) => Ok(v.is_some()),
            Local::Unsupported => Err(self.res.read_after_write("EXISTS", key)),
            Local::BadIncr(op, why) => Err(self.res.bad_incr(op, why)),
            Local::Untouched => {
                let mut buf = Vec::new();
                conn::command(&mut buf, &[b"EXISTS", key]);
                let v = self.res.server_read(&mut st, "EXISTS", &[k], &buf)?;
                convert(&self.res.store, "EXISTS", v)
            }
            Local::NeedBase => {
                // Whether the key exists on the server, then what the
                // buffered writes make of that (the type does not
                // matter: a string read would miss a hash or a set).
                let mut buf = Vec::new();
                conn::command(&mut buf, &[b"EXISTS", key]);
                let v = self.res.server_read(&mut st, "EXISTS", &[k], &buf)?;
                let mut exists: bool = convert(&self.res.store, "EXISTS", v)?;
                for op in st.ops.iter().filter(|op| op.keys.contains(&k)) {
                    exists = match op.name {
                        "SET" | "INCRBY" | "HSET" | "SADD" | "LPUSH" | "RPUSH" | "ZADD" => true,
                        "DEL" => false,
                        "PEXPIRE" => {
                            let ms: i64 = std::str::from_utf8(&op.args[0])
                                .ok()
                                .and_then(|s| s.parse().ok())
                                .unwrap_or(1);
                            exists && ms > 0
                        }
                        _ => return Err(self.res.read_after_write("EXISTS", key)),
                    };
                }
                Ok(exists)
            }
        }
    }

    /// `HGET`.
    pub fn hget<V: FromRedisValue>(
        &self,
        key: impl AsRef<[u8]>,
        field: impl AsRef<[u8]>,
    ) -> Result<Option<V>> {
        match self
            .res
            .plain_read("HGET", key.as_ref(), &[field.as_ref()])?
        {
            Value::Nil => Ok(None),
            v => convert(&self.res.store, "HGET", v).map(Some),
        }
    }

    /// `HGETALL` (e.g. into a `HashMap<String, String>`).
    pub fn hgetall<V: FromRedisValue>(&self, key: impl AsRef<[u8]>) -> Result<V> {
        let v = self.res.plain_read("HGETALL", key.as_ref(), &[])?;
        convert(&self.res.store, "HGETALL", v)
    }

    /// `SMEMBERS` (e.g. into a `HashSet<String>`).
    pub fn smembers<V: FromRedisValue>(&self, key: impl AsRef<[u8]>) -> Result<V> {
        let v = self.res.plain_read("SMEMBERS", key.as_ref(), &[])?;
        convert(&self.res.store, "SMEMBERS", v)
    }

    /// `SCARD`.
    pub fn scard(&self, key: impl AsRef<[u8]>) -> Result<usize> {
        let v = self.res.plain_read("SCARD", key.as_ref(), &[])?;
        convert(&self.res.store, "SCARD", v)
    }

    /// `LRANGE key start stop` (e.g. into a `Vec<String>`).
    pub fn lrange<V: FromRedisValue>(
        &self,
        key: impl AsRef<[u8]>,
        start: isize,
        stop: isize,
    ) -> Result<V> {
        let (a, b) = (start.to_string(), stop.to_string());
        let v = self
            .res
            .plain_read("LRANGE", key.as_ref(), &[a.as_bytes(), b.as_bytes()])?;
        convert(&self.res.store, "LRANGE", v)
    }

    /// `LLEN`.
    pub fn llen(&self, key: impl AsRef<[u8]>) -> Result<usize> {
        let v = self.res.plain_read("LLEN", key.as_ref(), &[])?;
        convert(&self.res.store, "LLEN", v)
    }

    /// `ZSCORE`.
    pub fn zscore(&self, key: impl AsRef<[u8]>, member: impl AsRef<[u8]>) -> Result<Option<f64>> {
        match self
            .res
            .plain_read("ZSCORE", key.as_ref(), &[member.as_ref()])?
        {
            Value::Nil => Ok(None),
            v => convert(&self.res.store, "ZSCORE", v).map(Some),
        }
    }

    /// `TTL` in seconds (`-1`: no expiry, `-2`: no such key).
    pub fn ttl(&self, key: impl AsRef<[u8]>) -> Result<i64> {
        let v = self.res.plain_read("TTL", key.as_ref(), &[])?;
        convert(&self.res.store, "TTL", v)
    }

    // ---- buffered writes ----

    /// Buffers `SET key value`.
    pub fn set<V: ToSingleRedisArg>(&self, key: impl AsRef<[u8]>, value: V) -> Result<()> {
        self.res.stage("SET", key.as_ref(), vec![one_arg(value)])
    }

    /// Buffers `SET key value PX ttl` (a zero `ttl`, or one beyond
    /// [`MAX_TTL`], is refused).
    pub fn set_ex<V: ToSingleRedisArg>(
        &self,
        key: impl AsRef<[u8]>,
        value: V,
        ttl: Duration,
    ) -> Result<()> {
        let ms = ttl.as_millis();
        if ms == 0 {
            return Err(Error::InvalidArgument(
                "set_ex: the expiry must be at least 1 ms".to_owned(),
            ));
        }
        check_ttl("set_ex", ttl)?;
        self.res.stage(
            "SET",
            key.as_ref(),
            vec![one_arg(value), b"PX".to_vec(), ms.to_string().into_bytes()],
        )
    }

    /// Buffers `DEL key`.
    pub fn del(&self, key: impl AsRef<[u8]>) -> Result<()> {
        self.res.stage("DEL", key.as_ref(), Vec::new())
    }

    /// Buffers `INCRBY key by`; the vote checks the type and the 64-bit range.
    pub fn incr_by(&self, key: impl AsRef<[u8]>, by: i64) -> Result<()> {
        self.res
            .stage("INCRBY", key.as_ref(), vec![by.to_string().into_bytes()])
    }

    /// Buffers `HSET key field value`.
    pub fn hset<V: ToSingleRedisArg>(
        &self,
        key: impl AsRef<[u8]>,
        field: impl AsRef<[u8]>,
        value: V,
    ) -> Result<()> {
        self.res.stage(
            "HSET",
            key.as_ref(),
            vec![field.as_ref().to_vec(), one_arg(value)],
        )
    }

    /// Buffers `HDEL key field`.
    pub fn hdel(&self, key: impl AsRef<[u8]>, field: impl AsRef<[u8]>) -> Result<()> {
        self.res
            .stage("HDEL", key.as_ref(), vec![field.as_ref().to_vec()])
    }

    /// Buffers `SADD key member`.
    pub fn sadd<V: ToSingleRedisArg>(&self, key: impl AsRef<[u8]>, member: V) -> Result<()> {
        self.res.stage("SADD", key.as_ref(), vec![one_arg(member)])
    }

    /// Buffers `SREM key member`.
    pub fn srem<V: ToSingleRedisArg>(&self, key: impl AsRef<[u8]>, member: V) -> Result<()> {
        self.res.stage("SREM", key.as_ref(), vec![one_arg(member)])
    }

    /// Buffers `LPUSH key value`.
    pub fn lpush<V: ToSingleRedisArg>(&self, key: impl AsRef<[u8]>, value: V) -> Result<()> {
        self.res.stage("LPUSH", key.as_ref(), vec![one_arg(value)])
    }

    /// Buffers `RPUSH key value`.
    pub fn rpush<V: ToSingleRedisArg>(&self, key: impl AsRef<[u8]>, value: V) -> Result<()> {
        self.res.stage("RPUSH", key.as_ref(), vec![one_arg(value)])
    }

    /// Buffers `ZADD key score member` (a NaN score is refused).
    pub fn zadd<V: ToSingleRedisArg>(
        &self,
        key: impl AsRef<[u8]>,
        member: V,
        score: f64,
    ) -> Result<()> {
        if score.is_nan() {
            return Err(Error::InvalidArgument("zadd: the score is NaN".to_owned()));
        }
        self.res.stage(
            "ZADD",
            key.as_ref(),
            vec![score.to_string().into_bytes(), one_arg(member)],
        )
    }

    /// Buffers `ZREM key member`.
    pub fn zrem<V: ToSingleRedisArg>(&self, key: impl AsRef<[u8]>, member: V) -> Result<()> {
        self.res.stage("ZREM", key.as_ref(), vec![one_arg(member)])
    }

    /// Buffers an expiry (`PEXPIRE key ms`; below 1 ms it is `PEXPIRE key 0`,
    /// which deletes the key). A `ttl` beyond [`MAX_TTL`] is refused.
    pub fn expire(&self, key: impl AsRef<[u8]>, ttl: Duration) -> Result<()> {
        check_ttl("expire", ttl)?;
        self.res.stage(
            "PEXPIRE",
            key.as_ref(),
            vec![ttl.as_millis().to_string().into_bytes()],
        )
    }

    /// Buffers any other write command, e.g. `redis::cmd("SETRANGE").arg("k").arg(0).arg("x")`.
    /// `keys` must list every key it touches: they are locked at the vote
    /// like the keys of the other writes.
    ///
    /// Limit: such a command is not simulated at the vote. If it fails when
    /// the write-set is applied, the other writes stay applied and the
    /// finish reports [`Error::PartialApply`] (tm reports the transaction as
    /// `Heuristic`). A command of more than 7000 arguments is refused here
    /// ([`Error::InvalidArgument`]): Redis's Lua could not pass it on.
    pub fn queue<K: AsRef<[u8]>>(&self, cmd: &redis::Cmd, keys: &[K]) -> Result<()> {
        let mut args = Vec::new();
        for a in cmd.args_iter() {
            match a {
                redis::Arg::Simple(bytes) => args.push(bytes.to_vec()),
                _ => {
                    return Err(Error::InvalidArgument(
                        "queue: a cursor argument is not a write".to_owned(),
                    ))
                }
            }
        }
        if args.is_empty() {
            return Err(Error::InvalidArgument("queue: an empty command".to_owned()));
        }
        if args.len() > MAX_QUEUED_ARGS {
            // Lua cannot pass more to redis.call: it would fail at apply,
            // after the decision.
            return Err(Error::InvalidArgument(format!(
                "queue: a command of {} arguments; tm's Redis functions can pass at most {MAX_QUEUED_ARGS}: split it",
                args.len()
            )));
        }
        for k in keys {
            self.res.check_user_key(k.as_ref())?;
        }
        let mut st = self.res.state.lock();
        if st.stage != Stage::Active {
            return Err(RedisTxn::closed());
        }
        let keys: Vec<usize> = keys.iter().map(|k| st.keys.intern(k.as_ref())).collect();
        st.ops.push(Op {
            name: "*",
            keys,
            args,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tag_follows_redis_cluster_rules() {
        assert_eq!(hash_tag(b"{u1}:a"), Some(&b"u1"[..]));
        assert_eq!(hash_tag(b"a{u1}b{u2}"), Some(&b"u1"[..]));
        assert_eq!(hash_tag(b"{}:a"), None);
        assert_eq!(hash_tag(b"a}{"), None);
        assert_eq!(hash_tag(b"plain"), None);
    }

    #[test]
    fn tm_keys_are_recognised_by_prefix_tag_and_kind() {
        assert!(is_tm_key(b"tm:", b"tm:{}:lock:x"));
        assert!(is_tm_key(b"tm:", b"tm:{u1}:rlock:{u1}:a"));
        assert!(is_tm_key(b"tm:", b"tm:{}:prepared:123"));
        assert!(is_tm_key(b"tm:", b"tm:{t}:aborted:123"));
        assert!(!is_tm_key(b"tm:", b"tm:users"));
        assert!(!is_tm_key(b"tm:", b"tm:{u1}:counter"));
        assert!(!is_tm_key(b"tm:", b"app:{}:lock:x"));
        assert!(!is_tm_key(b"app:", b"tm:{}:lock:x"));
    }

    #[test]
    fn key_list_round_trips_and_refuses_garbage() {
        let keys = vec![b"".to_vec(), (0..=255).collect(), b"k".to_vec()];
        let blob = encode_keys(1, keys.iter().map(Vec::as_slice));
        assert_eq!(decode_keys(&blob), Some((1, keys)));
        assert_eq!(decode_keys(&blob[..blob.len() - 1]), None);
        assert_eq!(decode_keys(b"junk"), None);
        assert_eq!(decode_keys(&encode_keys(3, [&b"a"[..]].into_iter())), None);
    }

    #[test]
    fn integers_parse_like_redis() {
        assert_eq!(parse_redis_int("0"), Some(0));
        assert_eq!(parse_redis_int("-9223372036854775808"), Some(i64::MIN));
        for bad in [
            "",
            "-",
            "-0",
            "+1",
            "01",
            " 1",
            "1 ",
            "9223372036854775808",
            "1e3",
        ] {
            assert_eq!(parse_redis_int(bad), None, "{bad:?}");
        }
    }
}
