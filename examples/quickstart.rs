//! Two resources in one transaction, a conflict retried, a savepoint rolled back.
//!
//! `cargo run --example quickstart`

use std::sync::atomic::{AtomicU32, Ordering};

use tm::{MemoryStore, TransactionManager};

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let accounts = MemoryStore::<i64>::named("accounts");
    let ledger = MemoryStore::<String>::named("ledger");
    let tm = TransactionManager::new();

    // Open two accounts: both stores commit together (two-phase commit).
    tm.run(|txn| {
        let a = accounts.join(txn)?;
        a.put("alice", 100)?;
        a.put("bob", 50)?;
        ledger
            .join(txn)?
            .put("0", "opened alice=100 bob=50".into())?;
        Ok::<_, tm::Error>(())
    })?;

    // A transfer that meets a conflict on its first attempt: another writer
    // changes alice's balance between our read and our commit. tm retries.
    let tries = AtomicU32::new(0);
    tm.run_named("transfer alice -> bob", |txn| {
        let a = accounts.join(txn)?;
        let alice = a.get("alice")?.unwrap_or(0);
        let bob = a.get("bob")?.unwrap_or(0);
        if tries.fetch_add(1, Ordering::SeqCst) == 0 {
            // A concurrent transaction commits first.
            let other = TransactionManager::explicit();
            other.run(|t| {
                accounts.join(t)?.put("alice", alice + 5)?;
                Ok::<_, tm::Error>(())
            })?;
        }
        a.put("alice", alice - 30)?;
        a.put("bob", bob + 30)?;
        ledger.join(txn)?.put("1", "alice -> bob 30".into())?;
        Ok::<_, tm::Error>(())
    })?;

    // A savepoint: the second write is rolled back, the first stays.
    tm.run(|txn| {
        let l = ledger.join(txn)?;
        l.put("2", "kept".into())?;
        let sp = txn.savepoint()?;
        l.put("3", "rolled back".into())?;
        sp.rollback()?;
        Ok::<_, tm::Error>(())
    })?;

    let alice = accounts.committed("alice").unwrap_or(0);
    let bob = accounts.committed("bob").unwrap_or(0);
    println!(
        "attempts for the transfer: {}",
        tries.load(Ordering::SeqCst)
    );
    println!("alice = {alice}, bob = {bob}, total = {}", alice + bob);
    let mut entries: Vec<_> = ledger.snapshot().into_iter().collect();
    entries.sort();
    for (k, v) in entries {
        println!("ledger[{k}] = {v}");
    }
    assert_eq!(alice + bob, 155, "money was created or destroyed");
    assert_eq!(ledger.committed("3"), None);
    Ok(())
}
