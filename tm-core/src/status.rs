//! Transaction status, and the one rule by which it changes.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::error::Error;

/// Where a transaction is in its life.
///
/// ```text
///                 ┌──────────── doom ─────────────┐
///                 ▼                               │
///   Active ◀──▶ Doomed ──abort──▶ Aborted       Active
///     │                              ▲
///     ├──commit──▶ Committing ──▶ Committed
///     │               └──failure──▶ CommitFailed ──abort──┘
///     ├──savepoint rollback fails──▶ CommitFailed
///     └──abort──▶ Aborted
/// ```
///
/// A transaction reports `Aborted` from the moment an `abort()` wins (its
/// hooks and the resources' `abort` calls follow). Before-commit hooks see
/// `Active`, as in ZODB, though the commit has already excluded any other
/// `commit`, `abort` or savepoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// Work may be done, resources joined, savepoints taken.
    Active,
    /// The commit is running.
    Committing,
    /// The commit succeeded.
    Committed,
    /// The transaction can only be aborted.
    Doomed,
    /// The commit failed; only `abort()` is accepted now.
    CommitFailed,
    /// The transaction was aborted.
    Aborted,
}

impl Status {
    /// `true` once the transaction has ended (committed or aborted).
    pub fn is_finished(self) -> bool {
        matches!(self, Status::Committed | Status::Aborted)
    }

    /// The status as ZODB spells it (`"Commit failed"`), plus `"Aborted"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "Active",
            Status::Committing => "Committing",
            Status::Committed => "Committed",
            Status::Doomed => "Doomed",
            Status::CommitFailed => "Commit failed",
            Status::Aborted => "Aborted",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The internal stage: finer than [`Status`], so that every operation that
/// calls resources holds the transaction in a stage of its own, and no
/// other operation can start meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Stage {
    /// Open for work.
    Active = 0,
    /// A savepoint is being taken or rolled back (resources are called).
    Savepoint = 1,
    /// `commit()` won: its before-commit hooks run (they may still join).
    BeforeCommit = 2,
    /// The two-phase commit runs: nothing may join.
    Committing = 3,
    Committed = 4,
    CommitFailed = 5,
    /// `abort()` won: hooks and resources' `abort` run.
    Aborting = 6,
    Aborted = 7,
}

/// Set beside the stage once the transaction is doomed.
const DOOMED: u8 = 0x10;
const STAGE: u8 = 0x0f;

impl Stage {
    fn from_bits(bits: u8) -> Stage {
        match bits & STAGE {
            0 => Stage::Active,
            1 => Stage::Savepoint,
            2 => Stage::BeforeCommit,
            3 => Stage::Committing,
            4 => Stage::Committed,
            5 => Stage::CommitFailed,
            6 => Stage::Aborting,
            _ => Stage::Aborted,
        }
    }
}

/// What an operation asks of the stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// `commit()` starts.
    Commit,
    /// The before-commit hooks are done: the protocol starts.
    StartProtocol,
    /// A before-commit hook or synchronizer doomed it: back to work, doomed.
    HooksDoomed,
    /// The protocol ended well.
    Succeed,
    /// The commit failed (before-commit hook, or any resource).
    Fail,
    /// `abort()` starts.
    Abort,
    /// `abort()` is done.
    Aborted,
    /// `doom()`.
    Doom,
    /// A savepoint is taken or rolled back.
    EnterSavepoint,
    /// ... and it went well.
    LeaveSavepoint,
    /// ... and its rollback failed: only abort is left.
    SavepointFailed,
}

/// The one rule: the stage a step leads to from `bits`, or why it is
/// refused. Every status change of a transaction goes through here.
fn next(bits: u8, step: Step) -> Result<u8, Error> {
    use Stage as S;
    let doomed = bits & DOOMED;
    let to = |stage: Stage| Ok(stage as u8 | doomed);
    let stage = Stage::from_bits(bits);
    match (step, stage) {
        (Step::Commit, S::Active) if doomed != 0 => Err(Error::Doomed),
        (Step::Commit, S::Active) => to(S::BeforeCommit),
        (Step::StartProtocol, S::BeforeCommit) if doomed == 0 => to(S::Committing),
        (Step::HooksDoomed, S::BeforeCommit) if doomed != 0 => to(S::Active),
        (Step::Succeed, S::Committing) => to(S::Committed),
        (Step::Fail, S::BeforeCommit | S::Committing) => to(S::CommitFailed),
        (Step::Abort, S::Active | S::CommitFailed) => to(S::Aborting),
        (Step::Aborted, S::Aborting) => to(S::Aborted),
        (Step::Doom, S::Active | S::Savepoint | S::BeforeCommit) => Ok(bits | DOOMED),
        (Step::EnterSavepoint, S::Active) => to(S::Savepoint),
        (Step::LeaveSavepoint, S::Savepoint) => to(S::Active),
        (Step::SavepointFailed, S::Savepoint) => to(S::CommitFailed),
        // Refusals: what the caller is told.
        (_, S::CommitFailed) => Err(Error::CommitFailed),
        (Step::EnterSavepoint, S::Committed | S::Aborting | S::Aborted) => {
            Err(Error::InvalidSavepoint)
        }
        (_, S::Savepoint) => Err(Error::Busy(
            "a savepoint is being taken or rolled back on another thread",
        )),
        _ => Err(Error::Closed),
    }
}

/// A transaction's stage, changed only by [`AtomicStage::step`].
#[derive(Debug)]
pub(crate) struct AtomicStage(AtomicU8);

impl AtomicStage {
    pub(crate) fn new() -> Self {
        AtomicStage(AtomicU8::new(Stage::Active as u8))
    }

    /// Applies `step` as one compare-and-set: exactly one of two racing
    /// steps wins; the other gets the refusal of the stage the winner left.
    pub(crate) fn step(&self, step: Step) -> Result<Stage, Error> {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let new = next(cur, step)?;
            match self
                .0
                .compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(Stage::from_bits(new)),
                Err(actual) => cur = actual,
            }
        }
    }

    pub(crate) fn stage(&self) -> Stage {
        Stage::from_bits(self.0.load(Ordering::Acquire))
    }

    pub(crate) fn is_doomed(&self) -> bool {
        self.0.load(Ordering::Acquire) & DOOMED != 0
    }

    /// Whether a resource may join now (from work, or a before-commit hook).
    pub(crate) fn check_join(&self) -> Result<(), Error> {
        match self.stage() {
            Stage::Active | Stage::Savepoint | Stage::BeforeCommit => Ok(()),
            Stage::CommitFailed => Err(Error::CommitFailed),
            _ => Err(Error::Closed),
        }
    }

    /// The public status.
    pub(crate) fn status(&self) -> Status {
        let bits = self.0.load(Ordering::Acquire);
        let doomed = bits & DOOMED != 0;
        match Stage::from_bits(bits) {
            Stage::Active | Stage::Savepoint | Stage::BeforeCommit if doomed => Status::Doomed,
            Stage::Active | Stage::Savepoint | Stage::BeforeCommit => Status::Active,
            Stage::Committing => Status::Committing,
            Stage::Committed => Status::Committed,
            Stage::CommitFailed => Status::CommitFailed,
            Stage::Aborting | Stage::Aborted => Status::Aborted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEPS: [Step; 11] = [
        Step::Commit,
        Step::StartProtocol,
        Step::HooksDoomed,
        Step::Succeed,
        Step::Fail,
        Step::Abort,
        Step::Aborted,
        Step::Doom,
        Step::EnterSavepoint,
        Step::LeaveSavepoint,
        Step::SavepointFailed,
    ];

    #[test]
    fn finished_stages_accept_no_step() {
        for stage in [Stage::Committed, Stage::Aborted] {
            for step in STEPS {
                assert!(next(stage as u8, step).is_err(), "{stage:?} {step:?}");
            }
        }
    }

    #[test]
    fn commit_and_abort_exclude_each_other() {
        for first in [Step::Commit, Step::Abort] {
            let s = AtomicStage::new();
            s.step(first).unwrap();
            let second = if first == Step::Commit {
                Step::Abort
            } else {
                Step::Commit
            };
            assert!(s.step(second).is_err(), "{first:?} then {second:?}");
            assert!(s.step(first).is_err(), "{first:?} twice");
        }
    }

    #[test]
    fn a_doomed_transaction_refuses_commit_but_aborts() {
        let s = AtomicStage::new();
        s.step(Step::Doom).unwrap();
        assert_eq!(s.status(), Status::Doomed);
        assert!(matches!(s.step(Step::Commit), Err(Error::Doomed)));
        s.step(Step::Abort).unwrap();
        s.step(Step::Aborted).unwrap();
        assert_eq!(s.status(), Status::Aborted);
    }
}
