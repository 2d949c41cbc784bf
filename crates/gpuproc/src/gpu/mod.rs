//! GPU information from any process, read through NVML (never CUDA).
