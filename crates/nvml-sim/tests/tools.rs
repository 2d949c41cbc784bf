//! Third-party GPU monitors against the simulator, as a user would run them: `nvitop -1` (from
//! the Python virtual environment `scripts/pyenv` makes) on every bundled scenario, and nvtop
//! (Debian's, installed by `scripts/sysdeps monitors`) in a tmux session. Each checks that the
//! tool accepts the simulator (no missing functions, no crash) and shows the scenario's values.
//!
//! A tool that is not installed is skipped with a note, unless `NVML_SIM_REQUIRE_TOOLS` is set
//! (`scripts/test` sets it), in which case its absence fails the test.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nvml_sim::scenario::{Device, Pid, Process, ProcessKind};
use nvml_sim::series::{sample_tick, secs, SAMPLE_PERIOD_US};
use nvml_sim::state::process_samples;
use nvml_sim::Scenario;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Whether a missing tool fails the test instead of skipping it.
fn tools_required() -> bool {
    std::env::var_os("NVML_SIM_REQUIRE_TOOLS").is_some_and(|v| !v.is_empty())
}

/// Skips (returns `None`, with a note) or fails when `what` is missing.
fn need<T>(found: Option<T>, what: &str) -> Option<T> {
    if found.is_none() {
        assert!(
            !tools_required(),
            "{what} is missing and NVML_SIM_REQUIRE_TOOLS is set: run scripts/pyenv and scripts/sysdeps monitors"
        );
        println!("note: skipping: {what} is missing (scripts/pyenv, scripts/sysdeps monitors install it)");
    }
    found
}

/// A directory removed with everything in it when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A directory holding `libnvidia-ml.so.1`, a link to the simulator that cargo built next to
/// this test binary or in its parent directory.
fn sim_dir(tag: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("nvml-sim-tools-{}-{tag}", std::process::id()));
    if nvml_sim::library_path().is_none() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new("timeout")
            .args(["-k", "10", "600", &cargo, "build", "-p", "nvml-sim"])
            .status()
            .expect("run cargo build -p nvml-sim");
        assert!(status.success(), "cargo build -p nvml-sim failed");
    }
    nvml_sim::make_pynvml_dir(&dir).expect("a directory with libnvidia-ml.so.1");
    TempDir(dir)
}

fn nvitop() -> Option<PathBuf> {
    let python = std::env::var_os("GPUPROC_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"));
    let exe = python.parent()?.join("nvitop");
    exe.is_file().then_some(exe)
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// nvitop's `bytes2human` (nvitop/api/utils.py), for the sizes a scenario holds.
fn human(b: u64) -> String {
    let f = b as f64;
    let (mib, gib) = (MIB as f64, GIB as f64);
    if b < 100 * MIB {
        format!("{:.2}MiB", f / mib)
    } else if b < 1000 * MIB {
        format!("{:.1}MiB", f / mib)
    } else if b < 20 * GIB {
        format!("{}MiB", (f / mib).round_ties_even())
    } else if b < 100 * GIB {
        format!("{:.2}GiB", f / gib)
    } else {
        format!("{:.1}GiB", f / gib)
    }
}

/// What nvitop calls a GPU in its panel: without the `NVIDIA ` prefix, at most 19 characters.
fn short_name(name: &str) -> String {
    let n = name.strip_prefix("NVIDIA ").unwrap_or(name);
    n.chars().take(17).collect()
}

fn used_memory(d: &Device) -> u64 {
    let procs = |ps: &[Process]| ps.iter().map(|p| p.used_memory.0).sum::<u64>();
    d.memory_used.0
        + procs(&d.processes)
        + d.mig
            .iter()
            .map(|m| m.memory_used.0 + procs(&m.processes))
            .sum::<u64>()
}

/// The `%SM` values a process of GPU `gpu` can show for samples taken between `from_us` and
/// `to_us`: the simulator's answer at each sample tick in that window.
fn possible_sm(d: &Device, gpu: usize, pid: u32, from_us: u64, to_us: u64) -> BTreeSet<u32> {
    let procs: Vec<(u32, Option<&Process>)> = d
        .processes
        .iter()
        .map(|p| (p.pid.resolve(), Some(p)))
        .collect();
    let mut out = BTreeSet::new();
    let mut tick = sample_tick(from_us);
    while tick <= to_us + SAMPLE_PERIOD_US {
        for s in process_samples(d, gpu, &procs, secs(tick)) {
            if s.pid == pid {
                out.insert(s.sm);
            }
        }
        tick += SAMPLE_PERIOD_US;
    }
    out
}

fn run_nvitop(exe: &Path, libdir: &Path, scenario: &str) -> (Output, u64, u64) {
    let start = nvml_sim::series::now_us();
    let out = Command::new("timeout")
        .args(["-k", "5", "120"])
        .arg(exe)
        .arg("-1")
        .env("LD_LIBRARY_PATH", libdir)
        .env("NVML_SIM_SCENARIO", scenario)
        .env_remove(nvml_sim::STATE_DIR_ENV)
        .env_remove(nvml_sim::state::CLOCK_ENV)
        .output()
        .expect("run nvitop");
    (out, start, nvml_sim::series::now_us())
}

#[test]
fn nvitop_once_shows_every_bundled_scenario() {
    let Some(exe) = need(nvitop(), "nvitop (in .venv)") else {
        return;
    };
    let tmp = sim_dir("nvitop");
    // Every scenario is checked, then the test fails naming each one that went wrong.
    let failed: Vec<&str> = nvml_sim::BUNDLED_SCENARIOS
        .iter()
        .copied()
        .filter(|name| std::panic::catch_unwind(|| check_nvitop(&exe, &tmp.0, name)).is_err())
        .collect();
    assert!(
        failed.is_empty(),
        "nvitop -1 went wrong on {failed:?} (see above)"
    );
}

/// Runs `nvitop -1` on bundled scenario `name` and checks what it shows.
fn check_nvitop(exe: &Path, libdir: &Path, name: &str) {
    let (out, start, end) = run_nvitop(exe, libdir, name);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let all = format!("{stdout}\n{stderr}");
    let ctx = format!("nvitop -1 on {name}: {:?}\n{all}", out.status);
    for bad in ["FunctionNotFound", "KeyError", "Traceback", "Error:"] {
        assert!(!all.contains(bad), "{bad} in {ctx}");
    }
    let scenario = Scenario::bundled(name).unwrap();
    if scenario.init_error.is_some() {
        // nvitop's answer to a machine without a driver: one line and exit 1.
        assert_eq!(out.status.code(), Some(1), "{ctx}");
        assert!(stderr.contains("NVML ERROR: Driver Not Loaded"), "{ctx}");
        return;
    }
    if scenario.devices.is_empty() {
        assert!(stdout.contains("No visible devices found"), "{ctx}");
        return;
    }
    assert!(out.status.success(), "{ctx}");
    assert!(stdout.contains("Driver Version: 550.54.15"), "{ctx}");
    let lines: Vec<&str> = stdout.lines().collect();
    for (i, d) in scenario.devices.iter().enumerate() {
        let head = format!("│ {i:>3}  ");
        let at = lines
            .iter()
            .position(|l| l.starts_with(&head))
            .unwrap_or_else(|| panic!("no row for GPU {i} in {ctx}"));
        let (row, second) = (lines[at], lines[at + 1]);
        if d.lost {
            // Every query fails with GPU_IS_LOST: nvitop shows the row as N/A.
            assert!(
                row.contains("N/A") && !row.contains("H100"),
                "lost GPU {i}: {ctx}"
            );
            continue;
        }
        assert!(row.contains(&d.pci_bus_id), "GPU {i} bus id: {ctx}");
        assert!(row.contains(&short_name(&d.name)), "GPU {i} name: {ctx}");
        let memory = format!("{} / {}", human(used_memory(d)), human(d.memory_total.0));
        assert!(second.contains(&memory), "GPU {i} memory {memory:?}: {ctx}");
        let util = second
            .split('│')
            .nth(3)
            .and_then(|cell| cell.split_whitespace().next())
            .unwrap_or_else(|| panic!("GPU {i} utilisation cell: {ctx}"));
        if d.mig_mode {
            assert_eq!(util, "N/A", "GPU {i} in MIG mode: {ctx}");
        } else {
            let v: u32 = util.trim_end_matches('%').parse().unwrap_or_else(|_| {
                panic!("GPU {i} utilisation {util:?}: {ctx}");
            });
            let l = d.utilization_gpu;
            assert!((l.min()..=l.max()).contains(&v), "GPU {i} {v}%: {ctx}");
        }
        // Every process, with its memory; MIG processes under `gpu:instance`.
        let mut expected: Vec<(String, &Process)> =
            d.processes.iter().map(|p| (format!("{i}"), p)).collect();
        for (j, m) in d.mig.iter().enumerate() {
            expected.extend(m.processes.iter().map(|p| (format!("{i}:{j}"), p)));
        }
        for (index, p) in expected {
            let kind = match p.kind {
                ProcessKind::Compute => 'C',
                ProcessKind::Graphics => 'G',
            };
            let mem = human(p.used_memory.0);
            let row = lines
                .iter()
                .find(|l| {
                    let cells: Vec<&str> = l.split_whitespace().collect();
                    cells.len() > 6
                        && cells[1] == index
                        && match p.pid {
                            Pid::Id(pid) => cells[2] == pid.to_string(),
                            Pid::SelfPid => true,
                        }
                        && cells[3] == kind.to_string()
                        && cells[5] == mem
                })
                .unwrap_or_else(|| panic!("no process row {index} {:?} {mem}: {ctx}", p.pid));
            // %SM on whole GPUs: the simulator's per-process sample from the last second.
            let (Pid::Id(pid), false) = (p.pid, d.mig_mode) else {
                continue;
            };
            let cells: Vec<&str> = row.split_whitespace().collect();
            let sm: u32 = cells[6]
                .parse()
                .unwrap_or_else(|_| panic!("%SM {:?} of {pid}: {ctx}", cells[6]));
            let possible = possible_sm(d, i, pid, start.saturating_sub(1_100_000), end);
            assert!(
                possible.contains(&sm),
                "%SM of {pid} is {sm}, expected one of {possible:?}: {ctx}"
            );
        }
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
            .args(["capture-pane", "-p", "-t", "sim"])
            .output()
            .expect("tmux capture-pane");
        text(&out.stdout)
    }

    /// Polls the pane until `done` holds (Ok) or `limit` passes (Err with the last screen).
    fn wait_for(&self, limit: Duration, done: impl Fn(&str) -> bool) -> Result<String, String> {
        let deadline = Instant::now().checked_add(limit).expect("a deadline");
        loop {
            let screen = self.capture();
            if done(&screen) {
                return Ok(screen);
            }
            if Instant::now() >= deadline {
                return Err(screen);
            }
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

#[test]
fn nvtop_lists_the_scenario_gpus() {
    let Some(nvtop) = need(on_path("nvtop"), "nvtop") else {
        return;
    };
    let Some(_) = need(on_path("tmux"), "tmux") else {
        return;
    };
    let tmp = sim_dir("nvtop");
    let libdir = &tmp.0;
    for &name in nvml_sim::BUNDLED_SCENARIOS {
        let scenario = Scenario::bundled(name).unwrap();
        let tmux = Tmux {
            socket: libdir.join(format!("tmux-{name}")),
        };
        // When nvtop exits (no GPU), the shell keeps the pane, and what nvtop printed, open.
        let command = format!(
            "env LD_LIBRARY_PATH='{}' NVML_SIM_SCENARIO={name} '{}'; echo nvtop exited $?; exec cat",
            libdir.display(),
            nvtop.display()
        );
        let started = tmux
            .cmd()
            .args(["new-session", "-d", "-s", "sim", "-x", "200", "-y", "60"])
            .arg(&command)
            .status()
            .expect("tmux new-session");
        assert!(started.success(), "tmux new-session for {name}");
        // What each GPU's header says: `Device <i> [<name>]`; nvtop leaves lost GPUs out and
        // numbers the others in order.
        let wanted: Vec<String> = scenario
            .devices
            .iter()
            .filter(|d| !d.lost)
            .enumerate()
            .map(|(i, d)| format!("Device {i} [{}]", d.name))
            .collect();
        let screen = if wanted.is_empty() {
            tmux.wait_for(Duration::from_secs(30), |s| s.contains("No GPU to monitor"))
        } else {
            // Every header, and the last GPU's power line below it.
            tmux.wait_for(Duration::from_secs(30), |s| {
                wanted.iter().all(|w| s.contains(w.as_str()))
                    && s.matches(" POW ").count() >= wanted.len()
            })
        }
        .unwrap_or_else(|screen| panic!("nvtop on {name}: expected {wanted:?} in\n{screen}"));
        assert!(
            !screen.contains("No GPU to monitor") || wanted.is_empty(),
            "{screen}"
        );
        // nvtop leaves a lost GPU out and numbers the others in order.
        for (i, d) in scenario.devices.iter().filter(|d| !d.lost).enumerate() {
            let header = format!("Device {i} [{}]", d.name);
            assert!(screen.contains(&header), "{header} on {name}:\n{screen}");
            let limit = d.power_limit_mw / 1000;
            assert!(
                screen.contains(&format!("/ {limit} W")),
                "GPU {i} power limit {limit} W on {name}:\n{screen}"
            );
        }
        if name == "mig" {
            assert!(
                screen.contains("N/A]"),
                "MIG GPU utilisation N/A:\n{screen}"
            );
        }
        drop(tmux);
    }
}
