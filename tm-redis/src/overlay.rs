//! Read-your-writes: what a transaction's buffered writes make of a key, so
//! that its string reads see them. Pure logic over the [`WriteSet`]; where
//! the answer is not well defined without the server, it says so and the
//! read is refused rather than answered stale.

use crate::ops::{Op, WriteSet};

/// What the buffered writes make of a key, for the string reads.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Local {
    /// No buffered write to it.
    Untouched,
    /// The result depends on the committed value (e.g. INCRBY first).
    NeedBase,
    /// A string value (or none).
    Value(Option<Vec<u8>>),
    /// It exists, but is not a string.
    Exists,
    /// Not well defined without the server.
    Unsupported,
    /// An INCRBY that will be refused at the vote: (write number, reason).
    BadIncr(usize, &'static str),
}

/// What the buffered writes make of key `k`, starting from `base` (its
/// committed string value, when read) or from nothing known. Without a base
/// it goes on past writes that need one (INCRBY) or keep it (PEXPIRE): a
/// later SET, DEL or PEXPIRE 0 makes the base irrelevant, and then the
/// server is not asked (its value might not even be a string).
pub(crate) fn local(ws: &WriteSet, k: usize, base: Option<Option<Vec<u8>>>) -> Local {
    /// The key as the writes so far leave it.
    enum Cur {
        /// As on the server (only when no base was given).
        Base,
        /// A string computed from the server's value (INCRBY on `Base`).
        FromBase,
        /// A known string value, or no key.
        Str(Option<Vec<u8>>),
        /// It exists, but is not a string.
        NonString,
    }
    let mut cur = match base {
        Some(v) => Cur::Str(v),
        None => Cur::Base,
    };
    let mut touched = false;
    for (n, w) in ws.writes_to(k) {
        touched = true;
        cur = match w.op {
            Op::Set => Cur::Str(w.value().map(<[u8]>::to_vec)),
            Op::Del => Cur::Str(None),
            Op::IncrBy(by) => match cur {
                Cur::Base | Cur::FromBase => Cur::FromBase,
                Cur::NonString => return Local::Unsupported, // WRONGTYPE at the vote
                Cur::Str(value) => {
                    let old = match value {
                        None => Some(0),
                        Some(v) => std::str::from_utf8(&v).ok().and_then(parse_redis_int),
                    };
                    let Some(old) = old else {
                        return Local::BadIncr(n + 1, "value is not an integer or out of range");
                    };
                    let Some(new) = old.checked_add(by) else {
                        return Local::BadIncr(n + 1, "increment or decrement would overflow");
                    };
                    Cur::Str(Some(new.to_string().into_bytes()))
                }
            },
            Op::PExpire(0) => Cur::Str(None),
            Op::PExpire(_) => cur, // the value stays (a missing key stays missing)
            Op::HSet | Op::SAdd | Op::LPush | Op::RPush | Op::ZAdd => match cur {
                // WRONGTYPE at the vote.
                Cur::Str(Some(_)) | Cur::FromBase => return Local::Unsupported,
                Cur::Base | Cur::Str(None) | Cur::NonString => Cur::NonString,
            },
            Op::HDel | Op::SRem | Op::ZRem | Op::Queued => return Local::Unsupported,
        };
    }
    if !touched {
        return Local::Untouched;
    }
    match cur {
        Cur::Base | Cur::FromBase => Local::NeedBase,
        Cur::Str(v) => Local::Value(v),
        Cur::NonString => Local::Exists,
    }
}

/// Whether key `k` exists after the buffered writes, given whether it
/// exists on the server (its type does not matter). `None` when a write's
/// effect on existence is not known without the server (a removal may
/// empty a collection; a queued command may do anything).
pub(crate) fn exists_after(ws: &WriteSet, k: usize, on_server: bool) -> Option<bool> {
    let mut exists = on_server;
    for (_, w) in ws.writes_to(k) {
        exists = match w.op {
            Op::Set | Op::IncrBy(_) | Op::HSet | Op::SAdd | Op::LPush | Op::RPush | Op::ZAdd => {
                true
            }
            Op::Del | Op::PExpire(0) => false,
            Op::PExpire(_) => exists,
            Op::HDel | Op::SRem | Op::ZRem | Op::Queued => return None,
        };
    }
    Some(exists)
}

/// Parses like Redis's `string2ll` (no `+`, no leading zeros, no spaces).
pub(crate) fn parse_redis_int(s: &str) -> Option<i64> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
        || s == "-0"
    {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws(writes: &[(Op, &[u8])]) -> WriteSet {
        let mut ws = WriteSet::default();
        ws.keys.intern(b"k");
        for (op, arg) in writes {
            let args = if arg.is_empty() {
                Vec::new()
            } else {
                vec![arg.to_vec()]
            };
            ws.stage(*op, b"k", args);
        }
        ws
    }

    fn val(s: &str) -> Local {
        Local::Value(Some(s.as_bytes().to_vec()))
    }

    #[test]
    fn untouched_keys_are_read_from_the_server() {
        assert_eq!(local(&ws(&[]), 0, None), Local::Untouched);
        let mut other = ws(&[]);
        other.stage(Op::Set, b"other", vec![b"1".to_vec()]);
        assert_eq!(local(&other, 0, None), Local::Untouched);
    }

    #[test]
    fn set_del_and_expire_need_no_base() {
        assert_eq!(local(&ws(&[(Op::Set, b"v")]), 0, None), val("v"));
        assert_eq!(
            local(&ws(&[(Op::Set, b"v"), (Op::Del, b"")]), 0, None),
            Local::Value(None)
        );
        assert_eq!(
            local(&ws(&[(Op::Set, b"v"), (Op::PExpire(0), b"")]), 0, None),
            Local::Value(None)
        );
        assert_eq!(
            local(&ws(&[(Op::Set, b"v"), (Op::PExpire(10), b"")]), 0, None),
            val("v")
        );
    }

    #[test]
    fn incr_by_needs_the_base_unless_a_set_came_first() {
        let incr = ws(&[(Op::IncrBy(2), b"")]);
        assert_eq!(local(&incr, 0, None), Local::NeedBase);
        assert_eq!(local(&incr, 0, Some(None)), val("2"));
        assert_eq!(local(&incr, 0, Some(Some(b"40".to_vec()))), val("42"));
        let set_then_incr = ws(&[(Op::Set, b"1"), (Op::IncrBy(2), b"")]);
        assert_eq!(local(&set_then_incr, 0, None), val("3"));
        // A later SET makes an unknown base irrelevant.
        let incr_then_set = ws(&[(Op::IncrBy(2), b""), (Op::Set, b"x")]);
        assert_eq!(local(&incr_then_set, 0, None), val("x"));
    }

    #[test]
    fn a_bad_incr_by_names_its_write() {
        let over = ws(&[(Op::Set, b"9223372036854775807"), (Op::IncrBy(1), b"")]);
        assert_eq!(
            local(&over, 0, None),
            Local::BadIncr(2, "increment or decrement would overflow")
        );
        let text = ws(&[(Op::IncrBy(1), b"")]);
        assert!(matches!(
            local(&text, 0, Some(Some(b"01".to_vec()))),
            Local::BadIncr(1, _)
        ));
    }

    #[test]
    fn collections_exist_and_mixing_types_is_refused() {
        assert_eq!(local(&ws(&[(Op::HSet, b"f")]), 0, None), Local::Exists);
        assert_eq!(
            local(&ws(&[(Op::Set, b"v"), (Op::SAdd, b"m")]), 0, None),
            Local::Unsupported
        );
        assert_eq!(
            local(&ws(&[(Op::SAdd, b"m"), (Op::IncrBy(1), b"")]), 0, None),
            Local::Unsupported
        );
        assert_eq!(local(&ws(&[(Op::SRem, b"m")]), 0, None), Local::Unsupported);
    }

    #[test]
    fn existence_follows_the_writes() {
        assert_eq!(exists_after(&ws(&[(Op::Del, b"")]), 0, true), Some(false));
        assert_eq!(
            exists_after(&ws(&[(Op::IncrBy(1), b"")]), 0, false),
            Some(true)
        );
        assert_eq!(
            exists_after(&ws(&[(Op::PExpire(5), b"")]), 0, false),
            Some(false)
        );
        assert_eq!(exists_after(&ws(&[(Op::HDel, b"f")]), 0, true), None);
    }

    #[test]
    fn integers_parse_like_redis() {
        assert_eq!(parse_redis_int("0"), Some(0));
        assert_eq!(parse_redis_int("-9223372036854775808"), Some(i64::MIN));
        for bad in [
            "",
            "-",
            "-0",
            "+1",
            "01",
            " 1",
            "1 ",
            "9223372036854775808",
            "1e3",
        ] {
            assert_eq!(parse_redis_int(bad), None, "{bad:?}");
        }
    }
}
