//! `MemoryStore`: a transactional in-memory key-value store, the reference
//! resource manager (optimistic versions, savepoints, prepare and recovery).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::Mutex;

use crate::data_manager::{DataManager, Phase, ResourceSavepoint};
use crate::decision_log::LogId;
use crate::error::{Error, Missing, Result};
use crate::recovery::{InDoubt, Recoverable};
use crate::transaction::Transaction;
use crate::txid::{TxId, TxIdMap};

/// A transactional in-memory key-value store.
///
/// Reads record the version they saw; writes are buffered in the transaction
/// and read back by it. At the vote, every key read must still have the
/// version seen, and no other prepared transaction may hold a lock on a key
/// read or written, or the vote fails with [`Error::Conflict`] (retryable).
/// A vote then takes shared locks on the keys read and exclusive locks on
/// the keys written until the transaction finishes, so transactions are
/// serializable, also together with other stores. Transactions on disjoint
/// keys never conflict.
///
/// Its prepared state outlives the transaction object (as a durable store's
/// would outlive a crash), so it is [`Recoverable`]: each prepared record
/// names its coordinator's [`LogId`] and when it was prepared; a commit
/// leaves a receipt and an abort a tombstone (the last
/// [`ENDINGS_KEPT`](Self::ENDINGS_KEPT) of each), so that finishing a
/// missing record tells "already finished" from "aborted" and "lost", and a
/// late prepare of an aborted transaction is refused. Being in memory, its
/// prepare is not durable across a crash of the process
/// ([`prepares_durably`](DataManager::prepares_durably) is `false`), so it
/// needs no decision log beside other resources.
///
/// ```
/// use tm_core::{MemoryStore, TransactionManager};
/// let tm = TransactionManager::explicit();
/// let store = MemoryStore::<String>::new();
/// tm.run(|txn| {
///     let h = store.join(txn)?;
///     h.put("greeting", "hello".to_string())?;
///     assert_eq!(h.get("greeting")?.as_deref(), Some("hello")); // own write
///     Ok::<_, tm_core::Error>(())
/// })?;
/// assert_eq!(store.committed("greeting").as_deref(), Some("hello"));
/// # Ok::<(), tm_core::Error>(())
/// ```
pub struct MemoryStore<V> {
    inner: Arc<StoreInner<V>>,
}

impl<V> Clone for MemoryStore<V> {
    fn clone(&self) -> Self {
        MemoryStore {
            inner: self.inner.clone(),
        }
    }
}

impl<V> fmt::Debug for MemoryStore<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("name", &self.inner.name)
            .finish()
    }
}

struct StoreInner<V> {
    name: String,
    resource_id: String,
    state: Mutex<StoreState<V>>,
    fail_finish: AtomicBool,
}

struct Entry<V> {
    value: Option<V>,
    version: u64,
}

enum Lock {
    Write(TxId),
    Read(HashSet<TxId>),
}

struct Prepared<V> {
    writes: Vec<(String, Option<V>)>,
    read_keys: Vec<String>,
    log: Option<LogId>,
    at: Instant,
}

const ENDINGS_KEPT: usize = 1 << 16;

/// The last few endings of one kind (receipts or tombstones), oldest first.
#[derive(Default)]
struct Endings {
    set: HashSet<TxId>,
    order: VecDeque<TxId>,
}

impl Endings {
    fn insert(&mut self, txid: TxId) {
        if self.set.insert(txid) {
            self.order.push_back(txid);
            if self.order.len() > ENDINGS_KEPT {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

struct StoreState<V> {
    data: HashMap<String, Entry<V>>,
    clock: u64,
    locks: HashMap<String, Lock>,
    prepared: TxIdMap<Prepared<V>>,
    open: TxIdMap<Arc<MemoryTxn<V>>>,
    receipts: Endings,
    tombstones: Endings,
}

impl<V> StoreState<V> {
    fn version(&self, key: &str) -> u64 {
        self.data.get(key).map_or(0, |e| e.version)
    }

    fn apply(&mut self, writes: Vec<(String, Option<V>)>) {
        for (key, value) in writes {
            self.clock += 1;
            let version = self.clock;
            self.data.insert(key, Entry { value, version });
        }
    }

    /// Applies a prepared transaction, releases its locks and leaves a
    /// receipt. Idempotent; a missing record without a receipt says why.
    fn finish_prepared(&mut self, txid: &TxId) -> std::result::Result<(), Missing> {
        match self.prepared.remove(txid) {
            Some(prepared) => {
                self.release(txid, &prepared);
                self.apply(prepared.writes);
                self.receipts.insert(*txid);
                Ok(())
            }
            None if self.receipts.set.contains(txid) => Ok(()),
            None if self.tombstones.set.contains(txid) => Err(Missing::Aborted),
            None => Err(Missing::Lost),
        }
    }

    /// Drops a prepared transaction, releases its locks and leaves a
    /// tombstone (idempotent); refuses one that was committed (a receipt).
    fn abort_prepared(&mut self, txid: &TxId) -> std::result::Result<(), Missing> {
        if let Some(prepared) = self.prepared.remove(txid) {
            self.release(txid, &prepared);
        } else if self.receipts.set.contains(txid) {
            return Err(Missing::Committed);
        }
        self.tombstones.insert(*txid);
        Ok(())
    }

    fn release(&mut self, txid: &TxId, prepared: &Prepared<V>) {
        for (key, _) in &prepared.writes {
            if matches!(self.locks.get(key), Some(Lock::Write(holder)) if holder == txid) {
                self.locks.remove(key);
            }
        }
        for key in &prepared.read_keys {
            if let Some(Lock::Read(holders)) = self.locks.get_mut(key) {
                holders.remove(txid);
                if holders.is_empty() {
                    self.locks.remove(key);
                }
            }
        }
    }
}

impl<V: Clone + Send + Sync + 'static> Default for MemoryStore<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: Clone + Send + Sync + 'static> MemoryStore<V> {
    /// How many receipts (of commits) and tombstones (of aborts) the store
    /// keeps: finishing a record that is gone is answered from them.
    pub const ENDINGS_KEPT: usize = ENDINGS_KEPT;

    /// A store named `memory`.
    pub fn new() -> Self {
        Self::named("memory")
    }

    /// A store with its own name (its sort key and resource id).
    pub fn named(name: &str) -> Self {
        MemoryStore {
            inner: Arc::new(StoreInner {
                name: name.to_owned(),
                resource_id: format!("memory:{name}"),
                state: Mutex::new(StoreState {
                    data: HashMap::new(),
                    clock: 0,
                    locks: HashMap::new(),
                    prepared: TxIdMap::default(),
                    open: TxIdMap::default(),
                    receipts: Endings::default(),
                    tombstones: Endings::default(),
                }),
                fail_finish: AtomicBool::new(false),
            }),
        }
    }

    /// The store's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Joins the store to `txn` (once; later calls give a handle on the same
    /// transaction state).
    pub fn join(&self, txn: &Transaction) -> Result<MemoryHandle<V>> {
        let txid = txn.id();
        let res = {
            let mut st = self.inner.state.lock();
            st.open
                .entry(txid)
                .or_insert_with(|| {
                    Arc::new_cyclic(|me| MemoryTxn {
                        me: me.clone(),
                        store: self.inner.clone(),
                        txid,
                        state: Mutex::new(TxnState::default()),
                    })
                })
                .clone()
        };
        if let Err(err) = txn.join(res.clone()) {
            self.inner.state.lock().open.remove(&txid);
            return Err(err);
        }
        Ok(MemoryHandle { res })
    }

    /// The committed value of `key`, read outside any transaction.
    pub fn committed(&self, key: &str) -> Option<V> {
        self.inner
            .state
            .lock()
            .data
            .get(key)
            .and_then(|e| e.value.clone())
    }

    /// Every committed key and value.
    pub fn snapshot(&self) -> HashMap<String, V> {
        self.inner
            .state
            .lock()
            .data
            .iter()
            .filter_map(|(k, e)| e.value.clone().map(|v| (k.clone(), v)))
            .collect()
    }

    /// For tests of failure paths: while `on`, `tpc_finish` fails and leaves
    /// the transaction prepared (in doubt), as a crash between the decision
    /// and the finish would.
    pub fn fail_finish(&self, on: bool) {
        self.inner.fail_finish.store(on, Ordering::SeqCst);
    }

    /// Number of transactions currently prepared (voted, not finished).
    pub fn prepared_count(&self) -> usize {
        self.inner.state.lock().prepared.len()
    }
}

impl<V: Clone + Send + Sync + 'static> Recoverable for MemoryStore<V> {
    fn resource_id(&self) -> String {
        self.inner.resource_id.clone()
    }

    fn in_doubt(&self) -> Result<Vec<InDoubt>> {
        let st = self.inner.state.lock();
        let now = Instant::now();
        let mut records: Vec<InDoubt> = st
            .prepared
            .iter()
            .map(|(txid, p)| InDoubt::new(*txid, p.log, now.saturating_duration_since(p.at)))
            .collect();
        records.sort_by_key(|r| r.txid);
        Ok(records)
    }

    fn commit_prepared(&self, txid: &TxId) -> Result<()> {
        self.inner
            .state
            .lock()
            .finish_prepared(txid)
            .map_err(|missing| Error::RecordMissing {
                resource: self.inner.name.clone(),
                txid: *txid,
                missing,
            })
    }

    fn abort_prepared(&self, txid: &TxId) -> Result<()> {
        self.inner
            .state
            .lock()
            .abort_prepared(txid)
            .map_err(|missing| Error::RecordMissing {
                resource: self.inner.name.clone(),
                txid: *txid,
                missing,
            })
    }
}

/// A transaction's view of a [`MemoryStore`], from [`MemoryStore::join`].
pub struct MemoryHandle<V> {
    res: Arc<MemoryTxn<V>>,
}

impl<V> Clone for MemoryHandle<V> {
    fn clone(&self) -> Self {
        MemoryHandle {
            res: self.res.clone(),
        }
    }
}

impl<V> fmt::Debug for MemoryHandle<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryHandle")
            .field("store", &self.res.store.name)
            .field("txid", &self.res.txid)
            .finish()
    }
}

impl<V: Clone + Send + Sync + 'static> MemoryHandle<V> {
    /// Reads `key`: this transaction's own write if any, else the committed
    /// value (whose version the vote will check). [`Error::Closed`] once the
    /// transaction has ended.
    pub fn get(&self, key: &str) -> Result<Option<V>> {
        let mut t = self.res.state.lock();
        if t.ended {
            return Err(Error::Closed);
        }
        if let Some(&i) = t.index.get(key) {
            return Ok(t.writes[i].1.clone());
        }
        let st = self.res.store.state.lock();
        let (value, version) = match st.data.get(key) {
            Some(e) => (e.value.clone(), e.version),
            None => (None, 0),
        };
        drop(st);
        t.reads.entry(key.to_owned()).or_insert(version);
        Ok(value)
    }

    /// Buffers a write of `key`. [`Error::Closed`] once the transaction has
    /// voted or ended: the vote promised exactly what was staged, so a later
    /// write could only be lost.
    pub fn put(&self, key: &str, value: V) -> Result<()> {
        self.res.state.lock().write(key, Some(value))
    }

    /// Buffers a delete of `key` ([`Error::Closed`] as for [`put`](Self::put)).
    pub fn delete(&self, key: &str) -> Result<()> {
        self.res.state.lock().write(key, None)
    }

    /// The transaction this handle belongs to.
    pub fn txid(&self) -> TxId {
        self.res.txid
    }
}

struct TxnState<V> {
    reads: HashMap<String, u64>,
    writes: Vec<(String, Option<V>)>,
    index: HashMap<String, usize>,
    ended: bool,
}

impl<V> Default for TxnState<V> {
    fn default() -> Self {
        TxnState {
            reads: HashMap::new(),
            writes: Vec::new(),
            index: HashMap::new(),
            ended: false,
        }
    }
}

impl<V> TxnState<V> {
    fn write(&mut self, key: &str, value: Option<V>) -> Result<()> {
        if self.ended {
            return Err(Error::Closed);
        }
        // Append (never overwrite in place): a savepoint is a length.
        self.index.insert(key.to_owned(), self.writes.len());
        self.writes.push((key.to_owned(), value));
        Ok(())
    }
}

/// The per-transaction data manager of a [`MemoryStore`].
struct MemoryTxn<V> {
    me: Weak<MemoryTxn<V>>,
    store: Arc<StoreInner<V>>,
    txid: TxId,
    state: Mutex<TxnState<V>>,
}

impl<V: Clone + Send + Sync + 'static> MemoryTxn<V> {
    fn name(&self) -> &str {
        &self.store.name
    }

    /// Checks reads and locks; `Ok` means this transaction may commit now.
    fn validate(&self, st: &StoreState<V>, t: &TxnState<V>, phase: Phase) -> Result<()> {
        for (key, &seen) in &t.reads {
            if st.version(key) != seen {
                return Err(Error::conflict(
                    self.name(),
                    phase,
                    format!("key {key:?} changed since it was read"),
                ));
            }
            if let Some(Lock::Write(holder)) = st.locks.get(key) {
                if *holder != self.txid {
                    return Err(Error::conflict(
                        self.name(),
                        phase,
                        format!("key {key:?} is being written by prepared transaction {holder}"),
                    ));
                }
            }
        }
        for (key, _) in &t.writes {
            match st.locks.get(key) {
                Some(Lock::Write(holder)) if *holder != self.txid => {
                    return Err(Error::conflict(
                        self.name(),
                        phase,
                        format!("key {key:?} is locked by prepared transaction {holder}"),
                    ))
                }
                Some(Lock::Read(holders)) if holders.iter().any(|h| *h != self.txid) => {
                    return Err(Error::conflict(
                        self.name(),
                        phase,
                        format!("key {key:?} was read by a prepared transaction"),
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn end(&self) -> TxnState<V> {
        let mut t = self.state.lock();
        let taken = std::mem::take(&mut *t);
        t.ended = true;
        taken
    }

    fn forget_open(&self, st: &mut StoreState<V>) {
        st.open.remove(&self.txid);
    }
}

impl<V: Clone + Send + Sync + 'static> DataManager for MemoryTxn<V> {
    fn sort_key(&self) -> &str {
        &self.store.name
    }

    fn abort(&self, _txn: &Transaction) -> Result<()> {
        self.end();
        let mut st = self.store.state.lock();
        self.forget_open(&mut st);
        Ok(())
    }

    fn tpc_begin(&self, _txn: &Transaction) -> Result<()> {
        Ok(())
    }

    fn commit(&self, _txn: &Transaction) -> Result<()> {
        Ok(())
    }

    fn tpc_vote(&self, txn: &Transaction) -> Result<()> {
        let mut t = self.state.lock();
        let mut st = self.store.state.lock();
        if st.tombstones.set.contains(&self.txid) {
            return Err(Error::resource(
                self.name(),
                format!(
                    "the prepare of {} is refused: it was aborted (a tombstone)",
                    self.txid
                ),
            ));
        }
        self.validate(&st, &t, Phase::TpcVote)?;
        for (key, _) in &t.writes {
            st.locks.insert(key.clone(), Lock::Write(self.txid));
        }
        let mut read_keys = Vec::new();
        for key in t.reads.keys() {
            if t.index.contains_key(key) {
                continue; // the write lock covers it
            }
            match st
                .locks
                .entry(key.clone())
                .or_insert_with(|| Lock::Read(HashSet::new()))
            {
                Lock::Read(holders) => {
                    holders.insert(self.txid);
                    read_keys.push(key.clone());
                }
                Lock::Write(_) => {}
            }
        }
        // The prepared record owns the writes now: the transaction cannot
        // read or write any more once it votes.
        let writes = std::mem::take(&mut t.writes);
        t.index.clear();
        t.ended = true;
        st.prepared.insert(
            self.txid,
            Prepared {
                writes,
                read_keys,
                log: txn.log_id(),
                at: Instant::now(),
            },
        );
        Ok(())
    }

    fn tpc_finish(&self, _txn: &Transaction) -> Result<()> {
        if self.store.fail_finish.load(Ordering::SeqCst) {
            return Err(Error::resource(
                self.name(),
                format!("injected failure at tpc_finish of {}", self.txid),
            ));
        }
        self.end();
        let mut st = self.store.state.lock();
        self.forget_open(&mut st);
        st.finish_prepared(&self.txid)
            .map_err(|missing| Error::RecordMissing {
                resource: self.name().to_owned(),
                txid: self.txid,
                missing,
            })
    }

    fn tpc_abort(&self, _txn: &Transaction) -> Result<()> {
        self.end();
        let mut st = self.store.state.lock();
        let aborted = st.abort_prepared(&self.txid);
        self.forget_open(&mut st);
        aborted.map_err(|missing| Error::RecordMissing {
            resource: self.name().to_owned(),
            txid: self.txid,
            missing,
        })
    }

    fn commit_one_phase(&self, _txn: &Transaction) -> Result<()> {
        let t = self.end();
        let mut st = self.store.state.lock();
        self.forget_open(&mut st);
        self.validate(&st, &t, Phase::CommitOnePhase)?;
        st.apply(t.writes);
        Ok(())
    }

    fn savepoint(&self, _txn: &Transaction) -> Result<Box<dyn ResourceSavepoint>> {
        let len = self.state.lock().writes.len();
        Ok(Box::new(MemorySavepoint {
            res: self.me.clone(),
            len,
        }))
    }

    fn recovery_id(&self) -> Option<String> {
        Some(self.store.resource_id.clone())
    }

    fn prepares_durably(&self) -> bool {
        false
    }
}

struct MemorySavepoint<V> {
    res: Weak<MemoryTxn<V>>,
    len: usize,
}

impl<V: Clone + Send + Sync + 'static> ResourceSavepoint for MemorySavepoint<V> {
    fn rollback(&self) -> Result<()> {
        let Some(res) = self.res.upgrade() else {
            return Err(Error::InvalidSavepoint);
        };
        let mut t = res.state.lock();
        if t.ended {
            return Err(Error::InvalidSavepoint);
        }
        t.writes.truncate(self.len);
        let index = t
            .writes
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        t.index = index;
        Ok(())
    }
}
