//! The names of tm's own keys in Redis: `<prefix>{<tag>}:<kind>:<name>`,
//! the hash tag rules, and telling tm's keys from the user's.

/// The names of tm's own keys: `<prefix>{<tag>}:<kind>:<name>`.
#[derive(Debug, Clone)]
pub(crate) struct Keyspace {
    prefix: Vec<u8>,
}

/// The kinds of tm keys that have a name part.
const KINDS: [&[u8]; 5] = [b"lock", b"rlock", b"prepared", b"aborted", b"applied"];

/// The tm keys of a store as a whole (under the empty tag): its id, and
/// the index of its prepared records.
const STORE_KEYS: [&[u8]; 2] = [b"store-id", b"records"];

impl Keyspace {
    pub(crate) fn new(prefix: &[u8]) -> Keyspace {
        Keyspace {
            prefix: prefix.to_vec(),
        }
    }

    pub(crate) fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// `<prefix>{<tag>}:<kind>:<name>`
    pub(crate) fn key(&self, tag: &[u8], kind: &str, name: &[u8]) -> Vec<u8> {
        let mut k = self.store_key_with(tag, kind, 1 + name.len());
        k.push(b':');
        k.extend_from_slice(name);
        k
    }

    fn store_key_with(&self, tag: &[u8], kind: &str, room: usize) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + tag.len() + kind.len() + 3 + room);
        k.extend_from_slice(&self.prefix);
        k.push(b'{');
        k.extend_from_slice(tag);
        k.extend_from_slice(b"}:");
        k.extend_from_slice(kind.as_bytes());
        k
    }

    /// `<prefix>{}:store-id`: the store's identity.
    pub(crate) fn store_id(&self) -> Vec<u8> {
        self.store_key_with(b"", "store-id", 0)
    }

    /// `<prefix>{}:records`: the set of prepared records' key names, so
    /// recovery finds them without scanning the keyspace.
    pub(crate) fn records(&self) -> Vec<u8> {
        self.store_key_with(b"", "records", 0)
    }

    /// The name part of `key` if it is exactly `<prefix>{<tag>}:<kind>:<name>`
    /// (the tag, like a Redis hash tag, ends at the first `}`), else `None`.
    /// A SCAN glob `<prefix>{*}:<kind>:*` also matches the locks of user
    /// keys shaped like tm keys (`<prefix>{}:lock:x}:prepared:<txid>`), and
    /// user keys such as `<prefix>{x}y}:prepared:<txid>`; this tells them
    /// apart.
    pub(crate) fn name_of<'a>(&self, key: &'a [u8], kind: &str) -> Option<&'a [u8]> {
        let rest = self.after_tag(key)?.strip_prefix(b":")?;
        rest.strip_prefix(kind.as_bytes())?.strip_prefix(b":")
    }

    /// `(tag, rest)` of a key `<prefix>{<tag>}<rest>`, if it starts so.
    fn split_tag<'a>(&self, key: &'a [u8]) -> Option<(&'a [u8], &'a [u8])> {
        let rest = key
            .strip_prefix(self.prefix.as_slice())?
            .strip_prefix(b"{")?;
        let close = rest.iter().position(|&b| b == b'}')?;
        Some((&rest[..close], &rest[close + 1..]))
    }

    /// What follows `<prefix>{<tag>}` in `key`, if it starts so.
    fn after_tag<'a>(&self, key: &'a [u8]) -> Option<&'a [u8]> {
        self.split_tag(key).map(|(_, rest)| rest)
    }

    /// The tag of a key `<prefix>{<tag>}...`.
    pub(crate) fn tag_of<'a>(&self, key: &'a [u8]) -> Option<&'a [u8]> {
        self.split_tag(key).map(|(tag, _)| tag)
    }

    /// Whether `key` is one tm itself stores (any kind), so that a user
    /// write to it must be refused.
    pub(crate) fn is_tm_key(&self, key: &[u8]) -> bool {
        let Some(rest) = self.after_tag(key).and_then(|r| r.strip_prefix(b":")) else {
            return false;
        };
        KINDS.iter().any(|kind| {
            rest.strip_prefix(*kind)
                .is_some_and(|r| r.starts_with(b":"))
        }) || STORE_KEYS.contains(&rest)
    }

    /// A SCAN glob matching every `<prefix>{*}:<kind>:<name>` (a superset:
    /// filter with [`name_of`](Self::name_of)).
    pub(crate) fn glob(&self, kind: &str, name: &[u8]) -> Vec<u8> {
        let mut pattern = glob_escape(&self.prefix);
        pattern.extend_from_slice(b"{*}:");
        pattern.extend_from_slice(kind.as_bytes());
        pattern.push(b':');
        pattern.extend_from_slice(name);
        pattern
    }
}

/// Escapes a glob's special characters.
pub(crate) fn glob_escape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for &b in s {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

/// The Redis hash tag of `key` (as Redis Cluster computes it), if any.
pub(crate) fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let close = key[open + 1..].iter().position(|&b| b == b'}')?;
    (close > 0).then(|| &key[open + 1..open + 1 + close])
}

/// The tag a transaction's record and tombstone go under: the hash tag all
/// its keys share, else the empty one.
pub(crate) fn shared_tag<'a>(mut keys: impl Iterator<Item = &'a [u8]>) -> &'a [u8] {
    let Some(first) = keys.next() else {
        return b"";
    };
    match hash_tag(first) {
        Some(t) if keys.all(|k| hash_tag(k) == Some(t)) => t,
        _ => b"",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_tag_follows_redis_cluster_rules() {
        assert_eq!(hash_tag(b"{u1}:a"), Some(&b"u1"[..]));
        assert_eq!(hash_tag(b"a{u1}b{u2}"), Some(&b"u1"[..]));
        assert_eq!(hash_tag(b"{}:a"), None);
        assert_eq!(hash_tag(b"a}{"), None);
        assert_eq!(hash_tag(b"plain"), None);
        assert_eq!(shared_tag([&b"{a}x"[..], b"{a}y"].into_iter()), b"a");
        assert_eq!(shared_tag([&b"{a}x"[..], b"y"].into_iter()), b"");
    }

    #[test]
    fn tm_keys_are_recognised_by_prefix_tag_and_kind() {
        let ks = Keyspace::new(b"tm:");
        assert!(ks.is_tm_key(b"tm:{}:lock:x"));
        assert!(ks.is_tm_key(b"tm:{u1}:rlock:{u1}:a"));
        assert!(ks.is_tm_key(b"tm:{}:prepared:123"));
        assert!(ks.is_tm_key(b"tm:{t}:aborted:123"));
        assert!(ks.is_tm_key(b"tm:{}:store-id"));
        assert!(ks.is_tm_key(b"tm:{}:records"));
        assert!(!ks.is_tm_key(b"tm:{}:records2"));
        assert!(!ks.is_tm_key(b"tm:{}:locked:x"));
        assert!(!ks.is_tm_key(b"tm:users"));
        assert!(!ks.is_tm_key(b"tm:{u1}:counter"));
        assert!(!ks.is_tm_key(b"app:{}:lock:x"));
        assert!(!Keyspace::new(b"app:").is_tm_key(b"tm:{}:lock:x"));
        assert_eq!(ks.store_id(), b"tm:{}:store-id");
        assert_eq!(ks.records(), b"tm:{}:records");
        assert_eq!(ks.key(b"t", "lock", b"k"), b"tm:{t}:lock:k");
        assert_eq!(ks.name_of(b"tm:{t}:lock:k", "lock"), Some(&b"k"[..]));
        assert_eq!(ks.name_of(b"tm:{t}:lock:k", "rlock"), None);
        assert_eq!(ks.tag_of(b"tm:{t}:prepared:1"), Some(&b"t"[..]));
    }
}
