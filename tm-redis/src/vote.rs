//! The vote and the one-phase commit of a [`RedisTxn`]: the write-set
//! sent in one function call (inside `MULTI`/`EXEC` on the watching
//! connection when it read anything, with `WAIT` for the replicas after a
//! prepare), and what its reply means.

use redis::{ServerError, Value};
use tm_core::{LogId, Phase};
use tracing::{error, warn};

use crate::conn::{self, Conn};
use crate::error::{Error, Result};
use crate::manager::{RedisTxn, Stage, TxnState, Watch};
use crate::ops::{Plan, WriteSet};
use crate::wire::{self, Function, Layout, LockKind, Refusal, Unsent};

/// The reply of a vote-like call, or why there is none.
type Sent = std::result::Result<Value, Unsent>;

impl RedisTxn {
    /// Builds the KEYS (and the triple number of every key) for the vote.
    fn layout(&self, ws: &WriteSet, with_record: bool) -> (Layout, Plan) {
        let plan = ws.plan();
        let data: Vec<&[u8]> = plan
            .order
            .iter()
            .map(|&k| ws.keys.names[k].as_slice())
            .collect();
        let tag = crate::keys::shared_tag(data.iter().copied());
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

    /// Sends a vote-like call (prepare or commit), `request` as
    /// [`call_write_set`](Self::call_write_set) built it: inside MULTI/EXEC
    /// on the watching connection when the transaction read anything, alone
    /// otherwise; then `WAIT` when `waiting` replicas are waited for.
    /// `Ok(reply)` is the function's reply; a changed
    /// watched key is a conflict. Alone, a missing function ran nothing and
    /// used up no WATCH: the library is loaded again and the call resent
    /// once.
    fn send_checked(
        &self,
        st: &mut TxnState,
        request: &[u8],
        function: Function,
        phase: Phase,
        waiting: usize,
    ) -> Sent {
        let name = function.name();
        let watched = match std::mem::replace(&mut st.watch, Watch::Unwatched) {
            Watch::Watching(conn) => Some(conn),
            Watch::Unwatched => None,
            // `call_write_set` refuses lost watches before sending.
            Watch::Lost => return Err(Unsent::NotSent(self.lost_watches(phase))),
        };
        let watching = watched.is_some();
        let count = if watching { 3 } else { 1 };
        let mut replies = self.send_once(watched, request, count, waiting, name, phase)?;
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
                    let mut again = self.send_once(None, request, 1, waiting, name, phase)?;
                    again.pop().unwrap_or(Value::Nil)
                }
                other => other,
            }
        };
        Ok(reply)
    }

    /// One request (`count` commands, then `WAIT` when `waiting` replicas
    /// are waited for) on `conn` (or a pooled connection), which then goes
    /// back to the pool. A `WAIT` that falls short is
    /// [`Error::NotReplicated`], as an outcome not known.
    fn send_once(
        &self,
        conn: Option<Conn>,
        request: &[u8],
        count: usize,
        waiting: usize,
        function: &str,
        phase: Phase,
    ) -> std::result::Result<Vec<Value>, Unsent> {
        let mut conn = match conn {
            Some(c) => c,
            None => self.store.connection(phase).map_err(Unsent::NotSent)?,
        };
        let total = count + usize::from(waiting > 0);
        let mut replies = match conn.request(request, total) {
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
        // The whole request in one buffer: `MULTI` first when the
        // transaction watches, then the call, `EXEC`, and `WAIT`.
        let watching = matches!(st.watch, Watch::Watching(_));
        let waiting = if prepare {
            self.store.replicas_to_wait()
        } else {
            0
        };
        let mut buf = Vec::new();
        if watching {
            conn::command(&mut buf, &[b"MULTI"]);
        }
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
        if watching {
            conn::command(&mut buf, &[b"EXEC"]);
        }
        if waiting > 0 {
            self.store.wait_command(&mut buf, waiting);
        }
        let reply = self.send_checked(st, &buf, function, phase, waiting);
        Ok(Some((layout, reply)))
    }

    pub(crate) fn do_vote(&self, st: &mut TxnState, log: Option<LogId>) -> Result<()> {
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
    pub(crate) fn do_commit_one_phase(&self, st: &mut TxnState) -> tm_core::Result<()> {
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

    /// `"write <n> (<command>) <key>: <error>"` for each failure `"<n>
    /// <key>: <error>"` of a write-set.
    pub(crate) fn name_failures(&self, st: &TxnState, failures: &[String]) -> Vec<String> {
        failures
            .iter()
            .map(|f| {
                let (n, rest) = f.split_once(' ').unwrap_or((f, ""));
                let w = n
                    .parse::<usize>()
                    .ok()
                    .and_then(|n| st.ws.writes.get(n.wrapping_sub(1)));
                match w {
                    Some(w) => format!("write {n} ({}) {rest}", w.name()),
                    None => f.clone(),
                }
            })
            .collect()
    }
}
