//! The per-transaction data manager of a [`Store`]: the transaction's
//! connection and WATCHes, its vote (a durable prepare), finish, abort and
//! one-phase commit.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use redis::{ServerError, Value};
use tm_core::{DataManager, LogId, Phase, ResourceSavepoint, Transaction, TxId};
use tracing::{error, warn};

use crate::conn::{self, Conn};
use crate::error::{Error, Result};
use crate::ops::{Plan, WriteSet};
use crate::store::{Store, StoreInner};
use crate::wire::{self, Function, Layout, LockKind, Refusal, Unsent};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Reading and staging.
    Active,
    /// The vote was refused before anything was written on the server.
    Refused,
    /// The vote's outcome is unknown (the connection failed, or the
    /// replicas did not acknowledge it): it may have prepared; abort must
    /// clean up on the server.
    VoteUnknown,
    /// Prepared on the server (or nothing to prepare: `layout` is `None`).
    Prepared,
    /// Finished, aborted or committed in one phase.
    Ended,
}

/// The transaction's WATCHes.
pub(crate) enum Watch {
    /// None held (nothing read from the server yet, or the EXEC that used
    /// them was sent).
    Unwatched,
    /// Held on this connection, which the transaction keeps.
    Watching(Conn),
    /// The connection holding them broke: the reads are no longer
    /// protected and the vote must refuse.
    Lost,
}

pub(crate) struct TxnState {
    pub(crate) ws: WriteSet,
    pub(crate) watch: Watch,
    pub(crate) stage: Stage,
    /// What the vote sent (for finish and abort).
    layout: Option<Layout>,
}

/// The reply of a vote-like call, or why there is none.
type Sent = std::result::Result<Value, Unsent>;

/// The per-transaction data manager of a [`Store`].
pub(crate) struct RedisTxn {
    me: Weak<RedisTxn>,
    pub(crate) store: Arc<StoreInner>,
    pub(crate) txid: TxId,
    id: String,
    pub(crate) state: Mutex<TxnState>,
}

/// The transaction's data manager on `store`: the one it already has, or a
/// new one joined to it.
pub(crate) fn join(store: &Store, txn: &Transaction) -> Result<Arc<RedisTxn>> {
    let txid = txn.id();
    let res = {
        let mut open = store.inner.open.lock();
        let entry = open.entry(txid).or_insert_with(|| {
            Arc::new_cyclic(|me| RedisTxn {
                me: me.clone(),
                store: store.inner.clone(),
                txid,
                id: txid.to_string(),
                state: Mutex::new(TxnState {
                    ws: WriteSet::default(),
                    watch: Watch::Unwatched,
                    stage: Stage::Active,
                    layout: None,
                }),
            }) as Arc<dyn std::any::Any + Send + Sync>
        });
        entry
            .clone()
            .downcast::<RedisTxn>()
            .map_err(|_| Error::InvalidArgument("a foreign value in the open table".into()))?
    };
    if let Err(err) = txn.join(res.clone()) {
        store.inner.open.lock().remove(&txid);
        return Err(err.into());
    }
    Ok(res)
}

impl RedisTxn {
    pub(crate) fn server(&self) -> &str {
        &self.store.server
    }

    pub(crate) fn closed() -> Error {
        Error::Transaction(tm_core::Error::Closed)
    }

    /// Sends a read on the transaction's connection, with `WATCH` of the
    /// keys not yet watched pipelined before it: one round trip.
    pub(crate) fn server_read(
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
            .filter(|&k| !st.ws.keys.read[k])
            .collect();
        let mut buf = Vec::with_capacity(packed.len() + 32);
        if !new.is_empty() {
            conn::cmd(&mut buf, 1 + new.len());
            conn::arg(&mut buf, b"WATCH");
            for &k in &new {
                conn::arg(&mut buf, &st.ws.keys.names[k]);
            }
        }
        buf.extend_from_slice(packed);
        let count = if new.is_empty() { 1 } else { 2 };
        let (mut conn, watching) = match std::mem::replace(&mut st.watch, Watch::Unwatched) {
            Watch::Watching(c) => (c, true),
            Watch::Unwatched => (self.store.connection(Phase::Work)?, false),
            Watch::Lost => {
                st.watch = Watch::Lost;
                (self.store.connection(Phase::Work)?, false)
            }
        };
        let lost = matches!(st.watch, Watch::Lost);
        let replies = match conn.request(&buf, count) {
            Ok(r) => r,
            Err(e)
                if conn.pooled && !watching && (e.is_io_error() || e.is_connection_dropped()) =>
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
                if watching {
                    st.watch = Watch::Lost;
                }
                return Err(self.store.command_error(Phase::Work, command, source));
            }
        };
        if !new.is_empty() {
            for &k in &new {
                st.ws.keys.read[k] = true;
            }
        }
        if lost {
            // The vote refuses anyway; keep no connection.
            self.store.release_watched(conn);
        } else if watching || !new.is_empty() {
            st.watch = Watch::Watching(conn);
        } else {
            self.store.release(conn);
        }
        match replies.into_iter().last() {
            Some(Value::ServerError(e)) => {
                Err(self.store.command_error(Phase::Work, command, e.into()))
            }
            Some(v) => Ok(v),
            None => Err(self.store.unexpected(Phase::Work, command, &Value::Nil)),
        }
    }

    /// Refuses a write to a key in tm's own key space
    /// (`<prefix>{<tag>}:lock:...` and the like): it would overwrite, or be
    /// overwritten by, a lock, a record or a tombstone.
    pub(crate) fn check_user_key(&self, key: &[u8]) -> Result<()> {
        if self.store.keys.is_tm_key(key) {
            return Err(Error::InvalidArgument(format!(
                "key {:?} is in tm's own key space (prefix {:?}, `{{tag}}:lock:`, `rlock:`, `prepared:`, `aborted:`, `applied:`, `store-id`, `records`); \
                 write it under another name or choose another Options::prefix",
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(self.store.keys.prefix()),
            )));
        }
        Ok(())
    }

    /// Builds the KEYS (and the triple number of every key) for the vote.
    fn layout(&self, ws: &WriteSet, with_record: bool) -> (Layout, Plan) {
        let plan = ws.plan();
        let data: Vec<&[u8]> = plan
            .order
            .iter()
            .map(|&k| ws.keys.names[k].as_slice())
            .collect();
        let tag = wire::shared_tag(data.iter().copied());
        let layout = Layout::new(
            &self.store.keys,
            tag,
            &self.txid,
            &data,
            plan.nread,
            with_record,
        );
        (layout, plan)
    }

    /// Maps a refusal of prepare / commit to an error.
    fn refusal(&self, st: &TxnState, layout: &Layout, phase: Phase, e: ServerError) -> Error {
        let server = self.server().to_owned();
        let lossy = |k: Option<&[u8]>| String::from_utf8_lossy(k.unwrap_or_default()).into_owned();
        match Refusal::parse(&e) {
            Some(Refusal::Conflict {
                triple,
                kind,
                holder,
            }) => {
                let data = layout.data_key(triple).unwrap_or_default();
                let key = lossy(Some(data));
                let what = match kind {
                    LockKind::Read => "read",
                    LockKind::Write => "written",
                };
                // A holder with no record is an orphan that nothing else
                // would ever release: remove it, so the retry gets through.
                let orphan = match wire::release_orphan(&self.store, data, kind, &holder, phase) {
                    Ok(true) => {
                        warn!(server = %server, key = %key, holder = %holder, "removed an orphan lock (its holder has no prepared record)");
                        " (an orphan lock, with no record: removed; a retry gets through)"
                    }
                    Ok(false) => "",
                    Err(err) => {
                        warn!(server = %server, key = %key, holder = %holder, error = %err, "could not check the lock's holder for a record");
                        ""
                    }
                };
                Error::Conflict {
                    server,
                    phase,
                    detail: format!(
                        "key {key:?} is {what} by prepared transaction {holder}{orphan}"
                    ),
                }
            }
            Some(Refusal::Invalid { write, message }) => Error::Invalid {
                server,
                phase,
                op: write,
                command: st
                    .ws
                    .writes
                    .get(write.wrapping_sub(1))
                    .map(|w| w.name())
                    .unwrap_or_default(),
                detail: message,
            },
            Some(Refusal::LockType {
                triple,
                kind,
                found,
            }) => Error::LockKeyType {
                server,
                phase,
                key: if triple == 0 {
                    lossy(Some(&self.store.keys.records()))
                } else {
                    lossy(layout.lock_key(triple, kind))
                },
                found,
            },
            Some(Refusal::Aborted) => Error::Aborted {
                server,
                txid: self.id.clone(),
            },
            Some(Refusal::Prepared) => Error::AlreadyPrepared {
                server,
                txid: self.id.clone(),
            },
            Some(Refusal::Late) => Error::PrepareTooLate {
                server,
                txid: self.id.clone(),
                limit: self.store.options.tombstone_ttl,
            },
            None if wire::is_function_missing(&e) => {
                if let Err(err) = self.store.load_functions(phase) {
                    warn!(server = %self.server(), error = %err, "loading tm functions again failed");
                }
                Error::FunctionMissing {
                    server,
                    phase,
                    function: if phase == Phase::TpcVote {
                        Function::Prepare
                    } else {
                        Function::Commit
                    }
                    .name()
                    .to_owned(),
                }
            }
            None => self.store.command_error(phase, "FCALL", e.into()),
        }
    }

    /// Sends a vote-like call (prepare or commit): inside MULTI/EXEC on the
    /// watching connection when the transaction read anything, alone
    /// otherwise; with `WAIT` for the replicas pipelined after it when
    /// `wait` is set. `Ok(reply)` is the function's reply; a changed
    /// watched key is a conflict. Alone, a missing function ran nothing and
    /// used up no WATCH: the library is loaded again and the call resent
    /// once.
    fn send_checked(
        &self,
        st: &mut TxnState,
        packed_fcall: &[u8],
        function: Function,
        phase: Phase,
        wait: bool,
    ) -> Sent {
        let name = function.name();
        let watched = match std::mem::replace(&mut st.watch, Watch::Unwatched) {
            Watch::Watching(conn) => Some(conn),
            Watch::Unwatched => None,
            Watch::Lost => unreachable!("the vote refuses lost watches before sending"),
        };
        let mut buf = Vec::with_capacity(packed_fcall.len() + 64);
        let watching = watched.is_some();
        if watching {
            conn::command(&mut buf, &[b"MULTI"]);
            buf.extend_from_slice(packed_fcall);
            conn::command(&mut buf, &[b"EXEC"]);
        } else {
            buf.extend_from_slice(packed_fcall);
        }
        let count = if watching { 3 } else { 1 };
        let mut replies = self.send_once(watched, &buf, count, wait, name, phase)?;
        let reply = if watching {
            let mut it = replies.drain(..);
            let _multi = it.next();
            let queued = it.next();
            match it.next() {
                Some(Value::Nil) => {
                    return Err(Unsent::NotSent(Error::Conflict {
                        server: self.server().to_owned(),
                        phase,
                        detail: "a key this transaction read was changed by another client"
                            .to_owned(),
                    }))
                }
                Some(Value::Array(mut items)) if items.len() == 1 => items.remove(0),
                // EXECABORT: the queued call itself was refused.
                Some(Value::ServerError(e)) => match queued {
                    Some(Value::ServerError(q)) => Value::ServerError(q),
                    _ => Value::ServerError(e),
                },
                other => {
                    return Err(Unsent::MaybeSent(self.store.unexpected(
                        phase,
                        "EXEC",
                        &other.unwrap_or(Value::Nil),
                    )))
                }
            }
        } else {
            let reply = replies.pop().unwrap_or(Value::Nil);
            match reply {
                Value::ServerError(e) if wire::is_function_missing(&e) => {
                    self.store.load_functions(phase).map_err(Unsent::NotSent)?;
                    let mut again = self.send_once(None, &buf, 1, wait, name, phase)?;
                    again.pop().unwrap_or(Value::Nil)
                }
                other => other,
            }
        };
        Ok(reply)
    }

    /// One request (`count` commands, then `WAIT` if `wait`) on `conn` (or
    /// a pooled connection), which then goes back to the pool. A `WAIT`
    /// that falls short of the replicas the store waits for is
    /// [`Error::NotReplicated`], as an outcome not known.
    fn send_once(
        &self,
        conn: Option<Conn>,
        buf: &[u8],
        count: usize,
        wait: bool,
        function: &str,
        phase: Phase,
    ) -> std::result::Result<Vec<Value>, Unsent> {
        let mut conn = match conn {
            Some(c) => c,
            None => self.store.connection(phase).map_err(Unsent::NotSent)?,
        };
        let waiting = if wait {
            self.store.replicas_to_wait()
        } else {
            0
        };
        let mut owned;
        let (packed, total) = if waiting > 0 {
            owned = buf.to_vec();
            self.store.wait_command(&mut owned, waiting);
            (owned.as_slice(), count + 1)
        } else {
            (buf, count)
        };
        let mut replies = match conn.request(packed, total) {
            Ok(r) => r,
            // Sent, but the outcome is unknown.
            Err(source) => {
                return Err(Unsent::MaybeSent(
                    self.store.command_error(phase, function, source),
                ))
            }
        };
        self.store.release(conn);
        if waiting > 0 {
            let acked = replies.pop().unwrap_or(Value::Nil);
            if let Err(err) = self.store.check_wait(phase, &acked, waiting) {
                // Applied on the primary, but not known to have reached the
                // replicas: a failover now would lose it.
                return Err(Unsent::MaybeSent(err));
            }
        }
        Ok(replies)
    }

    /// The vote (prepare, with a record) or the one-phase commit: one call
    /// with the layout's KEYS and ARGV `txid nread [key list, owner]
    /// write-set...`. `Ok(None)`: nothing read or written, so nothing to
    /// send.
    fn call_write_set(
        &self,
        st: &mut TxnState,
        phase: Phase,
        log: Option<LogId>,
    ) -> Result<Option<(Layout, Sent)>> {
        if st.stage != Stage::Active {
            return Err(Self::closed());
        }
        if let Watch::Lost = st.watch {
            return Err(self.lost_watches(phase));
        }
        // Nothing read and nothing written. (A queued command listing no
        // keys is still a write: it must not be dropped.)
        if st.ws.is_empty() {
            return Ok(None);
        }
        let prepare = phase == Phase::TpcVote;
        let (layout, plan) = self.layout(&st.ws, prepare);
        let function = if prepare {
            Function::Prepare
        } else {
            Function::Commit
        };
        let nread = layout.nread.to_string();
        let blob = prepare.then(|| wire::encode_keys(layout.nread, layout.data()));
        let mut buf = Vec::new();
        wire::fcall_head(
            &mut buf,
            function,
            &layout.keys,
            2 + 4 * usize::from(prepare) + st.ws.wire_len(),
        );
        conn::arg(&mut buf, self.id.as_bytes());
        conn::arg(&mut buf, nread.as_bytes());
        if let Some(blob) = &blob {
            conn::arg(&mut buf, blob);
            // The owner: recovery resolves only its own log's records.
            let log = log.map(|l| l.to_string()).unwrap_or_default();
            conn::arg(&mut buf, log.as_bytes());
            // When it was sent, and how late it may land: no later than a
            // tombstone of its abort would still refuse it.
            let sent = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            conn::arg(&mut buf, sent.to_string().as_bytes());
            let late = self.store.options.tombstone_ttl.as_millis().max(1);
            conn::arg(&mut buf, late.to_string().as_bytes());
        }
        st.ws.encode(&plan, |a| conn::arg(&mut buf, a));
        let reply = self.send_checked(st, &buf, function, phase, prepare);
        Ok(Some((layout, reply)))
    }

    fn end(&self, st: &mut TxnState) {
        st.stage = Stage::Ended;
        st.ws.writes.clear();
        st.layout = None;
        if let Watch::Watching(conn) = std::mem::replace(&mut st.watch, Watch::Unwatched) {
            self.store.release_watched(conn);
        }
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
                Err(self.refusal(st, &layout, Phase::TpcVote, e)),
            ),
            Ok(other) => (
                Stage::VoteUnknown,
                Err(self
                    .store
                    .unexpected(Phase::TpcVote, Function::Prepare.name(), &other)),
            ),
            Err(Unsent::MaybeSent(err)) => (Stage::VoteUnknown, Err(err)),
            Err(Unsent::NotSent(err)) => (Stage::Refused, Err(err)),
        };
        st.stage = stage;
        if stage != Stage::Refused {
            st.layout = Some(layout);
        }
        result
    }

    /// The one-phase commit. What it cannot know or did only in part is
    /// [`tm_core::Error::Heuristic`], never an ordinary failure: a reply
    /// lost after sending (it may have committed: `in_doubt`), and writes
    /// that failed while others were applied (both `committed` and
    /// `rolled_back` name the server; the log names the writes and keys).
    fn do_commit_one_phase(&self, st: &mut TxnState) -> tm_core::Result<()> {
        let phase = Phase::CommitOnePhase;
        let Some((layout, reply)) = self.call_write_set(st, phase, None)? else {
            return Ok(());
        };
        let server = self.server().to_owned();
        let reply = match reply {
            Ok(reply) => reply,
            Err(Unsent::NotSent(err)) => return Err(err.into()),
            Err(Unsent::MaybeSent(err)) => {
                error!(server = %server, txid = %self.id, error = %err, "the one-phase commit was sent but its reply was lost: it may or may not have committed");
                return Err(tm_core::Error::Heuristic {
                    committed: Vec::new(),
                    rolled_back: Vec::new(),
                    in_doubt: vec![server],
                });
            }
        };
        if let Value::ServerError(e) = reply {
            return Err(self.refusal(st, &layout, phase, e).into());
        }
        match wire::failures(&reply) {
            Some(failures) if failures.is_empty() => Ok(()),
            Some(failures) => {
                let named = self.name_failures(st, &failures);
                error!(server = %server, txid = %self.id, failures = ?named, "the one-phase commit applied only in part: these writes failed, the others were applied");
                Err(tm_core::Error::Heuristic {
                    committed: vec![server.clone()],
                    rolled_back: vec![server],
                    in_doubt: Vec::new(),
                })
            }
            None => Err(self
                .store
                .unexpected(phase, Function::Commit.name(), &reply)
                .into()),
        }
    }

    /// `"<write> <command> <keys>: <error>"` for each failure
    /// `"<write> <error>"` of a write-set.
    fn name_failures(&self, st: &TxnState, failures: &[String]) -> Vec<String> {
        failures
            .iter()
            .map(|f| {
                let (n, why) = f.split_once(' ').unwrap_or((f, ""));
                let w = n
                    .parse::<usize>()
                    .ok()
                    .and_then(|n| st.ws.writes.get(n.wrapping_sub(1)));
                match w {
                    Some(w) => {
                        let keys: Vec<String> = w
                            .keys
                            .iter()
                            .map(|&k| String::from_utf8_lossy(&st.ws.keys.names[k]).into_owned())
                            .collect();
                        format!("write {n} {} {keys:?}: {why}", w.name())
                    }
                    None => f.clone(),
                }
            })
            .collect()
    }

    fn do_abort(&self, st: &mut TxnState, phase: Phase) -> Result<()> {
        let result = match (st.stage, &st.layout) {
            (Stage::Prepared | Stage::VoteUnknown, Some(layout)) => {
                wire::abort(&self.store, layout, &self.id, phase).map(|_| ())
            }
            _ => Ok(()),
        };
        if let Err(err) = &result {
            // Still prepared (or maybe prepared) on the server: recovery
            // aborts it (presumed abort). Forget it here.
            warn!(server = %self.server(), txid = %self.id, error = %err, "abort on the server failed; the prepare stays until recovery");
        }
        self.end(st);
        result
    }
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
            match wire::apply(&self.store, layout, &self.txid, Phase::TpcFinish) {
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
        result
    }

    fn savepoint(&self, _txn: &Transaction) -> tm_core::Result<Box<dyn ResourceSavepoint>> {
        let st = self.state.lock();
        if st.stage != Stage::Active {
            return Err(tm_core::Error::InvalidSavepoint);
        }
        Ok(Box::new(RedisSavepoint {
            res: self.me.clone(),
            len: st.ws.writes.len(),
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
        if st.stage != Stage::Active || st.ws.writes.len() < self.len {
            return Err(tm_core::Error::InvalidSavepoint);
        }
        st.ws.writes.truncate(self.len);
        Ok(())
    }
}
