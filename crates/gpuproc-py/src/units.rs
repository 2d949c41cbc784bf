//! Sizes as Python callers write them (`min_free="10GiB"`), read as `gpuproc pick
//! --min-free` reads them.

// The `gpuproc` command's own parser, so that both read sizes alike.
pub use gpuproc::gpu::parse_size;
