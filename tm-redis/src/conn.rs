//! Connections: a small pool, and commands packed by hand (RESP) so that a
//! pipeline costs one write and one read.

use redis::{ConnectionLike, Value};

/// Appends a command with `argc` arguments to `buf`; the caller then appends
/// exactly `argc` arguments with [`arg`].
pub(crate) fn cmd(buf: &mut Vec<u8>, argc: usize) {
    buf.push(b'*');
    buf.extend_from_slice(argc.to_string().as_bytes());
    buf.extend_from_slice(b"\r\n");
}

/// Appends one argument.
pub(crate) fn arg(buf: &mut Vec<u8>, a: &[u8]) {
    buf.push(b'$');
    buf.extend_from_slice(a.len().to_string().as_bytes());
    buf.extend_from_slice(b"\r\n");
    buf.extend_from_slice(a);
    buf.extend_from_slice(b"\r\n");
}

/// Appends a whole command.
pub(crate) fn command(buf: &mut Vec<u8>, args: &[&[u8]]) {
    cmd(buf, args.len());
    for a in args {
        arg(buf, a);
    }
}

/// A connection, with what tm knows about its state.
pub(crate) struct Conn {
    pub(crate) con: redis::Connection,
    /// A previous user left WATCHes on it: the next request starts with
    /// UNWATCH (pipelined, no extra round trip).
    pub(crate) stale_watches: bool,
    /// Taken from the pool (it may have died meanwhile) rather than new.
    pub(crate) pooled: bool,
}

impl Conn {
    /// Sends `packed` (`count` commands) and reads `count` replies. Server
    /// errors come back as [`Value::ServerError`] in place; `Err` means the
    /// connection itself failed (and must not be reused).
    pub(crate) fn request(
        &mut self,
        packed: &[u8],
        count: usize,
    ) -> redis::RedisResult<Vec<Value>> {
        if self.stale_watches {
            let mut buf = Vec::with_capacity(packed.len() + 20);
            command(&mut buf, &[b"UNWATCH"]);
            buf.extend_from_slice(packed);
            let mut replies = self.con.req_packed_commands(&buf, 0, count + 1)?;
            self.stale_watches = false;
            replies.remove(0);
            Ok(replies)
        } else {
            self.con.req_packed_commands(packed, 0, count)
        }
    }
}
