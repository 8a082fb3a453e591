//! ferry-cluster
