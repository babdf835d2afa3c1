//! tm-sqlite (in progress)
