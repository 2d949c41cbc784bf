//! Host-side process information from `/proc`: pure parsers, then thin readers.
//!
//! Everything the GPU layer learns from `/proc` (owner, command line, CPU and memory use,
//! children, PID namespaces) goes through this module.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use super::types::HostProcess;

/// The fields of `/proc/PID/status` the GPU layer uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Status {
    pub name: String,
    pub ppid: Option<u32>,
    pub uid: Option<u32>,
    pub rss_bytes: Option<u64>,
    /// The PID in each PID namespace, from the namespace of the `/proc` mount inwards.
    pub nspid: Vec<u32>,
}

pub(crate) fn parse_status(text: &str) -> Status {
    let mut status = Status::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "Name" => status.name = value.to_string(),
            "PPid" => status.ppid = value.parse().ok(),
            "Uid" => status.uid = value.split_whitespace().next().and_then(|v| v.parse().ok()),
            "VmRSS" => {
                status.rss_bytes = value
                    .strip_suffix("kB")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|kb| kb * 1024)
            }
            "NSpid" => {
                status.nspid = value
                    .split_whitespace()
                    .filter_map(|v| v.parse().ok())
                    .collect()
            }
            _ => {}
        }
    }
    status
}

/// The fields of `/proc/PID/stat` the GPU layer uses; times are in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Stat {
    /// The state letter: `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub state: char,
    pub ppid: u32,
    pub cpu_ticks: u64,
    pub start_ticks: u64,
}

pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    // The command name sits in parentheses and may itself contain spaces and parentheses.
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // fields[0] is field 3 (state) of proc(5).
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        state: fields.first()?.chars().next()?,
        ppid: field(4)? as u32,
        cpu_ticks: field(14)? + field(15)?,
        start_ticks: field(22)?,
    })
}

pub(crate) fn parse_cmdline(bytes: &[u8]) -> Vec<String> {
    let bytes = bytes.strip_suffix(b"\0").unwrap_or(bytes);
    if bytes.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|&b| b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

pub(crate) fn parse_passwd(text: &str) -> HashMap<u32, String> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let uid = fields.nth(1)?.parse().ok()?;
            Some((uid, name.to_string()))
        })
        .collect()
}

pub(crate) fn parse_children(text: &str) -> Vec<u32> {
    text.split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// Seconds since boot from `/proc/uptime`.
pub(crate) fn parse_uptime(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// CPU use in percent of one core over `wall_secs`, from the ticks used in that time.
pub(crate) fn cpu_percent(ticks: u64, ticks_per_sec: u64, wall_secs: f64) -> Option<f64> {
    (wall_secs > 0.0 && ticks_per_sec > 0)
        .then(|| ticks as f64 / ticks_per_sec as f64 / wall_secs * 100.0)
}

/// Maps a PID as NVML reports it (in the PID namespace of the `/proc` mount, normally the
/// host's) to the PID in our own namespace.
///
/// `self_depth` is how many namespaces our process is nested below the `/proc` mount's
/// (`NSpid` of `/proc/self/status` has `self_depth + 1` entries); `nspids` are the `NSpid`
/// lists of the processes under that `/proc`. A process not in our namespace (or below it)
/// maps to `None`.
pub(crate) fn map_nvml_pid<'a>(
    nvml_pid: u32,
    self_nspid: &[u32],
    nspids: impl IntoIterator<Item = &'a [u32]>,
) -> Option<u32> {
    let depth = self_nspid.len().checked_sub(1)?;
    if depth == 0 {
        return Some(nvml_pid);
    }
    nspids
        .into_iter()
        .find(|ns| ns.first() == Some(&nvml_pid))
        .and_then(|ns| ns.get(depth).copied())
}

/// Reads `/proc` (or another procfs mount, such as a host's `/proc` mounted into a container).
#[derive(Debug)]
pub(crate) struct Proc {
    root: PathBuf,
    ticks_per_sec: u64,
    users: Mutex<Option<HashMap<u32, String>>>,
    cpu: Mutex<HashMap<(u32, u64), (u64, Instant)>>,
    /// The boot time (`btime` of `/proc/stat`), seconds since the epoch, read once.
    boot: std::sync::OnceLock<Option<u64>>,
}

/// The `btime` line of `/proc/stat`: when the machine booted, seconds since the epoch.
pub(crate) fn parse_btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// When a process started, milliseconds since the epoch, from the boot time and its start
/// time in clock ticks after boot.
pub(crate) fn started_ms(boot_s: u64, start_ticks: u64, ticks_per_sec: u64) -> Option<u64> {
    let after_boot_ms = start_ticks.checked_mul(1000)? / ticks_per_sec.max(1);
    boot_s.checked_mul(1000)?.checked_add(after_boot_ms)
}

impl Proc {
    pub(crate) fn new(root: PathBuf) -> Proc {
        Proc {
            root,
            ticks_per_sec: rustix::param::clock_ticks_per_second(),
            users: Mutex::new(None),
            cpu: Mutex::new(HashMap::new()),
            boot: std::sync::OnceLock::new(),
        }
    }

    fn path(&self, pid: u32, file: &str) -> PathBuf {
        self.root.join(pid.to_string()).join(file)
    }

    pub(crate) fn status(&self, pid: u32) -> Option<Status> {
        fs::read_to_string(self.path(pid, "status"))
            .ok()
            .map(|t| parse_status(&t))
    }

    fn self_nspid(&self) -> Vec<u32> {
        fs::read_to_string(self.root.join("self/status"))
            .map(|t| parse_status(&t).nspid)
            .unwrap_or_default()
    }

    /// Maps NVML's PIDs to ours; only scans `/proc` when we are in a nested PID namespace.
    pub(crate) fn pid_mapper(&self) -> PidMapper {
        let self_nspid = self.self_nspid();
        let nspids = if self_nspid.len() > 1 {
            self.pids()
                .into_iter()
                .filter_map(|pid| self.status(pid).map(|s| s.nspid))
                .collect()
        } else {
            Vec::new()
        };
        PidMapper { self_nspid, nspids }
    }

    fn pids(&self) -> Vec<u32> {
        let Ok(dir) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users
            .get_or_insert_with(|| {
                fs::read_to_string("/etc/passwd")
                    .map(|t| parse_passwd(&t))
                    .unwrap_or_default()
            })
            .get(&uid)
            .cloned()
    }

    /// What `/proc` says about `pid` (a PID in the namespace of this `/proc`), or `None` if
    /// there is no such process.
    pub(crate) fn process(&self, pid: u32) -> Option<HostProcess> {
        let status = self.status(pid)?;
        let cmdline = fs::read(self.path(pid, "cmdline"))
            .map(|b| parse_cmdline(&b))
            .unwrap_or_default();
        let stat = fs::read_to_string(self.path(pid, "stat"))
            .ok()
            .and_then(|t| parse_stat(&t));
        let started_ms = stat.and_then(|stat| {
            let boot = self
                .boot
                .get_or_init(|| parse_btime(&fs::read_to_string(self.root.join("stat")).ok()?));
            started_ms((*boot)?, stat.start_ticks, self.ticks_per_sec)
        });
        let cpu_percent = stat.and_then(|stat| self.cpu_percent(pid, stat));
        Some(HostProcess {
            uid: status.uid,
            user: status.uid.and_then(|uid| self.user_name(uid)),
            name: status.name,
            cmdline,
            cpu_percent,
            rss_bytes: status.rss_bytes,
            ppid: status.ppid,
            started_ms,
        })
    }

    fn cpu_percent(&self, pid: u32, stat: Stat) -> Option<f64> {
        let now = Instant::now();
        let mut samples = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
        let previous = samples.insert((pid, stat.start_ticks), (stat.cpu_ticks, now));
        match previous {
            Some((ticks, then)) => cpu_percent(
                stat.cpu_ticks.saturating_sub(ticks),
                self.ticks_per_sec,
                now.duration_since(then).as_secs_f64(),
            ),
            None => {
                let uptime = parse_uptime(&fs::read_to_string(self.root.join("uptime")).ok()?)?;
                // At least one tick: /proc/uptime and start times have tick resolution.
                let tick = 1.0 / self.ticks_per_sec as f64;
                let age = (uptime - stat.start_ticks as f64 * tick).max(tick);
                cpu_percent(stat.cpu_ticks, self.ticks_per_sec, age)
            }
        }
    }

    /// `pid` and all its descendants, parents before children.
    pub(crate) fn with_descendants(&self, pid: u32) -> Vec<u32> {
        let mut out = vec![pid];
        let mut i = 0;
        let mut by_parent: Option<HashMap<u32, Vec<u32>>> = None;
        while i < out.len() {
            let parent = out[i];
            i += 1;
            let children = match self.children(parent) {
                Some(children) => children,
                None => by_parent
                    .get_or_insert_with(|| self.children_by_scan())
                    .get(&parent)
                    .cloned()
                    .unwrap_or_default(),
            };
            for child in children {
                if !out.contains(&child) {
                    out.push(child);
                }
            }
        }
        out
    }

    /// Children from `/proc/PID/task/*/children`; `None` where the kernel lacks that file.
    fn children(&self, pid: u32) -> Option<Vec<u32>> {
        let tasks = fs::read_dir(self.path(pid, "task")).ok()?;
        let mut out = Vec::new();
        for task in tasks.flatten() {
            let text = fs::read_to_string(task.path().join("children")).ok()?;
            out.extend(parse_children(&text));
        }
        Some(out)
    }

    fn children_by_scan(&self) -> HashMap<u32, Vec<u32>> {
        let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
        for pid in self.pids() {
            if let Some(stat) = fs::read_to_string(self.path(pid, "stat"))
                .ok()
                .and_then(|t| parse_stat(&t))
            {
                map.entry(stat.ppid).or_default().push(pid);
            }
        }
        map
    }
}

/// NVML PIDs to our PIDs, see [`map_nvml_pid`].
#[derive(Debug)]
pub(crate) struct PidMapper {
    self_nspid: Vec<u32>,
    nspids: Vec<Vec<u32>>,
}

impl PidMapper {
    /// Our PID for a PID NVML reports, and the PID under the `/proc` root to read it from.
    pub(crate) fn map(&self, nvml_pid: u32) -> Option<u32> {
        if self.self_nspid.is_empty() {
            // No NSpid line (old kernel, or no /proc): take NVML's PID as ours.
            return Some(nvml_pid);
        }
        map_nvml_pid(
            nvml_pid,
            &self.self_nspid,
            self.nspids.iter().map(Vec::as_slice),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tpython3\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n\
        Ngid:\t0\nPid:\t4242\nPPid:\t17\nTracerPid:\t0\nUid:\t1000\t1000\t1000\t1000\n\
        Gid:\t1000\t1000\t1000\t1000\nNSpid:\t4242\t7\nVmRSS:\t  123456 kB\nThreads:\t3\n";

    #[test]
    fn boot_time_and_start_times() {
        let stat = "cpu  1 2 3\nintr 5\nctxt 9\nbtime 1700000000\nprocesses 12\n";
        assert_eq!(parse_btime(stat), Some(1_700_000_000));
        assert_eq!(parse_btime("cpu 1\n"), None);
        assert_eq!(started_ms(1_700_000_000, 250, 100), Some(1_700_000_002_500));
        assert_eq!(started_ms(1, u64::MAX, 100), None);
        assert_eq!(started_ms(1, 5, 0), Some(6000));
    }

    #[test]
    fn status_fields() {
        let s = parse_status(STATUS);
        assert_eq!(s.name, "python3");
        assert_eq!(s.ppid, Some(17));
        assert_eq!(s.uid, Some(1000));
        assert_eq!(s.rss_bytes, Some(123456 * 1024));
        assert_eq!(s.nspid, vec![4242, 7]);
        assert_eq!(parse_status("Name:\tkthreadd\n").rss_bytes, None);
    }

    #[test]
    fn stat_with_awkward_command_names() {
        let text = "4242 (we (ird) name) S 17 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 \
                    3 0 98765 1000000 2000 18446744073709551615";
        let stat = parse_stat(text).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.ppid, 17);
        assert_eq!(stat.cpu_ticks, 300);
        assert_eq!(stat.start_ticks, 98765);
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 0"), None);
    }

    #[test]
    fn cmdline_passwd_children_uptime() {
        assert_eq!(
            parse_cmdline(b"python\0train.py\0--lr\x000.1\0"),
            vec!["python", "train.py", "--lr", "0.1"]
        );
        assert_eq!(parse_cmdline(b""), Vec::<String>::new());
        assert_eq!(parse_cmdline(b"a b"), vec!["a b"]);
        let users = parse_passwd(
            "root:x:0:0:root:/root:/bin/bash\n# c\nalice:x:1000:1000::/home/alice:/bin/sh\nbad\n",
        );
        assert_eq!(users.get(&0).map(String::as_str), Some("root"));
        assert_eq!(users.get(&1000).map(String::as_str), Some("alice"));
        assert_eq!(users.len(), 2);
        assert_eq!(parse_children("12 13 14 "), vec![12, 13, 14]);
        assert_eq!(parse_uptime("12345.67 9999.00\n"), Some(12345.67));
    }

    #[test]
    fn cpu_percent_of_one_core() {
        assert_eq!(cpu_percent(50, 100, 1.0), Some(50.0));
        assert_eq!(cpu_percent(400, 100, 2.0), Some(200.0));
        assert_eq!(cpu_percent(1, 100, 0.0), None);
    }

    #[test]
    fn nvml_pids_map_through_nspid() {
        // Same namespace as the /proc mount: NVML's PIDs are ours.
        assert_eq!(map_nvml_pid(4242, &[100], std::iter::empty()), Some(4242));
        // We are one namespace down (container, host /proc): NSpid's second entry is ours.
        let table: Vec<Vec<u32>> = vec![vec![100, 1], vec![4242, 7], vec![5000]];
        let lists = || table.iter().map(Vec::as_slice);
        assert_eq!(map_nvml_pid(4242, &[100, 1], lists()), Some(7));
        // A host process outside our namespace has no PID here.
        assert_eq!(map_nvml_pid(5000, &[100, 1], lists()), None);
        // Unknown PID.
        assert_eq!(map_nvml_pid(6000, &[100, 1], lists()), None);
        // Two levels down.
        let deep: Vec<Vec<u32>> = vec![vec![9, 8, 3]];
        assert_eq!(
            map_nvml_pid(9, &[1, 2, 1], deep.iter().map(Vec::as_slice)),
            Some(3)
        );
        assert_eq!(map_nvml_pid(9, &[], std::iter::empty()), None);
    }

    #[test]
    fn reads_this_process() {
        let proc = Proc::new(PathBuf::from("/proc"));
        let me = std::process::id();
        let info = proc.process(me).expect("our own /proc entry");
        assert!(!info.name.is_empty());
        assert!(!info.cmdline.is_empty());
        assert!(info.rss_bytes.unwrap_or(0) > 0);
        assert!(info.cpu_percent.is_some());
        // A second sample uses the delta since the first.
        assert!(proc.process(me).unwrap().cpu_percent.is_some());
        assert_eq!(proc.with_descendants(me)[0], me);
        assert_eq!(proc.pid_mapper().map(me), Some(me));
        assert!(proc.process(u32::MAX).is_none());
    }

    #[test]
    fn descendants_include_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let proc = Proc::new(PathBuf::from("/proc"));
        let all = proc.with_descendants(std::process::id());
        let scanned = proc.children_by_scan();
        child.kill().ok();
        child.wait().ok();
        assert!(all.contains(&child.id()), "{all:?}");
        assert!(scanned[&std::process::id()].contains(&child.id()));
    }
}
