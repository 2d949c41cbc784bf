//! Pipes and queues between processes: Python's `Pipe`, `Queue`, `SimpleQueue` and `JoinableQueue`.
