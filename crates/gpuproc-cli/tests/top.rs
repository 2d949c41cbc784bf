//! `gpuproc top` against the NVML simulator: golden frames of `--once` (drawn through
//! ratatui's test backend) from bundled scenarios with the simulated clock stopped, and a
//! real session in tmux that sorts, filters and kills a process holding a simulated GPU.
//!
//! `GPUPROC_BLESS=1` rewrites the golden files from what the program draws now.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{run, scratch_dir, sim_gpuproc, stderr, stdout, Background};

/// The simulated clock, stopped: values that move hold still.
const CLOCK: &str = "1700000000.25";

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// `gpuproc top --once` at `width` x `height` on `scenario`, the host name replaced by
/// `HOST` so that frames compare across machines.
fn frame(scenario: &str, width: u16, height: u16, extra: &[&str]) -> String {
    let mut cmd = sim_gpuproc(scenario, None);
    cmd.args(["top", "--once"])
        .args(extra)
        .env("NVML_SIM_CLOCK", CLOCK)
        .env("COLUMNS", width.to_string())
        .env("LINES", height.to_string());
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let host = hostname();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if let Some(first) = lines.first_mut() {
        *first = first.replacen(&format!("  {host}  "), "  HOST  ", 1);
    }
    assert_eq!(lines.len(), usize::from(height), "{text}");
    for line in &lines {
        assert!(line.chars().count() <= usize::from(width), "{line:?}");
    }
    lines.join("\n") + "\n"
}

fn check_golden(name: &str, actual: &str) {
    let path = golden_dir().join(format!("{name}.txt"));
    if std::env::var_os("GPUPROC_BLESS").is_some() {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (GPUPROC_BLESS=1 writes it)", path.display()));
    assert_eq!(
        actual, expected,
        "frame {name} differs from {} (GPUPROC_BLESS=1 rewrites it):\n{actual}",
        path.display()
    );
}

#[test]
fn golden_frames() {
    for (scenario, width, height, extra) in [
        ("live", 80, 24, &[][..]),
        ("live", 120, 40, &[][..]),
        ("mig", 100, 30, &[][..]),
        ("mig", 80, 24, &["--tree"][..]),
        ("lost", 80, 24, &[][..]),
        ("4gpu", 170, 40, &[][..]),
        ("nodevices", 80, 24, &[][..]),
    ] {
        let name = format!(
            "top_{scenario}_{width}x{height}{}",
            extra.concat().replace("--", "_")
        );
        check_golden(&name, &frame(scenario, width, height, extra));
    }
}

#[test]
fn once_on_eight_gpus_fits_80x24_and_sorts_by_option() {
    let text = frame("8gpu", 80, 24, &["--filter", "gpu:0"]);
    let lines: Vec<&str> = text.lines().collect();
    // One line per GPU at this size, all eight shown.
    for i in 0..8 {
        assert!(
            lines.iter().any(|l| l.starts_with(&format!("{i:>2} H100"))),
            "{text}"
        );
    }
    // The filter keeps GPU 0's two processes.
    let rows: Vec<&&str> = lines
        .iter()
        .skip_while(|l| !l.starts_with("GPU PID"))
        .skip(1)
        .filter(|l| l.starts_with("0 "))
        .collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(text.contains("filter \"gpu:0\""), "{text}");
}

#[test]
fn no_terminal_without_once_is_an_error() {
    let mut cmd = sim_gpuproc("default", None);
    cmd.arg("top");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("--once"), "{}", stderr(&out));
    let mut cmd = sim_gpuproc("nodriver", None);
    cmd.args(["top", "--once"]);
    assert_eq!(run(cmd).status.code(), Some(2));
    let mut cmd = sim_gpuproc("default", None);
    cmd.args(["top", "--help"]);
    let help = stdout(&run(cmd));
    for word in ["--once", "--interval", "--tree", "SIGTERM", "80x24", "[run job]"] {
        assert!(help.contains(word), "{word}: {help}");
    }
}
