//! The `gpuproc` binary against the NVML simulator, and cross-checked against NVIDIA's
//! `nvidia-ml-py` (pynvml) and `gpustat` reading the same scenario.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use gpuproc::gpu::Snapshot;

mod common;
use common::{run, run_with_pid, scratch_dir, sim_gpuproc, sim_lib, stderr, stdout, wait_output};

const MIB: u64 = 1 << 20;

fn gpuproc(scenario: &str) -> Command {
    sim_gpuproc(scenario, None)
}

#[test]
fn help_and_version() {
    let mut help = gpuproc("default");
    help.arg("--help");
    let out = run(help);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("gpus"), "{text}");
    assert!(text.contains("Exit status"), "{text}");
    assert!(text.contains("no NVIDIA driver"), "{text}");

    let mut gpus_help = gpuproc("default");
    gpus_help.args(["gpus", "--help"]);
    let text = stdout(&run(gpus_help));
    for flag in ["--json", "--watch", "--color", "--details"] {
        assert!(text.contains(flag), "{text}");
    }

    let mut version = gpuproc("default");
    version.arg("--version");
    let out = run(version);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out).trim(),
        format!("gpuproc {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn usage_errors_have_their_own_status() {
    let mut bad = gpuproc("default");
    bad.args(["gpus", "--watch", "never"]);
    let out = run(bad);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("at least 0.1"), "{}", stderr(&out));
}

#[test]
fn table_of_eight_gpus() {
    let mut cmd = gpuproc("8gpu");
    cmd.arg("gpus");
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].contains("driver 550.54.15"), "{text}");
    for i in 0..8 {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("[{i}] NVIDIA H100"))),
            "{text}"
        );
    }
    assert!(text.contains("MiB"));
    assert!(text.contains("└─"), "{text}");
    assert!(!text.contains('\x1b'), "no colour on a pipe");

    let mut coloured = gpuproc("8gpu");
    coloured.args(["gpus", "--color", "always", "--no-processes"]);
    let text = stdout(&run(coloured));
    assert!(text.contains('\x1b'));
    assert!(!text.contains("└─"));
}

#[test]
fn json_is_the_snapshot() {
    let mut cmd = gpuproc("mig");
    cmd.args(["gpus", "--json"]);
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let snap: Snapshot = serde_json::from_slice(&out.stdout).expect("a Snapshot");
    assert_eq!(snap.devices.len(), 2);
    assert_eq!(snap.devices[0].mig.as_ref().unwrap().instances.len(), 3);
}

#[test]
fn lost_gpu_is_shown_not_fatal() {
    let mut cmd = gpuproc("lost");
    cmd.arg("gpus");
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let line = text.lines().find(|l| l.starts_with("[2]")).unwrap();
    assert!(line.contains("fell off the bus"), "{text}");
}

#[test]
fn no_driver_exits_2_with_one_sentence() {
    for (scenario, lib) in [
        ("nodriver", None),
        ("default", Some("/nonexistent/libnvidia-ml.so.1")),
    ] {
        let mut cmd = gpuproc(scenario);
        cmd.arg("gpus");
        if let Some(lib) = lib {
            cmd.env("GPUPROC_NVML_LIB", lib);
        }
        let out = run(cmd);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("driver"), "{err}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn no_devices() {
    let mut cmd = gpuproc("nodevices");
    cmd.arg("gpus");
    let out = run(cmd);
    assert!(out.status.success());
    assert!(stdout(&out).contains("no GPUs"));
}

#[test]
fn a_closed_pipe_ends_watch_quietly() {
    let mut child = gpuproc("8gpu")
        .args(["gpus", "--watch", "0.1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn gpuproc");
    // Closing the read end: the next redraw meets a broken pipe.
    drop(child.stdout.take());
    let out = wait_output(child, "gpuproc gpus --watch on a closed pipe");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
}

// ---- Cross-check with pynvml and gpustat ----

fn python() -> Option<PathBuf> {
    let python = std::env::var_os("GPUPROC_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"));
    if !python.exists() {
        eprintln!(
            "skipping the cross-check: no Python at {} (run scripts/pyenv or set GPUPROC_PYTHON)",
            python.display()
        );
        return None;
    }
    let mut probe = Command::new(&python);
    probe.args(["-c", "import pynvml, gpustat"]);
    if !run(probe).status.success() {
        eprintln!(
            "skipping the cross-check: {} lacks pynvml or gpustat",
            python.display()
        );
        return None;
    }
    Some(python)
}

/// Per device: (uuid, name, total MiB, used MiB, processes as pid -> used MiB), with the
/// scenario's "self" process (each tool's own pid) keyed as 0.
type View = Vec<(String, String, u64, u64, BTreeMap<u32, u64>)>;

fn self_as_zero(pid: u64, own: u64) -> u32 {
    if pid == own {
        0
    } else {
        pid as u32
    }
}

#[test]
fn cross_check_with_pynvml_and_gpustat() {
    let Some(python) = python() else { return };
    let dir = scratch_dir("crosscheck");
    let libdir = dir.join("lib");
    nvml_sim::make_pynvml_dir(&libdir).expect("pynvml library dir");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    // A real, live process (this test) holding 3 GiB on GPU 4: every tool must see it.
    let me = std::process::id();
    nvml_sim::state::write_allocation(&state, 4, me, 3 << 30).unwrap();

    let env = |cmd: &mut Command| {
        cmd.env("NVML_SIM_SCENARIO", "8gpu")
            .env("NVML_SIM_STATE_DIR", &state)
            .env("LD_LIBRARY_PATH", &libdir)
            .env("GPUPROC_NVML_LIB", sim_lib());
    };

    // gpuproc
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpuproc"));
    cmd.args(["gpus", "--json"]);
    env(&mut cmd);
    let (gpuproc_pid, out) = run_with_pid(cmd, Stdio::null());
    let gpuproc_pid = u64::from(gpuproc_pid);
    assert!(out.status.success(), "{}", stderr(&out));
    let snap: Snapshot = serde_json::from_slice(&out.stdout).unwrap();
    let ours: View = snap
        .devices
        .iter()
        .map(|d| {
            let m = d.memory.unwrap();
            let procs = d
                .processes
                .iter()
                .flatten()
                .map(|p| {
                    (
                        self_as_zero(p.nvml_pid as u64, gpuproc_pid),
                        p.used_memory.unwrap() / MIB,
                    )
                })
                .collect();
            (
                d.uuid.clone().unwrap(),
                d.name.clone().unwrap(),
                m.total / MIB,
                m.used / MIB,
                procs,
            )
        })
        .collect();
    assert!(ours[4].4.contains_key(&me), "{ours:?}");

    // pynvml
    let mut cmd = Command::new(&python);
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benchmarks/gpus/pynvml_dump.py"));
    env(&mut cmd);
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let py: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let own = py["self_pid"].as_u64().unwrap();
    let theirs: View = py["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let procs = d["processes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        self_as_zero(p["pid"].as_u64().unwrap(), own),
                        p["used_memory"].as_u64().unwrap() / MIB,
                    )
                })
                .collect();
            (
                d["uuid"].as_str().unwrap().to_string(),
                d["name"].as_str().unwrap().to_string(),
                d["memory"]["total"].as_u64().unwrap() / MIB,
                d["memory"]["used"].as_u64().unwrap() / MIB,
                procs,
            )
        })
        .collect();
    assert_eq!(ours, theirs, "gpuproc and pynvml disagree");
    assert_eq!(
        py["driver_version"].as_str(),
        snap.driver_version.as_deref()
    );

    // gpustat: lists only processes that exist on this host.
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "gpustat", "--json"]);
    env(&mut cmd);
    let (gpustat_pid, out) = run_with_pid(cmd, Stdio::null());
    let gpustat_pid = u64::from(gpustat_pid);
    assert!(out.status.success(), "{}", stderr(&out));
    let gs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let gpus = gs["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), ours.len());
    for (g, (uuid, name, total, used, procs)) in gpus.iter().zip(&ours) {
        assert_eq!(g["uuid"].as_str(), Some(uuid.as_str()));
        assert_eq!(g["name"].as_str(), Some(name.as_str()));
        assert_eq!(g["memory.total"].as_u64(), Some(*total));
        assert_eq!(g["memory.used"].as_u64(), Some(*used));
        for p in g["processes"].as_array().unwrap() {
            let pid = self_as_zero(p["pid"].as_u64().unwrap(), gpustat_pid);
            assert_eq!(
                procs.get(&pid).copied(),
                p["gpu_memory_usage"].as_u64(),
                "process {pid} on {uuid}"
            );
        }
    }
    let gpu4: Vec<u64> = gpus[4]["processes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["pid"].as_u64())
        .collect();
    assert!(
        gpu4.contains(&(me as u64)),
        "gpustat misses the live process"
    );
    // gpuproc's host information agrees with gpustat's for the live process.
    let ours4 = snap.devices[4].processes.as_ref().unwrap();
    let mine = ours4.iter().find(|p| p.pid == Some(me)).unwrap();
    let theirs4 = gpus[4]["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"].as_u64() == Some(me as u64))
        .unwrap();
    let host = mine.host.as_ref().unwrap();
    assert_eq!(host.user.as_deref(), theirs4["username"].as_str());
    let full: Vec<String> = theirs4["full_command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(host.cmdline, full);
    let _ = std::fs::remove_dir_all(dir);
}

/// An error with a cause prints the cause once: not repeated by a message that also quotes
/// it, and not dropped either.
#[test]
fn nested_errors_show_each_cause_once() {
    // NVML's own error repeats the loader's message; the loader's reason is what matters.
    for command in [&["gpus"][..], &["pick"]] {
        let mut cmd = gpuproc("default");
        cmd.args(command).env("GPUPROC_NVML_LIB", "/nonexistent");
        let out = run(cmd);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    }

    // A runtime directory that cannot be created: the lease table's error, then the OS's.
    let dir = scratch_dir("nested-errors");
    let file = dir.join("file");
    std::fs::write(&file, "").unwrap();
    let mut cmd = sim_gpuproc("4gpu", Some(&file.join("runtime")));
    cmd.arg("pick");
    let out = run(cmd);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.starts_with("gpuproc: GPU lease table "), "{err}");
    assert_eq!(err.matches("Not a directory").count(), 1, "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The detailed fields of `gpus --json` (PCIe, BAR1, video engines, energy, clock event
/// reasons, remapped rows, NVLink, per-process utilisation) agree with what pynvml reads on
/// the moving `live` scenario with the simulated clock stopped.
#[test]
fn details_agree_with_pynvml() {
    let Some(python) = python() else { return };
    let dir = scratch_dir("details");
    let libdir = dir.join("lib");
    nvml_sim::make_pynvml_dir(&libdir).expect("pynvml library dir");
    let env = |cmd: &mut Command| {
        cmd.env("NVML_SIM_SCENARIO", "live")
            .env("NVML_SIM_CLOCK", "1700000000.25")
            .env("LD_LIBRARY_PATH", &libdir)
            .env("GPUPROC_NVML_LIB", sim_lib());
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpuproc"));
    cmd.args(["gpus", "--json"]);
    env(&mut cmd);
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let snap: Snapshot = serde_json::from_slice(&out.stdout).unwrap();

    let mut cmd = Command::new(&python);
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benchmarks/gpus/pynvml_details.py"));
    env(&mut cmd);
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let py: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let theirs = py["devices"].as_array().unwrap();
    assert_eq!(theirs.len(), snap.devices.len());
    let num = |v: &serde_json::Value| v.as_u64();
    for (d, t) in snap.devices.iter().zip(theirs) {
        let what = format!("GPU {}", d.index);
        let pcie = d.pcie.unwrap_or_default();
        let tp = &t["pcie"];
        assert_eq!(
            [
                pcie.generation,
                pcie.max_generation,
                pcie.width,
                pcie.max_width,
                pcie.tx_kib_per_s,
                pcie.rx_kib_per_s
            ]
            .map(|v| v.map(u64::from)),
            [
                "generation",
                "max_generation",
                "width",
                "max_width",
                "tx_kib_per_s",
                "rx_kib_per_s"
            ]
            .map(|k| num(&tp[k])),
            "{what} PCIe"
        );
        assert_eq!(
            d.bar1_memory.map(|m| m.total),
            num(&t["bar1_total"]),
            "{what}"
        );
        assert_eq!(
            d.bar1_memory.map(|m| m.used),
            num(&t["bar1_used"]),
            "{what}"
        );
        assert_eq!(
            d.encoder_utilization.map(u64::from),
            num(&t["encoder_utilization"]),
            "{what}"
        );
        assert_eq!(
            d.decoder_utilization.map(u64::from),
            num(&t["decoder_utilization"]),
            "{what}"
        );
        assert_eq!(d.total_energy_mj, num(&t["total_energy_mj"]), "{what}");
        assert_eq!(
            d.clock_event_reasons.as_ref().map(|r| r.mask),
            num(&t["clock_event_reasons"]),
            "{what}"
        );
        let rows = d.remapped_rows.map(|r| {
            vec![
                r.correctable,
                r.uncorrectable,
                r.pending.into(),
                r.failure.into(),
            ]
        });
        let their_rows: Option<Vec<u32>> = t["remapped_rows"].as_array().map(|a| {
            a.iter()
                .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
                .collect()
        });
        assert_eq!(rows, their_rows, "{what}");
        let links: Option<Vec<bool>> = t["nvlink"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_bool().unwrap()).collect());
        assert_eq!(d.nvlink.as_ref().map(|n| n.links.clone()), links, "{what}");
        let procs = d.processes.as_ref().unwrap();
        assert!(!procs.is_empty());
        for p in procs {
            let u = p.utilization.expect("a sample per process");
            let tu = &t["process_utilization"][p.nvml_pid.to_string()];
            assert_eq!(
                [u.sm, u.memory, u.encoder, u.decoder].map(|v| v.map(u64::from)),
                ["sm", "memory", "encoder", "decoder"].map(|k| num(&tu[k])),
                "{what} pid {}",
                p.nvml_pid
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn details_table() {
    let mut cmd = gpuproc("live");
    cmd.args(["gpus", "--details"])
        .env("NVML_SIM_CLOCK", "1700000000.25");
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("    PCIe gen 5 x16 (max gen 5 x16)  tx "),
        "{text}"
    );
    assert!(text.contains("NVLink 18/18 up"), "{text}");
    assert!(text.contains("BAR1 1 / 131072 MiB"), "{text}");
    assert!(text.contains(" %SM  "), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    let details: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("    ") && !l.contains("└─"))
        .collect();
    assert!(details.len() >= 2, "{text}");
    assert!(details.iter().all(|l| l.chars().count() <= 80), "{text}");
}

#[test]
fn gpus_over_ssh_shows_each_node_and_a_silent_one_without_waiting_for_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch_dir("gpus-ssh");
    // A stand-in for ssh: node `ghost` never answers; others run the command here.
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let ssh = bin.join("ssh");
    std::fs::write(
        &ssh,
        "#!/bin/sh\n# ssh -o BatchMode=yes NODE COMMAND...\nshift 2\nnode=$1; shift\n\
         [ \"$node\" = ghost ] && exec sleep 600\nexec \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let started = std::time::Instant::now();
    let mut cmd = gpuproc("4gpu");
    cmd.env("PATH", &path).args([
        "gpus",
        "--ssh",
        "--nodes",
        "alpha,ghost",
        "--node-timeout",
        "1",
        "--json",
    ]);
    let out = run(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let nodes = json["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{json}");
    assert_eq!(nodes[0]["node"], "alpha");
    assert_eq!(nodes[0]["snapshot"]["devices"].as_array().unwrap().len(), 4);
    assert_eq!(nodes[1]["node"], "ghost");
    assert_eq!(nodes[1]["error"], "no answer within 1 s");
    // --ssh needs the nodes named.
    let mut cmd = gpuproc("4gpu");
    cmd.args(["gpus", "--ssh"]);
    let out = run(cmd);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--ssh needs --nodes"),
        "{}",
        stderr(&out)
    );
    let _ = std::fs::remove_dir_all(dir);
}
