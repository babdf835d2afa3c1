//! The public handle of a transaction on a [`Store`]: reads that see the
//! transaction's own writes, and buffered writes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::{FromRedisValue, ToSingleRedisArg, Value};
use tm_core::{DataManager, Phase, Transaction, TxId};

use crate::conn;
use crate::error::{Error, Result};
use crate::manager::{self, RedisTxn, TxnState};
use crate::ops::Op;
use crate::overlay::{self, Local};
use crate::store::{Store, StoreInner};

/// The most arguments (the command's name included) a queued command may
/// have: Lua 5.1 in Redis cannot unpack more than about 8000 values into one
/// `redis.call`.
const MAX_QUEUED_ARGS: usize = 7000;

impl Store {
    /// Joins this store to `txn` and returns the transaction's handle (the
    /// same transaction state however often it is called).
    pub fn join(&self, txn: &Transaction) -> Result<RedisHandle> {
        Ok(RedisHandle {
            res: manager::join(self, txn)?,
        })
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

/// The reads, over the data manager's connection and the overlay.
impl RedisTxn {
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

    /// A non-string read: only of keys this transaction has not written.
    fn plain_read(&self, command: &str, key: &[u8], extra: &[&[u8]]) -> Result<Value> {
        let mut st = self.state.lock();
        let k = st.ws.keys.intern(key);
        if overlay::local(&st.ws, k, None) != Local::Untouched {
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
        let idx: Vec<usize> = keys.iter().map(|k| st.ws.keys.intern(k)).collect();
        let mut out: Vec<Option<Option<Vec<u8>>>> = vec![None; keys.len()];
        let mut fetch = Vec::new();
        for (i, &k) in idx.iter().enumerate() {
            match overlay::local(&st.ws, k, None) {
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
                out[i] = Some(match overlay::local(&st.ws, idx[i], Some(base.clone())) {
                    Local::Untouched => base,
                    Local::Value(v) => v,
                    Local::BadIncr(op, why) => return Err(self.bad_incr(op, why)),
                    _ => return Err(self.read_after_write(command, keys[i])),
                });
            }
        }
        Ok(out.into_iter().map(|v| v.unwrap_or(None)).collect())
    }

    /// Buffers `op` on `key`.
    fn stage(&self, op: Op, key: &[u8], args: Vec<Vec<u8>>) -> Result<()> {
        self.check_user_key(key)?;
        let mut st = self.state.lock();
        active(&st)?;
        st.ws.stage(op, key, args);
        Ok(())
    }
}

fn active(st: &TxnState) -> Result<()> {
    if st.stage == manager::Stage::Active {
        Ok(())
    } else {
        Err(RedisTxn::closed())
    }
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
        let k = st.ws.keys.intern(key);
        match overlay::local(&st.ws, k, None) {
            Local::Exists => Ok(true),
            Local::Value(v) => Ok(v.is_some()),
            Local::Unsupported => Err(self.res.read_after_write("EXISTS", key)),
            Local::BadIncr(op, why) => Err(self.res.bad_incr(op, why)),
            Local::Untouched | Local::NeedBase => {
                // Whether the key exists on the server, then what the
                // buffered writes make of that (the type does not matter:
                // a string read would miss a hash or a set).
                let mut buf = Vec::new();
                conn::command(&mut buf, &[b"EXISTS", key]);
                let v = self.res.server_read(&mut st, "EXISTS", &[k], &buf)?;
                let on_server: bool = convert(&self.res.store, "EXISTS", v)?;
                overlay::exists_after(&st.ws, k, on_server)
                    .ok_or_else(|| self.res.read_after_write("EXISTS", key))
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
        self.res.stage(Op::Set, key.as_ref(), vec![one_arg(value)])
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
            Op::Set,
            key.as_ref(),
            vec![one_arg(value), b"PX".to_vec(), ms.to_string().into_bytes()],
        )
    }

    /// Buffers `DEL key`.
    pub fn del(&self, key: impl AsRef<[u8]>) -> Result<()> {
        self.res.stage(Op::Del, key.as_ref(), Vec::new())
    }

    /// Buffers `INCRBY key by`; the vote checks the type and the 64-bit range.
    pub fn incr_by(&self, key: impl AsRef<[u8]>, by: i64) -> Result<()> {
        self.res.stage(Op::IncrBy(by), key.as_ref(), Vec::new())
    }

    /// Buffers `HSET key field value`.
    pub fn hset<V: ToSingleRedisArg>(
        &self,
        key: impl AsRef<[u8]>,
        field: impl AsRef<[u8]>,
        value: V,
    ) -> Result<()> {
        self.res.stage(
            Op::HSet,
            key.as_ref(),
            vec![field.as_ref().to_vec(), one_arg(value)],
        )
    }

    /// Buffers `HDEL key field`.
    pub fn hdel(&self, key: impl AsRef<[u8]>, field: impl AsRef<[u8]>) -> Result<()> {
        self.res
            .stage(Op::HDel, key.as_ref(), vec![field.as_ref().to_vec()])
    }

    /// Buffers `SADD key member`.
    pub fn sadd<V: ToSingleRedisArg>(&self, key: impl AsRef<[u8]>, member: V) -> Result<()> {
        self.res
            .stage(Op::SAdd, key.as_ref(), vec![one_arg(member)])
    }

    /// Buffers `SREM key member`.
    pub fn srem<V: ToSingleRedisArg>(&self, key: impl AsRef<[u8]>, member: V) -> Result<()> {
        self.res
            .stage(Op::SRem, key.as_ref(), vec![one_arg(member)])
    }

    /// Buffers `LPUSH key value`.
    pub fn lpush<V: ToSingleRedisArg>(&self, key: impl AsRef<[u8]>, value: V) -> Result<()> {
        self.res
            .stage(Op::LPush, key.as_ref(), vec![one_arg(value)])
    }

    /// Buffers `RPUSH key value`.
    pub fn rpush<V: ToSingleRedisArg>(&self, key: impl AsRef<[u8]>, value: V) -> Result<()> {
        self.res
            .stage(Op::RPush, key.as_ref(), vec![one_arg(value)])
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
            Op::ZAdd,
            key.as_ref(),
            vec![score.to_string().into_bytes(), one_arg(member)],
        )
    }

    /// Buffers `ZREM key member`.
    pub fn zrem<V: ToSingleRedisArg>(&self, key: impl AsRef<[u8]>, member: V) -> Result<()> {
        self.res
            .stage(Op::ZRem, key.as_ref(), vec![one_arg(member)])
    }

    /// Buffers an expiry (`PEXPIRE key ms`; below 1 ms it is `PEXPIRE key 0`,
    /// which deletes the key). A `ttl` beyond [`MAX_TTL`] is refused.
    pub fn expire(&self, key: impl AsRef<[u8]>, ttl: Duration) -> Result<()> {
        check_ttl("expire", ttl)?;
        self.res
            .stage(Op::PExpire(ttl.as_millis()), key.as_ref(), Vec::new())
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
        active(&st)?;
        let keys: Vec<&[u8]> = keys.iter().map(AsRef::as_ref).collect();
        st.ws.queue(args, &keys);
        Ok(())
    }
}
