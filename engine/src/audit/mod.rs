//! The Merkle audit log (being written).
