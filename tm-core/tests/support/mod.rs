//! Helpers shared by test crates that `mod support;` them.

pub mod protocol;
