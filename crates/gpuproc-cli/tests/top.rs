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
        actual,
        expected,
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
    for word in [
        "--once",
        "--interval",
        "--tree",
        "SIGTERM",
        "80x24",
        "[run job]",
    ] {
        assert!(help.contains(word), "{word}: {help}");
    }
}

/// A tmux server of its own (its own socket file), killed with everything in it when dropped.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("timeout");
        c.args(["-k", "5", "30", "tmux", "-S"]).arg(&self.socket);
        c
    }

    fn capture(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "top"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let status = self
            .cmd()
            .args(["send-keys", "-t", "top"])
            .args(keys)
            .status()
            .expect("tmux send-keys");
        assert!(status.success(), "send-keys {keys:?}");
    }

    /// Polls the pane until `done` holds, or panics with the last screen after 30 s.
    fn wait_for(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now()
            .checked_add(Duration::from_secs(30))
            .expect("a deadline");
        loop {
            let screen = self.capture();
            if done(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "waiting for {what}; the screen:\n{screen}"
            );
            // Polling the pane: tmux has no way to wait for a screen's content.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The process table's rows (after the header line `GPU PID ...`), as cells.
fn table_rows(screen: &str) -> Vec<Vec<String>> {
    screen
        .lines()
        .skip_while(|l| !l.starts_with("GPU PID"))
        .skip(1)
        .take_while(|l| {
            !l.starts_with("sort ") && !l.starts_with("Send ") && !l.starts_with("filter:")
        })
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// Whether `pid` runs (exists and is not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

#[test]
fn in_tmux_sort_filter_and_kill_a_gpu_process() {
    if !on_path("tmux") {
        eprintln!("skipping: no tmux (scripts/sysdeps monitors installs it)");
        return;
    }
    let dir = scratch_dir("tmux");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    // Two real processes the simulator lists as GPU processes: a big one on GPU 2 (the one
    // to kill) and a small one on GPU 1.
    let mut big = Command::new("sleep");
    big.arg("600");
    let mut big = Background::start_in_group(big);
    let mut small = Command::new("sleep");
    small.arg("601");
    let small = Background::start_in_group(small);
    nvml_sim::state::write_allocation(&state, 2, big.pid(), 6 << 30).unwrap();
    nvml_sim::state::write_allocation(&state, 1, small.pid(), 1 << 30).unwrap();

    // A script so the pane's environment is exactly the simulator's.
    let script = dir.join("top.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexport GPUPROC_NVML_LIB='{}' NVML_SIM_SCENARIO=4gpu NVML_SIM_STATE_DIR='{}' GPUPROC_RUNTIME_DIR='{}'\nexec '{}' top --interval 0.2\n",
            common::sim_lib().display(),
            state.display(),
            dir.join("runtime").display(),
            env!("CARGO_BIN_EXE_gpuproc"),
        ),
    )
    .unwrap();
    let tmux = Tmux {
        socket: dir.join("tmux.sock"),
    };
    let started = tmux
        .cmd()
        .args([
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "100",
            "-y",
            "30",
            "sh",
        ])
        .arg(&script)
        .status()
        .expect("tmux new-session");
    assert!(started.success(), "tmux new-session");
    let (big_pid, small_pid) = (big.pid().to_string(), small.pid().to_string());

    // Both processes listed, in GPU order: GPU 1's first.
    let screen = tmux.wait_for("both processes", |s| {
        let rows = table_rows(s);
        rows.len() == 2 && rows[0][1] == small_pid && rows[1][1] == big_pid
    });
    assert!(screen.contains("4 GPUs  2 processes"), "{screen}");

    // Sort by GPU memory: the 6 GiB process first.
    tmux.keys(&["M"]);
    tmux.wait_for("sorted by GPU memory", |s| {
        let rows = table_rows(s);
        s.contains("sort GPU-MEM▼") && rows.len() == 2 && rows[0][1] == big_pid
    });

    // Filter on GPU 1: the small one alone; then on GPU 2.
    tmux.keys(&["/", "gpu:1", "Enter"]);
    tmux.wait_for("filtered to GPU 1", |s| {
        let rows = table_rows(s);
        s.contains("filter \"gpu:1\"") && rows.len() == 1 && rows[0][1] == small_pid
    });
    tmux.keys(&["/", "BSpace", "2", "Enter"]);
    tmux.wait_for("filtered to GPU 2", |s| {
        let rows = table_rows(s);
        s.contains("filter \"gpu:2\"") && rows.len() == 1 && rows[0][1] == big_pid
    });

    // Select it, ask for SIGKILL, decline, ask again and confirm.
    tmux.keys(&["Down", "K"]);
    tmux.wait_for("the question", |s| {
        s.contains(&format!("Send SIGKILL to pid {big_pid} (sleep 600)? [y/N]"))
    });
    tmux.keys(&["n"]);
    tmux.wait_for("declined", |s| s.contains("not sent"));
    assert!(running(big.pid()), "declined, yet the process is gone");
    tmux.keys(&["K"]);
    tmux.wait_for("the question again", |s| s.contains("Send SIGKILL"));
    tmux.keys(&["y"]);
    let status = big.wait();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "{status:?}");
    tmux.wait_for("the process gone", |s| {
        s.contains(&format!("sent SIGKILL to {big_pid}"))
            && s.contains("no process matches the filter")
    });

    // Esc clears the filter: the other process is still there, alive; q quits.
    tmux.keys(&["Escape"]);
    tmux.wait_for("the other process", |s| {
        let rows = table_rows(s);
        rows.len() == 1 && rows[0][1] == small_pid
    });
    assert!(running(small.pid()));
    tmux.keys(&["q"]);
    tmux.wait_for("top to quit", |s| !s.contains("GPU PID"));
    drop(tmux);
    drop(small);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn leases_show_who_holds_a_gpu_and_its_process() {
    let dir = scratch_dir("lease");
    let state = dir.join("state");
    let runtime = dir.join("runtime");
    std::fs::create_dir_all(&state).unwrap();
    // `pick --hold` leases GPU 2 and runs `sleep` behind its gate.
    let mut pick = sim_gpuproc("4gpu", Some(&runtime));
    pick.args(["pick", "--devices", "2", "--hold", "--", "sleep", "600"]);
    let pick = Background::start_in_group(pick);
    let deadline = Instant::now()
        .checked_add(Duration::from_secs(30))
        .expect("a deadline");
    let held = loop {
        let sleeping = common::children_of(pick.pid()).into_iter().find(|&c| {
            std::fs::read(format!("/proc/{c}/cmdline")).is_ok_and(|b| b == b"sleep\x00600\x00")
        });
        if let Some(pid) = sleeping {
            break pid;
        }
        assert!(Instant::now() < deadline, "pick --hold did not start sleep");
        // Polling /proc: nothing announces the exec.
        std::thread::sleep(Duration::from_millis(20));
    };
    // The held command uses GPU 2.
    nvml_sim::state::write_allocation(&state, 2, held, 2 << 30).unwrap();
    let mut cmd = sim_gpuproc("4gpu", Some(&runtime));
    cmd.args(["top", "--once"])
        .env("NVML_SIM_STATE_DIR", &state)
        .env("NVML_SIM_CLOCK", CLOCK)
        .env("COLUMNS", "120")
        .env("LINES", "40");
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let holder = text
        .lines()
        .find(|l| l.contains("pick --hold (pid "))
        .unwrap_or_else(|| panic!("the GPU's holder:\n{text}"));
    assert!(holder.contains(&held.to_string()), "{holder}");
    let row = text
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(held.to_string().as_str()))
        .unwrap_or_else(|| panic!("no row of {held}:\n{text}"));
    assert!(row.contains("[pick --hold] sleep 600"), "{row}");
    assert!(row.starts_with("2 "), "{row}");
    drop(pick);
    let _ = std::fs::remove_dir_all(dir);
}
