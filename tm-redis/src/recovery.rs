//! A [`Store`] as a [`Recoverable`]: its prepared records, found through
//! the store's index of records (never a keyspace SCAN per transaction),
//! and their finish or abort.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::Value;
use tm_core::{InDoubt, Missing, Phase, Recoverable, TxId};
use tracing::{debug, info, warn};

use crate::conn;
use crate::error::{Error, Result};
use crate::store::{Store, StoreInner};
use crate::wire::{self, Layout};

impl StoreInner {
    /// The record names in the index, all of them or those of `txid`
    /// (`SSCAN` with a pattern: the server filters).
    fn indexed(&self, txid: Option<&str>, phase: Phase) -> Result<Vec<Vec<u8>>> {
        let index = self.keys.records();
        let pattern = match txid {
            Some(id) => {
                let mut p = b"*:prepared:".to_vec();
                p.extend_from_slice(&crate::keys::glob_escape(id.as_bytes()));
                p
            }
            None => b"*".to_vec(),
        };
        let names = self.scan(&[b"SSCAN", &index], &pattern, phase)?;
        Ok(names
            .into_iter()
            .filter(|n| {
                self.keys
                    .name_of(n, "prepared")
                    .is_some_and(|got| txid.is_none_or(|id| got == id.as_bytes()))
            })
            .collect())
    }

    /// Once per store: puts records prepared by tm versions before the
    /// index (found by one SCAN) into it.
    fn index_older_records(&self, phase: Phase) -> Result<()> {
        if self.legacy_indexed.load(Ordering::Acquire) {
            return Ok(());
        }
        let names: Vec<Vec<u8>> = self
            .scan(&[b"SCAN"], &self.keys.glob("prepared", b"*"), phase)?
            .into_iter()
            .filter(|n| self.keys.name_of(n, "prepared").is_some())
            .collect();
        if !names.is_empty() {
            let index = self.keys.records();
            let mut buf = Vec::new();
            conn::cmd(&mut buf, 2 + names.len());
            conn::arg(&mut buf, b"SADD");
            conn::arg(&mut buf, &index);
            for n in &names {
                conn::arg(&mut buf, n);
            }
            if let Value::ServerError(e) = self.call_idempotent(phase, "SADD", &buf, 1)?.remove(0) {
                return Err(self.command_error(phase, "SADD", e.into()));
            }
            info!(server = %self.server, records = names.len(), "indexed prepared records of an older tm version");
        }
        self.legacy_indexed.store(true, Ordering::Release);
        Ok(())
    }

    /// The records of `txid` (key and key list of each). Usually one; more
    /// when two `Store`s opened separately on the same server and prefix
    /// took part with keys of different hash tags.
    fn find_records(&self, txid: &TxId, phase: Phase) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.index_older_records(phase)?;
        let id = txid.to_string();
        let names = self.indexed(Some(&id), phase)?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut buf = Vec::new();
        for n in &names {
            conn::command(&mut buf, &[b"HGET", n, b"k"]);
        }
        let replies = self.call_idempotent(phase, "HGET", &buf, names.len())?;
        let mut found = Vec::new();
        for (name, reply) in names.into_iter().zip(replies) {
            match reply {
                Value::BulkString(b) => found.push((name, b)),
                Value::Nil => {} // finished meanwhile
                Value::ServerError(e) => return Err(self.command_error(phase, "HGET", e.into())),
                other => return Err(self.unexpected(phase, "HGET", &other)),
            }
        }
        Ok(found)
    }

    /// What is left of `txid` with no record: `Ok` for a receipt, else why
    /// it is gone. One request for the receipt and the tombstone (both
    /// under the empty tag); only when neither is there, one SCAN for the
    /// tagged ones that tm versions before 2 left.
    fn missing_record(&self, txid: &TxId, phase: Phase) -> Result<()> {
        let id = txid.to_string();
        let receipt = self.keys.key(b"", "applied", id.as_bytes());
        let tombstone = self.keys.key(b"", "aborted", id.as_bytes());
        let mut buf = Vec::new();
        conn::command(&mut buf, &[b"EXISTS", &receipt]);
        conn::command(&mut buf, &[b"EXISTS", &tombstone]);
        let replies = self.call_idempotent(phase, "EXISTS", &buf, 2)?;
        let found = |v: &Value| matches!(v, Value::Int(n) if *n > 0);
        let (mut applied, mut aborted) = (found(&replies[0]), found(&replies[1]));
        if !applied && !aborted {
            let older = |kind: &str| -> Result<bool> {
                Ok(self
                    .scan(&[b"SCAN"], &self.keys.glob(kind, id.as_bytes()), phase)?
                    .iter()
                    .any(|name| self.keys.name_of(name, kind) == Some(id.as_bytes())))
            };
            applied = older("applied")?;
            aborted = !applied && older("aborted")?;
        }
        if applied {
            debug!(server = %self.server, %txid, "no record, and a receipt (applied before)");
            Ok(())
        } else if aborted {
            Err(self.record_missing(txid, Missing::Aborted))
        } else {
            Err(self.record_missing(txid, Missing::Lost))
        }
    }

    /// A `SCAN`-like command (`head`: `SCAN` or `SSCAN key`) to the end.
    fn scan(&self, head: &[&[u8]], pattern: &[u8], phase: Phase) -> Result<Vec<Vec<u8>>> {
        let command = String::from_utf8_lossy(head[0]).into_owned();
        let mut found = Vec::new();
        let mut seen = HashSet::new();
        let mut cursor = b"0".to_vec();
        loop {
            let mut buf = Vec::new();
            let mut args: Vec<&[u8]> = head.to_vec();
            args.extend_from_slice(&[&cursor, b"MATCH", pattern, b"COUNT", b"1000"]);
            conn::command(&mut buf, &args);
            let reply = self.call_idempotent(phase, &command, &buf, 1)?.remove(0);
            if let Value::ServerError(e) = reply {
                return Err(self.command_error(phase, &command, e.into()));
            }
            let Value::Array(mut parts) = reply else {
                return Err(self.unexpected(phase, &command, &reply));
            };
            if parts.len() != 2 {
                return Err(self.unexpected(phase, &command, &Value::Array(parts)));
            }
            let keys = parts.pop();
            let next = parts.pop();
            if let Some(Value::Array(keys)) = keys {
                for k in keys {
                    if let Value::BulkString(k) = k {
                        if seen.insert(k.clone()) {
                            found.push(k);
                        }
                    }
                }
            }
            match next {
                Some(Value::BulkString(c)) if c == b"0" => return Ok(found),
                Some(Value::BulkString(c)) => cursor = c,
                other => {
                    return Err(self.unexpected(phase, &command, &other.unwrap_or(Value::Nil)))
                }
            }
        }
    }

    /// The layout of a prepared record's apply or abort.
    fn record_layout(&self, txid: &TxId, record: &[u8], blob: &[u8]) -> Result<Layout> {
        let tag = self.keys.tag_of(record).unwrap_or_default();
        let (nread, keys) = wire::decode_keys(blob).ok_or_else(|| Error::UnexpectedReply {
            server: self.server.clone(),
            phase: Phase::Recover,
            command: "HGET".to_owned(),
            reply: "a prepared record with a malformed key list".to_owned(),
        })?;
        let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        Ok(Layout::new(&self.keys, tag, txid, &keys, nread, true))
    }

    fn in_doubt(&self) -> Result<Vec<InDoubt>> {
        let phase = Phase::Recover;
        self.index_older_records(phase)?;
        let names = self.indexed(None, phase)?;
        let mut records: Vec<(TxId, &[u8])> = names
            .iter()
            .filter_map(|n| {
                let id = self.keys.name_of(n, "prepared")?;
                let txid = std::str::from_utf8(id).ok()?.parse().ok()?;
                Some((txid, n.as_slice()))
            })
            .collect();
        records.sort();
        let mut buf = Vec::new();
        for (_, name) in &records {
            conn::command(&mut buf, &[b"HMGET", name, b"k", b"l", b"t"]);
        }
        conn::command(&mut buf, &[b"TIME"]);
        let mut replies = self.call_idempotent(phase, "HMGET", &buf, records.len() + 1)?;
        let time = replies.pop().unwrap_or(Value::Nil);
        let now = match &time {
            Value::Array(t) if t.len() == 2 => int_of(&t[0])
                .zip(int_of(&t[1]))
                .map(|(secs, micros)| secs * 1_000_000 + micros),
            Value::ServerError(e) => {
                return Err(self.command_error(phase, "TIME", e.clone().into()))
            }
            _ => None,
        };
        let Some(now) = now else {
            return Err(self.unexpected(phase, "TIME", &time));
        };
        let mut out: Vec<InDoubt> = Vec::with_capacity(records.len());
        for ((txid, name), reply) in records.iter().zip(replies) {
            let fields = match reply {
                Value::Array(f) if f.len() == 3 => f,
                Value::ServerError(e) => return Err(self.command_error(phase, "HMGET", e.into())),
                other => return Err(self.unexpected(phase, "HMGET", &other)),
            };
            if fields[0] == Value::Nil {
                // Finished since the listing, or an entry an older version
                // (which does not know the index) left behind.
                continue;
            }
            let log = match &fields[1] {
                Value::BulkString(b) if b.is_empty() => None,
                Value::BulkString(b) => {
                    match std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()) {
                        Some(log) => Some(log),
                        None => {
                            warn!(server = %self.server, record = %String::from_utf8_lossy(name), "a prepared record names no readable log id; it is listed without an owner");
                            None
                        }
                    }
                }
                _ => None, // prepared before records named their owner
            };
            let age = int_of(&fields[2])
                .map(|at| Duration::from_micros(now.saturating_sub(at)))
                .unwrap_or(Duration::ZERO);
            // Two records of one transaction (two Stores on one server and
            // prefix): listed once, as the older.
            match out.last_mut() {
                Some(last) if last.txid == *txid => last.age = last.age.max(age),
                _ => out.push(InDoubt::new(*txid, log, age)),
            }
        }
        Ok(out)
    }
}

/// A non-negative integer reply given as a string (TIME, a record's `t`).
fn int_of(v: &Value) -> Option<u64> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::Int(i) => u64::try_from(*i).ok(),
        _ => None,
    }
}

impl Recoverable for Store {
    /// `redis:<store id>`: the id kept on the server under
    /// `<prefix>{}:store-id`, made by the first open (`SET NX`). Every URL
    /// of one server, db and prefix gives the same id, and it survives
    /// restarts (it is in the AOF).
    fn resource_id(&self) -> String {
        self.inner.resource_id.clone()
    }

    /// The store's index of records (`SSCAN`), then one request: `HMGET k
    /// l t` of each and one `TIME`, so every age is measured by the
    /// server's own clock.
    fn in_doubt(&self) -> tm_core::Result<Vec<InDoubt>> {
        Ok(self.inner.in_doubt()?)
    }

    /// Applies every record of `txid`. With none: `Ok` only if a receipt
    /// shows it was applied before; a tombstone is `RecordMissing`
    /// (aborted), neither is `RecordMissing` (lost).
    fn commit_prepared(&self, txid: &TxId) -> tm_core::Result<()> {
        let records = self.inner.find_records(txid, Phase::Recover)?;
        if records.is_empty() {
            return Ok(self.inner.missing_record(txid, Phase::Recover)?);
        }
        for (record, blob) in records {
            let layout = self.inner.record_layout(txid, &record, &blob)?;
            wire::apply(&self.inner, &layout, txid, Phase::Recover)?;
        }
        Ok(())
    }

    fn abort_prepared(&self, txid: &TxId) -> tm_core::Result<()> {
        let records = self.inner.find_records(txid, Phase::Recover)?;
        if records.is_empty() {
            // No record: still leave a tombstone, so that a prepare of this
            // transaction still on its way refuses.
            let layout = Layout::new(&self.inner.keys, b"", txid, &[], 0, true);
            wire::abort(&self.inner, &layout, txid, Phase::Recover)?;
        }
        for (record, blob) in records {
            let layout = self.inner.record_layout(txid, &record, &blob)?;
            wire::abort(&self.inner, &layout, txid, Phase::Recover)?;
        }
        Ok(())
    }
}
