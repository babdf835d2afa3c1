//! Property tests: MemoryStore against a plain model, and the protocol's
//! "exactly one ending" invariant under random failures.

mod common;

use std::collections::HashMap;

use common::*;
use proptest::prelude::*;
use tm_core::testing::{CallLog, Fault, TestDataManager};
use tm_core::{Error, MemoryStore, Phase, Savepoint, Transaction};

#[derive(Debug, Clone)]
enum Op {
    Put(u8, i32),
    Delete(u8),
    Get(u8),
    JoinOther,
    Savepoint,
    Rollback(usize),
    Commit,
    Abort,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, any::<i32>()).prop_map(|(k, v)| Op::Put(k, v)),
        1 => (0u8..4).prop_map(Op::Delete),
        3 => (0u8..4).prop_map(Op::Get),
        1 => Just(Op::JoinOther),
        2 => Just(Op::Savepoint),
        2 => any::<usize>().prop_map(Op::Rollback),
        1 => Just(Op::Commit),
        1 => Just(Op::Abort),
    ]
}

type Overlay = HashMap<String, Option<i32>>;

struct Open {
    txn: Transaction,
    overlay: Overlay,
    /// Every savepoint taken, with the model's overlay then and whether the
    /// model thinks it is still valid.
    savepoints: Vec<(Savepoint, Overlay, bool)>,
}

fn key(k: u8) -> String {
    format!("k{k}")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn memory_store_agrees_with_a_model_of_map_and_savepoint_stack(ops in prop::collection::vec(op(), 1..60)) {
        let tm = tm();
        let store = MemoryStore::<i32>::new();
        let log = CallLog::new();
        let mut committed: HashMap<String, i32> = HashMap::new();
        let mut open: Option<Open> = None;
        for op in ops {
            let cur = open.get_or_insert_with(|| Open {
                txn: tm.begin().unwrap(),
                overlay: Overlay::new(),
                savepoints: Vec::new(),
            });
            match op {
                Op::Put(k, v) => {
                    store.join(&cur.txn).unwrap().put(&key(k), v)?;
                    cur.overlay.insert(key(k), Some(v));
                }
                Op::Delete(k) => {
                    store.join(&cur.txn).unwrap().delete(&key(k))?;
                    cur.overlay.insert(key(k), None);
                }
                Op::Get(k) => {
                    let got = store.join(&cur.txn).unwrap().get(&key(k)).unwrap();
                    let want = match cur.overlay.get(&key(k)) {
                        Some(v) => *v,
                        None => committed.get(&key(k)).copied(),
                    };
                    prop_assert_eq!(got, want, "get {}", key(k));
                }
                Op::JoinOther => {
                    cur.txn.join(TestDataManager::new("other", &log)).unwrap();
                }
                Op::Savepoint => {
                    let sp = cur.txn.savepoint().unwrap();
                    cur.savepoints.push((sp, cur.overlay.clone(), true));
                }
                Op::Rollback(i) => {
                    if cur.savepoints.is_empty() {
                        continue;
                    }
                    let i = i % cur.savepoints.len();
                    let (sp, snapshot, valid) = &cur.savepoints[i];
                    prop_assert_eq!(sp.is_valid(), *valid);
                    if *valid {
                        sp.rollback().unwrap();
                        cur.overlay = snapshot.clone();
                        for later in &mut cur.savepoints[i + 1..] {
                            later.2 = false;
                        }
                    } else {
                        prop_assert!(matches!(sp.rollback(), Err(Error::InvalidSavepoint)));
                    }
                }
                Op::Commit => {
                    let cur = open.take().unwrap();
                    cur.txn.commit().unwrap();
                    for (k, v) in cur.overlay {
                        match v {
                            Some(v) => committed.insert(k, v),
                            None => committed.remove(&k),
                        };
                    }
                    for (sp, _, _) in &cur.savepoints {
                        prop_assert!(!sp.is_valid());
                    }
                    prop_assert_eq!(store.snapshot(), committed.clone());
                }
                Op::Abort => {
                    let cur = open.take().unwrap();
                    cur.txn.abort().unwrap();
                    prop_assert_eq!(store.snapshot(), committed.clone());
                }
            }
        }
        if let Some(cur) = open.take() {
            cur.txn.abort().unwrap();
        }
        prop_assert_eq!(store.snapshot(), committed);
        prop_assert_eq!(store.prepared_count(), 0);
        prop_assert!(!tm.in_transaction());
    }

    #[test]
    fn every_resource_gets_exactly_one_ending_whatever_fails(
        resources in prop::collection::vec((0u8..3, any::<bool>()), 1..6),
        fault_at in prop::option::of((any::<prop::sample::Index>(), 0usize..6, 0usize..3)),
    ) {
        const PHASES: [Phase; 6] = [Phase::TpcBegin, Phase::Commit, Phase::TpcVote, Phase::TpcFinish, Phase::CommitOnePhase, Phase::TpcAbort];
        const FAULTS: [Fault; 3] = [Fault::Error, Fault::Conflict, Fault::Panic];
        let log = CallLog::new();
        let victim = fault_at.map(|(i, p, f)| (i.index(resources.len()), PHASES[p], FAULTS[f]));
        let tm = tm_many_last();
        let txn = tm.begin().unwrap();
        let mut names = Vec::new();
        for (i, (key, one_phase)) in resources.iter().enumerate() {
            let name = format!("r{i}");
            let mut dm = TestDataManager::new(&name, &log).with_sort_key(&key.to_string());
            if *one_phase {
                dm = dm.one_phase();
            }
            if let Some((v, phase, fault)) = victim {
                if v == i {
                    dm = dm.fail_at(phase, fault);
                }
            }
            txn.join(dm).unwrap();
            names.push((name, *key, *one_phase));
        }
        let result = txn.commit();
        let in_doubt = match &result {
            Err(Error::Heuristic { in_doubt, .. }) => in_doubt.clone(),
            _ => Vec::new(),
        };
        if result.is_err() {
            tm.abort().unwrap();
        }
        prop_assert!(!tm.in_transaction());
        // tpc_begin goes in sort-key order, ties in join order.
        let begins: Vec<String> = log.entries().into_iter().filter(|(_, p)| *p == Phase::TpcBegin).map(|(n, _)| n).collect();
        let mut sorted = names.clone();
        sorted.sort_by_key(|(_, key, _)| *key);
        let expected: Vec<String> = sorted.iter().map(|(n, _, _)| n.clone()).take(begins.len()).collect();
        prop_assert_eq!(begins, expected);
        for (i, (name, _, _)) in names.iter().enumerate() {
            let phases = log.phases_of(name);
            let finish_failed = matches!(victim, Some((v, Phase::TpcFinish, _)) if v == i);
            let endings = phases.iter().filter(|p| match p {
                Phase::TpcFinish => !finish_failed,
                p => is_ending(**p),
            }).count();
            // The kind of ending follows what ran: tpc_abort only after
            // tpc_begin, abort only without it.
            let begun = phases.contains(&Phase::TpcBegin);
            prop_assert!(!phases.contains(&Phase::TpcAbort) || begun, "{} {:?}", name, phases);
            prop_assert!(!phases.contains(&Phase::Abort) || !begun, "{} {:?}", name, phases);
            let key = resources[i].0.to_string();
            if finish_failed && !resources[i].1 && names.len() > 1 {
                prop_assert!(in_doubt.contains(&key), "{:?} names {}", result, key);
                // Prepared and in doubt: no ending in this process.
                prop_assert_eq!(endings, 0, "{} {:?}", name, phases);
                prop_assert_eq!(phases.last(), Some(&Phase::TpcFinish));
            } else {
                prop_assert_eq!(endings, 1, "{} {:?} victim {:?} result {:?}", name, phases, victim, result);
            }
        }
    }
}
