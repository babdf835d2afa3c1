//! The staged-write model: what a transaction has buffered and read, before
//! any of it reaches the server. Pure data; no I/O.

use std::collections::HashMap;

/// A staged write command. Commands with a parameter tm-redis needs to
/// reason about (the read-your-writes overlay) carry it typed; the others'
/// arguments stay bytes in [`Write::args`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// `SET key value [PX ms]`.
    Set,
    /// `DEL key`.
    Del,
    /// `INCRBY key by`.
    IncrBy(i64),
    /// `HSET key field value`.
    HSet,
    /// `HDEL key field`.
    HDel,
    /// `SADD key member`.
    SAdd,
    /// `SREM key member`.
    SRem,
    /// `LPUSH key value`.
    LPush,
    /// `RPUSH key value`.
    RPush,
    /// `ZADD key score member`.
    ZAdd,
    /// `ZREM key member`.
    ZRem,
    /// `PEXPIRE key ms` (0 deletes the key).
    PExpire(u128),
    /// Any other command, from `RedisHandle::queue`: `args` is the whole
    /// command, name first, and `keys` lists every key it touches.
    Queued,
}

impl Op {
    /// The name `tm.lua` reads in a write-set: a Redis command applied as
    /// `name data_key args...`, or `*` for a queued command applied as
    /// `args...` verbatim.
    fn wire_name(self) -> &'static [u8] {
        match self {
            Op::Set => b"SET",
            Op::Del => b"DEL",
            Op::IncrBy(_) => b"INCRBY",
            Op::HSet => b"HSET",
            Op::HDel => b"HDEL",
            Op::SAdd => b"SADD",
            Op::SRem => b"SREM",
            Op::LPush => b"LPUSH",
            Op::RPush => b"RPUSH",
            Op::ZAdd => b"ZADD",
            Op::ZRem => b"ZREM",
            Op::PExpire(_) => b"PEXPIRE",
            Op::Queued => b"*",
        }
    }

    /// The typed parameter, as the argument that goes first on the wire.
    fn typed_arg(self) -> Option<String> {
        match self {
            Op::IncrBy(by) => Some(by.to_string()),
            Op::PExpire(ms) => Some(ms.to_string()),
            _ => None,
        }
    }
}

/// One staged write: a command on keys (by index in [`Keys`]).
#[derive(Debug, Clone)]
pub(crate) struct Write {
    pub(crate) op: Op,
    pub(crate) keys: Vec<usize>,
    /// The arguments after the key (for [`Op::Queued`]: the whole command),
    /// without the typed parameter.
    pub(crate) args: Vec<Vec<u8>>,
}

impl Write {
    /// The command's name, for errors (a queued command's own name).
    pub(crate) fn name(&self) -> String {
        match self.op {
            Op::Queued => self
                .args
                .first()
                .map(|a| String::from_utf8_lossy(a).to_uppercase())
                .unwrap_or_default(),
            op => String::from_utf8_lossy(op.wire_name()).into_owned(),
        }
    }

    /// The first argument after the key, for the overlay (`SET`'s value).
    pub(crate) fn value(&self) -> Option<&[u8]> {
        self.args.first().map(Vec::as_slice)
    }
}

/// The keys a transaction has touched, each with an index.
#[derive(Debug, Default)]
pub(crate) struct Keys {
    pub(crate) names: Vec<Vec<u8>>,
    index: HashMap<Vec<u8>, usize>,
    /// Read from the server (and so WATCHed) by this transaction.
    pub(crate) read: Vec<bool>,
}

impl Keys {
    /// The index of `key`, adding it if new.
    pub(crate) fn intern(&mut self, key: &[u8]) -> usize {
        if let Some(&i) = self.index.get(key) {
            return i;
        }
        let i = self.names.len();
        self.names.push(key.to_vec());
        self.index.insert(key.to_vec(), i);
        self.read.push(false);
        i
    }
}

/// Where each key goes in the function call's KEYS: the keys only read
/// first, then the keys written.
#[derive(Debug)]
pub(crate) struct Plan {
    /// Key indexes in call order.
    pub(crate) order: Vec<usize>,
    /// How many of `order` are only read.
    pub(crate) nread: usize,
    /// The 1-based triple number of each key index (0: not in the call).
    pub(crate) triple: Vec<usize>,
}

/// A transaction's reads and buffered writes.
#[derive(Debug, Default)]
pub(crate) struct WriteSet {
    pub(crate) keys: Keys,
    pub(crate) writes: Vec<Write>,
}

impl WriteSet {
    /// Buffers `op` on one key.
    pub(crate) fn stage(&mut self, op: Op, key: &[u8], args: Vec<Vec<u8>>) {
        let k = self.keys.intern(key);
        self.writes.push(Write {
            op,
            keys: vec![k],
            args,
        });
    }

    /// Buffers a queued command (`args`: the whole command) touching `keys`.
    pub(crate) fn queue(&mut self, args: Vec<Vec<u8>>, keys: &[&[u8]]) {
        let keys = keys.iter().map(|k| self.keys.intern(k)).collect();
        self.writes.push(Write {
            op: Op::Queued,
            keys,
            args,
        });
    }

    /// The writes touching key `k`, in order.
    pub(crate) fn writes_to(&self, k: usize) -> impl Iterator<Item = (usize, &Write)> {
        self.writes
            .iter()
            .enumerate()
            .filter(move |(_, w)| w.keys.contains(&k))
    }

    /// Whether the transaction neither read nor wrote anything.
    pub(crate) fn is_empty(&self) -> bool {
        self.writes.is_empty() && !self.keys.read.iter().any(|&r| r)
    }

    /// The call order of the keys read or written.
    pub(crate) fn plan(&self) -> Plan {
        let n = self.keys.names.len();
        let mut written = vec![false; n];
        for w in &self.writes {
            for &k in &w.keys {
                written[k] = true;
            }
        }
        let mut order: Vec<usize> = (0..n)
            .filter(|&k| self.keys.read[k] && !written[k])
            .collect();
        let nread = order.len();
        order.extend((0..n).filter(|&k| written[k]));
        let mut triple = vec![0usize; n];
        for (pos, &k) in order.iter().enumerate() {
            triple[k] = pos + 1;
        }
        Plan {
            order,
            nread,
            triple,
        }
    }

    /// The number of arguments [`encode`](Self::encode) appends.
    pub(crate) fn wire_len(&self) -> usize {
        self.writes
            .iter()
            .map(|w| 3 + w.keys.len() + w.args.len() + usize::from(w.op.typed_arg().is_some()))
            .sum()
    }

    /// The write-set as `tm.lua` reads it: per write `name nkeys
    /// triples... nargs args...`, each pushed with `arg`.
    pub(crate) fn encode(&self, plan: &Plan, mut arg: impl FnMut(&[u8])) {
        for w in &self.writes {
            let typed = w.op.typed_arg();
            arg(w.op.wire_name());
            arg(w.keys.len().to_string().as_bytes());
            for &k in &w.keys {
                arg(plan.triple[k].to_string().as_bytes());
            }
            let nargs = w.args.len() + usize::from(typed.is_some());
            arg(nargs.to_string().as_bytes());
            if let Some(t) = &typed {
                arg(t.as_bytes());
            }
            for a in &w.args {
                arg(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(ws: &WriteSet) -> Vec<String> {
        let plan = ws.plan();
        let mut out = Vec::new();
        ws.encode(&plan, |a| out.push(String::from_utf8_lossy(a).into_owned()));
        assert_eq!(out.len(), ws.wire_len());
        out
    }

    #[test]
    fn read_only_keys_come_first_and_triples_are_numbered_from_one() {
        let mut ws = WriteSet::default();
        ws.stage(Op::Set, b"w", vec![b"1".to_vec()]);
        let r = ws.keys.intern(b"r");
        ws.keys.read[r] = true;
        let plan = ws.plan();
        assert_eq!(plan.nread, 1);
        assert_eq!(plan.order, vec![r, 0]);
        assert_eq!(plan.triple, vec![2, 1]);
    }

    #[test]
    fn the_wire_form_puts_typed_parameters_first() {
        let mut ws = WriteSet::default();
        ws.stage(Op::IncrBy(-5), b"n", Vec::new());
        ws.stage(Op::PExpire(0), b"n", Vec::new());
        ws.queue(
            vec![b"SETRANGE".to_vec(), b"s".to_vec(), b"0".to_vec()],
            &[b"s"],
        );
        assert_eq!(
            encoded(&ws),
            [
                "INCRBY", "1", "1", "1", "-5", //
                "PEXPIRE", "1", "1", "1", "0", //
                "*", "1", "2", "3", "SETRANGE", "s", "0",
            ]
        );
        assert_eq!(ws.writes[2].name(), "SETRANGE");
        assert_eq!(ws.writes[0].name(), "INCRBY");
    }

    #[test]
    fn an_untouched_transaction_is_empty() {
        let mut ws = WriteSet::default();
        ws.keys.intern(b"k"); // interned by a refused read: not read
        assert!(ws.is_empty());
        ws.queue(vec![b"FLUSHALL".to_vec()], &[]);
        assert!(!ws.is_empty(), "a command with no keys is still a write");
    }
}
