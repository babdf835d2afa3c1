//! Retrying a transaction: `for attempt in tm.attempts() { attempt.run(..)?; }`.

use std::cell::Cell;
use std::fmt;
use std::rc::Rc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::error::Error;
use crate::retry::{abort_logged, run_in, TxError};
use crate::transaction::Transaction;

/// The pause between attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backoff {
    /// Retry at once.
    None,
    /// Full-jitter exponential backoff: before retry `k` (1-based), sleep a
    /// random time in `[0, min(max, initial * 2^(k-1))]`.
    Exponential {
        /// The ceiling of the first pause.
        initial: Duration,
        /// The largest ceiling.
        max: Duration,
    },
}

impl Default for Backoff {
    /// About 1 ms doubling to 100 ms, jittered.
    fn default() -> Self {
        Backoff::Exponential {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(100),
        }
    }
}

impl Backoff {
    /// The pause before retry number `retry` (1 = the first retry).
    pub fn delay(&self, retry: u32) -> Duration {
        match self {
            Backoff::None => Duration::ZERO,
            Backoff::Exponential { initial, max } => {
                let factor = 1u32 << retry.saturating_sub(1).min(20);
                let ceiling = initial.saturating_mul(factor).min(*max);
                let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
                if nanos == 0 {
                    return Duration::ZERO;
                }
                Duration::from_nanos(jitter() % (nanos + 1))
            }
        }
    }
}

/// A per-thread xorshift generator: jitter needs spread, not cryptography.
fn jitter() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(0x9e37_79b9_7f4a_7c15);
            h.finish() | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

#[derive(Default)]
struct Progress {
    done: Cell<bool>,
    retry_pending: Cell<bool>,
}

/// The attempts of a retry loop (an iterator of [`Attempt`]s), from
/// [`TransactionManager::attempts`](crate::TransactionManager::attempts).
///
/// It stops after the first success; a retryable failure on any attempt but
/// the last is swallowed and the loop goes on after the backoff; the last
/// attempt's failure and any non-retryable failure are returned by
/// [`Attempt::run`].
///
/// ```
/// use tm_core::{Error, Phase, TransactionManager, Backoff};
/// use tm_core::testing::{CallLog, Fault, TestDataManager};
///
/// let tm = TransactionManager::builder().explicit(true).backoff(Backoff::None).build();
/// let log = CallLog::new();
/// let mut tries = 0;
/// for attempt in tm.attempts() {
///     attempt.run(|txn| {
///         tries += 1;
///         if tries < 3 {
///             return Err(Error::conflict("demo", Phase::Work, "try again"));
///         }
///         txn.join(TestDataManager::new("a", &log))
///     })?;
/// }
/// assert_eq!(tries, 3);
/// # Ok::<(), tm_core::Error>(())
/// ```
pub struct Attempts {
    tm: Rc<dyn Source>,
    total: u32,
    next: u32,
    progress: Rc<Progress>,
}

impl Attempts {
    pub(crate) fn new(tm: Rc<dyn Source>, total: u32) -> Self {
        Attempts {
            tm,
            total,
            next: 1,
            progress: Rc::new(Progress::default()),
        }
    }
}

impl fmt::Debug for Attempts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attempts")
            .field("total", &self.total)
            .field("next", &self.next)
            .field("done", &self.progress.done.get())
            .finish()
    }
}

impl Iterator for Attempts {
    type Item = Attempt;

    fn next(&mut self) -> Option<Attempt> {
        if self.progress.done.get() || self.next > self.total.max(1) {
            return None;
        }
        let number = self.next;
        self.next += 1;
        if self.progress.retry_pending.replace(false) {
            let delay = self.tm.backoff().delay(number - 1);
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
        }
        Some(Attempt {
            tm: self.tm.clone(),
            number,
            total: self.total,
            progress: self.progress.clone(),
        })
    }
}

/// What a retry loop needs of its manager (the manager implements it), so
/// that this module needs nothing of `manager.rs`.
pub(crate) trait Source {
    /// A new transaction for one attempt (none may be active).
    fn begin_attempt(&self) -> Result<Transaction, Error>;
    /// The pause between attempts.
    fn backoff(&self) -> Backoff;
}

/// One attempt of a retry loop.
pub struct Attempt {
    tm: Rc<dyn Source>,
    number: u32,
    total: u32,
    progress: Rc<Progress>,
}

impl fmt::Debug for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attempt")
            .field("number", &self.number)
            .field("total", &self.total)
            .finish()
    }
}

impl Attempt {
    /// 1-based.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// Whether this is the last attempt (its failure is returned, never
    /// swallowed).
    pub fn is_last(&self) -> bool {
        self.number >= self.total
    }

    /// Begins a transaction, runs `f`, commits on `Ok` (aborts on `Err`).
    ///
    /// `Ok(Some(value))` on success (the loop then ends); `Ok(None)` when a
    /// retryable failure was swallowed (the loop goes on); `Err` for the last
    /// attempt's failure or any non-retryable one, unchanged. A panic in `f`
    /// aborts the transaction and propagates.
    pub fn run<T, E, F>(self, f: F) -> Result<Option<T>, E>
    where
        F: FnOnce(&Transaction) -> Result<T, E>,
        E: TxError,
    {
        self.run_noted(None, f)
    }

    pub(crate) fn run_noted<T, E, F>(self, note: Option<&str>, f: F) -> Result<Option<T>, E>
    where
        F: FnOnce(&Transaction) -> Result<T, E>,
        E: TxError,
    {
        if self.total == 0 {
            self.progress.done.set(true);
            return Err(Error::InvalidArgument(
                "the number of attempts must be at least 1 (attempts_n(0) or retry_attempt_count 0)"
                    .to_owned(),
            )
            .into());
        }
        let txn = match self.tm.begin_attempt() {
            Ok(txn) => txn,
            Err(err) => {
                self.progress.done.set(true);
                return Err(err.into());
            }
        };
        if let Some(note) = note {
            txn.note(note);
        }
        // Pessimistic: a panic in `f` ends the loop too.
        self.progress.done.set(true);
        let failure = match run_in(&txn, f) {
            Ok(value) => return Ok(Some(value)),
            Err(failure) => failure,
        };
        let retryable = failure.is_retryable(&txn);
        abort_logged(&txn);
        let err = failure.into_error();
        let shown = err.as_std_error().map(tracing::field::display);
        if retryable && !self.is_last() {
            debug!(
                attempt = self.number,
                of = self.total,
                error = shown,
                "retryable failure; retrying"
            );
            self.progress.done.set(false);
            self.progress.retry_pending.set(true);
            return Ok(None);
        }
        if retryable {
            warn!(
                attempts = self.number,
                error = shown,
                "giving up: every attempt failed with a retryable error"
            );
        }
        Err(err)
    }
}
