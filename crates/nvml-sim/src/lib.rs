//! A simulated `libnvidia-ml.so`: exports the NVML C API and answers from a scenario file.
