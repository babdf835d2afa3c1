//! `Store`: one Redis server (and db) as a tm resource.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::{IntoConnectionInfo, Value};
use tm_core::{InDoubt, Missing, Phase, Recoverable, Transaction, TxId, TxIdMap};
use tracing::{debug, warn};

use crate::conn::{self, Conn};
use crate::error::{Error, Result};
use crate::options::{Durability, Options};
use crate::txn::{self, RedisHandle, RedisTxn};

/// The server-side code, loaded with `FUNCTION LOAD REPLACE` at open.
pub(crate) const LIBRARY: &str = include_str!("lua/tm.lua");

/// A Redis server (one db) as a transactional resource.
///
/// `Clone` (a cheap handle on the same pool), `Send + Sync`. Opening
/// connects, loads tm's Redis functions and checks the server's durability
/// settings ([`Store::durability`]).
///
/// ```
/// use tm_core::TransactionManager;
/// use tm_redis::{testing::TestServer, Store};
///
/// let server = TestServer::start();
/// let store = Store::open(&server.url())?;
/// let tm = TransactionManager::explicit();
/// tm.run(|txn| {
///     let r = store.join(txn)?;
///     let n: i64 = r.get("visits")?.unwrap_or(0);
///     r.set("visits", n + 1)?;
///     Ok::<_, tm_core::Error>(())
/// })?;
/// assert_eq!(store.get::<i64>("visits")?, Some(1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<StoreInner>,
}

pub(crate) struct StoreInner {
    client: redis::Client,
    /// The server, as named in errors and as sort key: `redis://host:port/db`.
    pub(crate) server: String,
    resource_id: String,
    pub(crate) prefix: Vec<u8>,
    pub(crate) options: Options,
    durability: Durability,
    idle: Mutex<Vec<Conn>>,
    pub(crate) open: Mutex<TxIdMap<Arc<RedisTxn>>>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("server", &self.inner.server)
            .field("prefix", &String::from_utf8_lossy(&self.inner.prefix))
            .finish()
    }
}

/// Hides a password in a URL given by the user.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

fn server_name(info: &redis::ConnectionInfo) -> String {
    let db = info.redis_settings().db();
    match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => format!("redis://{host}:{port}/{db}"),
        redis::ConnectionAddr::TcpTls { host, port, .. } => format!("rediss://{host}:{port}/{db}"),
        redis::ConnectionAddr::Unix(path) => format!("redis+unix://{}?db={db}", path.display()),
        other => format!("redis://{other:?}/{db}"),
    }
}

impl Store {
    /// Opens the server at `url` (`redis://host:port/db`) with default
    /// [`Options`].
    pub fn open(url: &str) -> Result<Store> {
        Store::open_with(url, Options::default())
    }

    /// Opens the server at `url` with `options`: connects (within
    /// `connect_timeout`), loads tm's functions, reads the durability
    /// settings; fails with [`Error::NotDurable`] if they would lose prepares
    /// and `require_durable_prepare` is set.
    pub fn open_with(url: &str, options: Options) -> Result<Store> {
        check_prefix(&options.prefix)?;
        let info = url
            .into_connection_info()
            .map_err(|e| Error::InvalidArgument(format!("not a redis URL {}: {e}", redact(url))))?;
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        let info = info.set_tcp_settings(tcp);
        let server = server_name(&info);
        let client = redis::Client::open(info).map_err(|source| Error::Connect {
            url: redact(url),
            cause: source,
        })?;
        let prefix = options.prefix.as_bytes().to_vec();
        let mut inner = StoreInner {
            client,
            server,
            resource_id: String::new(),
            prefix,
            options,
            durability: Durability {
                appendonly: None,
                appendfsync: None,
                maxmemory_policy: None,
            },
            idle: Mutex::new(Vec::new()),
            open: Mutex::new(TxIdMap::default()),
        };
        let mut conn = inner.connect().map_err(|err| match err {
            Error::Connect { cause: source, .. } => Error::Connect {
                url: redact(url),
                cause: source,
            },
            other => other,
        })?;
        let mut buf = Vec::new();
        conn::command(
            &mut buf,
            &[b"FUNCTION", b"LOAD", b"REPLACE", LIBRARY.as_bytes()],
        );
        for name in ["appendonly", "appendfsync", "maxmemory-policy"] {
            conn::command(&mut buf, &[b"CONFIG", b"GET", name.as_bytes()]);
        }
        let id_key = inner.tm_key(b"", "store-id", b"");
        let id_key = &id_key[..id_key.len() - 1]; // `<prefix>{}:store-id`
        conn::command(
            &mut buf,
            &[b"SET", id_key, new_store_id().as_bytes(), b"NX"],
        );
        conn::command(&mut buf, &[b"GET", id_key]);
        let replies = conn
            .request(&buf, 6)
            .map_err(|source| inner.command_error(Phase::Open, "FUNCTION LOAD", source))?;
        if let Value::ServerError(e) = &replies[0] {
            return Err(inner.command_error(Phase::Open, "FUNCTION LOAD", e.clone().into()));
        }
        inner.resource_id = match (&replies[4], &replies[5]) {
            (_, Value::BulkString(id)) => format!("redis:{}", String::from_utf8_lossy(id)),
            // A replica (READONLY) whose primary never opened a store.
            (Value::ServerError(e), _) => {
                return Err(inner.command_error(Phase::Open, "SET NX", e.clone().into()))
            }
            (_, other) => return Err(inner.unexpected(Phase::Open, "GET", other)),
        };
        let config = |v: &Value| -> Option<String> {
            match v {
                Value::Array(items) if items.len() == 2 => match &items[1] {
                    Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
                    Value::SimpleString(s) => Some(s.clone()),
                    _ => None,
                },
                Value::Map(items) if items.len() == 1 => match &items[0].1 {
                    Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
                    Value::SimpleString(s) => Some(s.clone()),
                    _ => None,
                },
                _ => None,
            }
        };
        inner.durability = Durability {
            appendonly: config(&replies[1]).map(|v| v == "yes"),
            appendfsync: config(&replies[2]),
            maxmemory_policy: config(&replies[3]),
        };
        if !inner.durability.is_durable() {
            if inner.options.require_durable_prepare {
                return Err(Error::NotDurable {
                    server: inner.server.clone(),
                    durability: inner.durability.clone(),
                });
            }
            warn_once(&inner.server, &inner.durability);
        }
        inner.release(conn);
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    /// Joins this store to `txn` and returns the transaction's handle (the
    /// same transaction state however often it is called).
    pub fn join(&self, txn: &Transaction) -> Result<RedisHandle> {
        txn::join(self, txn)
    }

    /// The durability settings found at open.
    pub fn durability(&self) -> &Durability {
        &self.inner.durability
    }

    /// The server as named in errors and used as sort key:
    /// `redis://host:port/db`.
    pub fn server(&self) -> &str {
        &self.inner.server
    }

    /// The prefix of tm's own keys.
    pub fn prefix(&self) -> &str {
        &self.inner.options.prefix
    }

    /// The underlying client, for work outside transactions.
    pub fn client(&self) -> &redis::Client {
        &self.inner.client
    }

    /// Reads a string key outside any transaction (committed data).
    pub fn get<V: redis::FromRedisValue>(&self, key: impl AsRef<[u8]>) -> Result<Option<V>> {
        let mut buf = Vec::new();
        conn::command(&mut buf, &[b"GET", key.as_ref()]);
        let reply = self
            .inner
            .call_idempotent(Phase::Work, "GET", &buf, 1)?
            .remove(0);
        match reply {
            Value::Nil => Ok(None),
            Value::ServerError(e) => Err(self.inner.command_error(Phase::Work, "GET", e.into())),
            v => redis::from_redis_value(v)
                .map(Some)
                .map_err(|e| self.inner.command_error(Phase::Work, "GET", e.into())),
        }
    }

    /// Loads tm's functions again (`FUNCTION LOAD REPLACE`). Done at open,
    /// and by itself when a call finds them missing.
    pub fn load_functions(&self) -> Result<()> {
        self.inner.load_functions(Phase::Open)
    }
}

/// A new store id: 128 bits, hex. Only its uniqueness matters (the first
/// open of a store on a server keeps it there with `SET NX`), so the std
/// hasher's random keys, the clock and the pid are enough.
fn new_store_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let half = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        h.write_u64(salt);
        h.finish()
    };
    format!("{:016x}{:016x}", half(1), half(2))
}

/// Every tm key is `<prefix>{<tag>}:...`: a brace in the prefix would
/// become (or break) the hash tag of every one of them, and an empty prefix
/// would put tm's keys among the user's.
fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        return Err(Error::InvalidArgument(
            "the prefix \"\" of tm's keys is empty; choose one such as \"tm:\"".to_owned(),
        ));
    }
    if prefix.contains(['{', '}']) {
        return Err(Error::InvalidArgument(format!(
            "the prefix {prefix:?} of tm's keys contains a brace; \
             it would become the hash tag of every tm key"
        )));
    }
    Ok(())
}

fn warn_once(server: &str, durability: &Durability) {
    static WARNED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let first = WARNED
        .get_or_init(|| Mutex::new(HashSet::new()))
        .lock()
        .insert(server.to_owned());
    if first {
        warn!(server, %durability, "redis prepares are not durable on this server");
    }
}

impl StoreInner {
    pub(crate) fn command_error(
        &self,
        phase: Phase,
        command: &str,
        source: redis::RedisError,
    ) -> Error {
        if source.is_io_error() || source.is_connection_dropped() || source.is_timeout() {
            // The server may have restarted: the other idle connections are
            // most likely dead too.
            self.idle.lock().clear();
        }
        Error::Command {
            server: self.server.clone(),
            phase,
            command: command.to_owned(),
            cause: source,
        }
    }

    fn connect(&self) -> Result<Conn> {
        let con = self
            .client
            .get_connection_with_timeout(self.options.connect_timeout)
            .map_err(|source| Error::Connect {
                url: self.server.clone(),
                cause: source,
            })?;
        let timeout = Some(self.options.response_timeout);
        con.set_read_timeout(timeout)
            .and_then(|()| con.set_write_timeout(timeout))
            .map_err(|source| Error::Connect {
                url: self.server.clone(),
                cause: source,
            })?;
        Ok(Conn {
            con,
            stale_watches: false,
            pooled: false,
        })
    }

    /// An idle connection, or a new one ([`reconnect`](Self::reconnect)).
    pub(crate) fn connection(&self, phase: Phase) -> Result<Conn> {
        if let Some(mut c) = self.idle.lock().pop() {
            c.pooled = true;
            return Ok(c);
        }
        self.reconnect(phase)
    }

    /// A new connection, retried with backoff while the server cannot be
    /// reached, until [`Options::reconnect_deadline`]: a restart is ridden
    /// out, a dead server is reported ([`Error::Unavailable`], not
    /// retryable) instead of being retried forever.
    pub(crate) fn reconnect(&self, phase: Phase) -> Result<Conn> {
        let started = Instant::now();
        let deadline = started + self.options.reconnect_deadline;
        let mut pause = Duration::from_millis(20);
        loop {
            let source = match self.connect() {
                Ok(conn) => return Ok(conn),
                Err(Error::Connect { cause: source, .. }) => source,
                Err(other) => return Err(other),
            };
            let now = Instant::now();
            if now + pause >= deadline {
                return Err(Error::Unavailable {
                    server: self.server.clone(),
                    phase,
                    waited: now - started,
                    cause: source,
                });
            }
            debug!(server = %self.server, error = %source, "cannot connect; retrying");
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Returns a healthy connection to the pool (or closes it when full).
    pub(crate) fn release(&self, conn: Conn) {
        let mut idle = self.idle.lock();
        if idle.len() < self.options.pool_size {
            idle.push(conn);
        }
    }

    /// Runs a request that may safely be sent twice (reads, apply, abort):
    /// a pooled connection that turns out dead is replaced once.
    pub(crate) fn call_idempotent(
        &self,
        phase: Phase,
        command: &str,
        packed: &[u8],
        count: usize,
    ) -> Result<Vec<Value>> {
        let mut conn = self.connection(phase)?;
        let first = conn.request(packed, count);
        let replies = match first {
            Ok(r) => r,
            Err(e) if conn.pooled && (e.is_io_error() || e.is_connection_dropped()) => {
                debug!(server = %self.server, error = %e, "idle connection was dead; retrying on a new one");
                self.idle.lock().clear();
                conn = self.reconnect(phase)?;
                conn.request(packed, count)
                    .map_err(|source| self.command_error(phase, command, source))?
            }
            Err(source) => return Err(self.command_error(phase, command, source)),
        };
        self.release(conn);
        Ok(replies)
    }

    pub(crate) fn load_functions(&self, phase: Phase) -> Result<()> {
        let mut buf = Vec::new();
        conn::command(
            &mut buf,
            &[b"FUNCTION", b"LOAD", b"REPLACE", LIBRARY.as_bytes()],
        );
        match self
            .call_idempotent(phase, "FUNCTION LOAD", &buf, 1)?
            .remove(0)
        {
            Value::ServerError(e) => Err(self.command_error(phase, "FUNCTION LOAD", e.into())),
            _ => Ok(()),
        }
    }

    /// `<prefix>{<tag>}:<kind>:<name>`
    pub(crate) fn tm_key(&self, tag: &[u8], kind: &str, name: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + tag.len() + kind.len() + name.len() + 4);
        k.extend_from_slice(&self.prefix);
        k.push(b'{');
        k.extend_from_slice(tag);
        k.extend_from_slice(b"}:");
        k.extend_from_slice(kind.as_bytes());
        k.push(b':');
        k.extend_from_slice(name);
        k
    }

    /// The name part of `key` if it is exactly `<prefix>{<tag>}:<kind>:<name>`
    /// (the tag, like a Redis hash tag, ends at the first `}`), else `None`.
    /// A SCAN glob `<prefix>{*}:<kind>:*` also matches the locks of user
    /// keys shaped like tm keys (`<prefix>{}:lock:x}:prepared:<txid>`), and
    /// user keys such as `<prefix>{x}y}:prepared:<txid>`; this tells them
    /// apart.
    pub(crate) fn tm_key_name<'a>(&self, key: &'a [u8], kind: &str) -> Option<&'a [u8]> {
        let rest = key
            .strip_prefix(self.prefix.as_slice())?
            .strip_prefix(b"{")?;
        let close = rest.iter().position(|&b| b == b'}')?;
        let rest = rest[close + 1..].strip_prefix(b":")?;
        rest.strip_prefix(kind.as_bytes())?.strip_prefix(b":")
    }

    /// Finds the records of `txid` (key and field `k` of each): the untagged
    /// name, and a SCAN over the tagged ones. Usually one; more when two
    /// `Store`s opened separately on the same server and prefix took part in
    /// the transaction with keys of different hash tags.
    fn find_records(&self, txid: &TxId, phase: Phase) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let id = txid.to_string();
        let mut found = Vec::new();
        let plain = self.tm_key(b"", "prepared", id.as_bytes());
        if let Some(blob) = self.record_keys(&plain, phase)? {
            found.push((plain.clone(), blob));
        }
        let mut pattern = glob_escape(&self.prefix);
        pattern.extend_from_slice(b"{*}:prepared:");
        pattern.extend_from_slice(id.as_bytes());
        for name in self.scan(&pattern, phase)? {
            // The glob also matches locks of user keys shaped like a record
            // (`x}:prepared:<txid>`) and such user keys themselves.
            if name == plain || self.tm_key_name(&name, "prepared") != Some(id.as_bytes()) {
                continue;
            }
            if let Some(blob) = self.record_keys(&name, phase)? {
                found.push((name, blob));
            }
        }
        Ok(found)
    }

    /// What is left of `txid` with no record (the receipt and tombstones
    /// may be under any tag): `Ok` for a receipt, else why it is gone.
    fn missing_record(&self, txid: &TxId, phase: Phase) -> Result<()> {
        let id = txid.to_string();
        let trace = |kind: &str| -> Result<bool> {
            let mut pattern = glob_escape(&self.prefix);
            pattern.extend_from_slice(format!("{{*}}:{kind}:{id}").as_bytes());
            Ok(self
                .scan(&pattern, phase)?
                .iter()
                .any(|name| self.tm_key_name(name, kind) == Some(id.as_bytes())))
        };
        if trace("applied")? {
            debug!(server = %self.server, %txid, "no record, and a receipt (applied before)");
            Ok(())
        } else if trace("aborted")? {
            Err(self.record_missing(txid, Missing::Aborted))
        } else {
            Err(self.record_missing(txid, Missing::Lost))
        }
    }

    pub(crate) fn record_missing(&self, txid: &TxId, missing: Missing) -> Error {
        Error::Transaction(tm_core::Error::RecordMissing {
            resource: self.server.clone(),
            txid: *txid,
            missing,
        })
    }

    fn record_keys(&self, record: &[u8], phase: Phase) -> Result<Option<Vec<u8>>> {
        let mut buf = Vec::new();
        conn::command(&mut buf, &[b"HGET", record, b"k"]);
        match self.call_idempotent(phase, "HGET", &buf, 1)?.remove(0) {
            Value::BulkString(b) => Ok(Some(b)),
            Value::Nil => Ok(None),
            Value::ServerError(e) => Err(self.command_error(phase, "HGET", e.into())),
            other => Err(self.unexpected(phase, "HGET", &other)),
        }
    }

    fn scan(&self, pattern: &[u8], phase: Phase) -> Result<Vec<Vec<u8>>> {
        let mut found = Vec::new();
        let mut seen = HashSet::new();
        let mut cursor = b"0".to_vec();
        loop {
            let mut buf = Vec::new();
            conn::command(
                &mut buf,
                &[b"SCAN", &cursor, b"MATCH", pattern, b"COUNT", b"1000"],
            );
            let reply = self.call_idempotent(phase, "SCAN", &buf, 1)?.remove(0);
            let Value::Array(mut parts) = reply else {
                return Err(self.unexpected(phase, "SCAN", &reply));
            };
            if parts.len() != 2 {
                return Err(self.unexpected(phase, "SCAN", &Value::Array(parts)));
            }
            let keys = parts.pop();
            let next = parts.pop();
            if let Some(Value::Array(keys)) = keys {
                for k in keys {
                    if let Value::BulkString(k) = k {
                        if seen.insert(k.clone()) {
                            found.push(k);
                        }
                    }
                }
            }
            match next {
                Some(Value::BulkString(c)) if c == b"0" => return Ok(found),
                Some(Value::BulkString(c)) => cursor = c,
                other => return Err(self.unexpected(phase, "SCAN", &other.unwrap_or(Value::Nil))),
            }
        }
    }

    pub(crate) fn unexpected(&self, phase: Phase, command: &str, reply: &Value) -> Error {
        Error::UnexpectedReply {
            server: self.server.clone(),
            phase,
            command: command.to_owned(),
            reply: format!("{reply:?}"),
        }
    }

    /// The layout of a prepared record's apply or abort.
    fn record_layout(
        &self,
        txid: &TxId,
        id: &str,
        record: &[u8],
        blob: &[u8],
    ) -> Result<txn::Layout> {
        let tag = self.record_tag(record, id).to_vec();
        let (nread, keys) = txn::decode_keys(blob).ok_or_else(|| Error::UnexpectedReply {
            server: self.server.clone(),
            phase: Phase::Recover,
            command: "HGET".to_owned(),
            reply: "a prepared record with a malformed key list".to_owned(),
        })?;
        let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        Ok(txn::Layout::new(self, &tag, txid, &keys, nread, true))
    }

    /// The record key's tag: `<prefix>{<tag>}:prepared:<txid>`.
    fn record_tag<'a>(&self, record: &'a [u8], txid: &str) -> &'a [u8] {
        let start = self.prefix.len() + 1;
        let end = record.len() - b"}:prepared:".len() - txid.len();
        &record[start..end]
    }
}

impl StoreInner {
    fn in_doubt(&self) -> Result<Vec<InDoubt>> {
        let phase = Phase::Recover;
        let mut pattern = glob_escape(&self.prefix);
        pattern.extend_from_slice(b"{*}:prepared:*");
        let names = self.scan(&pattern, phase)?;
        let mut records: Vec<(TxId, &[u8])> = names
            .iter()
            .filter_map(|n| {
                let id = self.tm_key_name(n, "prepared")?;
                let txid = std::str::from_utf8(id).ok()?.parse().ok()?;
                Some((txid, n.as_slice()))
            })
            .collect();
        records.sort();
        let mut buf = Vec::new();
        for (_, name) in &records {
            conn::command(&mut buf, &[b"HMGET", name, b"k", b"l", b"t"]);
        }
        conn::command(&mut buf, &[b"TIME"]);
        let mut replies = self.call_idempotent(phase, "HMGET", &buf, records.len() + 1)?;
        let time = replies.pop().unwrap_or(Value::Nil);
        let now = match &time {
            Value::Array(t) if t.len() == 2 => int_of(&t[0])
                .zip(int_of(&t[1]))
                .map(|(secs, micros)| secs * 1_000_000 + micros),
            Value::ServerError(e) => {
                return Err(self.command_error(phase, "TIME", e.clone().into()))
            }
            _ => None,
        };
        let Some(now) = now else {
            return Err(self.unexpected(phase, "TIME", &time));
        };
        let mut out: Vec<InDoubt> = Vec::with_capacity(records.len());
        for ((txid, name), reply) in records.iter().zip(replies) {
            let fields = match reply {
                Value::Array(f) if f.len() == 3 => f,
                Value::ServerError(e) => return Err(self.command_error(phase, "HMGET", e.into())),
                other => return Err(self.unexpected(phase, "HMGET", &other)),
            };
            if fields[0] == Value::Nil {
                continue; // finished since the SCAN
            }
            let log = match &fields[1] {
                Value::BulkString(b) if b.is_empty() => None,
                Value::BulkString(b) => {
                    match std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()) {
                        Some(log) => Some(log),
                        None => {
                            warn!(server = %self.server, record = %String::from_utf8_lossy(name), "a prepared record names no readable log id; it is listed without an owner");
                            None
                        }
                    }
                }
                _ => None, // prepared before records named their owner
            };
            let age = int_of(&fields[2])
                .map(|at| Duration::from_micros(now.saturating_sub(at)))
                .unwrap_or(Duration::ZERO);
            // Two records of one transaction (two Stores on one server and
            // prefix): listed once, as the older.
            match out.last_mut() {
                Some(last) if last.txid == *txid => last.age = last.age.max(age),
                _ => out.push(InDoubt::new(*txid, log, age)),
            }
        }
        Ok(out)
    }
}

/// A non-negative integer reply given as a string (TIME, a record's `t`).
fn int_of(v: &Value) -> Option<u64> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::Int(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

fn glob_escape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for &b in s {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

impl Recoverable for Store {
    /// `redis:<store id>`: the id kept on the server under
    /// `<prefix>{}:store-id`, made by the first open (`SET NX`). Every URL
    /// of one server, db and prefix gives the same id, and it survives
    /// restarts (it is in the AOF).
    fn resource_id(&self) -> String {
        self.inner.resource_id.clone()
    }

    /// One SCAN of the records, then one request: `HMGET k l t` of each and
    /// one `TIME`, so every age is measured by the server's own clock.
    fn in_doubt(&self) -> tm_core::Result<Vec<InDoubt>> {
        Ok(self.inner.in_doubt()?)
    }

    /// Applies every record of `txid`. With none: `Ok` only if a receipt
    /// shows it was applied before; a tombstone is `RecordMissing`
    /// (aborted), neither is `RecordMissing` (lost).
    fn commit_prepared(&self, txid: &TxId) -> tm_core::Result<()> {
        let records = self.inner.find_records(txid, Phase::Recover)?;
        if records.is_empty() {
            return Ok(self.inner.missing_record(txid, Phase::Recover)?);
        }
        let id = txid.to_string();
        for (record, blob) in records {
            let layout = self.inner.record_layout(txid, &id, &record, &blob)?;
            txn::apply(&self.inner, &layout, txid, Phase::Recover)?;
        }
        Ok(())
    }

    fn abort_prepared(&self, txid: &TxId) -> tm_core::Result<()> {
        let id = txid.to_string();
        let records = self.inner.find_records(txid, Phase::Recover)?;
        if records.is_empty() {
            // No record: still leave a tombstone (under the empty tag, which
            // every prepare also checks), so that a prepare of this
            // transaction still on its way refuses.
            let layout = txn::Layout::new(&self.inner, b"", txid, &[], 0, true);
            txn::abort(&self.inner, &layout, &id, Phase::Recover)?;
        }
        for (record, blob) in records {
            let layout = self.inner.record_layout(txid, &id, &record, &blob)?;
            txn::abort(&self.inner, &layout, &id, Phase::Recover)?;
        }
        Ok(())
    }
}
