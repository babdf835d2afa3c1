//! [`FileDecisionLog`]: decisions in an append-only file of checksummed
//! records, owned by one process at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use parking_lot::{Condvar, Mutex, MutexGuard};
use tracing::{error, warn};

use crate::decision_log::{Decision, DecisionLog, LogId, Outcome};
use crate::error::{Error, Result};
use crate::txid::TxId;

/// Format 2: the header holds the log's id.
const MAGIC: &[u8; 8] = b"TMDLOG2\n";
/// The first format, without an id.
const MAGIC_V1: &[u8; 8] = b"TMDLOG1\n";
/// Magic, the log id, and a CRC-32 of both.
const HEADER_LEN: usize = 8 + 16 + 4;
const KIND_COMMIT: u8 = 1;
const KIND_FORGET: u8 = 2;
const KIND_ABORT: u8 = 3;
/// Once every decision is forgotten, a log larger than this is emptied.
const COMPACT_AT: u64 = 1 << 20;

/// An append-only file of checksummed records, `fsync`ed before a
/// decision is acknowledged.
///
/// * **One owner.** The file is locked exclusively while it is open: a
///   second open, in this process or another, is an error naming the path.
///   (Two writers would each cut the other's records.) A process that shares
///   stores with others uses a log of its own, or a shared
///   `tm_sqlite::SqliteDecisionLog`.
/// * **Group commit.** Concurrent decisions share an `fsync`: the write
///   happens under the log's lock, the `fsync` outside it, and every decision
///   written before an `fsync` started is durable when it returns.
/// * **Damage is not a torn tail.** A torn *last* record (a crash mid-write:
///   nothing valid follows it) is cut off when the log is opened. Damage
///   anywhere else (a flipped bit in an acknowledged record) is an error
///   naming its offset, and nothing is truncated: cutting there would make
///   recovery abort transactions that were decided.
/// * **A failed `fsync` is final.** After one, the log refuses every further
///   decision: whether the written bytes reached the disk is unknown, and
///   retrying the `fsync` cannot tell (the kernel may have dropped the dirty
///   pages). Reopen the log after fixing the cause.
/// * **The fence.** [`record_abort`](DecisionLog::record_abort) and
///   [`record_commit`](DecisionLog::record_commit) of one transaction check
///   each other under the log's lock; as the only writer, that lock decides.
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
/// // The same file cannot be opened twice.
/// assert!(FileDecisionLog::open(log.path()).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct FileDecisionLog {
    path: PathBuf,
    id: LogId,
    inner: Mutex<LogFile>,
    /// Signalled when an `fsync` ends.
    synced_cv: Condvar,
    /// A second handle on the file, for `fsync` without the lock.
    sync_handle: Box<dyn SyncData>,
}

/// The one call the log makes outside its lock: `fsync`. A trait so that
/// the unit tests can make it fail (a failed `fsync` cannot be produced on
/// demand on a real disk).
trait SyncData: Send + Sync {
    fn sync_data(&self) -> std::io::Result<()>;
}

impl SyncData for File {
    fn sync_data(&self) -> std::io::Result<()> {
        File::sync_data(self)
    }
}

struct LogFile {
    file: File,
    len: u64,
    /// Bytes known durable.
    synced: u64,
    /// An `fsync` is running (outside the lock).
    syncing: bool,
    /// Set by the first failed `fsync`: every later decision is refused.
    poisoned: Option<String>,
    pending: BTreeMap<TxId, Decision>,
    /// Recorded aborts: the fence. Kept for the life of the process (the
    /// file lock guarantees that no coordinator of an earlier process is
    /// alive to need them after a restart).
    aborted: BTreeSet<TxId>,
}

impl std::fmt::Debug for FileDecisionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileDecisionLog")
            .field("path", &self.path)
            .field("id", &self.id)
            .finish()
    }
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

fn header(id: LogId) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&id.to_bytes());
    let crc = crc32(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

impl FileDecisionLog {
    /// Opens (or creates) the log at `path`, cutting off a torn last record.
    ///
    /// Errors (each names the path): the file is already open (locked by
    /// another `FileDecisionLog`, in this process or another); it is not a
    /// decision log; it is damaged before its last record (the offset is
    /// named, nothing is changed); or I/O.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_inner(path.as_ref(), None)
    }

    fn open_inner(path: &Path, sync: Option<Box<dyn SyncData>>) -> Result<Self> {
        let path = path.to_path_buf();
        let err = |e: std::io::Error| log_error(&path, e);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "already open: another FileDecisionLog (in this process or another) holds its lock; \
                     give each process its own log",
                )))
            }
            Err(TryLockError::Error(e)) => return Err(err(e)),
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(err)?;
        let (id, replay) = if bytes.is_empty() {
            let id = LogId::new();
            file.write_all(&header(id)).map_err(err)?;
            file.sync_all().map_err(err)?;
            sync_parent(&path);
            (id, Replay::default())
        } else {
            let id = parse_header(&bytes).map_err(err)?;
            let replay = parse(&bytes).map_err(err)?;
            (id, replay)
        };
        let good = if bytes.is_empty() {
            HEADER_LEN as u64
        } else {
            replay.good
        };
        if !bytes.is_empty() && good < bytes.len() as u64 {
            warn!(path = %path.display(), kept = good, dropped = bytes.len() as u64 - good, "decision log: cut off a torn last record");
            file.set_len(good).map_err(err)?;
            file.sync_all().map_err(err)?;
        }
        file.seek(SeekFrom::Start(good)).map_err(err)?;
        let sync_handle = match sync {
            Some(sync) => sync,
            None => Box::new(file.try_clone().map_err(err)?),
        };
        Ok(FileDecisionLog {
            path,
            id,
            inner: Mutex::new(LogFile {
                file,
                len: good,
                synced: good,
                syncing: false,
                poisoned: None,
                pending: replay.pending,
                aborted: replay.aborted,
            }),
            synced_cv: Condvar::new(),
            sync_handle,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses when an earlier `fsync` failed.
    fn check_poisoned(&self, inner: &LogFile) -> Result<()> {
        match &inner.poisoned {
            None => Ok(()),
            Some(why) => Err(log_error(
                &self.path,
                std::io::Error::other(format!(
                    "refusing decisions after a failed fsync ({why}); reopen the log once the disk is fixed"
                )),
            )),
        }
    }

    /// Waits until the first `end` bytes are durable, running the `fsync`
    /// itself unless another caller's covers them.
    fn sync_upto(&self, inner: &mut MutexGuard<'_, LogFile>, end: u64) -> Result<()> {
        loop {
            self.check_poisoned(inner)?;
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
            if let Err(e) = result {
                error!(path = %self.path.display(), error = %e, "decision log fsync failed: refusing every further decision");
                inner.poisoned = Some(e.to_string());
                return Err(log_error(&self.path, e));
            }
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
    fn id(&self) -> LogId {
        self.id
    }

    fn record_commit(&self, decision: &Decision) -> Result<()> {
        let body = encode_commit(decision);
        let mut inner = self.inner.lock();
        self.check_poisoned(&inner)?;
        if inner.aborted.contains(&decision.txid) {
            return Err(Error::Fenced {
                txid: decision.txid,
            });
        }
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

    fn record_abort(&self, txid: &TxId) -> Result<Outcome> {
        let mut inner = self.inner.lock();
        self.check_poisoned(&inner)?;
        if inner.pending.contains_key(txid) {
            // The commit may still be waiting for its fsync: answer only
            // once it is durable (a failed one poisons the log).
            let end = inner.len;
            self.sync_upto(&mut inner, end)?;
            return Ok(Outcome::Committed);
        }
        if inner.aborted.insert(*txid) {
            let mut body = Vec::with_capacity(17);
            body.push(KIND_ABORT);
            put_txid(&mut body, txid);
            self.append(&mut inner, &body)?;
        }
        let end = inner.len;
        self.sync_upto(&mut inner, end)?;
        Ok(Outcome::Aborted)
    }

    fn forget(&self, txid: &TxId) -> Result<()> {
        let mut inner = self.inner.lock();
        if inner.pending.remove(txid).is_none() {
            return Ok(());
        }
        if inner.pending.is_empty() && inner.len > COMPACT_AT && !inner.syncing {
            let err = |e| log_error(&self.path, e);
            inner.file.set_len(HEADER_LEN as u64).map_err(err)?;
            inner
                .file
                .seek(SeekFrom::Start(HEADER_LEN as u64))
                .map_err(err)?;
            inner.file.sync_data().map_err(err)?;
            inner.len = HEADER_LEN as u64;
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

fn parse_header(bytes: &[u8]) -> std::io::Result<LogId> {
    if bytes.starts_with(MAGIC_V1) {
        return Err(invalid(
            "a decision log of tm's first format (without a log id): finish its transactions with \
             the version that wrote it, then start a new log"
                .to_owned(),
        ));
    }
    if bytes.len() < HEADER_LEN || &bytes[..MAGIC.len()] != MAGIC {
        return Err(invalid("not a tm decision log (bad magic)".to_owned()));
    }
    let crc = u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes"));
    if crc32(&bytes[..24]) != crc {
        return Err(invalid(
            "damaged header at offset 0 (checksum mismatch); nothing was changed".to_owned(),
        ));
    }
    Ok(LogId::from_bytes(
        bytes[8..24].try_into().expect("16 bytes"),
    ))
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
    Abort(TxId),
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
            if !r.buf.is_empty() {
                return None;
            }
            Some(Record::Commit(Decision::new(txid, participants, metadata)))
        }
        KIND_FORGET if r.buf.is_empty() => Some(Record::Forget(txid)),
        KIND_ABORT if r.buf.is_empty() => Some(Record::Abort(txid)),
        _ => None,
    }
}

#[derive(Default)]
struct Replay {
    pending: BTreeMap<TxId, Decision>,
    aborted: BTreeSet<TxId>,
    /// The length of the good prefix: after it only a torn last record.
    good: u64,
}

/// The record at `pos`, if a whole, valid one starts there: its length.
fn record_at(bytes: &[u8], pos: usize) -> Option<(usize, Record)> {
    let header = bytes.get(pos..pos + 8)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let body = bytes.get(pos + 8..(pos + 8).checked_add(len)?)?;
    if crc32(body) != crc {
        return None;
    }
    Some((8 + len, decode(body)?))
}

/// Replays the records. A bad record with nothing valid after it is a torn
/// tail (cut by the caller); a bad record followed by a valid one is damage,
/// reported with its offset.
fn parse(bytes: &[u8]) -> std::io::Result<Replay> {
    let mut replay = Replay::default();
    let mut pos = HEADER_LEN;
    while pos < bytes.len() {
        let Some((len, record)) = record_at(bytes, pos) else {
            if let Some(next) = (pos + 1..bytes.len()).find(|&q| record_at(bytes, q).is_some()) {
                return Err(invalid(format!(
                    "damaged record at offset {pos} (a valid record follows at offset {next}, so \
                     this is not a torn tail); nothing was truncated: restore the file or repair it \
                     by hand"
                )));
            }
            break;
        };
        match record {
            Record::Commit(d) => {
                replay.pending.insert(d.txid, d);
            }
            Record::Forget(id) => {
                replay.pending.remove(&id);
            }
            Record::Abort(id) => {
                replay.aborted.insert(id);
            }
        }
        pos += len;
    }
    replay.good = pos.min(bytes.len()) as u64;
    Ok(replay)
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
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn commit(log: &FileDecisionLog, participant: &str) -> TxId {
        let id = TxId::new();
        log.record_commit(&Decision::new(
            id,
            vec![participant.to_owned()],
            BTreeMap::new(),
        ))
        .unwrap();
        id
    }

    fn pending_ids(log: &FileDecisionLog) -> Vec<TxId> {
        log.pending().unwrap().into_iter().map(|d| d.txid).collect()
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn the_id_is_created_with_the_log_and_kept_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let id = FileDecisionLog::open(&path).unwrap().id();
        assert_eq!(FileDecisionLog::open(&path).unwrap().id(), id);
        let other = FileDecisionLog::open(dir.path().join("other")).unwrap();
        assert_ne!(other.id(), id);
    }

    #[test]
    fn torn_tail_is_cut_off_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (a, b) = {
            let log = FileDecisionLog::open(&path).unwrap();
            (commit(&log, "x"), commit(&log, "y"))
        };
        let full = std::fs::metadata(&path).unwrap().len();
        // Tear the last record at every possible byte.
        let bytes = std::fs::read(&path).unwrap();
        let second_len =
            encode_commit(&Decision::new(b, vec!["y".into()], BTreeMap::new())).len() + 8;
        for cut in 1..second_len as u64 {
            std::fs::write(&path, &bytes[..(full - cut) as usize]).unwrap();
            let log = FileDecisionLog::open(&path).unwrap();
            assert_eq!(pending_ids(&log), vec![a], "cut {cut}");
            // Appending after the cut works and is readable again.
            commit(&log, "y");
            drop(log);
            let log = FileDecisionLog::open(&path).unwrap();
            assert_eq!(log.pending().unwrap().len(), 2);
        }
    }

    #[test]
    fn a_zero_filled_tail_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let a = commit(&FileDecisionLog::open(&path).unwrap(), "x");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[0u8; 4096]);
        std::fs::write(&path, &bytes).unwrap();
        let log = FileDecisionLog::open(&path).unwrap();
        assert_eq!(pending_ids(&log), vec![a]);
    }

    #[test]
    fn damage_before_the_last_record_is_an_error_naming_the_offset_and_nothing_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        {
            let log = FileDecisionLog::open(&path).unwrap();
            for p in ["a", "b", "c"] {
                commit(&log, p);
            }
        }
        let clean = std::fs::read(&path).unwrap();
        // Flip one bit anywhere in the first record (its length, checksum or
        // body): open must refuse and leave the file as it was.
        let first_len = clean.len() - HEADER_LEN;
        let first_len = first_len / 3;
        for at in HEADER_LEN..HEADER_LEN + first_len {
            let mut bytes = clean.clone();
            bytes[at] ^= 0x10;
            std::fs::write(&path, &bytes).unwrap();
            let err = FileDecisionLog::open(&path).unwrap_err();
            let text = crate::Report(&err).to_string();
            assert!(
                text.contains(&format!("offset {HEADER_LEN}")),
                "flip at {at}: {text}"
            );
            assert_eq!(
                std::fs::read(&path).unwrap(),
                bytes,
                "flip at {at}: file changed"
            );
        }
        // A damaged header is refused too.
        let mut bytes = clean.clone();
        bytes[10] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(FileDecisionLog::open(&path).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn a_second_open_of_one_file_fails_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let first = FileDecisionLog::open(&path).unwrap();
        let err = FileDecisionLog::open(&path).unwrap_err();
        let text = crate::Report(&err).to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("already open"), "{text}");
        drop(first);
        FileDecisionLog::open(&path).unwrap();
    }

    #[test]
    fn record_abort_fences_a_later_commit_and_a_commit_wins_over_a_later_abort() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let fenced = TxId::new();
        let decided;
        {
            let log = FileDecisionLog::open(&path).unwrap();
            assert_eq!(log.record_abort(&fenced).unwrap(), Outcome::Aborted);
            assert_eq!(log.record_abort(&fenced).unwrap(), Outcome::Aborted);
            let err = log
                .record_commit(&Decision::new(fenced, vec![], BTreeMap::new()))
                .unwrap_err();
            assert!(
                matches!(err, Error::Fenced { txid } if txid == fenced),
                "{err}"
            );
            decided = commit(&log, "x");
            assert_eq!(log.record_abort(&decided).unwrap(), Outcome::Committed);
            assert_eq!(pending_ids(&log), vec![decided]);
        }
        // Both survive a reopen.
        let log = FileDecisionLog::open(&path).unwrap();
        assert!(log
            .record_commit(&Decision::new(fenced, vec![], BTreeMap::new()))
            .is_err());
        assert_eq!(log.record_abort(&decided).unwrap(), Outcome::Committed);
    }

    struct FailingSync {
        file: File,
        fail: Arc<AtomicBool>,
    }

    impl SyncData for FailingSync {
        fn sync_data(&self) -> std::io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(5)); // EIO
            }
            self.file.sync_data()
        }
    }

    #[test]
    fn after_a_failed_fsync_every_further_decision_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        drop(FileDecisionLog::open(&path).unwrap());
        let fail = Arc::new(AtomicBool::new(false));
        let sync = FailingSync {
            file: File::open(&path).unwrap(),
            fail: fail.clone(),
        };
        let log = FileDecisionLog::open_inner(&path, Some(Box::new(sync))).unwrap();
        let kept = commit(&log, "ok");
        fail.store(true, Ordering::SeqCst);
        let d = Decision::new(TxId::new(), vec!["p".into()], BTreeMap::new());
        assert!(log.record_commit(&d).is_err());
        // The disk is fine again, but the log does not trust it.
        fail.store(false, Ordering::SeqCst);
        let err = log
            .record_commit(&Decision::new(TxId::new(), vec![], BTreeMap::new()))
            .unwrap_err();
        let text = crate::Report(&err).to_string();
        assert!(text.contains("failed fsync"), "{text}");
        assert!(log.record_abort(&TxId::new()).is_err());
        assert_eq!(pending_ids(&log), vec![kept]);
    }

    #[test]
    fn concurrent_decisions_share_fsyncs_and_all_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let log = Arc::new(FileDecisionLog::open(&path).unwrap());
        let ids: Vec<TxId> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let log = log.clone();
                    s.spawn(move || {
                        (0..50)
                            .map(|i| commit(&log, &format!("p{i}")))
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
        let mut pending = pending_ids(&reopened);
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
        let text = crate::Report(&err).to_string();
        assert!(text.contains("bad magic"), "{text}");
        std::fs::write(&path, b"TMDLOG1\nxxxxxxxxxxxx").unwrap();
        let err = FileDecisionLog::open(&path).unwrap_err();
        let text = crate::Report(&err).to_string();
        assert!(text.contains("first format"), "{text}");
    }
}
