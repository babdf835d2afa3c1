#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub use tm_core::*;

/// SQLite as a transaction participant: [`tm_sqlite`].
pub use tm_sqlite as sqlite;

/// Redis as a durable, preparable participant: [`tm_redis`].
pub use tm_redis as redis;
