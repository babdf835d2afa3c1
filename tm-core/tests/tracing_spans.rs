//! tracing: a span per transaction carrying its id; an event per phase per
//! resource inside it; a warning when retries are spent; an error on a
//! heuristic outcome.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tm_core::testing::{CallLog, Fault, TestDataManager};
use tm_core::{Backoff, Error, Phase, TransactionManager};

#[derive(Default)]
struct Seen {
    /// span id -> "name field=value ..."
    spans: Vec<(u64, String)>,
    /// (level, span the event happened in, "field=value ...")
    events: Vec<(tracing::Level, Option<u64>, String)>,
    stack: Vec<u64>,
}

#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Seen>>,
    next: Arc<AtomicU64>,
}

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={:?} ", field.name(), value));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push_str(&format!("{}={} ", field.name(), value));
    }
}

impl tracing::Subscriber for Recorder {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut fields = Fields(format!("{} ", attrs.metadata().name()));
        attrs.record(&mut fields);
        self.seen.lock().spans.push((id, fields.0));
        tracing::span::Id::from_u64(id)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let mut seen = self.seen.lock();
        let current = seen.stack.last().copied();
        seen.events
            .push((*event.metadata().level(), current, fields.0));
    }
    fn enter(&self, id: &tracing::span::Id) {
        self.seen.lock().stack.push(id.into_u64());
    }
    fn exit(&self, _: &tracing::span::Id) {
        self.seen.lock().stack.pop();
    }
}

fn record<T>(f: impl FnOnce() -> T) -> (T, Seen) {
    let recorder = Recorder::default();
    let out = tracing::subscriber::with_default(recorder.clone(), f);
    let seen = std::mem::take(&mut *recorder.seen.lock());
    (out, seen)
}

#[test]
fn each_transaction_has_a_span_carrying_its_id_and_each_phase_call_is_an_event_in_it() {
    let log = CallLog::new();
    let ((), seen) = record(|| {
        let tm = TransactionManager::explicit();
        let txn = tm.begin().unwrap();
        txn.join(TestDataManager::new("a", &log)).unwrap();
        txn.join(TestDataManager::new("b", &log)).unwrap();
        txn.commit().unwrap();
    });
    let (span_id, span) = seen
        .spans
        .iter()
        .find(|(_, s)| s.starts_with("transaction "))
        .expect("a transaction span");
    assert!(span.contains("id="), "{span}");
    for resource in ["a", "b"] {
        for phase in ["tpc_begin", "commit", "tpc_vote", "tpc_finish"] {
            assert!(
                seen.events
                    .iter()
                    .any(|(_, in_span, text)| *in_span == Some(*span_id)
                        && text.contains(&format!("resource={resource}"))
                        && text.contains(&format!("phase={phase}"))),
                "no {phase} event for {resource} inside the transaction span: {:?}",
                seen.events
            );
        }
    }
}

#[test]
fn the_span_id_field_is_the_transaction_id() {
    let (id, seen) = record(|| {
        let tm = TransactionManager::explicit();
        let txn = tm.begin().unwrap();
        let id = txn.id().to_string();
        txn.commit().unwrap();
        id
    });
    assert!(
        seen.spans
            .iter()
            .any(|(_, s)| s.starts_with("transaction ") && s.contains(&id)),
        "{:?} does not name {id}",
        seen.spans
    );
}

#[test]
fn spent_retries_warn_and_a_heuristic_outcome_is_an_error_event() {
    let log = CallLog::new();
    let (outcome, seen) = record(|| {
        let tm = TransactionManager::builder()
            .explicit(true)
            .backoff(Backoff::None)
            .build();
        let spent = tm.run(|txn| {
            txn.join(TestDataManager::new("c", &log).fail_at(Phase::TpcVote, Fault::Conflict))?;
            txn.join(TestDataManager::new("d", &log))
        });
        assert!(matches!(spent, Err(Error::Conflict { .. })));
        let txn = tm.begin().unwrap();
        txn.join(TestDataManager::new("e", &log)).unwrap();
        txn.join(TestDataManager::new("f", &log).fail_at(Phase::TpcFinish, Fault::Error))
            .unwrap();
        let outcome = txn.commit();
        txn.abort().unwrap();
        outcome
    });
    assert!(matches!(outcome, Err(Error::Heuristic { .. })));
    assert!(seen
        .events
        .iter()
        .any(|(level, _, text)| *level == tracing::Level::WARN && text.contains("attempts=3")));
    assert!(seen
        .events
        .iter()
        .any(|(level, _, text)| *level == tracing::Level::ERROR && text.contains("heuristic")));
}
