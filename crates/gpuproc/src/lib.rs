//! gpuproc: Python's `multiprocessing` for Rust, with GPU information from any process.

pub mod gpu;
