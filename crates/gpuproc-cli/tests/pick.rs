//! `gpuproc pick` against the NVML simulator: criteria, leases between concurrent pickers,
//! holders that die, `CUDA_VISIBLE_DEVICES` in the parent, waiting, and `--hold`.
//!
//! Every test has its own lease table (`GPUPROC_RUNTIME_DIR`). Commands run under `--hold`
//! print a line and then wait for their standard input to close, so the test decides when
//! they end; every wait has a deadline, and every process is ended and reaped, even when a
//! test fails.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;
use common::{
    run, scratch_dir, signal, sim_env, sim_gpuproc, stderr, stdout, Background, Signal, DEADLINE,
};

/// The UUIDs of the bundled `4gpu` scenario, GPU 0 first.
const FOUR: [&str; 4] = [
    "GPU-0a4f2e61-3c1b-4d2e-9f00-1b2c3d4e5f60",
    "GPU-1b5f3f72-4d2c-4e3f-8a11-2c3d4e5f6071",
    "GPU-2c6a4a83-5e3d-4f4a-9b22-3d4e5f607182",
    "GPU-3d7b5b94-6f4e-4a5b-8c33-4e5f60718293",
];

/// A command for `--hold`: prints its pid and its CUDA_VISIBLE_DEVICES, then waits for its
/// standard input to close.
const REPORT_AND_WAIT: &str =
    r#"echo "$$ $CUDA_VISIBLE_DEVICES $NVIDIA_VISIBLE_DEVICES"; read x || true"#;

/// `gpuproc pick ARGS` on `scenario`, with the lease table in `runtime`.
fn pick(scenario: &str, runtime: &Path, args: &[&str]) -> Command {
    let mut command = sim_gpuproc(scenario, Some(runtime));
    command.arg("pick").args(args);
    command
}

/// Waits until process `pid` (not necessarily our child) has exited.
fn await_exit(pid: u32) {
    use rustix::event::{poll, PollFd, PollFlags};
    let Ok(fd) = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::PidfdFlags::empty(),
    ) else {
        return; // Already gone.
    };
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let timeout = rustix::event::Timespec {
        tv_sec: DEADLINE.as_secs() as i64,
        tv_nsec: 0,
    };
    let ready = poll(&mut fds, Some(&timeout)).expect("poll pidfd");
    assert_eq!(ready, 1, "process {pid} did not exit within {DEADLINE:?}");
}

/// Parses a line of [`REPORT_AND_WAIT`]: the command's pid and its two variables.
fn report(line: &str) -> (u32, String, String) {
    let mut words = line.split_whitespace();
    let pid = words.next().unwrap().parse().unwrap();
    let cuda = words.next().unwrap_or_default().to_string();
    let nvidia = words.next().unwrap_or_default().to_string();
    (pid, cuda, nvidia)
}

#[test]
fn twenty_concurrent_pickers_share_four_gpus() {
    let dir = scratch_dir("twenty");
    let mut pickers: Vec<Background> = (0..20)
        .map(|_| {
            Background::start(pick(
                "4gpu",
                &dir,
                &[
                    "-n",
                    "1",
                    "--max-per-gpu",
                    "1",
                    "--hold",
                    "--",
                    "sh",
                    "-c",
                    REPORT_AND_WAIT,
                ],
            ))
        })
        .collect();
    // Each winner's command reports its GPU; each loser's output simply ends.
    let (tx, rx) = mpsc::channel();
    for (i, p) in pickers.iter_mut().enumerate() {
        let stdout = std::mem::replace(&mut p.stdout, mpsc::channel().1);
        let tx = tx.clone();
        std::thread::spawn(move || {
            let first = stdout.recv_timeout(DEADLINE).ok();
            let _ = tx.send((i, first));
        });
    }
    drop(tx);
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for _ in 0..20 {
        let (i, line) = rx.recv_timeout(DEADLINE).expect("every picker answers");
        match line {
            Some(line) => winners.push((i, report(&line))),
            None => losers.push(i),
        }
    }
    assert_eq!(winners.len(), 4, "winners: {winners:?}");
    let gpus: HashSet<&str> = winners.iter().map(|(_, r)| r.1.as_str()).collect();
    assert_eq!(gpus, FOUR.into_iter().collect(), "each GPU exactly once");
    for (_, (_, cuda, nvidia)) in &winners {
        assert_eq!(cuda, nvidia);
    }
    for &i in &losers {
        let status = pickers[i].wait();
        let stderr = pickers[i].stderr();
        assert_eq!(status.code(), Some(3), "{stderr}");
        assert!(
            stderr.starts_with("gpuproc: none free: 1 GPU needed, 0 qualify"),
            "{stderr}"
        );
        assert_eq!(stderr.matches("leased by pid").count(), 4, "{stderr}");
    }
    for (i, _) in &winners {
        assert_eq!(pickers[*i].finish().code(), Some(0));
    }
    // Every lease ended with its command: all four GPUs are free again.
    let out = run(pick("4gpu", &dir, &["-n", "4", "--hold", "--", "true"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn criteria_skip_busy_gpus_and_say_why() {
    let dir = scratch_dir("busy");
    let scenario = dir.join("busy.toml");
    std::fs::write(
        &scenario,
        r#"
[[devices]]
utilization_gpu = 95

[[devices]]
memory_used = "75 GiB"
utilization_gpu = 5

[[devices]]
utilization_gpu = 0
processes = [{ pid = 7101, used_memory = "1 GiB" }]

[[devices]]
utilization_gpu = 10
"#,
    )
    .unwrap();
    let scenario = scenario.to_string_lossy().into_owned();
    let runtime = dir.join("run");
    let criteria = [
        "--max-util",
        "50",
        "--min-free",
        "10GiB",
        "--no-foreign",
        "--order",
        "lowest-index",
    ];
    let mut args = criteria.to_vec();
    args.extend(["--hold", "--", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES"]);
    let out = run(pick(&scenario, &runtime, &args));
    assert!(out.status.success(), "{}", stderr(&out));
    let uuid = stdout(&out).trim().to_string();
    assert!(uuid.starts_with("GPU-"), "{uuid}");

    let mut args = criteria.to_vec();
    args.extend(["-n", "2"]);
    let out = run(pick(&scenario, &runtime, &args));
    assert_eq!(out.status.code(), Some(3));
    let stderr = stderr(&out);
    assert!(
        stderr.starts_with("gpuproc: none free: 2 GPUs needed, 1 qualifies\n"),
        "{stderr}"
    );
    for expected in [
        "GPU 0 (GPU-",
        "): 95% utilized, at most 50% allowed",
        "GPU 1 (GPU-",
        " free, 10 GiB needed",
        "): used by other processes (pid 7101)",
        &format!("GPU 3 ({uuid}): qualifies"),
    ] {
        assert!(stderr.contains(expected), "{expected:?} missing:\n{stderr}");
    }
    // Nothing was leased by the failed pick.
    assert!(stdout_is_empty(&out));
    let _ = std::fs::remove_dir_all(dir);
}

fn stdout_is_empty(out: &Output) -> bool {
    out.stdout.is_empty()
}

#[test]
fn a_killed_holder_frees_its_gpu() {
    let dir = scratch_dir("killed");
    // The lease goes to another process (--for-pid), which is then killed.
    let mut shell = Background::start({
        let mut c = Command::new("sh");
        c.args(["-c", "read x"]);
        c
    });
    let holder = shell.pid().to_string();
    let out = run(pick("default", &dir, &["--for-pid", &holder]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).trim().starts_with("GPU-"));
    let out = run(pick("default", &dir, &[]));
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains(&format!("leased by pid {holder} (1 of 1 allowed lease)")),
        "{}",
        stderr(&out)
    );
    signal(shell.pid(), Signal::KILL);
    assert!(shell.wait().code().is_none());
    let out = run(pick("default", &dir, &["--hold", "--", "true"]));
    assert!(out.status.success(), "{}", stderr(&out));

    // Under --hold the command holds the lease too: killing gpuproc leaves it with the
    // command, and the GPU is free once the command is gone as well.
    let mut held = Background::start(pick(
        "default",
        &dir,
        &["--hold", "--", "sh", "-c", REPORT_AND_WAIT],
    ));
    let (command_pid, _, _) = report(&held.line().expect("the command reports"));
    signal(held.pid(), Signal::KILL);
    assert!(held.wait().code().is_none());
    let out = run(pick("default", &dir, &[]));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    // The command reads the same stdin pipe: closing it ends the command.
    held.stdin = None;
    await_exit(command_pid);
    let out = run(pick("default", &dir, &["--hold", "--", "true"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = shell.finish();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn cuda_visible_devices_in_the_parent_restricts_the_pick() {
    let dir = scratch_dir("visible");
    let mut restricted = pick(
        "4gpu",
        &dir,
        &[
            "-n",
            "2",
            "--hold",
            "--",
            "sh",
            "-c",
            "echo $CUDA_VISIBLE_DEVICES",
        ],
    );
    restricted.env("CUDA_VISIBLE_DEVICES", "1,3");
    let out = run(restricted);
    assert!(out.status.success(), "{}", stderr(&out));
    let got: HashSet<String> = stdout(&out).trim().split(',').map(str::to_string).collect();
    assert_eq!(got, [FOUR[1], FOUR[3]].map(str::to_string).into());

    let mut too_many = pick("4gpu", &dir, &["-n", "3", "--wait", "10m"]);
    too_many.env("CUDA_VISIBLE_DEVICES", FOUR[2]);
    let started = Instant::now();
    let out = run(too_many);
    assert_eq!(out.status.code(), Some(3));
    // No use waiting for GPUs that can never qualify.
    assert!(started.elapsed() < Duration::from_secs(300));
    let stderr = stderr(&out);
    assert!(stderr.contains("waiting cannot change that"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "GPU 0 ({}): not in this process's CUDA_VISIBLE_DEVICES",
            FOUR[0]
        )),
        "{stderr}"
    );

    let mut everything = pick(
        "4gpu",
        &dir,
        &[
            "-n",
            "4",
            "--ignore-cuda-visible-devices",
            "--hold",
            "--",
            "true",
        ],
    );
    everything.env("CUDA_VISIBLE_DEVICES", "0");
    assert!(run(everything).status.success());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn wait_until_a_gpu_frees_up() {
    let dir = scratch_dir("wait");
    let mut holder = Background::start(pick(
        "default",
        &dir,
        &["--hold", "--", "sh", "-c", REPORT_AND_WAIT],
    ));
    let (_, held_gpu, _) = report(&holder.line().expect("the holder reports"));

    let out = run(pick("default", &dir, &["--wait", "200ms"]));
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("after waiting"), "{}", stderr(&out));

    let mut waiter = Background::start(pick(
        "default",
        &dir,
        &["--wait", "1m", "--hold", "--", "sh", "-c", REPORT_AND_WAIT],
    ));
    let note = waiter.stderr_until("waiting up to 1m");
    assert!(
        note.contains("none free: 1 GPU needed, 0 qualify"),
        "{note}"
    );
    assert_eq!(holder.finish().code(), Some(0));
    let (_, got, _) = report(&waiter.line().expect("the waiter gets the GPU"));
    assert_eq!(got, held_gpu);
    assert_eq!(waiter.finish().code(), Some(0));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn hold_forwards_exit_status_and_signals() {
    let dir = scratch_dir("hold");
    let out = run(pick(
        "default",
        &dir,
        &["--hold", "--", "sh", "-c", "exit 7"],
    ));
    assert_eq!(out.status.code(), Some(7));
    assert!(out.stderr.is_empty(), "{}", stderr(&out));

    let out = run(pick("default", &dir, &["--hold", "--", "/nonexistent/cmd"]));
    assert_eq!(out.status.code(), Some(127));
    assert!(stderr(&out).contains("cannot run /nonexistent/cmd"));

    for (sig, code) in [(Signal::TERM, 143), (Signal::INT, 130), (Signal::HUP, 129)] {
        let mut held = Background::start(pick(
            "default",
            &dir,
            &["--hold", "--", "sh", "-c", REPORT_AND_WAIT],
        ));
        let (command_pid, _, _) = report(&held.line().expect("the command reports"));
        signal(held.pid(), sig);
        assert_eq!(held.wait().code(), Some(code), "{sig:?}");
        await_exit(command_pid);
    }
    // Every lease ended: the GPU is free.
    let out = run(pick("default", &dir, &["--hold", "--", "true"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn json_and_the_lease_left_to_the_parent() {
    let dir = scratch_dir("json");
    let mut shell = Background::start({
        let mut c = Command::new("sh");
        c.args(["-c", "read x"]);
        c
    });
    let holder = shell.pid().to_string();
    let out = run(pick(
        "4gpu",
        &dir,
        &[
            "-n",
            "2",
            "--order",
            "lowest-index",
            "--json",
            "--for-pid",
            &holder,
        ],
    ));
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        json["cuda_visible_devices"],
        format!("{},{}", FOUR[0], FOUR[1])
    );
    assert_eq!(json["devices"][1]["index"], 1);
    assert_eq!(json["devices"][1]["uuid"], FOUR[1]);
    assert_eq!(json["lease"]["holder_pid"].to_string(), holder);
    assert_eq!(json["lease"]["runtime_dir"], dir.to_string_lossy().as_ref());
    // Each user's leases are in their own file.
    let uid = rustix::process::geteuid().as_raw();
    let table = std::fs::read_to_string(dir.join(format!("leases.{uid}"))).unwrap();
    assert!(table.contains(&format!("holders={holder}:")), "{table}");

    // Without --for-pid the lease goes to gpuproc's parent: here, a shell.
    let script = format!(
        "{} pick --order lowest-index; {} pick -n 4; echo $?",
        env!("CARGO_BIN_EXE_gpuproc"),
        env!("CARGO_BIN_EXE_gpuproc")
    );
    let mut sh = Command::new("sh");
    sh.args(["-c", &script]);
    sim_env(&mut sh, "4gpu", Some(&dir));
    let out = run(sh);
    let stdout = stdout(&out);
    assert_eq!(stdout, format!("{}\n3\n", FOUR[2]), "{}", stderr(&out));
    // That shell has exited, so its lease has ended.
    let out = run(pick("4gpu", &dir, &["-n", "2", "--hold", "--", "true"]));
    assert!(out.status.success(), "{}", stderr(&out));

    let _ = shell.finish();
    let out = run(pick("4gpu", &dir, &["-n", "4", "--hold", "--", "true"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_values_and_help() {
    let dir = scratch_dir("usage");
    for args in [
        &["--min-free", "lots"][..],
        &["-n", "0"],
        &["--max-util", "101"],
        &["--wait", "soon"],
        &["--devices", "0,x"],
        &["--json", "--hold", "--", "true"],
        &["--hold"],
    ] {
        let out = run(pick("default", &dir, args));
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
    }
    let out = run(pick("4gpu", &dir, &["--devices", "9"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no GPU 9 on this machine (4 GPUs found)"),
        "{}",
        stderr(&out)
    );
    let out = run(pick("nodriver", &dir, &[]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = run(pick("default", &dir, &["--help"]));
    let help = stdout(&out);
    assert!(help.contains("3    none free"), "{help}");
    assert!(help.contains("--for-pid"), "{help}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A wait too long for the clock means "for ever" (no overflow panic, exit 101): with a
/// GPU free, the pick returns at once.
#[test]
fn a_huge_wait_saturates() {
    let dir = scratch_dir("hugewait");
    for wait in ["1e19", "1e20", "99999999999999999999d"] {
        let out = run(pick(
            "default",
            &dir,
            &["--wait", wait, "--hold", "--", "true"],
        ));
        assert_eq!(
            out.status.code(),
            Some(0),
            "--wait {wait}: {}",
            stderr(&out)
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
