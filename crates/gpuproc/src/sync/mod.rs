//! Locks and other synchronisation primitives that work across processes.
