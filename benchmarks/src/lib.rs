//! Shared helpers for gpuproc's comparative benchmarks.

use std::path::{Path, PathBuf};
use std::process::Command;

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

/// Runs the Python anchor `script` (with [`python`]) with `args` and parses the JSON it
/// prints; the error says what failed, with Python's standard error.
pub fn run_python_json<T: serde::de::DeserializeOwned>(
    script: &Path,
    args: &[String],
) -> Result<T, String> {
    let python = python();
    let out = Command::new(&python)
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| {
            format!(
                "cannot run {} (scripts/pyenv makes it): {e}",
                python.display()
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed ({}): {}",
            python.display(),
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "unreadable output from {}: {e}: {:?}",
            script.display(),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
