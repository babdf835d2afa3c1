//! tm facade
pub use tm_core::*;
pub use tm_redis as redis;
pub use tm_sqlite as sqlite;
