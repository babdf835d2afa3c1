//! `Store`: one Redis server (and db) as a tm resource.

use std::any::Any;
use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::{IntoConnectionInfo, Value};
use tm_core::{Missing, Phase, TxId, TxIdMap};
use tracing::{debug, warn};

use crate::conn::{self, Conn};
use crate::error::{Error, Result};
use crate::keys::Keyspace;
use crate::options::{Durability, Options};
use crate::wire;

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
    pub(crate) resource_id: String,
    pub(crate) keys: Keyspace,
    pub(crate) options: Options,
    durability: Durability,
    idle: Mutex<Vec<Conn>>,
    /// The open transactions' data managers (`manager::RedisTxn`), so that
    /// joining twice gives the same one. Typed `Any` so that the store
    /// knows nothing of the data manager.
    pub(crate) open: Mutex<TxIdMap<Arc<dyn Any + Send + Sync>>>,
    /// Records of tm versions before the index were put in it.
    pub(crate) legacy_indexed: AtomicBool,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("server", &self.inner.server)
            .field("prefix", &self.inner.options.prefix)
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
        let keys = Keyspace::new(options.prefix.as_bytes());
        let mut inner = StoreInner {
            client,
            server,
            resource_id: String::new(),
            keys,
            options,
            durability: Durability::unknown(),
            idle: Mutex::new(Vec::new()),
            open: Mutex::new(TxIdMap::default()),
            legacy_indexed: AtomicBool::new(false),
        };
        let mut conn = inner.connect().map_err(|err| match err {
            Error::Connect { cause: source, .. } => Error::Connect {
                url: redact(url),
                cause: source,
            },
            other => other,
        })?;
        let mut buf = Vec::new();
        wire::load_library(&mut buf);
        for name in ["appendonly", "appendfsync", "maxmemory-policy", "maxmemory"] {
            conn::command(&mut buf, &[b"CONFIG", b"GET", name.as_bytes()]);
        }
        let id_key = inner.keys.store_id();
        conn::command(
            &mut buf,
            &[b"SET", &id_key, new_store_id().as_bytes(), b"NX"],
        );
        conn::command(&mut buf, &[b"GET", &id_key]);
        conn::command(&mut buf, &[b"INFO", b"replication"]);
        let mut replies = conn
            .request(&buf, 8)
            .map_err(|source| inner.command_error(Phase::Open, "FUNCTION LOAD", source))?;
        let info = replies.pop().unwrap_or(Value::Nil);
        if let Value::ServerError(e) = &replies[0] {
            return Err(inner.command_error(Phase::Open, "FUNCTION LOAD", e.clone().into()));
        }
        inner.resource_id = match (&replies[5], &replies[6]) {
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
        let replicas = replica_count(&info);
        let waited = match inner.options.wait_replicas {
            Some(n) => n,
            None => replicas.unwrap_or(0),
        };
        inner.durability = Durability {
            appendonly: config(&replies[1]).map(|v| v == "yes"),
            appendfsync: config(&replies[2]),
            maxmemory_policy: config(&replies[3]),
            maxmemory: config(&replies[4]).and_then(|v| v.parse().ok()),
            replicas,
            replicas_waited: waited,
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

/// `connected_slaves:<n>` of `INFO replication`.
fn replica_count(info: &Value) -> Option<usize> {
    let text = match info {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::VerbatimString { text, .. } => text.clone(),
        _ => return None,
    };
    text.lines()
        .find_map(|l| l.trim().strip_prefix("connected_slaves:"))
        .and_then(|n| n.trim().parse().ok())
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

    /// Returns a connection that may still hold a transaction's WATCHes:
    /// its next user sends `UNWATCH` first (pipelined).
    pub(crate) fn release_watched(&self, mut conn: Conn) {
        conn.stale_watches = true;
        self.release(conn);
    }

    /// How many replicas a vote waits for (`WAIT`).
    pub(crate) fn replicas_to_wait(&self) -> usize {
        self.durability.replicas_waited
    }

    /// Appends `WAIT <n> <replica_timeout ms>`.
    pub(crate) fn wait_command(&self, buf: &mut Vec<u8>, n: usize) {
        let timeout = self.options.replica_timeout.as_millis().max(1).to_string();
        conn::command(
            buf,
            &[b"WAIT", n.to_string().as_bytes(), timeout.as_bytes()],
        );
    }

    /// Checks `WAIT`'s reply: at least `wanted` replicas acknowledged.
    pub(crate) fn check_wait(&self, phase: Phase, reply: &Value, wanted: usize) -> Result<()> {
        match reply {
            Value::Int(n) if usize::try_from(*n).is_ok_and(|n| n >= wanted) => Ok(()),
            Value::Int(n) => Err(Error::NotReplicated {
                server: self.server.clone(),
                phase,
                acked: usize::try_from(*n).unwrap_or(0),
                wanted,
                waited: self.options.replica_timeout,
            }),
            Value::ServerError(e) => Err(self.command_error(phase, "WAIT", e.clone().into())),
            other => Err(self.unexpected(phase, "WAIT", other)),
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
        wire::load_library(&mut buf);
        match self
            .call_idempotent(phase, "FUNCTION LOAD", &buf, 1)?
            .remove(0)
        {
            Value::ServerError(e) => Err(self.command_error(phase, "FUNCTION LOAD", e.into())),
            _ => Ok(()),
        }
    }

    pub(crate) fn record_missing(&self, txid: &TxId, missing: Missing) -> Error {
        Error::Transaction(tm_core::Error::RecordMissing {
            resource: self.server.clone(),
            txid: *txid,
            missing,
        })
    }

    pub(crate) fn unexpected(&self, phase: Phase, command: &str, reply: &Value) -> Error {
        Error::UnexpectedReply {
            server: self.server.clone(),
            phase,
            command: command.to_owned(),
            reply: format!("{reply:?}"),
        }
    }
}
