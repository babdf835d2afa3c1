//! The per-transaction data manager of a [`Store`]: the transaction's
//! connection and WATCHes, its vote (a durable prepare), finish, abort and
//! one-phase commit.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;
use redis::Value;
use tm_core::{DataManager, Phase, ResourceSavepoint, Transaction, TxId};
use tracing::{error, warn};

use crate::conn::{self, Conn};
use crate::error::{Error, Result};
use crate::ops::WriteSet;
use crate::store::{Store, StoreInner};
use crate::wire::{self, Layout};

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
    pub(crate) layout: Option<Layout>,
}

/// The per-transaction data manager of a [`Store`].
pub(crate) struct RedisTxn {
    me: Weak<RedisTxn>,
    pub(crate) store: Arc<StoreInner>,
    pub(crate) txid: TxId,
    pub(crate) id: String,
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

    fn end(&self, st: &mut TxnState) {
        st.stage = Stage::Ended;
        st.ws.writes.clear();
        st.layout = None;
        if let Watch::Watching(conn) = std::mem::replace(&mut st.watch, Watch::Unwatched) {
            self.store.release_watched(conn);
        }
        self.store.open.lock().remove(&self.txid);
    }

    pub(crate) fn lost_watches(&self, phase: Phase) -> Error {
        Error::Conflict {
            server: self.server().to_owned(),
            phase,
            detail:
                "the connection holding this transaction's WATCHes broke; its reads are unprotected"
                    .to_owned(),
        }
    }

    fn do_abort(&self, st: &mut TxnState, phase: Phase) -> Result<()> {
        let result = match (st.stage, &st.layout) {
            (Stage::Prepared | Stage::VoteUnknown, Some(layout)) => {
                wire::abort(&self.store, layout, &self.txid, phase)
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
                // Applied, but some writes failed (an outside client changed
                // a key behind tm's back, or a queued command failed): the
                // record is gone, the outcome is mixed.
                Err(Error::PartialApply { failures, .. }) => {
                    let named = self.name_failures(&st, &failures);
                    error!(server = %self.server(), txid = %self.id, failures = ?named, "the finish applied only in part: these writes failed, the others were applied");
                    self.end(&mut st);
                    let server = self.server().to_owned();
                    return Err(tm_core::Error::Heuristic {
                        committed: vec![server.clone()],
                        rolled_back: vec![server],
                        in_doubt: Vec::new(),
                    });
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
