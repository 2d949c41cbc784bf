//! The `gpuproc` command-line tool.
fn main() {}
