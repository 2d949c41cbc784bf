//! Where the runner's GPUs come from.
//!
//! [`GpuSource`] is the seam: today [`NvmlSource`] lists NVML devices (optionally a
//! `--gpus` selection of them); a source that takes leases from `gpuproc pick` only has to
//! return the leased devices here and release them when dropped. Everything after this
//! point (shares, slot numbers, retries) is the scheduler's pure policy.

use anyhow::{bail, Context};

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
