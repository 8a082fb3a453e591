//! ferry-db
