//! `gpuproc gpus --slurm` (and `--ssh`): the GPUs of many nodes in one table or one JSON.
//!
//! Each node runs `gpuproc gpus --json --slurm-jobs` itself (the same binary, at the same
//! path: a shared filesystem), started through Slurm (`srun -N1 -w NODE`, a step of the
//! current allocation when there is one) or through `ssh NODE`. All nodes are asked at
//! once; one that does not answer within `--node-timeout` is shown as such and never holds
//! up the rest. `--slurm-jobs` adds to each GPU process the Slurm job step it belongs to
//! (from `scontrol listpids` on its node) and the job's user.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::cli::GpusArgs;

/// One node's answer.
#[derive(Debug)]
pub enum Answer {
    /// Its `gpuproc gpus --json`.
    Snapshot(Value),
    /// Why there is none.
    Failed(String),
}

/// The nodes to ask: `--nodes` (Slurm's host list syntax, expanded by `scontrol`; plain
/// comma-separated names with `--ssh`), else the partition's (`sinfo`), else the current
/// allocation's, else every node Slurm knows.
fn nodes(args: &GpusArgs) -> anyhow::Result<Vec<String>> {
    if let Some(list) = &args.nodes {
        if args.ssh {
            return Ok(split_names(list));
        }
        return lines_of(Command::new("scontrol").args(["show", "hostnames", list]));
    }
    if let Some(p) = &args.partition {
        return lines_of(Command::new("sinfo").args(["-h", "-N", "-o", "%N", "-p", p]));
    }
    if let Ok(list) = std::env::var("SLURM_JOB_NODELIST") {
        return lines_of(Command::new("scontrol").args(["show", "hostnames", &list]));
    }
    if args.ssh {
        bail!("--ssh needs --nodes NAME[,NAME...]");
    }
    lines_of(Command::new("sinfo").args(["-h", "-N", "-o", "%N"]))
}

/// Comma-separated names, without empty ones or repeats, in order.
pub fn split_names(list: &str) -> Vec<String> {
    unique(list.split(',').map(str::trim))
}

fn unique<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut seen = Vec::<String>::new();
    for n in names.filter(|n| !n.is_empty()) {
        if !seen.iter().any(|s| s == n) {
            seen.push(n.to_string());
        }
    }
    seen
}

/// The distinct non-empty lines a command prints; an error naming it if it fails.
fn lines_of(cmd: &mut Command) -> anyhow::Result<Vec<String>> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let names = unique(text.lines().map(str::trim));
    if names.is_empty() {
        bail!("{shown} named no node");
    }
    Ok(names)
}

/// The command that asks `node` for its GPUs.
fn ask(args: &GpusArgs, node: &str, exe: &str) -> Command {
    let mut cmd;
    if args.ssh {
        cmd = Command::new("ssh");
        cmd.args(["-o", "BatchMode=yes", node, exe]);
    } else {
        cmd = Command::new("srun");
        cmd.args(["-N1", "-n1", "--quiet", "-w", node, "--time=1"]);
        if std::env::var_os("SLURM_JOB_ID").is_some() {
            // A step beside the allocation's own, not waiting for its resources.
            cmd.arg("--overlap");
        }
        if let Some(p) = &args.partition {
            cmd.arg(format!("--partition={p}"));
        }
        cmd.arg(exe);
    }
    cmd.args(["gpus", "--json", "--slurm-jobs"]);
    cmd
}

/// Asks every node at once; each answers within `timeout` or is reported as silent.
fn gather(args: &GpusArgs, nodes: &[String], timeout: Duration) -> BTreeMap<String, Answer> {
    let exe = std::env::current_exe()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "gpuproc".into());
    let mut running = Vec::new();
    let mut answers = BTreeMap::new();
    for node in nodes {
        let mut cmd = ask(args, node, &exe);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match cmd.spawn() {
            Ok(child) => running.push((node.clone(), child)),
            Err(e) => {
                answers.insert(
                    node.clone(),
                    Answer::Failed(format!("cannot start {cmd:?}: {e}")),
                );
            }
        }
    }
    let deadline = gpuproc::time::deadline(timeout);
    // Read every child's output on a thread of its own, so a full pipe never stalls one.
    let readers: Vec<_> = running
        .into_iter()
        .map(|(node, mut child)| {
            let mut stdout = child.stdout.take();
            let mut stderr = child.stderr.take();
            let out = std::thread::spawn(move || {
                let mut s = String::new();
                if let Some(o) = stdout.as_mut() {
                    let _ = o.read_to_string(&mut s);
                }
                s
            });
            let err = std::thread::spawn(move || {
                let mut s = String::new();
                if let Some(e) = stderr.as_mut() {
                    let _ = e.read_to_string(&mut s);
                }
                s
            });
            (node, child, out, err)
        })
        .collect();
    for (node, mut child, out, err) in readers {
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if deadline.is_none_or(|d| Instant::now() < d) => {
                    // No call waits for a child with a deadline: poll, briefly.
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        let answer = match status {
            None => Answer::Failed(format!("no answer within {}", human(timeout))),
            Some(s) if !s.success() => Answer::Failed(format!(
                "{} ({s})",
                stderr.trim().lines().last().unwrap_or("failed")
            )),
            Some(_) => match serde_json::from_str::<Value>(&stdout) {
                Ok(v) => Answer::Snapshot(v),
                Err(e) => Answer::Failed(format!("its answer is not gpuproc's JSON: {e}")),
            },
        };
        answers.insert(node, answer);
    }
    answers
}

fn human(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

/// `gpuproc gpus --slurm` / `--ssh`.
pub fn run(args: &GpusArgs) -> anyhow::Result<()> {
    let nodes = nodes(args)?;
    let timeout = crate::units::seconds(args.node_timeout);
    loop {
        let answers = gather(args, &nodes, timeout);
        let text = if args.json {
            let list: Vec<Value> = answers
                .iter()
                .map(|(node, a)| match a {
                    Answer::Snapshot(s) => json!({"node": node, "snapshot": s}),
                    Answer::Failed(e) => json!({"node": node, "error": e}),
                })
                .collect();
            let mut s = serde_json::to_string_pretty(&json!({ "nodes": list }))?;
            s.push('\n');
            s
        } else {
            render(&answers, !args.no_processes)
        };
        print!("{text}");
        match args.watch {
            Some(seconds) => std::thread::sleep(crate::units::seconds(seconds)),
            None => return Ok(()),
        }
    }
}

/// One block per node: its GPUs (index, name, memory, utilisation) and their processes
/// with their Slurm jobs; a node that did not answer says why.
pub fn render(answers: &BTreeMap<String, Answer>, processes: bool) -> String {
    let mut out = String::new();
    for (node, answer) in answers {
        match answer {
            Answer::Failed(why) => out.push_str(&format!("{node}: no GPUs shown: {why}\n")),
            Answer::Snapshot(s) => {
                let devices = s["devices"].as_array().map(Vec::as_slice).unwrap_or(&[]);
                out.push_str(&format!("{node}: {} GPUs\n", devices.len()));
                for d in devices {
                    let mib = |v: &Value| v.as_u64().map(|b| b >> 20);
                    out.push_str(&format!(
                        "  [{}] {:<24} {:>6} / {:>6} MiB {:>4}\n",
                        d["index"],
                        d["name"].as_str().unwrap_or("?"),
                        mib(&d["memory"]["used"]).map_or("-".into(), |m| m.to_string()),
                        mib(&d["memory"]["total"]).map_or("-".into(), |m| m.to_string()),
                        d["utilization"]["gpu"]
                            .as_u64()
                            .map_or("-".into(), |u| format!("{u}%")),
                    ));
                    let procs = d["processes"].as_array().map(Vec::as_slice).unwrap_or(&[]);
                    for p in procs.iter().filter(|_| processes) {
                        let job = match &p["slurm_job"] {
                            Value::Object(j) => format!(
                                " job {}.{} ({})",
                                j.get("job_id").unwrap_or(&Value::Null),
                                j.get("step").and_then(Value::as_str).unwrap_or("?"),
                                j.get("user").and_then(Value::as_str).unwrap_or("?"),
                            ),
                            _ => String::new(),
                        };
                        out.push_str(&format!(
                            "      pid {:<8} {:>6} MiB {}{job}\n",
                            p["pid"].as_u64().or(p["nvml_pid"].as_u64()).unwrap_or(0),
                            mib(&p["used_memory"]).map_or("-".into(), |m| m.to_string()),
                            p["host"]["name"].as_str().unwrap_or("?"),
                        ));
                    }
                }
            }
        }
    }
    out
}

/// `scontrol listpids` (on this node): process id → (job id, step id).
pub fn parse_listpids(text: &str) -> BTreeMap<u32, (u64, String)> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let pid = f.next()?.parse().ok()?;
            let job = f.next()?.parse().ok()?;
            let step = f.next()?.to_string();
            Some((pid, (job, step)))
        })
        .collect()
}

/// `squeue -h -o "%A %u"`: job id → user.
pub fn parse_users(text: &str) -> BTreeMap<u64, String> {
    text.lines()
        .filter_map(|line| {
            let (id, user) = line.trim().split_once(' ')?;
            Some((id.parse().ok()?, user.trim().to_string()))
        })
        .collect()
}

/// Adds to each GPU process of a snapshot (as JSON) the Slurm job step it belongs to and
/// the job's user (`slurm_job`: `{job_id, step, user}`, or null). Slurm not answering
/// leaves every `slurm_job` null.
pub fn add_slurm_jobs(snapshot: &mut Value) {
    let run = |cmd: &mut Command| {
        cmd.stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let steps = parse_listpids(&run(Command::new("scontrol").arg("listpids")));
    let users = if steps.is_empty() {
        BTreeMap::new()
    } else {
        parse_users(&run(Command::new("squeue").args(["-h", "-o", "%A %u"])))
    };
    let Some(devices) = snapshot["devices"].as_array_mut() else {
        return;
    };
    for d in devices {
        let Some(procs) = d["processes"].as_array_mut() else {
            continue;
        };
        for p in procs {
            let pid = p["pid"].as_u64().and_then(|v| u32::try_from(v).ok());
            let job = pid
                .and_then(|pid| steps.get(&pid))
                .map(|(job, step)| json!({"job_id": job, "step": step, "user": users.get(job)}));
            p["slurm_job"] = job.unwrap_or(Value::Null);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_outputs_parse_strictly() {
        let pids = parse_listpids(
            "PID      JOBID    STEPID   LOCALID GLOBALID\n7798     156      0        0       0\n\
             12 15 batch 0 0\ngarbage\n",
        );
        assert_eq!(pids.get(&7798), Some(&(156, "0".to_string())));
        assert_eq!(pids.get(&12), Some(&(15, "batch".to_string())));
        assert_eq!(pids.len(), 2);
        let users = parse_users("156 root\n157 alice\nbad line\n");
        assert_eq!(users.get(&157).map(String::as_str), Some("alice"));
        assert_eq!(users.len(), 2);
        assert_eq!(split_names("a, b,,a,c"), ["a", "b", "c"]);
    }

    #[test]
    fn a_silent_node_is_shown_with_the_reason_beside_the_others() {
        let mut answers = BTreeMap::new();
        answers.insert(
            "n2".to_string(),
            Answer::Failed("no answer within 5 s".into()),
        );
        let mut snap = json!({"devices": [{"index": 0, "name": "H100", "memory": {"used": 1u64 << 30, "total": 80u64 << 30},
            "utilization": {"gpu": 7}, "processes": [{"pid": 42, "used_memory": 1u64 << 30, "host": {"name": "python"}}]}]});
        snap["devices"][0]["processes"][0]["slurm_job"] =
            json!({"job_id": 9, "step": "0", "user": "ann"});
        answers.insert("n1".to_string(), Answer::Snapshot(snap));
        let text = render(&answers, true);
        assert!(text.starts_with("n1: 1 GPUs\n"), "{text}");
        assert!(
            text.contains("pid 42") && text.contains("job 9.0 (ann)"),
            "{text}"
        );
        assert!(
            text.contains("n2: no GPUs shown: no answer within 5 s"),
            "{text}"
        );
    }
}
