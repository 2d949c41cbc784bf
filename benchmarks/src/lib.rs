//! Shared helpers for gpuproc's comparative benchmarks.
