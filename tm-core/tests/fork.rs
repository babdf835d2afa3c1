//! A child made by `fork()` that does not exec never repeats its parent's
//! transaction ids. A real `fork`: the child makes ids and writes them to a
//! pipe; the parent makes as many and compares.

#![cfg(unix)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;

use tm_core::TxId;

extern "C" {
    fn fork() -> i32;
    fn pipe(fds: *mut i32) -> i32;
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
    fn _exit(code: i32) -> !;
}

const IDS: usize = 1000;

#[test]
fn a_forked_child_never_repeats_its_parents_transaction_ids() {
    // The parent has made ids before the fork: its prefix is chosen.
    let before: Vec<TxId> = (0..10).map(|_| TxId::new()).collect();
    let mut fds = [0i32; 2];
    // SAFETY: pipe fills two descriptors we own from here on.
    assert_eq!(unsafe { pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only makes ids, writes them and _exits (no
    // allocation-unsafe state is relied on: the test harness thread that
    // forks is the only one the child has).
    let pid = unsafe { fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: the write end, owned by the child.
        let mut w = unsafe { std::fs::File::from_raw_fd(fds[1]) };
        let mut text = String::new();
        for _ in 0..IDS {
            text.push_str(&TxId::new().to_string());
            text.push('\n');
        }
        let code = i32::from(w.write_all(text.as_bytes()).is_err());
        drop(w);
        // SAFETY: leave at once, running no destructor of the parent's state.
        unsafe { _exit(code) }
    }
    // SAFETY: the parent closes the write end and owns the read end.
    drop(unsafe { std::fs::File::from_raw_fd(fds[1]) });
    let mut r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    let parent: Vec<TxId> = (0..IDS).map(|_| TxId::new()).collect();
    let mut text = String::new();
    r.read_to_string(&mut text).unwrap();
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { waitpid(pid, &mut status, 0) }, pid);
    assert_eq!(status, 0, "the child failed");
    let child: Vec<TxId> = text.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(child.len(), IDS);
    let mine: HashSet<TxId> = before.iter().chain(&parent).copied().collect();
    let repeated: Vec<&TxId> = child.iter().filter(|id| mine.contains(id)).collect();
    assert!(
        repeated.is_empty(),
        "the child repeated {} of its parent's ids, e.g. {}",
        repeated.len(),
        repeated[0]
    );
    assert_ne!(child[0].prefix(), before[0].prefix());
}
