//! Shared helpers for gpuproc's comparative benchmarks.

use std::path::{Path, PathBuf};

/// The workspace root (where `.venv` and `benchmarks/` live).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The Python to run the anchors with: `$GPUPROC_PYTHON`, else the workspace's
/// `.venv/bin/python` (made by `scripts/pyenv`), else `python3`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("GPUPROC_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = workspace_root().join(".venv/bin/python");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}
