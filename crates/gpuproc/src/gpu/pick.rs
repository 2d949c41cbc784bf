//! Choosing GPUs: what a caller asks for ([`Criteria`]), the pure policy that answers it
//! ([`select`]), and why nothing qualified ([`Unavailable`], inside [`PickError`]).
//!
//! The policy sees a list of devices, the leases other pickers hold and the devices this
//! process may use; it makes no system calls, so every rule is unit-tested here. The
//! mechanism (snapshot, lock, record) is [`pick`](super::pick) in `lease.rs`.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::GpuError;
use super::lease::LeaseTable;
use super::types::Device;

/// In which order qualifying GPUs are handed out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// Least-shared first, then most free memory, then lowest index: spreads work out. The
    /// default.
    #[default]
    MostFree,
    /// Lowest NVML index first: packs work onto the first GPUs.
    LowestIndex,
    /// The GPU after the one most recently handed out by any picker on this machine (the
    /// lease table remembers it), wrapping around.
    RoundRobin,
}

impl Order {
    /// The name used on the command line: `most-free`, `lowest-index` or `round-robin`.
    pub fn name(self) -> &'static str {
        match self {
            Order::MostFree => "most-free",
            Order::LowestIndex => "lowest-index",
            Order::RoundRobin => "round-robin",
        }
    }
}

impl FromStr for Order {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "most-free" => Ok(Order::MostFree),
            "lowest-index" => Ok(Order::LowestIndex),
            "round-robin" => Ok(Order::RoundRobin),
            other => Err(format!(
                "unknown order {other:?}: expected most-free, lowest-index or round-robin"
            )),
        }
    }
}

/// A GPU named explicitly: its NVML index (as `nvidia-smi` and `gpuproc gpus` number them)
/// or its UUID (`GPU-...`, or a unique prefix of one).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeviceId {
    /// NVML index (PCI bus order).
    Index(u32),
    /// A `GPU-` UUID or a unique prefix of one.
    Uuid(String),
}

impl FromStr for DeviceId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.len() >= 4 && s[..4].eq_ignore_ascii_case("GPU-") {
            return Ok(DeviceId::Uuid(s.to_string()));
        }
        s.parse().map(DeviceId::Index).map_err(|_| {
            format!(
                "{s:?} is not a GPU: expected an index such as 0 or a UUID such as GPU-5d1f3c2a"
            )
        })
    }
}

impl From<u32> for DeviceId {
    fn from(index: u32) -> Self {
        DeviceId::Index(index)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceId::Index(i) => write!(f, "{i}"),
            DeviceId::Uuid(u) => f.write_str(u),
        }
    }
}

impl DeviceId {
    /// Parses a comma-separated list such as `0,2` or `GPU-5d1f,GPU-8932`.
    ///
    /// # Errors
    /// Names the first entry that is neither an index nor a UUID.
    pub fn parse_list(list: &str) -> Result<Vec<DeviceId>, String> {
        list.split(',').map(str::parse).collect()
    }

    fn matches(&self, device: &Device) -> bool {
        match self {
            DeviceId::Index(i) => device.index == *i,
            DeviceId::Uuid(prefix) => device.uuid.as_deref().is_some_and(|u| {
                u.len() >= prefix.len()
                    && u.is_char_boundary(prefix.len())
                    && u[..prefix.len()].eq_ignore_ascii_case(prefix)
            }),
        }
    }
}

/// What a caller needs from the GPUs it picks.
///
/// ```
/// use std::time::Duration;
/// use gpuproc::gpu::{Criteria, Order};
///
/// let want = Criteria::new()
///     .count(2)
///     .min_free(10 << 30)
///     .max_utilization(50)
///     .order(Order::LowestIndex)
///     .wait(Duration::from_secs(300));
/// assert_eq!(want.gpu_count(), 2);
/// ```
///
/// By default: one GPU, any free memory and utilisation, other processes allowed, one lease
/// per GPU (exclusive), [`Order::MostFree`], no waiting, and only among the devices this
/// process's own `CUDA_VISIBLE_DEVICES` allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[must_use]
pub struct Criteria {
    count: Option<usize>,
    min_free: Option<u64>,
    max_utilization: Option<u32>,
    no_foreign_processes: bool,
    max_per_gpu: u32,
    order: Order,
    devices: Option<Vec<DeviceId>>,
    wait: Option<Duration>,
    within_visible: bool,
}

impl Default for Criteria {
    fn default() -> Self {
        Criteria {
            count: None,
            min_free: None,
            max_utilization: None,
            no_foreign_processes: false,
            max_per_gpu: 1,
            order: Order::MostFree,
            devices: None,
            wait: None,
            within_visible: true,
        }
    }
}

impl Criteria {
    /// One GPU, no other conditions: see the type's documentation for every default.
    pub fn new() -> Self {
        Criteria::default()
    }

    /// How many GPUs to pick (default 1, or the length of [`devices`](Self::devices) when
    /// a list is given).
    pub fn count(mut self, n: usize) -> Self {
        self.count = Some(n);
        self
    }

    /// Only GPUs with at least this much free memory, bytes.
    pub fn min_free(mut self, bytes: u64) -> Self {
        self.min_free = Some(bytes);
        self
    }

    /// Only GPUs whose utilisation is at most this many percent. A GPU that does not report
    /// its utilisation does not qualify.
    pub fn max_utilization(mut self, percent: u32) -> Self {
        self.max_utilization = Some(percent);
        self
    }

    /// Only GPUs on which no other process has a context. Processes of this process's own
    /// tree, and those of the holders of a lease on the GPU, do not count.
    pub fn no_foreign_processes(mut self, yes: bool) -> Self {
        self.no_foreign_processes = yes;
        self
    }

    /// How many leases may hold one GPU at the same time (default 1: exclusive). A GPU
    /// already leased with a smaller limit keeps that limit: an exclusive lease is never
    /// joined by a sharing one.
    pub fn max_per_gpu(mut self, leases: u32) -> Self {
        self.max_per_gpu = leases;
        self
    }

    /// The order in which qualifying GPUs are chosen.
    pub fn order(mut self, order: Order) -> Self {
        self.order = order;
        self
    }

    /// Only these GPUs (NVML indices or UUIDs). Without [`count`](Self::count), all of them.
    pub fn devices<I>(mut self, devices: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<DeviceId>,
    {
        self.devices = Some(devices.into_iter().map(Into::into).collect());
        self
    }

    /// Waits up to `timeout` for enough GPUs to qualify, instead of failing at once. A
    /// request that can never be met (more GPUs than exist) fails at once all the same.
    pub fn wait(mut self, timeout: Duration) -> Self {
        self.wait = Some(timeout);
        self
    }

    /// Whether to pick only among the GPUs this process's `CUDA_VISIBLE_DEVICES` allows (the
    /// default, `true`). `false` considers every GPU on the machine.
    pub fn within_visible(mut self, yes: bool) -> Self {
        self.within_visible = yes;
        self
    }

    /// How many GPUs will be picked.
    pub fn gpu_count(&self) -> usize {
        self.count
            .unwrap_or_else(|| self.devices.as_ref().map_or(1, Vec::len))
    }

    /// The minimum free memory asked for, bytes.
    pub fn min_free_bytes(&self) -> Option<u64> {
        self.min_free
    }

    /// The maximum utilisation asked for, percent.
    pub fn max_utilization_percent(&self) -> Option<u32> {
        self.max_utilization
    }

    /// Whether GPUs with other processes are refused.
    pub fn refuses_foreign_processes(&self) -> bool {
        self.no_foreign_processes
    }

    /// How many leases may share one GPU.
    pub fn share_limit(&self) -> u32 {
        self.max_per_gpu
    }

    /// The order of choice.
    pub fn chosen_order(&self) -> Order {
        self.order
    }

    /// The explicit device list, if any.
    pub fn device_list(&self) -> Option<&[DeviceId]> {
        self.devices.as_deref()
    }

    /// How long to wait for GPUs to qualify.
    pub fn wait_timeout(&self) -> Option<Duration> {
        self.wait
    }

    /// Whether only devices in `CUDA_VISIBLE_DEVICES` are considered.
    pub fn is_within_visible(&self) -> bool {
        self.within_visible
    }

    pub(crate) fn with_count(&self, n: usize) -> Criteria {
        Criteria {
            count: Some(n),
            ..self.clone()
        }
    }
}

/// A GPU handed out by a pick.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PickedDevice {
    /// NVML index (PCI bus order, as `nvidia-smi` numbers it).
    pub index: u32,
    /// The full UUID, `GPU-...`: what the child's `CUDA_VISIBLE_DEVICES` names.
    pub uuid: String,
    /// Product name.
    pub name: Option<String>,
}

/// Why one GPU did not qualify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
#[non_exhaustive]
pub enum Rejection {
    /// Not among the devices this process's `CUDA_VISIBLE_DEVICES` allows.
    NotVisible,
    /// Not in the explicit device list.
    NotListed,
    /// The device could not be read (lost, permission denied).
    Unreadable {
        /// What NVML said.
        message: String,
    },
    /// NVML gave no UUID, which a lease and `CUDA_VISIBLE_DEVICES` need.
    NoUuid,
    /// MIG mode is on: CUDA sees its MIG devices, not the whole GPU.
    MigEnabled,
    /// Free memory was asked for and the device does not report its memory.
    MemoryUnknown,
    /// Less free memory than asked for.
    LowMemory {
        /// Free memory, bytes.
        free: u64,
        /// Total memory, bytes.
        total: u64,
        /// What was asked for, bytes.
        needed: u64,
    },
    /// A utilisation limit was asked for and the device does not report its utilisation.
    UtilizationUnknown,
    /// Busier than allowed.
    Busy {
        /// Utilisation, percent.
        utilization: u32,
        /// The limit asked for, percent.
        max: u32,
    },
    /// No foreign processes were asked for and the device does not list its processes.
    ProcessesUnknown,
    /// Other processes use the device.
    ForeignProcesses {
        /// Their PIDs (as this process sees them, or NVML's when not visible from here).
        pids: Vec<u32>,
    },
    /// Leased as often as allowed.
    Leased {
        /// The processes holding leases on it.
        holders: Vec<u32>,
        /// How many leases hold it.
        leases: usize,
        /// How many are allowed (the smallest limit of the asker and the holders).
        limit: u32,
    },
}

impl Rejection {
    /// Whether waiting cannot change this (the device is excluded or unusable, rather than
    /// busy or leased).
    pub fn is_permanent(&self) -> bool {
        match self {
            Rejection::NotVisible
            | Rejection::NotListed
            | Rejection::Unreadable { .. }
            | Rejection::NoUuid
            | Rejection::MigEnabled
            | Rejection::MemoryUnknown
            | Rejection::UtilizationUnknown
            | Rejection::ProcessesUnknown => true,
            Rejection::LowMemory { total, needed, .. } => total < needed,
            Rejection::Busy { .. }
            | Rejection::ForeignProcesses { .. }
            | Rejection::Leased { .. } => false,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::NotVisible => f.write_str("not in this process's CUDA_VISIBLE_DEVICES"),
            Rejection::NotListed => f.write_str("not in the requested device list"),
            Rejection::Unreadable { message } => write!(f, "unreadable: {message}"),
            Rejection::NoUuid => f.write_str("NVML gives no UUID for it"),
            Rejection::MigEnabled => f.write_str("in MIG mode (CUDA sees only its MIG devices)"),
            Rejection::MemoryUnknown => f.write_str("free memory unknown"),
            Rejection::LowMemory {
                free,
                total,
                needed,
            } if total < needed => write!(
                f,
                "only {} of memory in all, {} needed",
                bytes(*total),
                bytes(*needed)
            ),
            Rejection::LowMemory { free, needed, .. } => {
                write!(f, "{} free, {} needed", bytes(*free), bytes(*needed))
            }
            Rejection::UtilizationUnknown => f.write_str("utilization unknown"),
            Rejection::Busy { utilization, max } => {
                write!(f, "{utilization}% utilized, at most {max}% allowed")
            }
            Rejection::ProcessesUnknown => f.write_str("its processes are unknown"),
            Rejection::ForeignProcesses { pids } => {
                write!(f, "used by other processes (pid {})", join(pids))
            }
            Rejection::Leased {
                holders,
                leases,
                limit,
            } => write!(
                f,
                "leased by pid {} ({leases} of {limit} allowed lease{})",
                join(holders),
                if *limit == 1 { "" } else { "s" }
            ),
        }
    }
}

fn join(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A byte count for people: `512 MiB`, `9.5 GiB`.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// What one device looked like to a pick that failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// NVML index.
    pub index: u32,
    /// UUID, when known.
    pub uuid: Option<String>,
    /// Why it did not qualify; `None` when it did.
    pub rejection: Option<Rejection>,
}

/// Why a pick found too few GPUs: every device with its verdict.
///
/// Its `Debug` is its `Display`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unavailable {
    /// How many GPUs were asked for.
    pub needed: usize,
    /// Every device, in NVML order.
    pub devices: Vec<Verdict>,
    /// How long the pick waited before giving up.
    pub waited: Option<Duration>,
}

impl Unavailable {
    /// How many devices qualified.
    pub fn qualifying(&self) -> usize {
        self.devices
            .iter()
            .filter(|d| d.rejection.is_none())
            .count()
    }

    /// Whether waiting cannot help: fewer devices than needed could ever qualify.
    pub fn is_impossible(&self) -> bool {
        let possible = self
            .devices
            .iter()
            .filter(|d| !d.rejection.as_ref().is_some_and(Rejection::is_permanent))
            .count();
        possible < self.needed
    }
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: usize| if n == 1 { "GPU" } else { "GPUs" };
        write!(
            f,
            "none free: {} {} needed, {} qualif{}",
            self.needed,
            plural(self.needed),
            self.qualifying(),
            if self.qualifying() == 1 { "ies" } else { "y" }
        )?;
        if self.is_impossible() {
            f.write_str(", and waiting cannot change that")?;
        } else if let Some(waited) = self.waited {
            write!(f, " after waiting {}", seconds(waited))?;
        }
        if self.devices.is_empty() {
            f.write_str(" (there are no GPUs)")?;
        }
        for d in &self.devices {
            write!(f, "\n  GPU {}", d.index)?;
            if let Some(uuid) = &d.uuid {
                write!(f, " ({uuid})")?;
            }
            match &d.rejection {
                Some(r) => write!(f, ": {r}")?,
                // Not refused itself: too few others qualify alongside it.
                None => f.write_str(": qualifies, but too few GPUs do")?,
            }
        }
        Ok(())
    }
}

fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 10.0 {
        format!("{s:.0}s")
    } else {
        format!("{s:.1}s")
    }
}

/// Why GPUs could not be picked, or a lease not recorded or released.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum PickError {
    /// The GPUs could not be read: no driver ([`GpuError::is_no_driver`]), or NVML failed.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// Too few GPUs qualified (after waiting, when asked to wait).
    #[error("{0}")]
    NoneFree(Box<Unavailable>),
    /// The request itself is wrong: zero GPUs, a share limit of zero, a device list naming no
    /// GPU or a GPU twice.
    #[error("invalid GPU request: {reason}")]
    Invalid {
        /// What is wrong.
        reason: String,
    },
    /// The lease table in the runtime directory could not be used.
    #[error("GPU lease table {}: {context}", path.display())]
    Lease {
        /// What gpuproc was doing.
        context: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl PickError {
    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        PickError::Invalid {
            reason: reason.into(),
        }
    }

    pub(crate) fn lease(
        context: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| PickError::Lease {
            context,
            path,
            source,
        }
    }

    /// Too few GPUs qualified; [`unavailable`](Self::unavailable) says why, device by device.
    pub fn is_none_free(&self) -> bool {
        matches!(self, PickError::NoneFree(_))
    }

    /// There is no NVIDIA driver (or NVML library) on this machine.
    pub fn is_no_driver(&self) -> bool {
        matches!(self, PickError::Gpu(e) if e.is_no_driver())
    }

    /// The GPUs could not be read.
    pub fn is_gpu(&self) -> bool {
        matches!(self, PickError::Gpu(_))
    }

    /// The request was invalid.
    pub fn is_invalid(&self) -> bool {
        matches!(self, PickError::Invalid { .. })
    }

    /// The lease table could not be read, written or locked.
    pub fn is_lease(&self) -> bool {
        matches!(self, PickError::Lease { .. })
    }

    /// The verdict on every device, when too few qualified.
    pub fn unavailable(&self) -> Option<&Unavailable> {
        match self {
            PickError::NoneFree(u) => Some(u),
            _ => None,
        }
    }

    /// The GPU layer's error, when the GPUs could not be read.
    pub fn gpu_error(&self) -> Option<&GpuError> {
        match self {
            PickError::Gpu(e) => Some(e),
            _ => None,
        }
    }
}

/// Chooses `criteria.gpu_count()` GPUs among `devices`: the policy behind
/// [`pick`](super::pick), without system calls.
///
/// `leases` holds the live leases; `visible` the NVML indices this process may use (`None`:
/// all). Every process listed on a device counts as foreign unless it holds a lease on that
/// device, so remove the caller's own processes first ([`pick`](super::pick) does).
///
/// # Errors
/// [`PickError::NoneFree`] with every device's verdict when too few qualify;
/// [`PickError::Invalid`] for a request of zero GPUs or a zero share limit, or a device list
/// naming an unknown GPU, an ambiguous UUID prefix or a GPU twice.
pub fn select(
    devices: &[Device],
    leases: &LeaseTable,
    visible: Option<&[u32]>,
    criteria: &Criteria,
) -> Result<Vec<PickedDevice>, PickError> {
    let needed = criteria.gpu_count();
    if needed == 0 {
        return Err(PickError::invalid("zero GPUs asked for"));
    }
    if criteria.max_per_gpu == 0 {
        return Err(PickError::invalid(
            "a share limit of zero leases per GPU allows no GPU at all",
        ));
    }
    let listed = match &criteria.devices {
        Some(list) => Some(resolve_list(list, devices)?),
        None => None,
    };
    let mut verdicts = Vec::with_capacity(devices.len());
    let mut qualifying = Vec::new();
    for (pos, device) in devices.iter().enumerate() {
        let rejection = judge(device, leases, visible, listed.as_deref(), pos, criteria);
        if rejection.is_none() {
            qualifying.push(pos);
        }
        verdicts.push(Verdict {
            index: device.index,
            uuid: device.uuid.clone(),
            rejection,
        });
    }
    if qualifying.len() < needed {
        return Err(PickError::NoneFree(Box::new(Unavailable {
            needed,
            devices: verdicts,
            waited: None,
        })));
    }
    let key = |&pos: &usize| {
        let d = &devices[pos];
        let shares = d.uuid.as_deref().map_or(0, |u| leases.count_on(u));
        let free = d.memory.map_or(0, |m| m.free);
        match criteria.order {
            Order::MostFree => (shares, u64::MAX - free, 0, d.index),
            Order::LowestIndex => (0, 0, 0, d.index),
            Order::RoundRobin => {
                let after_cursor = leases.cursor().is_none_or(|c| d.index > c);
                (0, 0, u32::from(!after_cursor), d.index)
            }
        }
    };
    qualifying.sort_by_key(key);
    Ok(qualifying
        .into_iter()
        .take(needed)
        .map(|pos| {
            let d = &devices[pos];
            PickedDevice {
                index: d.index,
                uuid: d.uuid.clone().unwrap_or_default(),
                name: d.name.clone(),
            }
        })
        .collect())
}

/// Positions in `devices` named by an explicit list.
fn resolve_list(list: &[DeviceId], devices: &[Device]) -> Result<Vec<usize>, PickError> {
    let mut out = Vec::with_capacity(list.len());
    for id in list {
        let mut matching = devices
            .iter()
            .enumerate()
            .filter(|(_, d)| id.matches(d))
            .map(|(pos, _)| pos);
        let Some(pos) = matching.next() else {
            return Err(PickError::invalid(format!(
                "no GPU {id} on this machine ({} GPU{} found)",
                devices.len(),
                if devices.len() == 1 { "" } else { "s" }
            )));
        };
        if matching.next().is_some() {
            return Err(PickError::invalid(format!(
                "{id} names more than one GPU: give more of the UUID"
            )));
        }
        if out.contains(&pos) {
            return Err(PickError::invalid(format!(
                "the device list names GPU {} twice",
                devices[pos].index
            )));
        }
        out.push(pos);
    }
    Ok(out)
}

fn judge(
    device: &Device,
    leases: &LeaseTable,
    visible: Option<&[u32]>,
    listed: Option<&[usize]>,
    pos: usize,
    criteria: &Criteria,
) -> Option<Rejection> {
    if visible.is_some_and(|v| !v.contains(&device.index)) {
        return Some(Rejection::NotVisible);
    }
    if listed.is_some_and(|l| !l.contains(&pos)) {
        return Some(Rejection::NotListed);
    }
    if let Some(fault) = &device.error {
        return Some(Rejection::Unreadable {
            message: fault.message.clone(),
        });
    }
    let Some(uuid) = device.uuid.as_deref() else {
        return Some(Rejection::NoUuid);
    };
    if device.mig.as_ref().is_some_and(|m| m.enabled) {
        return Some(Rejection::MigEnabled);
    }
    if let Some(needed) = criteria.min_free {
        match device.memory {
            None => return Some(Rejection::MemoryUnknown),
            Some(m) if m.free < needed => {
                return Some(Rejection::LowMemory {
                    free: m.free,
                    total: m.total,
                    needed,
                })
            }
            Some(_) => {}
        }
    }
    if let Some(max) = criteria.max_utilization {
        match device.utilization {
            None => return Some(Rejection::UtilizationUnknown),
            Some(u) if u.gpu > max => {
                return Some(Rejection::Busy {
                    utilization: u.gpu,
                    max,
                })
            }
            Some(_) => {}
        }
    }
    let holders = leases.holders_on(uuid);
    if criteria.no_foreign_processes {
        let Some(processes) = &device.processes else {
            return Some(Rejection::ProcessesUnknown);
        };
        let mut pids: Vec<u32> = processes
            .iter()
            .filter(|p| !p.pid.is_some_and(|pid| holders.contains(&pid)))
            .map(|p| p.pid.unwrap_or(p.nvml_pid))
            .collect();
        pids.dedup();
        if !pids.is_empty() {
            return Some(Rejection::ForeignProcesses { pids });
        }
    }
    let count = leases.count_on(uuid);
    let limit = leases
        .limit_on(uuid)
        .map_or(criteria.max_per_gpu, |l| l.min(criteria.max_per_gpu));
    if count >= limit as usize {
        return Some(Rejection::Leased {
            holders,
            leases: count,
            limit,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::lease::{Holder, LeaseRecord};
    use crate::gpu::types::{DeviceFault, GpuProcess, Memory, Mig, ProcessKind, Utilization};
    use crate::gpu::GpuErrorKind;

    const GIB: u64 = 1 << 30;

    fn gpu(index: u32, free_gib: u64) -> Device {
        Device {
            index,
            name: Some("H100".into()),
            uuid: Some(format!("GPU-{index}{index}{index}{index}-0000")),
            memory: Some(Memory {
                total: 80 * GIB,
                used: (80 - free_gib) * GIB,
                free: free_gib * GIB,
            }),
            utilization: Some(Utilization { gpu: 0, memory: 0 }),
            processes: Some(Vec::new()),
            ..Device::default()
        }
    }

    fn four() -> Vec<Device> {
        vec![gpu(0, 70), gpu(1, 79), gpu(2, 40), gpu(3, 75)]
    }

    fn lease(pid: u32, share: u32, indices: &[u32]) -> LeaseRecord {
        LeaseRecord {
            id: format!("test-{pid}"),
            boot_id: String::new(),
            created_ms: 0,
            max_per_gpu: share,
            holders: vec![Holder {
                pid,
                start_ticks: 1,
            }],
            devices: indices
                .iter()
                .map(|&i| PickedDevice {
                    index: i,
                    uuid: format!("GPU-{i}{i}{i}{i}-0000"),
                    name: None,
                })
                .collect(),
        }
    }

    fn table(records: Vec<LeaseRecord>) -> LeaseTable {
        let mut t = LeaseTable::default();
        for r in records {
            t.insert(r);
        }
        t
    }

    fn pick(devices: &[Device], leases: &LeaseTable, criteria: &Criteria) -> Vec<u32> {
        select(devices, leases, None, criteria)
            .unwrap()
            .iter()
            .map(|d| d.index)
            .collect()
    }

    fn why(devices: &[Device], leases: &LeaseTable, criteria: &Criteria) -> Unavailable {
        match select(devices, leases, None, criteria) {
            Err(PickError::NoneFree(u)) => *u,
            other => panic!("expected none free, got {other:?}"),
        }
    }

    #[test]
    fn default_order_is_most_free_memory() {
        let d = four();
        let none = LeaseTable::default();
        assert_eq!(pick(&d, &none, &Criteria::new()), vec![1]);
        assert_eq!(pick(&d, &none, &Criteria::new().count(3)), vec![1, 3, 0]);
        let picked = select(&d, &none, None, &Criteria::new()).unwrap();
        assert_eq!(picked[0].uuid, "GPU-1111-0000");
        assert_eq!(picked[0].name.as_deref(), Some("H100"));
    }

    #[test]
    fn lowest_index_and_round_robin() {
        let d = four();
        let mut leases = LeaseTable::default();
        let lowest = Criteria::new().count(2).order(Order::LowestIndex);
        assert_eq!(pick(&d, &leases, &lowest), vec![0, 1]);
        let rr = Criteria::new().count(2).order(Order::RoundRobin);
        assert_eq!(pick(&d, &leases, &rr), vec![0, 1]);
        leases.set_cursor(1);
        assert_eq!(pick(&d, &leases, &rr), vec![2, 3]);
        leases.set_cursor(2);
        assert_eq!(pick(&d, &leases, &rr), vec![3, 0]);
        leases.set_cursor(3);
        assert_eq!(pick(&d, &leases, &rr.clone().count(1)), vec![0]);
    }

    #[test]
    fn criteria_skip_a_busy_gpu() {
        let mut d = four();
        d[1].utilization = Some(Utilization {
            gpu: 95,
            memory: 10,
        });
        d[3].processes = Some(vec![GpuProcess {
            pid: Some(4242),
            nvml_pid: 4242,
            used_memory: Some(GIB),
            kind: ProcessKind::Compute,
            gpu_instance_id: None,
            compute_instance_id: None,
            utilization: None,
            host: None,
        }]);
        let none = LeaseTable::default();
        let want = Criteria::new()
            .min_free(50 * GIB)
            .max_utilization(50)
            .no_foreign_processes(true);
        assert_eq!(pick(&d, &none, &want), vec![0]);
        let u = why(&d, &none, &want.clone().count(2));
        assert_eq!(u.needed, 2);
        assert_eq!(u.qualifying(), 1);
        assert!(!u.is_impossible());
        assert_eq!(u.devices[0].rejection, None);
        assert_eq!(
            u.devices[1].rejection,
            Some(Rejection::Busy {
                utilization: 95,
                max: 50
            })
        );
        assert_eq!(
            u.devices[2].rejection,
            Some(Rejection::LowMemory {
                free: 40 * GIB,
                total: 80 * GIB,
                needed: 50 * GIB
            })
        );
        assert_eq!(
            u.devices[3].rejection,
            Some(Rejection::ForeignProcesses { pids: vec![4242] })
        );
        let text = u.to_string();
        assert!(
            text.starts_with("none free: 2 GPUs needed, 1 qualifies"),
            "{text}"
        );
        for line in [
            "GPU 0 (GPU-0000-0000): qualifies, but too few GPUs do",
            "GPU 1 (GPU-1111-0000): 95% utilized, at most 50% allowed",
            "GPU 2 (GPU-2222-0000): 40 GiB free, 50 GiB needed",
            "GPU 3 (GPU-3333-0000): used by other processes (pid 4242)",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        // The error's Debug (what `fn main() -> Result` prints) is the same text: no
        // `rejection: None`.
        let err = PickError::NoneFree(Box::new(u));
        assert_eq!(format!("{err:?}"), text);
    }

    #[test]
    fn unknown_figures_do_not_qualify() {
        let mut d = vec![gpu(0, 70)];
        d[0].memory = None;
        d[0].utilization = None;
        d[0].processes = None;
        let none = LeaseTable::default();
        assert_eq!(pick(&d, &none, &Criteria::new()), vec![0]);
        let r = |c: Criteria| why(&d, &none, &c).devices[0].rejection.clone().unwrap();
        assert_eq!(r(Criteria::new().min_free(1)), Rejection::MemoryUnknown);
        assert_eq!(
            r(Criteria::new().max_utilization(10)),
            Rejection::UtilizationUnknown
        );
        assert_eq!(
            r(Criteria::new().no_foreign_processes(true)),
            Rejection::ProcessesUnknown
        );
        assert!(why(&d, &none, &Criteria::new().min_free(1)).is_impossible());
    }

    #[test]
    fn unusable_devices_are_permanent_rejections() {
        let mut d = four();
        d[0].error = Some(DeviceFault {
            kind: GpuErrorKind::GpuLost,
            message: "the GPU fell off the bus".into(),
        });
        d[1].uuid = None;
        d[2].mig = Some(Mig {
            enabled: true,
            ..Mig::default()
        });
        let none = LeaseTable::default();
        assert_eq!(pick(&d, &none, &Criteria::new()), vec![3]);
        let u = why(&d, &none, &Criteria::new().count(2));
        assert!(u.is_impossible());
        assert!(matches!(
            u.devices[0].rejection,
            Some(Rejection::Unreadable { .. })
        ));
        assert_eq!(u.devices[1].rejection, Some(Rejection::NoUuid));
        assert_eq!(u.devices[2].rejection, Some(Rejection::MigEnabled));
        assert!(u.to_string().contains("waiting cannot change that"));
        // Asking for more memory than the GPU has can never be met.
        let huge = why(&d, &none, &Criteria::new().min_free(100 * GIB));
        assert!(huge.is_impossible());
        assert!(huge.to_string().contains("only 80 GiB of memory in all"));
    }

    #[test]
    fn share_limits() {
        let d = four();
        // GPU 1 is leased exclusively, GPU 3 by one sharing lease.
        let leases = table(vec![lease(100, 1, &[1]), lease(200, 2, &[3])]);
        assert_eq!(pick(&d, &leases, &Criteria::new().count(2)), vec![0, 2]);
        // Sharing allowed: the unleased GPUs come first, then GPU 3 (but never GPU 1).
        let sharing = Criteria::new().count(3).max_per_gpu(2);
        assert_eq!(pick(&d, &leases, &sharing), vec![0, 2, 3]);
        let u = why(&d, &leases, &sharing.clone().count(4));
        assert_eq!(
            u.devices[1].rejection,
            Some(Rejection::Leased {
                holders: vec![100],
                leases: 1,
                limit: 1
            })
        );
        assert!(u
            .to_string()
            .contains("GPU 1 (GPU-1111-0000): leased by pid 100 (1 of 1 allowed lease)"));
        // An exclusive asker does not join a shared GPU either.
        let u = why(&d, &leases, &Criteria::new().count(3));
        assert!(matches!(
            u.devices[3].rejection,
            Some(Rejection::Leased { limit: 1, .. })
        ));
        // Waiting can help: the leases may end.
        assert!(!u.is_impossible());
        // A full shared GPU.
        let full = table(vec![lease(1, 2, &[0]), lease(2, 2, &[0])]);
        let u = why(&d[..1], &full, &Criteria::new().max_per_gpu(3));
        assert_eq!(
            u.devices[0].rejection,
            Some(Rejection::Leased {
                holders: vec![1, 2],
                leases: 2,
                limit: 2
            })
        );
    }

    #[test]
    fn lease_holders_processes_are_not_foreign() {
        let mut d = vec![gpu(0, 70)];
        d[0].processes = Some(vec![GpuProcess {
            pid: Some(100),
            nvml_pid: 100,
            used_memory: None,
            kind: ProcessKind::Compute,
            gpu_instance_id: None,
            compute_instance_id: None,
            utilization: None,
            host: None,
        }]);
        let leases = table(vec![lease(100, 2, &[0])]);
        let want = Criteria::new().max_per_gpu(2).no_foreign_processes(true);
        assert_eq!(pick(&d, &leases, &want), vec![0]);
        let u = why(&d, &LeaseTable::default(), &want);
        assert_eq!(
            u.devices[0].rejection,
            Some(Rejection::ForeignProcesses { pids: vec![100] })
        );
    }

    #[test]
    fn explicit_lists() {
        let d = four();
        let none = LeaseTable::default();
        // Without a count, all listed devices; the order policy still applies.
        let listed = Criteria::new().devices([2u32, 0]);
        assert_eq!(listed.gpu_count(), 2);
        assert_eq!(pick(&d, &none, &listed), vec![0, 2]);
        let by_uuid = Criteria::new()
            .devices(DeviceId::parse_list("GPU-3333,gpu-2222-0000").unwrap())
            .count(1);
        assert_eq!(pick(&d, &none, &by_uuid), vec![3]);
        let u = why(
            &d,
            &none,
            &Criteria::new().devices([0u32]).min_free(75 * GIB),
        );
        assert_eq!(u.devices[1].rejection, Some(Rejection::NotListed));
        for (list, message) in [
            (
                vec![DeviceId::Index(7)],
                "no GPU 7 on this machine (4 GPUs found)",
            ),
            (vec![DeviceId::Uuid("GPU-".into())], "more than one GPU"),
            (vec![DeviceId::Uuid("GPU-9".into())], "no GPU GPU-9"),
            (
                vec![DeviceId::Index(1), DeviceId::Uuid("GPU-1111".into())],
                "names GPU 1 twice",
            ),
        ] {
            let err = select(&d, &none, None, &Criteria::new().devices(list)).unwrap_err();
            assert!(err.is_invalid());
            assert!(err.to_string().contains(message), "{err}");
        }
    }

    #[test]
    fn visible_restriction() {
        let d = four();
        let none = LeaseTable::default();
        let picked = select(&d, &none, Some(&[0, 2]), &Criteria::new()).unwrap();
        assert_eq!(picked[0].index, 0);
        let err = select(&d, &none, Some(&[0, 2]), &Criteria::new().count(3)).unwrap_err();
        let u = err.unavailable().unwrap();
        assert!(u.is_impossible());
        assert_eq!(u.devices[1].rejection, Some(Rejection::NotVisible));
        assert!(err
            .to_string()
            .contains("GPU 1 (GPU-1111-0000): not in this process's CUDA_VISIBLE_DEVICES"));
        assert!(select(&d, &none, Some(&[]), &Criteria::new())
            .unwrap_err()
            .is_none_free());
    }

    #[test]
    fn invalid_requests() {
        let d = four();
        let none = LeaseTable::default();
        assert!(select(&d, &none, None, &Criteria::new().count(0))
            .unwrap_err()
            .is_invalid());
        assert!(select(&d, &none, None, &Criteria::new().max_per_gpu(0))
            .unwrap_err()
            .is_invalid());
        // No GPUs at all: none free, impossible.
        let u = why(&[], &none, &Criteria::new());
        assert!(u.is_impossible());
        assert!(u.to_string().contains("there are no GPUs"));
    }

    #[test]
    fn parsing_names() {
        for o in [Order::MostFree, Order::LowestIndex, Order::RoundRobin] {
            assert_eq!(o.name().parse::<Order>().unwrap(), o);
        }
        assert!("fastest"
            .parse::<Order>()
            .unwrap_err()
            .contains("most-free"));
        assert_eq!(
            DeviceId::parse_list(" 0, GPU-ab").unwrap(),
            vec![DeviceId::Index(0), DeviceId::Uuid("GPU-ab".into())]
        );
        assert!(DeviceId::parse_list("0,x")
            .unwrap_err()
            .contains("\"x\" is not a GPU"));
        assert_eq!(DeviceId::Index(3).to_string(), "3");
    }

    #[test]
    fn byte_counts_for_people() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(512 << 20), "512 MiB");
        assert_eq!(bytes(80 * GIB), "80 GiB");
        assert_eq!(bytes(GIB + GIB / 2), "1.5 GiB");
    }
}
