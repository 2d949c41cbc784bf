//! What `gpuproc top` asks of the system besides NVML: `/proc` for process families and
//! lease holders, signals to a selected process, and the thread's CPU time.

use std::collections::HashMap;
use std::fs;
use std::time::Duration;

use super::model::HostInfo;

/// The deepest ancestry followed (a guard against pid reuse making a loop).
const MAX_DEPTH: usize = 64;

/// `(ppid, uid)` of `pid` from `/proc/PID/status`.
fn status(pid: u32) -> Option<(u32, Option<u32>)> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut ppid = None;
    let mut uid = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("PPid:") {
            ppid = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("Uid:") {
            uid = v.split_whitespace().next().and_then(|v| v.parse().ok());
        }
    }
    Some((ppid?, uid))
}

/// The command line of `pid`, one string per argument.
pub fn cmdline(pid: u32) -> Vec<String> {
    let bytes = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let bytes = bytes.strip_suffix(b"\0").unwrap_or(&bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The parent of `pid`.
pub fn ppid(pid: u32) -> Option<u32> {
    status(pid).map(|(p, _)| p)
}

/// Each pid's ancestors (nearest first, up to but not including pid 1), and what is known
/// of each ancestor.
pub fn ancestry(
    pids: impl IntoIterator<Item = u32>,
) -> (HashMap<u32, Vec<u32>>, HashMap<u32, HostInfo>) {
    let mut chains: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut hosts: HashMap<u32, HostInfo> = HashMap::new();
    let mut parents: HashMap<u32, Option<u32>> = HashMap::new();
    let mut parent = |pid: u32, hosts: &mut HashMap<u32, HostInfo>| -> Option<u32> {
        *parents.entry(pid).or_insert_with(|| {
            let (ppid, uid) = status(pid)?;
            let command = cmdline(pid).join(" ");
            hosts.entry(pid).or_insert(HostInfo {
                ppid: Some(ppid),
                user: uid.map(|u| u.to_string()).unwrap_or_default(),
                command,
            });
            Some(ppid)
        })
    };
    for pid in pids {
        if chains.contains_key(&pid) {
            continue;
        }
        let mut chain = Vec::new();
        let mut at = pid;
        while chain.len() < MAX_DEPTH {
            match parent(at, &mut hosts) {
                Some(p) if p > 1 && p != at && !chain.contains(&p) => {
                    chain.push(p);
                    at = p;
                }
                _ => break,
            }
        }
        // Ancestors' own chains are suffixes of this one.
        for (i, &a) in chain.iter().enumerate() {
            chains.entry(a).or_insert_with(|| chain[i + 1..].to_vec());
        }
        chains.insert(pid, chain);
    }
    (chains, hosts)
}

/// Sends `sig` to `pid`; the outcome as a sentence for the status line.
pub fn signal(pid: u32, sig: super::app::Sig) -> String {
    use rustix::process::{kill_process, Pid, Signal};
    let Some(target) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return format!("no such process {pid}");
    };
    let signal = match sig {
        super::app::Sig::Term => Signal::TERM,
        super::app::Sig::Kill => Signal::KILL,
        super::app::Sig::Int => Signal::INT,
    };
    match kill_process(target, signal) {
        Ok(()) => format!("sent SIG{} to {pid}", sig.name()),
        Err(e) => format!("SIG{} to {pid} failed: {e}", sig.name()),
    }
}

/// CPU time this thread has used.
pub fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_ancestry() {
        let me = std::process::id();
        let (chains, hosts) = ancestry([me]);
        let parent = rustix::process::getppid()
            .map(|p| p.as_raw_nonzero().get() as u32)
            .unwrap_or(1);
        if parent > 1 {
            assert_eq!(chains[&me].first(), Some(&parent));
            assert!(hosts.contains_key(&me));
            // The parent's chain is the rest of ours.
            assert_eq!(chains[&parent], chains[&me][1..]);
        }
        assert!(!cmdline(me).is_empty());
        assert!(thread_cpu_time() > Duration::ZERO);
    }
}
