//! Where the runner's GPUs come from, and the leases its jobs run under.
//!
//! [`GpuSource`] lists the GPUs a run may use: [`NvmlSource`] lists NVML devices
//! (optionally a `--gpus` selection of them). Shares, slot numbers and retries are the
//! scheduler's pure policy; but no job starts on a GPU before [`Leaser`] has leased it
//! through [`gpuproc::gpu::pick`], in the machine-wide lease table that `gpuproc pick`,
//! other runs and worker pools use too.
//!
//! # One lease per job
//! Each job attempt leases its GPUs when it starts and releases them when it ends
//! (`max_per_gpu` = `--per-gpu`, so the run's own jobs share a GPU as asked and nobody
//! else joins an exclusive one). A lease for the whole run would be simpler, but it keeps
//! GPUs from other users while the run has nothing to put on them (the tail of a run, a
//! retry backlog, jobs waiting for a multi-GPU slot), and it decides the GPUs' fitness
//! (`--min-free`, `--max-util`, `--no-foreign`) once, at the start, while a long run
//! needs it decided whenever work is handed out. Per-job leases give each job GPUs that
//! qualify when it starts, let a run grow onto GPUs freed by others, and turn "wait for
//! busy GPUs" into "wait until a lease can be had". The job's process is added as a holder
//! of its lease before its command runs (it starts behind a [gate](crate::gate)), so a job
//! orphaned by a killed runner, at any moment, keeps its GPUs until it exits.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Context};
use gpuproc::gpu::{self, Criteria, GpuLease, PickError, Rejection};

use super::schedule::{Launch, Placement, Request};

/// A GPU the runner may give to jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// NVML index (for messages and the summary).
    pub index: u32,
    /// UUID (`GPU-…`), which is what jobs get in `CUDA_VISIBLE_DEVICES`: unlike an index it
    /// means the same device whatever `CUDA_DEVICE_ORDER` the job uses.
    pub uuid: String,
}

/// A source of GPUs for a run.
pub trait GpuSource {
    /// The GPUs to schedule on, in the order slots are filled.
    ///
    /// # Errors
    /// When the GPUs cannot be listed (no driver) or the selection names a missing GPU.
    fn gpus(&mut self) -> anyhow::Result<Vec<Gpu>>;
}

/// Which GPUs `--gpus` selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every GPU NVML sees.
    All,
    /// These, by NVML index or UUID (a prefix of at least `GPU-` and 4 characters).
    Some(Vec<String>),
}

impl Selection {
    /// Parses `all` or a comma-separated list.
    ///
    /// # Errors
    /// An empty list.
    pub fn parse(s: &str) -> Result<Selection, String> {
        if s.trim().eq_ignore_ascii_case("all") {
            return Ok(Selection::All);
        }
        let items: Vec<String> = s
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .map(str::to_owned)
            .collect();
        if items.is_empty() {
            return Err(format!(
                "expected `all` or GPU indices or UUIDs separated by commas (`0,1,3`), got {s:?}"
            ));
        }
        Ok(Selection::Some(items))
    }

    /// Picks the selected GPUs out of `all`, in the selection's order.
    ///
    /// # Errors
    /// An item that matches no GPU, matches several, or is given twice.
    pub fn apply(&self, all: &[Gpu]) -> anyhow::Result<Vec<Gpu>> {
        let items = match self {
            Selection::All => return Ok(all.to_vec()),
            Selection::Some(items) => items,
        };
        let mut chosen: Vec<Gpu> = Vec::with_capacity(items.len());
        for item in items {
            let matches: Vec<&Gpu> = match item.parse::<u32>() {
                Ok(index) => all.iter().filter(|g| g.index == index).collect(),
                Err(_) if item.len() >= 8 => all
                    .iter()
                    .filter(|g| g.uuid.starts_with(item.as_str()))
                    .collect(),
                Err(_) => Vec::new(),
            };
            let gpu = match matches.as_slice() {
                [gpu] => *gpu,
                [] => bail!(
                    "--gpus: no GPU {item:?}; this machine has indices 0 to {} (see `gpuproc gpus`)",
                    all.len().saturating_sub(1)
                ),
                _ => bail!("--gpus: {item:?} matches several GPUs; give more of the UUID"),
            };
            if chosen.contains(gpu) {
                bail!("--gpus: GPU {item:?} is listed twice");
            }
            chosen.push(gpu.clone());
        }
        Ok(chosen)
    }
}

/// GPUs straight from NVML (`$GPUPROC_NVML_LIB` or the system's library).
#[derive(Debug)]
pub struct NvmlSource {
    /// Which of them.
    pub selection: Selection,
}

impl GpuSource for NvmlSource {
    fn gpus(&mut self) -> anyhow::Result<Vec<Gpu>> {
        let devices = gpuproc::gpu::global()?
            .devices(false)
            .context("listing GPUs")?;
        let all: Vec<Gpu> = devices
            .into_iter()
            .filter(|d| d.error.is_none())
            .filter_map(|d| {
                Some(Gpu {
                    index: d.index,
                    uuid: d.uuid?,
                })
            })
            .collect();
        if all.is_empty() {
            bail!("NVML lists no usable GPU; use --cpu-only -j N to run without GPUs");
        }
        self.selection.apply(&all)
    }
}

/// What the last failed lease attempt found.
#[derive(Debug, Clone)]
pub struct Shortage {
    /// The pick's explanation, every GPU with its reason.
    pub message: String,
    /// Whether waiting cannot help (fewer GPUs could ever qualify than the job needs).
    pub impossible: bool,
    /// `GPU N: reason` for each candidate GPU that did not qualify.
    pub unavailable: Vec<String>,
}

/// How a [`Leaser`] takes GPUs: [`Leasing`] them in the lease table for a run, or
/// [`Preview`] for a dry run. Both choose with the same policy, [`gpu::select`].
pub trait Picker {
    /// What a successful pick gives.
    type Lease: std::fmt::Debug;
    /// Picks GPUs meeting `criteria`.
    ///
    /// # Errors
    /// As [`gpu::pick`].
    fn pick(&mut self, criteria: &Criteria) -> Result<Self::Lease, PickError>;
    /// The UUIDs of the GPUs picked.
    fn uuids(lease: &Self::Lease) -> Vec<String>;
    /// Gives the GPUs back.
    fn release(&mut self, lease: Self::Lease);
}

/// Real leases, through [`gpu::pick`] (the lease table that `gpuproc pick` uses too).
#[derive(Debug, Default)]
pub struct Leasing;

impl Picker for Leasing {
    type Lease = GpuLease;

    fn pick(&mut self, criteria: &Criteria) -> Result<GpuLease, PickError> {
        gpu::pick(criteria)
    }

    fn uuids(lease: &GpuLease) -> Vec<String> {
        lease.uuids().into_iter().map(str::to_owned).collect()
    }

    fn release(&mut self, lease: GpuLease) {
        let _ = lease.release();
    }
}

/// Picks without leasing, for `--dry-run`: [`gpu::select`], the policy [`gpu::pick`]
/// applies, on the GPUs as NVML shows them now and the lease table as it is now, with this
/// run's own jobs recorded as leases in a private copy of the table while they would run.
/// What it cannot know: how the jobs will change the GPUs' memory and utilisation, which
/// jobs fail, and what others lease or free meanwhile.
#[derive(Debug)]
pub struct Preview {
    devices: Vec<gpu::Device>,
    table: gpu::LeaseTable,
    holder: gpu::Holder,
    next_id: u64,
}

/// A lease a [`Preview`] pretends to hold.
#[derive(Debug)]
pub struct PreviewLease {
    id: String,
    uuids: Vec<String>,
}

impl Preview {
    /// The GPUs and leases as they are now, judged for `criteria` (as a pick would).
    ///
    /// # Errors
    /// When NVML or the lease table cannot be read.
    pub fn new(criteria: &Criteria) -> anyhow::Result<Preview> {
        let devices = gpu::global()?
            .devices(criteria.refuses_foreign_processes())
            .context("listing GPUs")?;
        let table = gpu::leases().context("reading the GPU lease table")?;
        let holder = gpu::Holder::of(std::process::id())
            .context("reading this process's start time in /proc")?;
        Ok(Preview {
            devices,
            table,
            holder,
            next_id: 0,
        })
    }
}

impl Picker for Preview {
    type Lease = PreviewLease;

    fn pick(&mut self, criteria: &Criteria) -> Result<PreviewLease, PickError> {
        let chosen = gpu::select(&self.devices, &self.table, None, criteria)?;
        self.next_id += 1;
        let id = format!("dry-run-{}", self.next_id);
        if let Some(last) = chosen.last() {
            self.table.set_cursor(last.index);
        }
        let uuids = chosen.iter().map(|d| d.uuid.clone()).collect();
        self.table.insert(gpu::LeaseRecord {
            id: id.clone(),
            boot_id: String::new(),
            created_ms: 0,
            max_per_gpu: criteria.share_limit(),
            holders: vec![self.holder],
            devices: chosen,
        });
        Ok(PreviewLease { id, uuids })
    }

    fn uuids(lease: &PreviewLease) -> Vec<String> {
        lease.uuids.clone()
    }

    fn release(&mut self, lease: PreviewLease) {
        self.table.remove(&lease.id);
    }
}

/// Leases GPUs for jobs as the scheduler hands them out.
#[derive(Debug)]
pub struct Leaser<P: Picker = Leasing> {
    /// The run's criteria: everything but the count and the device list.
    pub criteria: Criteria,
    /// How long the run may wait, with nothing running, for a lease (`None`: not at all).
    pub wait: Option<Duration>,
    /// The lease taken by the last successful [`choose`](Self::choose), for the job about
    /// to start.
    pub pending: Option<P::Lease>,
    /// Why the last attempt failed, when it did.
    pub shortage: Option<Shortage>,
    /// An error other than "none free" (the lease table is unusable, NVML failed).
    pub error: Option<PickError>,
    /// Positions of GPUs that can never qualify (too little memory in all, MIG, lost).
    pub dead: BTreeSet<usize>,
    /// How GPUs are taken.
    pub picker: P,
}

impl Leaser<Leasing> {
    /// A leaser applying `criteria` (count and devices are set per job).
    pub fn new(criteria: Criteria, wait: Option<Duration>) -> Leaser {
        Leaser::with_picker(criteria, wait, Leasing)
    }
}

impl<P: Picker> Leaser<P> {
    /// A leaser applying `criteria` through `picker`.
    pub fn with_picker(criteria: Criteria, wait: Option<Duration>, picker: P) -> Leaser<P> {
        Leaser {
            criteria,
            wait,
            pending: None,
            shortage: None,
            error: None,
            dead: BTreeSet::new(),
            picker,
        }
    }

    /// Leases `request.need` of the request's candidate GPUs (those not used by a failed
    /// previous attempt if enough of them qualify); returns their positions in `gpus`.
    /// The lease waits in [`pending`](Self::pending).
    pub fn choose(&mut self, request: &Request, gpus: &[Gpu]) -> Option<Vec<usize>> {
        self.pending = None;
        let mut tries = vec![&request.candidates];
        if request.preferred.len() >= request.need && request.preferred != request.candidates {
            tries.insert(0, &request.preferred);
        }
        let mut last = None;
        for candidates in tries {
            let indices: Vec<u32> = candidates.iter().map(|&g| gpus[g].index).collect();
            let criteria = self.criteria.clone().count(request.need).devices(indices);
            match self.picker.pick(&criteria) {
                Ok(lease) => {
                    let positions: Option<Vec<usize>> = P::uuids(&lease)
                        .iter()
                        .map(|u| gpus.iter().position(|g| g.uuid == *u))
                        .collect();
                    let Some(positions) = positions else {
                        // Not one of ours (cannot happen with an explicit device list).
                        self.picker.release(lease);
                        return None;
                    };
                    self.shortage = None;
                    self.pending = Some(lease);
                    return Some(positions);
                }
                Err(PickError::NoneFree(why)) => last = Some((why, candidates)),
                Err(e) => {
                    self.error = Some(e);
                    return None;
                }
            }
        }
        if let Some((why, candidates)) = last {
            let mut unavailable = Vec::new();
            for verdict in &why.devices {
                let Some(rejection) = &verdict.rejection else {
                    continue;
                };
                if matches!(rejection, Rejection::NotListed) {
                    continue;
                }
                if let Some(pos) = gpus.iter().position(|g| g.index == verdict.index) {
                    if rejection.is_permanent() && candidates.contains(&pos) {
                        self.dead.insert(pos);
                    }
                }
                unavailable.push(format!("GPU {}: {rejection}", verdict.index));
            }
            self.shortage = Some(Shortage {
                message: why.to_string(),
                impossible: why.is_impossible(),
                unavailable,
            });
        }
        None
    }
}

/// A dry run's placement: each job's GPUs chosen by a [`Leaser`] over a [`Preview`], as
/// the run's leaser would choose them, and given back when the job would end.
#[derive(Debug)]
pub struct DryRun {
    /// Chooses as the run would.
    pub leaser: Leaser<Preview>,
    /// The run's GPUs.
    pub gpus: Vec<Gpu>,
    /// The simulated leases of jobs that would be running, by job index.
    leases: std::collections::HashMap<usize, PreviewLease>,
}

impl DryRun {
    /// A dry run with the run's criteria over its GPUs.
    ///
    /// # Errors
    /// When NVML or the lease table cannot be read.
    pub fn new(criteria: Criteria, gpus: Vec<Gpu>) -> anyhow::Result<DryRun> {
        let preview = Preview::new(&criteria)?;
        Ok(DryRun {
            leaser: Leaser::with_picker(criteria, None, preview),
            gpus,
            leases: std::collections::HashMap::new(),
        })
    }
}

impl Placement for DryRun {
    fn choose(&mut self, request: &Request) -> Option<Vec<usize>> {
        let chosen = self.leaser.choose(request, &self.gpus)?;
        if let Some(lease) = self.leaser.pending.take() {
            self.leases.insert(request.job, lease);
        }
        Some(chosen)
    }

    fn unavailable(&self) -> Vec<usize> {
        self.leaser.dead.iter().copied().collect()
    }

    fn finished(&mut self, launch: &Launch) {
        if let Some(lease) = self.leases.remove(&launch.job) {
            self.leaser.picker.release(lease);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus() -> Vec<Gpu> {
        (0..4)
            .map(|i| Gpu {
                index: i,
                uuid: format!("GPU-{i}{i}{i}{i}aaaa-0000"),
            })
            .collect()
    }

    #[test]
    fn selection() {
        assert_eq!(Selection::parse("all"), Ok(Selection::All));
        assert!(Selection::parse(" , ").is_err());
        let sel = Selection::parse("3,GPU-1111,0").unwrap();
        let chosen = sel.apply(&gpus()).unwrap();
        let idx: Vec<u32> = chosen.iter().map(|g| g.index).collect();
        assert_eq!(idx, [3, 1, 0]);
        assert_eq!(Selection::All.apply(&gpus()).unwrap().len(), 4);
    }

    #[test]
    fn bad_selection() {
        let err = Selection::parse("7").unwrap().apply(&gpus()).unwrap_err();
        assert!(err.to_string().contains("0 to 3"), "{err}");
        assert!(Selection::parse("1,1").unwrap().apply(&gpus()).is_err());
        assert!(Selection::parse("GPU-").unwrap().apply(&gpus()).is_err());
        let err = Selection::parse("GPU-")
            .unwrap()
            .apply(&gpus())
            .unwrap_err();
        assert!(err.to_string().contains("no GPU"), "{err}");
    }
}
