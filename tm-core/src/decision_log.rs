//! The durable commit decision: what makes a two-phase commit survive a crash.
//!
//! When a transaction has two or more resources and a decision log is
//! configured, tm records the decision (the transaction id and its
//! participants) after every preparable resource voted and before any of
//! them is finished. After a crash, [`recover`](crate::recover) commits the
//! prepared transactions that have a decision and aborts the others
//! (presumed abort).
//!
//! With a resource that cannot prepare (SQLite) among the participants, its
//! own commit is the decision, so keep the log *inside* that resource
//! (`tm_sqlite::SqliteDecisionLog` on the same database: the decision row
//! commits with it). A log kept elsewhere is written just before that
//! commit; a crash between the two would leave a decision for a transaction
//! whose last resource rolled back, and recovery would commit the others.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use parking_lot::{Condvar, Mutex, MutexGuard};
use tracing::warn;

use crate::error::{Error, Result};
use crate::txid::TxId;

/// A commit decision.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Decision {
    /// The transaction.
    pub txid: TxId,
    /// Its participants that can be recovered: their
    /// [`recovery_id`](crate::DataManager::recovery_id)s (the
    /// [`Recoverable::resource_id`](crate::Recoverable::resource_id)s).
    pub participants: Vec<String>,
    /// User, description and extensions of the transaction.
    pub metadata: BTreeMap<String, String>,
}

impl Decision {
    /// A decision to commit `txid`.
    pub fn new(txid: TxId, participants: Vec<String>, metadata: BTreeMap<String, String>) -> Self {
        Decision {
            txid,
            participants,
            metadata,
        }
    }
}

/// Where commit decisions are made durable.
pub trait DecisionLog: Send + Sync {
    /// Records the decision to commit; it is durable when this returns `Ok`.
    fn record_commit(&self, decision: &Decision) -> Result<()>;
    /// The transaction is finished everywhere: its decision is no longer
    /// needed. Need not be durable (recovery is idempotent).
    fn forget(&self, txid: &TxId) -> Result<()>;
    /// The decisions not yet forgotten.
    fn pending(&self) -> Result<Vec<Decision>>;
}

const MAGIC: &[u8; 8] = b"TMDLOG1\n";
const KIND_COMMIT: u8 = 1;
const KIND_FORGET: u8 = 2;
/// Once every decision is forgotten, a log larger than this is emptied.
const COMPACT_AT: u64 = 1 << 20;

/// An append-only file of checksummed records, `fsync`ed before a
/// decision is acknowledged.
///
/// Concurrent decisions share an `fsync` (group commit): the write happens
/// under the log's lock, the `fsync` outside it, and every decision written
/// before an `fsync` started is durable when it returns.
///
/// A torn last record (a crash mid-write) is detected by its length or
/// checksum and cut off when the log is opened; every record before it is
/// kept. One process should own a log file at a time.
///
/// ```
/// use tm_core::{Decision, DecisionLog, FileDecisionLog, TxId};
/// let dir = tempfile::tempdir()?;
/// let log = FileDecisionLog::open(dir.path().join("decisions.log"))?;
/// let id = TxId::new();
/// log.record_commit(&Decision::new(id, vec!["a".into(), "b".into()], Default::default()))?;
/// assert_eq!(log.pending()?.len(), 1);
/// log.forget(&id)?;
/// assert!(log.pending()?.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct FileDecisionLog {
    path: PathBuf,
    inner: Mutex<LogFile>,
    /// Signalled when an `fsync` ends.
    synced_cv: Condvar,
    /// A second handle on the file, for `fsync` without the lock.
    sync_handle: File,
}

struct LogFile {
    file: File,
    len: u64,
    /// Bytes known durable.
    synced: u64,
    /// An `fsync` is running (outside the lock).
    syncing: bool,
    pending: BTreeMap<TxId, Decision>,
}

impl std::fmt::Debug for FileDecisionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDecisionLog")
            .field("path", &self.path)
            .finish()
    }
}

impl FileDecisionLog {
    /// Opens (or creates) the log at `path`, cutting off a torn tail.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let err = |e: std::io::Error| log_error(&path, e);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(err)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(err)?;
        let (pending, good) = if bytes.is_empty() {
            file.write_all(MAGIC).map_err(err)?;
            file.sync_all().map_err(err)?;
            sync_parent(&path);
            (BTreeMap::new(), MAGIC.len() as u64)
        } else if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(log_error(
                &path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "not a tm decision log (bad magic)",
                ),
            ));
        } else {
            parse(&bytes)
        };
        if good < bytes.len() as u64 && !bytes.is_empty() {
            warn!(path = %path.display(), kept = good, dropped = bytes.len() as u64 - good, "decision log: cut off a torn tail");
            file.set_len(good).map_err(err)?;
            file.sync_all().map_err(err)?;
        }
        file.seek(SeekFrom::Start(good)).map_err(err)?;
        let sync_handle = file.try_clone().map_err(err)?;
        Ok(FileDecisionLog {
            path,
            inner: Mutex::new(LogFile {
                file,
                len: good,
                synced: good,
                syncing: false,
                pending,
            }),
            synced_cv: Condvar::new(),
            sync_handle,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits until the first `end` bytes are durable, running the `fsync`
    /// itself unless another caller's covers them.
    fn sync_upto(&self, inner: &mut MutexGuard<'_, LogFile>, end: u64) -> Result<()> {
        loop {
            if inner.synced >= end {
                return Ok(());
            }
            if inner.syncing {
                self.synced_cv.wait(inner);
                continue;
            }
            inner.syncing = true;
            let target = inner.len;
            let result = MutexGuard::unlocked(inner, || self.sync_handle.sync_data());
            inner.syncing = false;
            self.synced_cv.notify_all();
            result.map_err(|e| log_error(&self.path, e))?;
            inner.synced = inner.synced.max(target);
        }
    }

    fn append(&self, inner: &mut LogFile, body: &[u8]) -> Result<()> {
        let mut record = Vec::with_capacity(body.len() + 8);
        record.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
        record.extend_from_slice(&crc32(body).to_le_bytes());
        record.extend_from_slice(body);
        let err = |e| log_error(&self.path, e);
        if let Err(e) = inner.file.write_all(&record) {
            // Do not leave a half record in front of the next one.
            let _ = inner.file.set_len(inner.len);
            let _ = inner.file.seek(SeekFrom::Start(inner.len));
            return Err(err(e));
        }
        inner.len += record.len() as u64;
        Ok(())
    }
}

fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent() {
        if let Ok(dir) = File::open(if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        }) {
            let _ = dir.sync_all();
        }
    }
}

fn log_error(path: &Path, e: std::io::Error) -> Error {
    Error::DecisionLog {
        log: path.display().to_string(),
        source: Box::new(e),
    }
}

impl DecisionLog for FileDecisionLog {
    fn record_commit(&self, decision: &Decision) -> Result<()> {
        let body = encode_commit(decision);
        let mut inner = self.inner.lock();
        self.append(&mut inner, &body)?;
        // Pending before the fsync, so that a concurrent `forget` never
        // compacts the file under it.
        inner.pending.insert(decision.txid, decision.clone());
        let end = inner.len;
        if let Err(err) = self.sync_upto(&mut inner, end) {
            inner.pending.remove(&decision.txid);
            return Err(err);
        }
        Ok(())
    }

    fn forget(&self, txid: &TxId) -> Result<()> {
        let mut inner = self.inner.lock();
        if inner.pending.remove(txid).is_none() {
            return Ok(());
        }
        if inner.pending.is_empty() && inner.len > COMPACT_AT && !inner.syncing {
            let err = |e| log_error(&self.path, e);
            inner.file.set_len(MAGIC.len() as u64).map_err(err)?;
            inner
                .file
                .seek(SeekFrom::Start(MAGIC.len() as u64))
                .map_err(err)?;
            inner.file.sync_data().map_err(err)?;
            inner.len = MAGIC.len() as u64;
            inner.synced = inner.len;
            return Ok(());
        }
        let mut body = Vec::with_capacity(17);
        body.push(KIND_FORGET);
        put_txid(&mut body, txid);
        self.append(&mut inner, &body)
    }

    fn pending(&self) -> Result<Vec<Decision>> {
        Ok(self.inner.lock().pending.values().cloned().collect())
    }
}

fn put_txid(out: &mut Vec<u8>, txid: &TxId) {
    out.extend_from_slice(&txid.prefix().to_le_bytes());
    out.extend_from_slice(&txid.counter().to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn encode_commit(d: &Decision) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(KIND_COMMIT);
    put_txid(&mut out, &d.txid);
    out.extend_from_slice(&(d.participants.len() as u32).to_le_bytes());
    for p in &d.participants {
        put_str(&mut out, p);
    }
    out.extend_from_slice(&(d.metadata.len() as u32).to_le_bytes());
    for (k, v) in &d.metadata {
        put_str(&mut out, k);
        put_str(&mut out, v);
    }
    out
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    fn txid(&mut self) -> Option<TxId> {
        Some(TxId::from_parts(self.u64()?, self.u64()?))
    }
}

enum Record {
    Commit(Decision),
    Forget(TxId),
}

fn decode(body: &[u8]) -> Option<Record> {
    let mut r = Reader { buf: body };
    let kind = r.take(1)?[0];
    let txid = r.txid()?;
    match kind {
        KIND_COMMIT => {
            let n = r.u32()? as usize;
            let mut participants = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                participants.push(r.string()?);
            }
            let m = r.u32()? as usize;
            let mut metadata = BTreeMap::new();
            for _ in 0..m {
                let k = r.string()?;
                let v = r.string()?;
                metadata.insert(k, v);
            }
            Some(Record::Commit(Decision::new(txid, participants, metadata)))
        }
        KIND_FORGET => Some(Record::Forget(txid)),
        _ => None,
    }
}

/// Replays the records; returns the pending decisions and the length of the
/// good prefix (everything after it is a torn or corrupt tail).
fn parse(bytes: &[u8]) -> (BTreeMap<TxId, Decision>, u64) {
    let mut pending = BTreeMap::new();
    let mut pos = MAGIC.len();
    while let Some(header) = bytes.get(pos..pos + 8) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(body) = bytes.get(pos + 8..pos + 8 + len) else {
            break;
        };
        if crc32(body) != crc {
            break;
        }
        match decode(body) {
            Some(Record::Commit(d)) => {
                pending.insert(d.txid, d);
            }
            Some(Record::Forget(id)) => {
                pending.remove(&id);
            }
            None => break,
        }
        pos += 8 + len;
    }
    (pending, pos as u64)
}

/// CRC-32 (IEEE 802.3), bitwise table built at compile time.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn torn_tail_is_cut_off_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let a = TxId::new();
        let b = TxId::new();
        {
            let log = FileDecisionLog::open(&path).unwrap();
            log.record_commit(&Decision::new(a, vec!["x".into()], BTreeMap::new()))
                .unwrap();
            log.record_commit(&Decision::new(b, vec!["y".into()], BTreeMap::new()))
                .unwrap();
        }
        let full = std::fs::metadata(&path).unwrap().len();
        // Tear the last record at every possible byte.
        let bytes = std::fs::read(&path).unwrap();
        let second_len =
            encode_commit(&Decision::new(b, vec!["y".into()], BTreeMap::new())).len() + 8;
        for cut in 1..second_len as u64 {
            std::fs::write(&path, &bytes[..(full - cut) as usize]).unwrap();
            let log = FileDecisionLog::open(&path).unwrap();
            let pending: Vec<TxId> = log.pending().unwrap().into_iter().map(|d| d.txid).collect();
            assert_eq!(pending, vec![a], "cut {cut}");
            // Appending after the cut works and is readable again.
            log.record_commit(&Decision::new(b, vec!["y".into()], BTreeMap::new()))
                .unwrap();
            drop(log);
            let log = FileDecisionLog::open(&path).unwrap();
            assert_eq!(log.pending().unwrap().len(), 2);
        }
    }

    #[test]
    fn concurrent_decisions_share_fsyncs_and_all_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let log = std::sync::Arc::new(FileDecisionLog::open(&path).unwrap());
        let ids: Vec<TxId> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let log = log.clone();
                    s.spawn(move || {
                        (0..50)
                            .map(|i| {
                                let id = TxId::new();
                                let d = Decision::new(id, vec![format!("p{i}")], BTreeMap::new());
                                log.record_commit(&d).unwrap();
                                id
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let inner = log.inner.lock();
        assert_eq!(inner.synced, inner.len, "every acknowledged byte is synced");
        assert!(!inner.syncing);
        drop(inner);
        drop(log);
        let reopened = FileDecisionLog::open(&path).unwrap();
        let mut pending: Vec<TxId> = reopened
            .pending()
            .unwrap()
            .into_iter()
            .map(|d| d.txid)
            .collect();
        let mut expected = ids;
        pending.sort();
        expected.sort();
        assert_eq!(pending, expected);
    }

    #[test]
    fn a_file_that_is_not_a_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, b"hello world, not a log").unwrap();
        let err = FileDecisionLog::open(&path).unwrap_err();
        assert!(err.to_string().contains("bad magic"), "{err}");
    }
}
