//! Transaction ids: unique across threads, processes and restarts.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

/// A transaction's globally unique id.
///
/// It is a random 64-bit prefix chosen once per process plus a per-process
/// counter, so making one costs an atomic increment and no system call. Its
/// text form is 16 hex digits, `-`, then the counter in decimal
/// (`"3f9a0c1d22b7e410-42"`); [`FromStr`] parses it back exactly.
///
/// ```
/// use tm_core::TxId;
/// let id = TxId::new();
/// let back: TxId = id.to_string().parse()?;
/// assert_eq!(id, back);
/// # Ok::<(), tm_core::ParseTxIdError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxId {
    prefix: u64,
    counter: u64,
}

static COUNTER: AtomicU64 = AtomicU64::new(1);

/// The process's random prefix; 0 until chosen. A forked child that does
/// not exec resets it (see `forget_prefix_in_child`), so it never repeats
/// its parent's ids.
static PREFIX: AtomicU64 = AtomicU64::new(0);

fn process_prefix() -> u64 {
    match PREFIX.load(Ordering::Relaxed) {
        0 => choose_prefix(),
        prefix => prefix,
    }
}

#[cold]
fn choose_prefix() -> u64 {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(register_fork_handler);
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS's randomness; mixing in the time and
    // pid guards against a platform where it is not. Never 0 (unset).
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(now);
    h.write_u32(std::process::id());
    let fresh = h.finish().max(1);
    match PREFIX.compare_exchange(0, fresh, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => fresh,
        Err(chosen) => chosen,
    }
}

/// Runs in the child of a `fork()`, before `fork` returns there: the next
/// id chooses a new prefix. Only an atomic store: async-signal-safe.
#[cfg(unix)]
extern "C" fn forget_prefix_in_child() {
    PREFIX.store(0, Ordering::Relaxed);
}

#[cfg(unix)]
fn register_fork_handler() {
    extern "C" {
        fn pthread_atfork(
            prepare: Option<extern "C" fn()>,
            parent: Option<extern "C" fn()>,
            child: Option<extern "C" fn()>,
        ) -> std::os::raw::c_int;
    }
    // SAFETY: pthread_atfork (POSIX) only stores the three function
    // pointers; the child handler is a plain atomic store and never
    // unwinds. std links the C library that provides it on every unix.
    let rc = unsafe { pthread_atfork(None, None, Some(forget_prefix_in_child)) };
    if rc != 0 {
        tracing::warn!(
            rc,
            "pthread_atfork failed: a forked child that does not exec could repeat transaction ids"
        );
    }
}

#[cfg(not(unix))]
fn register_fork_handler() {}

impl TxId {
    /// A fresh id, never returned before by any process (with overwhelming
    /// probability: the prefix has 64 random bits), also in a child made by
    /// `fork()` without `exec` (it chooses a prefix of its own).
    pub fn new() -> Self {
        TxId {
            prefix: process_prefix(),
            counter: COUNTER.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Builds an id from its parts (for adapters that store ids compactly).
    pub fn from_parts(prefix: u64, counter: u64) -> Self {
        TxId { prefix, counter }
    }

    /// The per-process random prefix.
    pub fn prefix(&self) -> u64 {
        self.prefix
    }

    /// The per-process counter.
    pub fn counter(&self) -> u64 {
        self.counter
    }
}

impl Default for TxId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{}", self.prefix, self.counter)
    }
}

impl fmt::Debug for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TxId({self})")
    }
}

/// A map keyed by [`TxId`] with a cheap hasher: adapters keep their
/// per-transaction state in one, looked up on every call.
///
/// Ids are made by tm, not by an adversary, so hash flooding is not a
/// concern; the prefix and counter are mixed with a multiply (FxHash-style)
/// instead of SipHash.
///
/// ```
/// use tm_core::{TxId, TxIdMap};
/// let mut open: TxIdMap<&str> = TxIdMap::default();
/// let id = TxId::new();
/// open.insert(id, "state");
/// assert_eq!(open.get(&id), Some(&"state"));
/// ```
pub type TxIdMap<V> = std::collections::HashMap<TxId, V, BuildTxIdHasher>;

/// The [`BuildHasher`](std::hash::BuildHasher) of [`TxIdMap`].
pub type BuildTxIdHasher = std::hash::BuildHasherDefault<TxIdHasher>;

/// The hasher of [`TxIdMap`]: fast for the two `u64`s of a [`TxId`].
#[derive(Debug, Default, Clone, Copy)]
pub struct TxIdHasher(u64);

impl std::hash::Hasher for TxIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(buf));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// The text was not a transaction id (`<16 hex digits>-<decimal counter>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a transaction id: {text:?} (expected <16 hex digits>-<counter>)")]
pub struct ParseTxIdError {
    text: String,
}

impl FromStr for TxId {
    type Err = ParseTxIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseTxIdError { text: s.to_owned() };
        let (prefix, counter) = s.split_once('-').ok_or_else(err)?;
        if prefix.len() != 16 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        if counter.is_empty() || !counter.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        Ok(TxId {
            prefix: u64::from_str_radix(prefix, 16).map_err(|_| err())?,
            counter: counter.parse().map_err(|_| err())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_are_distinct() {
        let a = TxId::new();
        let b = TxId::new();
        assert_ne!(a, b);
        assert_eq!(a, a.to_string().parse().unwrap());
    }

    #[test]
    fn bad_text_is_refused() {
        for bad in [
            "",
            "-",
            "zz-1",
            "0123456789abcdef-",
            "0123456789abcdef-x",
            "0123456789abcdef",
        ] {
            assert!(bad.parse::<TxId>().is_err(), "{bad}");
        }
    }
}
