//! Run-time state: the reference-counted init, the loaded scenario, device handles, failure
//! counters and live allocations from `NVML_SIM_STATE_DIR`.
//!
//! A live allocation is a file `<gpu-index>-<pid>` holding a decimal byte count. Write it with
//! [`write_allocation`] (aside, then renamed over the old one), so a query never reads it half
//! written. A file that is still read empty or not as a number (someone wrote it in place)
//! counts as the last value this process read from it, or as 0 bytes: the process stays listed.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::codes::{self, Code};
use crate::scenario::{Clocks, Device, Feature, MigInstance, Process, ProcessKind, Scenario};
use crate::series::{self, Level};

/// Environment variable naming the scenario: a bundled name or a `.toml`/`.json` path.
pub const SCENARIO_ENV: &str = "NVML_SIM_SCENARIO";
/// Environment variable naming the live allocation directory.
pub const STATE_DIR_ENV: &str = "NVML_SIM_STATE_DIR";
/// Environment variable that stops the simulated clock at this many seconds since the Unix
/// epoch (a decimal number), for frames that must not move. Read at the first `nvmlInit`.
pub const CLOCK_ENV: &str = "NVML_SIM_CLOCK";

/// Environment variable naming each GPU's device node, `{minor}` standing for its minor number
/// (e.g. `/dev/nvidia{minor}`; overrides the scenario's `device_nodes`). When set, NVML
/// enumerates only the GPUs whose node this process can open, in scenario order, as the
/// driver does inside a job whose device cgroup denies the others: read at the first
/// `nvmlInit`.
pub const DEVICE_NODES_ENV: &str = "NVML_SIM_DEVICE_NODES";

/// `NVML_VALUE_NOT_AVAILABLE` as an unsigned int: the GPU/compute instance id of a non-MIG process.
pub const NOT_AVAILABLE_U32: u32 = u32::MAX;

struct Global {
    refcount: u32,
    sim: Option<Arc<Sim>>,
    spec_override: Option<String>,
}

static GLOBAL: Mutex<Global> = Mutex::new(Global {
    refcount: 0,
    sim: None,
    spec_override: None,
});

fn global() -> MutexGuard<'static, Global> {
    // A panic while holding the lock leaves the data consistent (every update is one assignment).
    GLOBAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `nvmlInit*`: loads the scenario on the first call, counts nested calls.
pub fn init() -> Result<(), Code> {
    let mut g = global();
    if g.refcount > 0 {
        g.refcount += 1;
        return Ok(());
    }
    let spec = g
        .spec_override
        .clone()
        .or_else(|| std::env::var(SCENARIO_ENV).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "default".to_string());
    let mut scenario = Scenario::from_spec(&spec).map_err(|e| {
        eprintln!("nvml-sim: {e}");
        codes::UNKNOWN
    })?;
    if let Some(pattern) = std::env::var(DEVICE_NODES_ENV)
        .ok()
        .filter(|s| !s.is_empty())
    {
        if let Err(e) = crate::scenario::check_node_pattern(&pattern) {
            eprintln!("nvml-sim: {DEVICE_NODES_ENV}: {e}");
            return Err(codes::UNKNOWN);
        }
        scenario.device_nodes = Some(pattern);
    }
    if let Some(code) = scenario.init_error {
        return Err(code);
    }
    g.sim = Some(Arc::new(Sim::new(scenario)));
    g.refcount = 1;
    Ok(())
}

/// `nvmlShutdown`: drops the scenario when the last reference goes.
pub fn shutdown() -> Result<(), Code> {
    let mut g = global();
    if g.refcount == 0 {
        return Err(codes::UNINITIALIZED);
    }
    g.refcount -= 1;
    if g.refcount == 0 {
        g.sim = None;
    }
    Ok(())
}

/// The loaded simulation, or `NVML_ERROR_UNINITIALIZED`.
pub fn current() -> Result<Arc<Sim>, Code> {
    global().sim.clone().ok_or(codes::UNINITIALIZED)
}

/// Overrides `NVML_SIM_SCENARIO` for the next first `nvmlInit` (tests); `None` clears it.
pub fn set_scenario_override(spec: Option<String>) {
    global().spec_override = spec;
}

/// What a device handle refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A whole GPU, by index.
    Gpu(usize),
    /// MIG device `mig` of GPU `gpu`.
    Mig {
        /// The parent GPU index.
        gpu: usize,
        /// The index into the parent's MIG devices.
        mig: usize,
    },
}

const HANDLE_MAGIC: usize = 0x5e_0000;

impl Target {
    /// The opaque handle value given to callers. It is never dereferenced, by them or by us.
    pub fn handle(self) -> usize {
        match self {
            Target::Gpu(g) => HANDLE_MAGIC | (g + 1) << 8,
            Target::Mig { gpu, mig } => HANDLE_MAGIC | (gpu + 1) << 8 | (mig + 1),
        }
    }

    /// The parent GPU index.
    pub fn gpu(self) -> usize {
        match self {
            Target::Gpu(g) | Target::Mig { gpu: g, .. } => g,
        }
    }
}

/// One entry of a process list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    /// Host pid.
    pub pid: u32,
    /// Bytes of GPU memory.
    pub used: u64,
    /// GPU instance id, or [`NOT_AVAILABLE_U32`].
    pub gpu_instance_id: u32,
    /// Compute instance id, or [`NOT_AVAILABLE_U32`].
    pub compute_instance_id: u32,
}

/// Memory figures in bytes, NVML v2 semantics (`used` excludes `reserved`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Total.
    pub total: u64,
    /// Reserved by the driver.
    pub reserved: u64,
    /// Used by processes and others.
    pub used: u64,
}

/// A loaded scenario plus its counters.
#[derive(Debug)]
pub struct Sim {
    /// The scenario.
    pub scenario: Scenario,
    /// The scenario indices of the GPUs NVML enumerates, in enumeration order: every GPU,
    /// or with device nodes, those whose node this process may open.
    enumerated: Vec<usize>,
    failure_calls: Vec<AtomicU64>,
    state_dir: Option<PathBuf>,
    /// The last byte count read from each `(gpu, pid)` file, for when it is read half written.
    last_read: Mutex<HashMap<(usize, u32), u64>>,
    /// `NVML_SIM_CLOCK`, in microseconds since the Unix epoch.
    frozen_us: Option<u64>,
    /// When the machine booted (taken as when the driver loaded), seconds since the Unix epoch.
    boot_s: f64,
}

/// One entry of `nvmlDeviceGetProcessUtilization`, percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSample {
    /// Host pid.
    pub pid: u32,
    /// SM utilisation.
    pub sm: u32,
    /// Memory (bandwidth) utilisation.
    pub mem: u32,
    /// Encoder utilisation.
    pub enc: u32,
    /// Decoder utilisation.
    pub dec: u32,
}

/// The phase seed of GPU `gpu`'s values, so GPUs sharing a range do not move together.
pub fn device_seed(gpu: usize) -> u64 {
    (gpu as u64).wrapping_mul(7919).wrapping_add(1)
}

/// The per-process utilisation of GPU `gpu` at `t` seconds since the epoch, for `procs` (pid and
/// its scenario entry, if any), in `procs` order. A process with a stated value gets it; the
/// others share what is left of the GPU's value, in shares that move with time. Pure: tests use
/// it to predict what the simulator answers.
pub fn process_samples(
    d: &Device,
    gpu: usize,
    procs: &[(u32, Option<&Process>)],
    t: f64,
) -> Vec<ProcSample> {
    let seed = device_seed(gpu);
    let weights: Vec<f64> = procs
        .iter()
        .map(|&(pid, _)| series::process_weight(t, pid))
        .collect();
    let metric = |total: Level, own: fn(&Process) -> Option<Level>| -> Vec<u32> {
        let stated: Vec<Option<u32>> = procs
            .iter()
            .map(|&(pid, p)| p.and_then(own).map(|l| l.at(t, u64::from(pid))))
            .collect();
        let taken: u32 = stated.iter().flatten().sum();
        let left = total.at(t, seed).saturating_sub(taken);
        let free_weights: Vec<f64> = stated
            .iter()
            .zip(&weights)
            .map(|(s, w)| if s.is_some() { 0.0 } else { *w })
            .collect();
        let shares = series::split(left, &free_weights);
        stated
            .iter()
            .zip(shares)
            .map(|(s, share)| s.unwrap_or(share))
            .collect()
    };
    let sm = metric(d.utilization_gpu, |p| p.sm_utilization);
    let mem = metric(d.utilization_memory, |p| p.memory_utilization);
    let enc = metric(d.encoder_utilization, |p| p.encoder_utilization);
    let dec = metric(d.decoder_utilization, |p| p.decoder_utilization);
    procs
        .iter()
        .enumerate()
        .map(|(i, &(pid, _))| ProcSample {
            pid,
            sm: sm[i],
            mem: mem[i],
            enc: enc[i],
            dec: dec[i],
        })
        .collect()
}

/// Energy used by GPU `gpu` (scenario `d`) from boot to `t` (seconds since the epoch), mJ: the
/// scenario's `energy_mj` plus the power draw integrated since boot.
pub fn energy_mj(d: &Device, gpu: usize, boot_s: f64, t: f64) -> u64 {
    // mW times seconds is mJ.
    let used = d.power_usage_mw.integral(boot_s, t, device_seed(gpu));
    d.energy_mj.saturating_add(used as u64)
}

/// KiB moved over one NVLink link of GPU `gpu` from boot to `t` at `rate` KiB/s.
pub fn counter_kib(rate: Level, gpu: usize, boot_s: f64, t: f64) -> u64 {
    rate.integral(boot_s, t, device_seed(gpu)) as u64
}

/// The scenario indices of the GPUs whose device node (`pattern` with the GPU's minor number)
/// `open` opens, in scenario order. A node refused (`EPERM` from a device cgroup, `EACCES`) or
/// missing (a container given some nodes only) hides its GPU, as the driver's enumeration
/// skips devices the process cannot open; any other outcome, such as `ENXIO` from a node
/// without a driver behind it, lists it.
pub fn enumerable(
    scenario: &Scenario,
    pattern: &str,
    open: impl Fn(&Path) -> io::Result<()>,
) -> Vec<usize> {
    (0..scenario.devices.len())
        .filter(|&gpu| {
            let path = crate::scenario::node_path(pattern, scenario.minor_number(gpu));
            !matches!(
                open(&path).map_err(|e| e.kind()),
                Err(io::ErrorKind::PermissionDenied | io::ErrorKind::NotFound)
            )
        })
        .collect()
}

/// The boot time from `/proc/stat` (`btime`), else now.
fn boot_time_s() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .map_or_else(|| series::secs(series::now_us()), |s| s as f64)
}

impl Sim {
    fn new(scenario: Scenario) -> Sim {
        let state_dir = std::env::var_os(STATE_DIR_ENV)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .or_else(|| scenario.state_dir.clone());
        let frozen_us = std::env::var(CLOCK_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| (s * 1e6) as u64);
        let enumerated = match &scenario.device_nodes {
            None => (0..scenario.devices.len()).collect(),
            Some(pattern) => enumerable(&scenario, pattern, |path| {
                std::fs::File::open(path).map(drop)
            }),
        };
        Sim {
            enumerated,
            failure_calls: scenario
                .failures
                .iter()
                .map(|_| AtomicU64::new(0))
                .collect(),
            scenario,
            state_dir,
            last_read: Mutex::default(),
            frozen_us,
            boot_s: boot_time_s(),
        }
    }

    /// The simulated time, microseconds since the Unix epoch (the wall clock unless frozen).
    pub fn now_us(&self) -> u64 {
        self.frozen_us.unwrap_or_else(series::now_us)
    }

    /// The value of one of GPU `gpu`'s levels now.
    pub fn level(&self, gpu: usize, level: Level) -> u32 {
        self.level_at(gpu, level, self.now_us())
    }

    /// The value of one of GPU `gpu`'s levels at `t_us` (µs since the epoch).
    pub fn level_at(&self, gpu: usize, level: Level, t_us: u64) -> u32 {
        level.at(series::secs(t_us), device_seed(gpu))
    }

    /// Whether GPU `gpu` is busy now: its utilisation is above 0, or, in MIG mode, one of its
    /// instances has a process.
    pub fn busy(&self, gpu: usize) -> bool {
        self.busy_at(gpu, self.now_us())
    }

    /// Whether GPU `gpu` is busy at `t_us`.
    pub fn busy_at(&self, gpu: usize, t_us: u64) -> bool {
        let d = &self.scenario.devices[gpu];
        if d.mig_mode {
            d.mig.iter().any(|m| !m.processes.is_empty())
        } else {
            self.level_at(gpu, d.utilization_gpu, t_us) > 0
        }
    }

    /// GPU `gpu`'s clocks now: the stated ones, else the maximum ones while busy and the idle
    /// ones while not.
    pub fn clocks(&self, gpu: usize) -> Clocks {
        self.clocks_at(gpu, self.now_us())
    }

    /// GPU `gpu`'s clocks at `t_us`.
    pub fn clocks_at(&self, gpu: usize, t_us: u64) -> Clocks {
        let d = &self.scenario.devices[gpu];
        match d.clocks {
            Some(c) => c,
            None if self.busy_at(gpu, t_us) => d.max_clocks,
            None => d.idle_clocks,
        }
    }

    /// GPU `gpu`'s performance state now: the stated one, else P0 while busy and the idle one
    /// while not.
    pub fn pstate(&self, gpu: usize) -> u32 {
        let d = &self.scenario.devices[gpu];
        match d.pstate {
            Some(p) => p,
            None if self.busy(gpu) => 0,
            None => d.idle_pstate,
        }
    }

    /// Energy used by GPU `gpu` since boot, mJ.
    pub fn energy_mj(&self, gpu: usize) -> u64 {
        energy_mj(
            &self.scenario.devices[gpu],
            gpu,
            self.boot_s,
            series::secs(self.now_us()),
        )
    }

    /// KiB moved since boot over one link at `rate` KiB/s.
    pub fn counter_kib(&self, gpu: usize, rate: Level) -> u64 {
        counter_kib(rate, gpu, self.boot_s, series::secs(self.now_us()))
    }

    /// Per-process utilisation of GPU `gpu` at the sample time `tick_us`: every compute and
    /// graphics process it lists (live allocations included), each once.
    pub fn process_samples(&self, gpu: usize, tick_us: u64) -> Vec<ProcSample> {
        let d = &self.scenario.devices[gpu];
        let mut pids: Vec<u32> = Vec::new();
        for kind in [ProcessKind::Compute, ProcessKind::Graphics] {
            for p in self.processes(Target::Gpu(gpu), kind) {
                if !pids.contains(&p.pid) {
                    pids.push(p.pid);
                }
            }
        }
        let procs: Vec<(u32, Option<&Process>)> = pids
            .iter()
            .map(|&pid| (pid, d.processes.iter().find(|p| p.pid.resolve() == pid)))
            .collect();
        process_samples(d, gpu, &procs, series::secs(tick_us))
    }

    /// Returns the injected error for this call of `function`, if one is due.
    pub fn inject(&self, function: &str, gpu: Option<usize>) -> Result<(), Code> {
        for (f, calls) in self.scenario.failures.iter().zip(&self.failure_calls) {
            if f.matches(function) && (f.device.is_none() || f.device == gpu) {
                let n = calls.fetch_add(1, Ordering::Relaxed);
                if n >= f.fail_after {
                    return Err(f.error);
                }
            }
        }
        Ok(())
    }

    /// Decodes a handle value into a target that exists in this scenario.
    pub fn resolve(&self, handle: usize) -> Result<Target, Code> {
        if handle & !0xffff != HANDLE_MAGIC {
            return Err(codes::INVALID_ARGUMENT);
        }
        let gpu = (handle >> 8) & 0xff;
        let mig = handle & 0xff;
        let device = gpu
            .checked_sub(1)
            .filter(|&g| self.index_of(g).is_some())
            .and_then(|g| self.scenario.devices.get(g))
            .ok_or(codes::INVALID_ARGUMENT)?;
        match mig {
            0 => Ok(Target::Gpu(gpu - 1)),
            m if m <= device.mig.len() => Ok(Target::Mig {
                gpu: gpu - 1,
                mig: m - 1,
            }),
            _ => Err(codes::INVALID_ARGUMENT),
        }
    }

    /// The GPUs NVML enumerates, with their scenario indices, in enumeration order.
    pub fn listed(&self) -> impl Iterator<Item = (usize, &Device)> {
        self.enumerated
            .iter()
            .map(|&g| (g, &self.scenario.devices[g]))
    }

    /// How many GPUs NVML enumerates.
    pub fn count(&self) -> usize {
        self.enumerated.len()
    }

    /// The GPU NVML enumerates at `index` (a scenario index), `None` past the end.
    pub fn enumerated(&self, index: usize) -> Option<usize> {
        self.enumerated.get(index).copied()
    }

    /// The enumeration index of scenario GPU `gpu`, `None` when NVML does not list it.
    pub fn index_of(&self, gpu: usize) -> Option<usize> {
        self.enumerated.iter().position(|&g| g == gpu)
    }

    /// The GPU (the parent, for a MIG target).
    pub fn device(&self, t: Target) -> &Device {
        &self.scenario.devices[t.gpu()]
    }

    /// The MIG instance of a MIG target.
    pub fn mig(&self, t: Target) -> Option<&MigInstance> {
        match t {
            Target::Gpu(_) => None,
            Target::Mig { gpu, mig } => self.scenario.devices[gpu].mig.get(mig),
        }
    }

    /// The checks every device query makes, in NVML's order: lost GPU, injected failure,
    /// unsupported feature.
    pub fn check(&self, function: &str, t: Target, feature: Option<Feature>) -> Result<(), Code> {
        let d = self.device(t);
        if d.lost {
            return Err(codes::GPU_IS_LOST);
        }
        self.inject(function, Some(t.gpu()))?;
        match feature {
            Some(f) if d.unsupported(f) => Err(codes::NOT_SUPPORTED),
            _ => Ok(()),
        }
    }

    /// Finds a GPU or MIG device by UUID among the GPUs NVML enumerates.
    pub fn by_uuid(&self, uuid: &str) -> Option<Target> {
        self.listed().find_map(|(g, d)| {
            if d.uuid == uuid {
                return Some(Target::Gpu(g));
            }
            d.mig
                .iter()
                .position(|m| m.uuid == uuid)
                .map(|mig| Target::Mig { gpu: g, mig })
        })
    }

    /// Processes of `kind` on a GPU (including those in its MIG devices) or a MIG device.
    pub fn processes(&self, t: Target, kind: ProcessKind) -> Vec<ProcInfo> {
        let d = self.device(t);
        let listed = |m: Option<&MigInstance>| {
            let (procs, gi, ci) = match m {
                Some(m) => (&m.processes, m.gpu_instance_id, m.compute_instance_id),
                None => (&d.processes, NOT_AVAILABLE_U32, NOT_AVAILABLE_U32),
            };
            procs
                .iter()
                .filter(|p| p.kind == kind)
                .map(|p| ProcInfo {
                    pid: p.pid.resolve(),
                    used: p.used_memory.0,
                    gpu_instance_id: gi,
                    compute_instance_id: ci,
                })
                .collect::<Vec<_>>()
        };
        match t {
            Target::Mig { .. } => listed(self.mig(t)),
            Target::Gpu(g) => {
                let mut out = listed(None);
                for m in &d.mig {
                    out.extend(listed(Some(m)));
                }
                if kind == ProcessKind::Compute {
                    for (pid, used) in self.live_allocations(g) {
                        match out.iter_mut().find(|p| p.pid == pid) {
                            Some(p) => p.used += used,
                            None => out.push(ProcInfo {
                                pid,
                                used,
                                gpu_instance_id: NOT_AVAILABLE_U32,
                                compute_instance_id: NOT_AVAILABLE_U32,
                            }),
                        }
                    }
                }
                out
            }
        }
    }

    /// Memory of a GPU or MIG device, counting listed processes and live allocations.
    pub fn memory(&self, t: Target) -> Memory {
        let d = self.device(t);
        let procs =
            |ps: &[crate::scenario::Process]| ps.iter().map(|p| p.used_memory.0).sum::<u64>();
        match (t, self.mig(t)) {
            (Target::Mig { .. }, Some(m)) => Memory {
                total: m.memory_total.0,
                reserved: 0,
                used: m.memory_used.0 + procs(&m.processes),
            },
            _ => {
                let mig: u64 = d
                    .mig
                    .iter()
                    .map(|m| m.memory_used.0 + procs(&m.processes))
                    .sum();
                let live: u64 = self.live_allocations(t.gpu()).iter().map(|a| a.1).sum();
                let used = d.memory_used.0 + procs(&d.processes) + mig + live;
                let room = d.memory_total.0.saturating_sub(d.memory_reserved.0);
                Memory {
                    total: d.memory_total.0,
                    reserved: d.memory_reserved.0,
                    used: used.min(room),
                }
            }
        }
    }

    /// `(pid, bytes)` from files `<gpu>-<pid>` in the state directory, live pids only.
    pub fn live_allocations(&self, gpu: usize) -> Vec<(u32, u64)> {
        let Some(dir) = self.state_dir.as_deref() else {
            return Vec::new();
        };
        let mut last = self
            .last_read
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let out = read_allocations(dir, gpu, &last);
        // Remember this GPU's values; forget files that are gone.
        last.retain(|&(g, _), _| g != gpu);
        last.extend(out.iter().map(|&(pid, bytes)| ((gpu, pid), bytes)));
        out
    }
}

/// The files `<gpu>-<pid>` of live processes in `dir`. A file read empty or not as a number
/// (being written in place) is read once more, then counts as its value in `last`, else 0.
fn read_allocations(dir: &Path, gpu: usize, last: &HashMap<(usize, u32), u64>) -> Vec<(u32, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(u32, u64)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name();
            let (g, pid) = name.to_str()?.split_once('-')?;
            if g.parse::<usize>().ok()? != gpu {
                return None;
            }
            let pid: u32 = pid.parse().ok()?;
            if !Path::new("/proc").join(pid.to_string()).exists() {
                return None;
            }
            let path = e.path();
            let read = || match std::fs::read_to_string(&path) {
                Ok(text) => Ok(parse_bytes(&text)),
                Err(e) => Err(e.kind()),
            };
            let bytes = match read() {
                Ok(Some(bytes)) => bytes,
                // Removed since the directory was listed: the allocation is over.
                Err(io::ErrorKind::NotFound) => return None,
                _ => match read() {
                    Ok(Some(bytes)) => bytes,
                    Err(io::ErrorKind::NotFound) => return None,
                    _ => last.get(&(gpu, pid)).copied().unwrap_or(0),
                },
            };
            Some((pid, bytes))
        })
        .collect();
    out.sort_unstable();
    out
}

/// A byte count: decimal digits, with surrounding whitespace (a final newline) allowed.
fn parse_bytes(text: &str) -> Option<u64> {
    let digits = text.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Records that process `pid` uses `bytes` of GPU `gpu`'s memory: writes file `<gpu>-<pid>` in
/// the state directory `dir` aside (a unique name the simulator ignores, in the same
/// directory) and renames it into place, so a concurrent query never reads it half written.
pub fn write_allocation(dir: &Path, gpu: u32, pid: u32, bytes: u64) -> io::Result<()> {
    static ASIDE_NUMBER: AtomicU64 = AtomicU64::new(0);
    let n = ASIDE_NUMBER.fetch_add(1, Ordering::Relaxed);
    // Starts with a dot, so it never parses as `<gpu>-<pid>`.
    let aside = dir.join(format!(".{gpu}-{pid}.{}.{n}.new", std::process::id()));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&aside)?;
        file.write_all(format!("{bytes}\n").as_bytes())?;
        std::fs::rename(&aside, dir.join(format!("{gpu}-{pid}")))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&aside);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Format;

    fn sim(text: &str) -> Sim {
        Sim::new(Scenario::parse(text, Format::Toml, "test").unwrap())
    }

    #[test]
    fn device_nodes_hide_the_gpus_whose_node_is_refused_keeping_the_order() {
        let mut scenario = Scenario::bundled("4gpu").unwrap();
        scenario.devices[3].minor_number = Some(7);
        let refused = |path: &Path| -> io::Result<()> {
            match path.to_str().unwrap() {
                // A device cgroup says EPERM; a node missing from a container, ENOENT.
                "/n/nvidia0" => Err(io::Error::from_raw_os_error(1)),
                "/n/nvidia2" => Err(io::Error::from_raw_os_error(2)),
                // No driver behind the node: listed, as the real node would be.
                "/n/nvidia1" => Err(io::Error::from_raw_os_error(6)),
                "/n/nvidia7" => Ok(()),
                other => panic!("opened {other}"),
            }
        };
        assert_eq!(
            enumerable(&scenario, "/n/nvidia{minor}", refused),
            vec![1, 3]
        );
        scenario.device_nodes = Some("/n/nvidia{minor}".into());
        let mut s = Sim::new(scenario);
        s.enumerated = vec![1, 3];
        assert_eq!(s.count(), 2);
        assert_eq!(
            (s.enumerated(0), s.enumerated(1), s.enumerated(2)),
            (Some(1), Some(3), None)
        );
        assert_eq!((s.index_of(3), s.index_of(0)), (Some(1), None));
        let hidden = s.scenario.devices[0].uuid.clone();
        assert_eq!(s.by_uuid(&hidden), None);
        assert_eq!(
            s.resolve(Target::Gpu(0).handle()),
            Err(codes::INVALID_ARGUMENT)
        );
        assert_eq!(s.resolve(Target::Gpu(3).handle()), Ok(Target::Gpu(3)));
    }

    #[test]
    fn device_node_patterns_are_checked() {
        for good in ["/dev/nvidia{minor}", "/x/{minor}/node"] {
            assert_eq!(crate::scenario::check_node_pattern(good), Ok(()));
        }
        for bad in ["dev/nvidia{minor}", "/dev/nvidia", "/d/{minor}{minor}"] {
            assert!(crate::scenario::check_node_pattern(bad).is_err(), "{bad}");
        }
        assert_eq!(
            crate::scenario::node_path("/d/nvidia{minor}", 12),
            PathBuf::from("/d/nvidia12")
        );
    }

    #[test]
    fn handles_round_trip_and_reject_garbage() {
        let s = Sim::new(Scenario::bundled("mig").unwrap());
        for t in [
            Target::Gpu(0),
            Target::Gpu(1),
            Target::Mig { gpu: 0, mig: 2 },
        ] {
            assert_eq!(s.resolve(t.handle()), Ok(t));
        }
        for bad in [
            0,
            1,
            Target::Gpu(2).handle(),
            Target::Mig { gpu: 0, mig: 3 }.handle(),
        ] {
            assert_eq!(s.resolve(bad), Err(codes::INVALID_ARGUMENT));
        }
    }

    #[test]
    fn fail_after_counts_calls_per_failure() {
        let s = sim(
            "devices = [{}, {}]\n[[failures]]\nfunction = \"nvmlDeviceGetPowerUsage\"\nerror = \"UNKNOWN\"\nfail_after = 2\ndevice = 1",
        );
        let call = |g| s.check("nvmlDeviceGetPowerUsage", Target::Gpu(g), None);
        assert_eq!(
            (call(1), call(1), call(1)),
            (Ok(()), Ok(()), Err(codes::UNKNOWN))
        );
        assert_eq!(call(0), Ok(()));
        assert_eq!(s.check("nvmlDeviceGetName", Target::Gpu(1), None), Ok(()));
    }

    #[test]
    fn versioned_names_match_base_failures() {
        let s = sim("devices = [{}]\n[[failures]]\nfunction = \"nvmlDeviceGetComputeRunningProcesses\"\nerror = 999");
        assert_eq!(
            s.inject("nvmlDeviceGetComputeRunningProcesses_v3", Some(0)),
            Err(codes::UNKNOWN)
        );
    }

    #[test]
    fn live_allocations_add_processes_and_memory() {
        let dir = std::env::temp_dir().join(format!("nvml-sim-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let me = std::process::id();
        std::fs::write(dir.join(format!("0-{me}")), "1048576\n").unwrap();
        std::fs::write(dir.join("0-4000000000"), "5").unwrap(); // no such pid
        std::fs::write(dir.join(format!("1-{me}")), "7").unwrap(); // other GPU
        std::fs::write(dir.join("junk"), "x").unwrap();
        let mut scenario =
            Scenario::parse("devices = [{memory_used = 10}, {}]", Format::Toml, "t").unwrap();
        scenario.state_dir = Some(dir.clone());
        let s = Sim {
            enumerated: vec![0, 1],
            failure_calls: Vec::new(),
            state_dir: scenario.state_dir.clone(),
            last_read: Mutex::default(),
            frozen_us: None,
            boot_s: 0.0,
            scenario,
        };
        let procs = s.processes(Target::Gpu(0), ProcessKind::Compute);
        assert_eq!(procs.len(), 1);
        assert_eq!((procs[0].pid, procs[0].used), (me, 1_048_576));
        assert_eq!(procs[0].gpu_instance_id, NOT_AVAILABLE_U32);
        assert_eq!(s.memory(Target::Gpu(0)).used, 10 + 1_048_576);
        assert!(s
            .processes(Target::Gpu(0), ProcessKind::Graphics)
            .is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn process_samples_share_the_gpu_and_keep_stated_values() {
        let s = Scenario::parse(
            "[[devices]]\nutilization_gpu = 90\nutilization_memory = 40\nprocesses = [\n{ pid = 1, used_memory = 1 },\n{ pid = 2, used_memory = 1 },\n{ pid = 3, used_memory = 1, sm_utilization = 30 }]",
            Format::Toml,
            "t",
        )
        .unwrap();
        let d = &s.devices[0];
        let procs: Vec<(u32, Option<&Process>)> = d
            .processes
            .iter()
            .map(|p| (p.pid.resolve(), Some(p)))
            .collect();
        let mut shares = std::collections::BTreeSet::new();
        for i in 0..200 {
            let t = 1.7e9 + f64::from(i) * 0.5;
            let v = process_samples(d, 0, &procs, t);
            assert_eq!(v.iter().map(|p| p.pid).collect::<Vec<_>>(), vec![1, 2, 3]);
            assert_eq!(v[2].sm, 30, "a stated value is kept");
            assert!(
                v[0].sm + v[1].sm <= 60,
                "the others share what is left: {v:?}"
            );
            assert!(v.iter().map(|p| p.mem).sum::<u32>() <= 40);
            shares.insert(v[0].sm);
        }
        assert!(shares.len() > 5, "the shares move: {shares:?}");
        assert!(process_samples(d, 0, &[], 1.7e9).is_empty());
    }

    #[test]
    fn mig_memory_and_processes() {
        let s = Sim::new(Scenario::bundled("mig").unwrap());
        let parent = s.processes(Target::Gpu(0), ProcessKind::Compute);
        assert_eq!(parent.len(), 3);
        let m = Target::Mig { gpu: 0, mig: 1 };
        let inst = s.processes(m, ProcessKind::Compute);
        assert_eq!(inst.len(), 2);
        assert!(inst
            .iter()
            .all(|p| p.gpu_instance_id == 3 && p.compute_instance_id == 0));
        assert_eq!(s.memory(m).total, 19 << 30);
        assert_eq!(s.memory(m).used, (64 << 20) + (6 << 30));
        assert!(s.memory(Target::Gpu(0)).used > s.memory(m).used);
    }
}
