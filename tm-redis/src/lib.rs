//! tm-redis (in progress)
