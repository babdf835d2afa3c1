//! [`RecoveryService`]: recovery on a background thread that the
//! application owns.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tracing::{error, warn};

use crate::decision_log::DecisionLog;
use crate::error::Result;
use crate::recovery::{recover_with, Recoverable, RecoveryOptions, RecoveryReport};

/// Runs [`recover_with`] every `interval` on its own thread, until dropped.
///
/// Safe while transactions run, in this process or others (see
/// [`recover`](crate::recover)): records younger than the grace period are
/// left alone, and an abort is fenced. What it is for: a `tpc_finish` that
/// failed after the decision leaves its resource prepared, holding locks;
/// the service commits it within one interval, instead of at the next
/// restart. A pass that fails (the log cannot be read) or leaves errors
/// backs off, doubling the pause up to `max_backoff`.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tm_core::{FileDecisionLog, MemoryStore, Recoverable, RecoveryService};
///
/// let dir = tempfile::tempdir()?;
/// let log = Arc::new(FileDecisionLog::open(dir.path().join("decisions"))?);
/// let store = MemoryStore::<i64>::named("accounts");
/// let service = RecoveryService::builder(log, vec![Arc::new(store) as Arc<dyn Recoverable>])
///     .interval(Duration::from_millis(10))
///     .start()?;
/// service.run_now(); // one pass, now
/// assert!(service.passes() >= 1);
/// drop(service); // stops the thread and waits for it
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct RecoveryService {
    shared: Arc<ServiceShared>,
    thread: Option<JoinHandle<()>>,
}

struct ServiceShared {
    state: Mutex<ServiceState>,
    wake: Condvar,
    passes: AtomicU64,
}

#[derive(Default)]
struct ServiceState {
    stop: bool,
    /// A pass was asked for (`nudge`, `run_now`).
    nudged: bool,
    /// Passes started and completed: `run_now` waits for a pass that
    /// started after it was called.
    started: u64,
    completed: u64,
    last: Option<Arc<RecoveryReport>>,
}

/// Configures a [`RecoveryService`].
#[must_use]
pub struct RecoveryServiceBuilder {
    log: Arc<dyn DecisionLog>,
    resources: Vec<Arc<dyn Recoverable>>,
    interval: Duration,
    max_backoff: Duration,
    options: RecoveryOptions,
}

impl std::fmt::Debug for RecoveryServiceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveryServiceBuilder")
            .field("log", &self.log.id())
            .field("resources", &self.resources.len())
            .field("interval", &self.interval)
            .field("max_backoff", &self.max_backoff)
            .field("options", &self.options)
            .finish()
    }
}

impl RecoveryServiceBuilder {
    /// The pause between passes (default 1 s).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }
    /// The longest pause after failing passes (default 30 s).
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.max_backoff = max;
        self
    }
    /// The options of each pass (grace, take-over); a dry run is refused.
    pub fn options(mut self, options: RecoveryOptions) -> Self {
        self.options = options;
        self
    }
    /// Starts the thread.
    ///
    /// Errors: [`Error::InvalidArgument`](crate::Error::InvalidArgument) for
    /// a zero interval or a dry run; the thread could not be spawned.
    pub fn start(self) -> Result<RecoveryService> {
        if self.interval.is_zero() {
            return Err(crate::Error::InvalidArgument(
                "RecoveryService interval must be more than zero".to_owned(),
            ));
        }
        if self.options.dry_run {
            return Err(crate::Error::InvalidArgument(
                "a RecoveryService cannot run dry: use recover_with for a dry run".to_owned(),
            ));
        }
        let shared = Arc::new(ServiceShared {
            state: Mutex::new(ServiceState::default()),
            wake: Condvar::new(),
            passes: AtomicU64::new(0),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tm-recovery".to_owned())
            .spawn(move || self.run(&thread_shared))
            .map_err(|e| {
                crate::Error::InvalidArgument(format!("could not start the recovery thread: {e}"))
            })?;
        Ok(RecoveryService {
            shared,
            thread: Some(thread),
        })
    }

    fn run(self, shared: &ServiceShared) {
        let span = tracing::info_span!("recovery_service", log = %self.log.id());
        let _entered = span.enter();
        let resources: Vec<&dyn Recoverable> = self.resources.iter().map(|r| &**r).collect();
        let mut pause = self.interval;
        loop {
            mark_started(shared);
            let outcome = recover_with(&*self.log, &resources, &self.options);
            shared.passes.fetch_add(1, Ordering::Relaxed);
            let failed = match &outcome {
                Ok(report) => !report.is_clean(),
                Err(err) => {
                    error!(error = %err, "recovery pass failed");
                    true
                }
            };
            pause = if failed {
                (pause * 2).min(self.max_backoff.max(self.interval))
            } else {
                self.interval
            };
            if failed {
                warn!(?pause, "recovery pass left errors; backing off");
            }
            let mut st = shared.state.lock();
            st.completed += 1;
            if let Ok(report) = outcome {
                st.last = Some(Arc::new(report));
            }
            shared.wake.notify_all();
            let deadline = Instant::now() + pause;
            while !st.stop && !st.nudged {
                if shared.wake.wait_until(&mut st, deadline).timed_out() {
                    break;
                }
            }
            if st.stop {
                return;
            }
            st.nudged = false;
        }
    }
}

fn mark_started(shared: &ServiceShared) {
    shared.state.lock().started += 1;
}

impl RecoveryService {
    /// A service recovering `log` over `resources`: 1 s interval, default
    /// [`RecoveryOptions`].
    pub fn builder(
        log: Arc<dyn DecisionLog>,
        resources: Vec<Arc<dyn Recoverable>>,
    ) -> RecoveryServiceBuilder {
        RecoveryServiceBuilder {
            log,
            resources,
            interval: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            options: RecoveryOptions::default(),
        }
    }

    /// Asks for a pass soon, without waiting (e.g. after an
    /// [`Error::Heuristic`](crate::Error::Heuristic) left something in doubt).
    pub fn nudge(&self) {
        self.shared.state.lock().nudged = true;
        self.shared.wake.notify_all();
    }

    /// Runs a pass now and waits for it: its report (`None` if the pass
    /// could not read the log).
    pub fn run_now(&self) -> Option<Arc<RecoveryReport>> {
        let mut st = self.shared.state.lock();
        // A pass running now may have listed before the caller's change:
        // wait for the next one to start and end.
        let target = st.started + 1;
        st.nudged = true;
        self.shared.wake.notify_all();
        while st.completed < target && !st.stop {
            self.shared.wake.wait(&mut st);
        }
        st.last.clone()
    }

    /// How many passes have run.
    pub fn passes(&self) -> u64 {
        self.shared.passes.load(Ordering::Relaxed)
    }

    /// The last pass's report.
    pub fn last_report(&self) -> Option<Arc<RecoveryReport>> {
        self.shared.state.lock().last.clone()
    }

    /// Stops the thread and waits for it (what `drop` does).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("the recovery thread panicked");
            }
        }
    }
}

impl Drop for RecoveryService {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for RecoveryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveryService")
            .field("passes", &self.passes())
            .finish()
    }
}
