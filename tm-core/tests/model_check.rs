//! A model-checked specification of tm's commit + recovery protocol (the
//! design with owned records, a grace period, the abort-row fence and
//! receipts), written for the `stateright` model checker.
//!
//! Run it (the CI configuration, then the larger one):
//!
//! ```text
//! cargo test -p tm-core --test model_check --release -- --nocapture
//! TM_MODEL_FULL=1 cargo test -p tm-core --test model_check --release -- --nocapture
//! cargo run -p tm-core --example model_explorer --release   # stateright's web explorer
//! ```
//!
//! # What is modelled
//!
//! Two coordinators C1, C2 each run one transaction (t1 over S, R1, R2; t2
//! over S, R1: they share R1, and in the default configuration they share the
//! decision log L too). S is the one-phase SQLite participant that hosts the
//! log; its COMMIT is the decision (the commit row is INSERTed inside S's own
//! transaction). R1, R2 are Redis participants with one record per txid.
//! Recovery workers (restarted coordinators, a third process) run
//! `recover()` at any moment, any number of times, one record at a time.
//!
//! Faults, bounded by a budget so that every path ends: a coordinator crash
//! at any step (its open S transaction rolls back), a vote timeout while the
//! prepare is still on the wire (it may arrive late), S's COMMIT returning an
//! error whether or not it committed, a failing `tpc_finish` (before or after
//! `tm_apply` ran), a failing `tpc_abort`, a recovery worker crashing or
//! failing between any two of its steps, and a Redis record lost (eviction,
//! failover without the write). Stalls need no action: the checker explores
//! every interleaving, with no fairness. One configuration also lets
//! receipts and tombstones expire at any moment.
//!
//! # What is not modelled
//!
//! Data values and key locks (a prepared record stands for its locks; the
//! transactions do not conflict on keys), SQLite's write lock held from S's
//! first write (it only serializes more: the model allows a superset of the
//! interleavings), the clock behind "old" (any record may become old at any
//! time), a recovery pass whose listing of a participant fails (it must not
//! forget: `recover` marks every decision unfinished then), and
//! one-phase-only transactions.
//!
//! # What the checker found in the design
//!
//! S's COMMIT can fail and still have committed (an I/O error while syncing
//! the WAL; the commit is found on the next open). `run_protocol` treats an
//! error from the first one-phase resource as "nothing decided": it forgets
//! the commit row and aborts the Redis participants, which breaks atomicity
//! (`aborting_after_an_uncertain_commit_breaks_atomicity`, 6 steps). The fix
//! modelled as the design (`CommitError::Fence`): after an S COMMIT error the
//! coordinator calls `record_abort` itself; `Committed` means S did commit
//! (finish the Redis participants), otherwise the abort row it inserted
//! forbids that commit for good and everyone is aborted. If `record_abort`
//! fails too, leave everything prepared for recovery, which does the same.
//!
//! Each action's doc comment names the code it stands for:
//! `Transaction::run_protocol` (tm-core/src/transaction.rs), `recover`
//! (tm-core/src/recovery.rs), `DecisionLog::record_commit` /
//! `record_abort` / `forget` (`SqliteDecisionLog`, tm-sqlite/src/decision_log.rs)
//! and the Lua functions `tm_prepare`, `tm_apply`, `tm_abort`
//! (tm-redis/src/lua/tm.lua).

mod support;

use stateright::{Checker, HasDiscoveries, Model};
use std::collections::{HashMap, VecDeque};
use std::time::Instant;
use support::protocol::{
    full, Action, CommitError, Config, Fence, Rules, State, PROPERTIES, SCENARIOS,
};

/// Explores every state of `config` (or stops once every property of
/// `until` has a counterexample); prints what it explored.
fn explore(name: &str, config: Config, until: &[&'static str]) -> impl Checker<Config> {
    let started = Instant::now();
    let mut builder = config.checker();
    if !until.is_empty() {
        builder = builder.finish_when(HasDiscoveries::AllOf(until.iter().copied().collect()));
    }
    let checker = builder.spawn_bfs().join();
    println!(
        "{name}: {} unique states ({} generated), depth {}, {:.2?}",
        checker.unique_state_count(),
        checker.state_count(),
        checker.max_depth(),
        started.elapsed()
    );
    checker
}

/// Asserts that every property of `config` holds.
fn assert_holds(name: &str, config: Config) {
    let checker = explore(name, config, &[]);
    for property in PROPERTIES {
        if let Some(path) = checker.discovery(property) {
            panic!("{name}: {property:?} broken by {:#?}", path.into_actions());
        }
    }
    // Not vacuous: commits, fences, recovery commits and late prepares
    // all happen.
    for scenario in SCENARIOS {
        assert!(
            checker.discovery(scenario).is_some(),
            "{name}: no {scenario:?}"
        );
    }
}

/// Asserts that each of `properties` has a counterexample in `config` (as
/// found by stateright), and prints the shortest one.
fn assert_broken(name: &str, config: Config, properties: &[&'static str]) {
    let checker = explore(name, config.clone(), properties);
    for &property in properties {
        assert!(
            checker.discovery(property).is_some(),
            "{name}: expected a counterexample to {property:?}, found none"
        );
        // Stateright keeps the last violation of a batch of states, so its
        // path may wander; a plain BFS gives the shortest one to print.
        let actions = shortest_counterexample(&config, property);
        println!(
            "{name}: counterexample to {property:?}, {} steps:",
            actions.len()
        );
        for (i, a) in actions.iter().enumerate() {
            println!("  {:2}. {a:?}", i + 1);
        }
    }
}

/// The shortest path to a state that breaks the `always` property named
/// `property`.
fn shortest_counterexample(config: &Config, property: &str) -> Vec<Action> {
    let properties = config.properties();
    let holds = properties
        .iter()
        .find(|p| p.name == property)
        .unwrap()
        .condition;
    let mut seen: HashMap<State, Option<(State, Action)>> = HashMap::new();
    let mut queue = VecDeque::new();
    for init in config.init_states() {
        seen.insert(init.clone(), None);
        queue.push_back(init);
    }
    while let Some(state) = queue.pop_front() {
        if !holds(config, &state) {
            let mut path = Vec::new();
            let mut at = &state;
            while let Some((parent, action)) = &seen[at] {
                path.push(*action);
                at = parent;
            }
            path.reverse();
            return path;
        }
        let mut actions = Vec::new();
        config.actions(&state, &mut actions);
        for action in actions {
            if let Some(next) = config.next_state(&state, action) {
                if !seen.contains_key(&next) {
                    seen.insert(next.clone(), Some((state.clone(), action)));
                    queue.push_back(next);
                }
            }
        }
    }
    unreachable!("{property:?} holds in every state")
}

#[test]
fn new_rules_hold_every_property() {
    for (name, config) in Config::for_new_rules() {
        let size = if full() { "full" } else { "CI size" };
        assert_holds(&format!("new rules, {name} ({size})"), config);
    }
}

/// Old rules: presumed abort of everything without a decision, and
/// `tm_apply` of a missing record taken as "already finished". No fault is
/// needed: a coordinator that stalls between its votes and its decision.
#[test]
fn old_rules_have_a_counterexample() {
    let config = Config::shared(Rules::OLD, 1, 0);
    assert_broken("old rules", config, &["atomicity", "no lost commit"]);
}

#[test]
fn without_the_fence_atomicity_breaks() {
    let rules = Rules {
        fence: Fence::None,
        ..Rules::NEW
    };
    assert_broken("no fence", Config::shared(rules, 1, 0), &["atomicity"]);
}

#[test]
fn a_fence_without_the_unique_key_breaks() {
    let rules = Rules {
        fence: Fence::OneSided,
        ..Rules::NEW
    };
    let config = Config::shared(rules, 1, 0);
    assert_broken("one-sided fence", config, &["the fence", "atomicity"]);
}

#[test]
fn applying_a_missing_record_as_success_loses_a_commit() {
    let rules = Rules {
        missing_is_heuristic: false,
        ..Rules::NEW
    };
    let config = Config::shared(rules, 1, 1);
    assert_broken("missing record is Ok", config, &["no lost commit"]);
}

#[test]
fn without_the_ownership_filter_a_foreign_commit_is_aborted() {
    let rules = Rules {
        ownership_filter: false,
        ..Rules::NEW
    };
    let config = Config::foreign(rules, 1, 0);
    assert_broken("no ownership filter", config, &["atomicity"]);
}

#[test]
fn forgetting_while_a_young_record_is_prepared_breaks_atomicity() {
    let rules = Rules {
        forget_waits_for_young: false,
        ..Rules::NEW
    };
    let config = Config::shared(rules, 1, 0);
    let properties = ["decision kept while in doubt", "atomicity"];
    assert_broken("forget ignores young records", config, &properties);
}

#[test]
fn forgetting_on_a_listing_older_than_the_commit_row_breaks_atomicity() {
    let rules = Rules {
        forget_reads_log_first: false,
        ..Rules::NEW
    };
    let config = Config::shared(rules, 1, 0);
    let properties = ["decision kept while in doubt", "atomicity"];
    assert_broken("forget lists before reading", config, &properties);
}

/// The hole found in the design: S's COMMIT can return an error and still
/// have committed (SQLite finds the commit in its WAL on the next open).
/// Treating that error as "nothing decided" aborts the Redis participants of
/// a committed transaction. The fix (in `Rules::NEW`): ask the fence.
#[test]
fn aborting_after_an_uncertain_commit_breaks_atomicity() {
    let rules = Rules {
        commit_error: CommitError::AbortAll,
        ..Rules::NEW
    };
    let config = Config::shared(rules, 1, 1);
    assert_broken("abort after a commit error", config, &["atomicity"]);
}

#[test]
fn aborting_over_a_receipt_gives_a_second_ending() {
    let rules = Rules {
        abort_keeps_receipt: false,
        ..Rules::NEW
    };
    let config = Config::shared(rules, 1, 0);
    assert_broken("abort overwrites receipt", config, &["one ending"]);
}

/// The grace period is not what keeps the protocol safe: without it the
/// fence still holds every property (recovery then fences off transactions
/// whose coordinator is alive and merely slow; that costs aborts, not money).
#[test]
fn without_the_grace_period_the_fence_alone_keeps_it_safe() {
    let rules = Rules {
        grace: false,
        ..Rules::NEW
    };
    assert_holds("no grace", Config::shared(rules, 1, 2));
}

/// The liveness property can fail too: with no process recovering L2, a
/// crashed C2's record stays prepared (L's recovery rightly leaves it alone).
#[test]
fn a_log_nobody_recovers_leaves_records_prepared() {
    let mut config = Config::foreign(Rules::NEW, 1, 1);
    config.workers.retain(|&log| log == 0);
    let property = "every prepared record is resolved";
    assert_broken("nobody recovers L2", config, &[property]);
}
