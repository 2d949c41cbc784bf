//! gpuproc's integration tests: one binary, which re-runs itself as the child processes.

gpuproc::enable_test_support!();

mod big_data;
mod channel;
mod connection;
mod examples;
mod managers;
mod mp_rest;
mod pool;
mod pool_gpu;
mod ported;
mod process;
mod remote;
mod shm;
mod support;
mod sync;
