//! `CUDA_VISIBLE_DEVICES` and `CUDA_DEVICE_ORDER`, parsed and resolved the way CUDA does.
//!
//! The rules follow the CUDA runtime's observed behaviour (as also modelled by PyTorch's
//! `torch.cuda._parse_visible_devices`):
//! - unset: every device; empty: no device;
//! - entries are separated by commas; surrounding whitespace is ignored;
//! - an index is read like `strtoul`: an optional sign and leading digits, so `1gpu` is 1;
//!   an entry without leading digits, a negative index or an index with no device ends the
//!   list (earlier entries stay visible);
//! - `GPU-<uuid>` entries may be unique prefixes of a UUID; an unknown or ambiguous one ends
//!   the list; `MIG-<uuid>` (and the older `MIG-GPU-<uuid>/<gi>/<ci>`) names a MIG device;
//! - the list's form is fixed by its first entry: in a list of UUIDs an index ends the list
//!   and vice versa;
//! - naming the same device twice makes CUDA see no device at all;
//! - CUDA numbers the devices the process may open: a device NVML lists but refuses
//!   ([`GpuErrorKind::PermissionDenied`]) is not among them.
//!
//! # Inside a Slurm job
//! Slurm gives a job's GPUs two ways: `SLURM_STEP_GPUS` (in a step; `SLURM_JOB_GPUS` in the
//! batch script) lists them by the node's numbers, `N` of `/dev/nvidiaN` (NVML's minor
//! number), and `CUDA_VISIBLE_DEVICES` lists them as CUDA inside the job numbers them. Without
//! device confinement the two are the same numbers. With it (`task/cgroup`,
//! `ConstrainDevices=yes`) the job may open only its GPUs, so the driver (NVML and CUDA)
//! enumerates those alone, from 0, and Slurm renumbers: a job given GPUs 2 and 3 has
//! `SLURM_STEP_GPUS=2,3` and `CUDA_VISIBLE_DEVICES=0,1`. Both read right against the process's
//! own enumeration. They disagree only where the enumeration lists more GPUs than the job may
//! use while Slurm renumbered (a driver or container that lists every GPU of the node): then
//! [`slurm_visible_devices`] reads `CUDA_VISIBLE_DEVICES` as Slurm wrote it, entry `c` being
//! the `c`-th of Slurm's GPUs in ascending order, found by minor number. UUIDs need none of
//! this, which is why gpuproc itself always passes `CUDA_VISIBLE_DEVICES` as full UUIDs.

use serde::{Deserialize, Serialize};

use super::error::GpuErrorKind;
use super::types::{Device, MigInstance};

/// One entry of `CUDA_VISIBLE_DEVICES`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeviceSelector {
    /// A CUDA device ordinal (an index in [`CudaDeviceOrder`]).
    Index(u32),
    /// A `GPU-` UUID or a prefix of one, stored with its `GPU-`.
    Uuid(String),
    /// A `MIG-` identifier, stored with its `MIG-`.
    Mig(String),
}

/// The order in which CUDA numbers devices (`CUDA_DEVICE_ORDER`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CudaDeviceOrder {
    /// `FASTEST_FIRST`, CUDA's default: the fastest device first, by a heuristic NVML cannot
    /// see. gpuproc uses PCI bus order for it, which is right when all devices are the same
    /// model; see [`VisibleDevices::order_is_exact`](super::VisibleDevices::order_is_exact).
    #[default]
    FastestFirst,
    /// `PCI_BUS_ID`: ascending PCI bus id, the order NVML uses.
    PciBusId,
}

impl CudaDeviceOrder {
    /// Reads a `CUDA_DEVICE_ORDER` value; CUDA treats anything but `PCI_BUS_ID` as the default.
    pub fn parse(value: Option<&str>) -> CudaDeviceOrder {
        match value.map(str::trim) {
            Some("PCI_BUS_ID") => CudaDeviceOrder::PciBusId,
            _ => CudaDeviceOrder::FastestFirst,
        }
    }
}

/// Parses a `CUDA_VISIBLE_DEVICES` value into the entries CUDA would use, stopping where CUDA
/// stops. Duplicated entries give an empty list, as CUDA then sees no device.
///
/// ```
/// use gpuproc::gpu::{parse_cuda_visible_devices, DeviceSelector::*};
/// assert_eq!(parse_cuda_visible_devices("2, 0,x,1"), vec![Index(2), Index(0)]);
/// assert_eq!(parse_cuda_visible_devices("GPU-8932f937"), vec![Uuid("GPU-8932f937".into())]);
/// assert_eq!(parse_cuda_visible_devices("0,0"), vec![]);
/// ```
pub fn parse_cuda_visible_devices(value: &str) -> Vec<DeviceSelector> {
    let mut out: Vec<DeviceSelector> = Vec::new();
    let mut first_is_uuid = None;
    for raw in value.split(',') {
        let entry = raw.trim();
        let selector = if starts_with_ignore_case(entry, "GPU-") {
            DeviceSelector::Uuid(entry.to_string())
        } else if starts_with_ignore_case(entry, "MIG-") {
            DeviceSelector::Mig(entry.to_string())
        } else {
            match strtoul(entry) {
                Some(index) => DeviceSelector::Index(index),
                None => break,
            }
        };
        let is_uuid = !matches!(selector, DeviceSelector::Index(_));
        if *first_is_uuid.get_or_insert(is_uuid) != is_uuid {
            break;
        }
        if out.iter().any(|s| same_text(s, &selector)) {
            return Vec::new();
        }
        out.push(selector);
    }
    out
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

fn same_text(a: &DeviceSelector, b: &DeviceSelector) -> bool {
    match (a, b) {
        (DeviceSelector::Index(x), DeviceSelector::Index(y)) => x == y,
        (DeviceSelector::Uuid(x), DeviceSelector::Uuid(y))
        | (DeviceSelector::Mig(x), DeviceSelector::Mig(y)) => x.eq_ignore_ascii_case(y),
        _ => false,
    }
}

/// `strtoul` on one entry: an optional sign, then leading digits; `None` for no digits, a
/// negative number or one too large for a device ordinal.
fn strtoul(entry: &str) -> Option<u32> {
    let (negative, rest) = match entry.as_bytes().first() {
        Some(b'-') => (true, &entry[1..]),
        Some(b'+') => (false, &entry[1..]),
        _ => (false, entry),
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let value: u32 = rest[..digits].parse().ok()?;
    if negative && value != 0 {
        return None;
    }
    Some(value)
}

/// A device CUDA would see, as positions in the device list given to
/// [`resolve_visible_devices`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resolved {
    /// The CUDA ordinal the process sees (0, 1, ... in list order).
    pub cuda_index: u32,
    /// Position of the physical device in the list.
    pub device: usize,
    /// Position of the MIG device in that device's MIG instances, for `MIG-` entries.
    pub mig: Option<usize>,
}

/// Resolves parsed entries against the devices in NVML order, as CUDA would: an entry that
/// names no device, or more than one, ends the list; naming a device twice leaves none.
///
/// `None` for `selectors` means `CUDA_VISIBLE_DEVICES` is unset: every device is visible.
pub fn resolve_visible_devices(
    selectors: Option<&[DeviceSelector]>,
    order: CudaDeviceOrder,
    devices: &[Device],
) -> Vec<Resolved> {
    let cuda_order = cuda_order(order, devices);
    let Some(selectors) = selectors else {
        return cuda_order
            .iter()
            .enumerate()
            .map(|(i, &device)| Resolved {
                cuda_index: i as u32,
                device,
                mig: None,
            })
            .collect();
    };
    let mut out: Vec<Resolved> = Vec::new();
    for selector in selectors {
        let found = match selector {
            DeviceSelector::Index(i) => cuda_order.get(*i as usize).map(|&d| (d, None)),
            DeviceSelector::Uuid(prefix) => unique(
                devices
                    .iter()
                    .enumerate()
                    .filter(|(_, d)| uuid_matches(d.uuid.as_deref(), prefix))
                    .map(|(i, _)| (i, None)),
            ),
            DeviceSelector::Mig(id) => unique(devices.iter().enumerate().flat_map(|(i, d)| {
                d.mig
                    .iter()
                    .flat_map(|m| m.instances.iter().enumerate())
                    .filter(move |(_, m)| mig_matches(d, m, id))
                    .map(move |(j, _)| (i, Some(j)))
            })),
        };
        let Some((device, mig)) = found else { break };
        if out.iter().any(|r| r.device == device && r.mig == mig) {
            return Vec::new();
        }
        out.push(Resolved {
            cuda_index: out.len() as u32,
            device,
            mig,
        });
    }
    out
}

/// The environment variables that list, by the node's numbers (`/dev/nvidiaN`), the GPUs Slurm
/// bound to this process: the step's first, then the job's.
pub const SLURM_GPU_ENVS: [&str; 2] = ["SLURM_STEP_GPUS", "SLURM_JOB_GPUS"];

/// Reads a `SLURM_STEP_GPUS` / `SLURM_JOB_GPUS` value: comma-separated numbers. `None` when
/// it is empty or anything else (Slurm writes no other form; a value it did not write is not
/// trusted).
///
/// ```
/// use gpuproc::gpu::parse_slurm_gpus;
/// assert_eq!(parse_slurm_gpus("2,3"), Some(vec![2, 3]));
/// assert_eq!(parse_slurm_gpus("gpu:2"), None);
/// ```
pub fn parse_slurm_gpus(value: &str) -> Option<Vec<u32>> {
    let list: Option<Vec<u32>> = value
        .split(',')
        .map(|n| {
            let n = n.trim();
            (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .then(|| n.parse().ok())
                .flatten()
        })
        .collect();
    list.filter(|l| !l.is_empty())
}

/// The GPUs Slurm bound to this process by the node's numbers, from [`SLURM_GPU_ENVS`];
/// `None` outside a job with GPUs.
pub fn slurm_gpus_from_env() -> Option<Vec<u32>> {
    SLURM_GPU_ENVS.iter().find_map(|name| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|v| parse_slurm_gpus(&v))
    })?
}

/// [`resolve_visible_devices`] with Slurm's renumbering: the devices this process may use
/// given its `CUDA_VISIBLE_DEVICES` (`selectors`, `None` when unset) and the GPUs Slurm says
/// it bound (`slurm`, node numbers from `SLURM_STEP_GPUS` or `SLURM_JOB_GPUS`; see
/// [`slurm_gpus_from_env`]).
///
/// The rule (see the module's "Inside a Slurm job"): when `CUDA_VISIBLE_DEVICES` is exactly
/// `0,1,...,k-1` for Slurm's `k` GPUs, Slurm's list is another one (Slurm renumbered them,
/// as it does under `ConstrainDevices=yes`), and CUDA's enumeration has more than `k`
/// devices (so it is not the job's confined one), entry `c` is Slurm's `c`-th GPU in
/// ascending order: the device whose minor number is that GPU's number (its NVML index when
/// NVML gives no minor numbers). In every other case, UUIDs and MIG ids included, it is
/// [`resolve_visible_devices`].
///
/// ```
/// use gpuproc::gpu::{parse_cuda_visible_devices, slurm_visible_devices, CudaDeviceOrder, Device};
/// let node: Vec<Device> = (0..4)
///     .map(|i| Device { index: i, minor_number: Some(i), ..Device::default() })
///     .collect();
/// let cvd = parse_cuda_visible_devices("0,1");
/// let mine = slurm_visible_devices(Some(&cvd), Some(&[2, 3]), CudaDeviceOrder::PciBusId, &node);
/// assert_eq!(mine.iter().map(|r| r.device).collect::<Vec<_>>(), vec![2, 3]);
/// ```
pub fn slurm_visible_devices(
    selectors: Option<&[DeviceSelector]>,
    slurm: Option<&[u32]>,
    order: CudaDeviceOrder,
    devices: &[Device],
) -> Vec<Resolved> {
    if let (Some(selectors), Some(slurm)) = (selectors, slurm) {
        if let Some(out) = renumbered(selectors, slurm, order, devices) {
            return out;
        }
    }
    resolve_visible_devices(selectors, order, devices)
}

/// Slurm's local numbering undone, or `None` where the rule of [`slurm_visible_devices`]
/// does not apply (or a GPU Slurm names is not here).
fn renumbered(
    selectors: &[DeviceSelector],
    slurm: &[u32],
    order: CudaDeviceOrder,
    devices: &[Device],
) -> Option<Vec<Resolved>> {
    let k = slurm.len();
    let local = selectors
        .iter()
        .enumerate()
        .all(|(i, s)| *s == DeviceSelector::Index(u32::try_from(i).unwrap_or(u32::MAX)));
    let listed = cuda_order(order, devices).len();
    if selectors.len() != k || !local || slurm.iter().copied().eq(0..k as u32) || listed <= k {
        return None;
    }
    let mut global = slurm.to_vec();
    global.sort_unstable();
    global.dedup();
    if global.len() != k {
        return None; // a GPU named twice: not a list Slurm wrote
    }
    let by_minor = devices
        .iter()
        .filter(|d| usable(d))
        .all(|d| d.minor_number.is_some());
    let mut out = Vec::with_capacity(k);
    for (cuda_index, n) in global.into_iter().enumerate() {
        let device = unique(devices.iter().enumerate().filter(|(_, d)| {
            usable(d)
                && if by_minor {
                    d.minor_number == Some(n)
                } else {
                    d.index == n
                }
        }))?
        .0;
        out.push(Resolved {
            cuda_index: u32::try_from(cuda_index).ok()?,
            device,
            mig: None,
        });
    }
    Some(out)
}

/// Whether CUDA can open the device: NVML did not refuse it.
fn usable(device: &Device) -> bool {
    !device
        .error
        .as_ref()
        .is_some_and(|e| e.kind == GpuErrorKind::PermissionDenied)
}

/// Whether CUDA's order certainly matches the order gpuproc assumes: always for
/// `PCI_BUS_ID`; for `FASTEST_FIRST` only when every device is the same model.
pub fn order_is_exact(order: CudaDeviceOrder, devices: &[Device]) -> bool {
    order == CudaDeviceOrder::PciBusId || devices.windows(2).all(|w| w[0].name == w[1].name)
}

/// Positions of the devices CUDA enumerates (those the process may open), in CUDA's order.
fn cuda_order(_order: CudaDeviceOrder, devices: &[Device]) -> Vec<usize> {
    // Both orders are PCI bus order here: FASTEST_FIRST's ranking is internal to CUDA and
    // equals PCI order for identical devices (see `order_is_exact`).
    let mut positions: Vec<usize> = (0..devices.len())
        .filter(|&i| usable(&devices[i]))
        .collect();
    positions.sort_by_key(|&i| {
        let bus = devices[i]
            .pci_bus_id
            .as_deref()
            .map(str::to_ascii_lowercase);
        (bus.is_none(), bus, devices[i].index)
    });
    positions
}

fn unique<T>(mut it: impl Iterator<Item = T>) -> Option<T> {
    let first = it.next()?;
    match it.next() {
        None => Some(first),
        Some(_) => None,
    }
}

fn uuid_matches(uuid: Option<&str>, prefix: &str) -> bool {
    uuid.is_some_and(|u| starts_with_ignore_case(u, prefix))
}

fn mig_matches(parent: &Device, mig: &MigInstance, id: &str) -> bool {
    // The older form: MIG-GPU-<parent uuid>/<gpu instance>/<compute instance>.
    if let Some(rest) = id.get(4..).filter(|r| starts_with_ignore_case(r, "GPU-")) {
        let mut parts = rest.split('/');
        let (Some(uuid), Some(gi), Some(ci), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        return parent
            .uuid
            .as_deref()
            .is_some_and(|u| u.eq_ignore_ascii_case(uuid))
            && gi.parse().ok() == mig.gpu_instance_id
            && ci.parse().ok() == mig.compute_instance_id;
    }
    uuid_matches(mig.uuid.as_deref(), id)
}

#[cfg(test)]
mod tests {
    use super::DeviceSelector::{Index, Mig, Uuid};
    use super::*;
    use crate::gpu::types::Mig as MigState;

    fn parse(s: &str) -> Vec<DeviceSelector> {
        parse_cuda_visible_devices(s)
    }

    #[test]
    fn indices() {
        assert_eq!(parse("0"), vec![Index(0)]);
        assert_eq!(parse("3,1,2"), vec![Index(3), Index(1), Index(2)]);
        assert_eq!(parse("+1"), vec![Index(1)]);
        assert_eq!(parse("007"), vec![Index(7)]);
    }

    #[test]
    fn empty_and_blank_mean_no_device() {
        assert_eq!(parse(""), vec![]);
        assert_eq!(parse("   "), vec![]);
        assert_eq!(parse(","), vec![]);
    }

    #[test]
    fn whitespace_around_entries_is_ignored() {
        assert_eq!(parse(" 0 , 1\t,2\n"), vec![Index(0), Index(1), Index(2)]);
        assert_eq!(
            parse(" GPU-abc , GPU-def"),
            vec![Uuid("GPU-abc".into()), Uuid("GPU-def".into())]
        );
    }

    #[test]
    fn indices_are_read_like_strtoul() {
        assert_eq!(parse("1gpu2,2ampere"), vec![Index(1), Index(2)]);
        assert_eq!(parse("1 2,3"), vec![Index(1), Index(3)]);
    }

    #[test]
    fn an_invalid_entry_ends_the_list() {
        assert_eq!(parse("0,2,-1,1"), vec![Index(0), Index(2)]);
        assert_eq!(parse("0,x,1"), vec![Index(0)]);
        assert_eq!(parse("0,,1"), vec![Index(0)]);
        assert_eq!(parse("-1"), vec![]);
        assert_eq!(parse("NoDevFiles"), vec![]);
        assert_eq!(parse("0,99999999999,1"), vec![Index(0)]);
        assert_eq!(parse("-0"), vec![Index(0)]);
    }

    #[test]
    fn duplicates_leave_no_device() {
        assert_eq!(parse("0,1,0"), vec![]);
        assert_eq!(parse("1,01"), vec![]);
        assert_eq!(parse("GPU-abc,gpu-ABC"), vec![]);
        // A duplicate after the end of the list does not count.
        assert_eq!(parse("0,x,0"), vec![Index(0)]);
    }

    #[test]
    fn uuid_and_mig_forms() {
        assert_eq!(parse("gpu-ABC"), vec![Uuid("gpu-ABC".into())]);
        assert_eq!(
            parse("MIG-1234,MIG-GPU-abcd/1/0"),
            vec![Mig("MIG-1234".into()), Mig("MIG-GPU-abcd/1/0".into())]
        );
        assert_eq!(
            parse("GPU-a,MIG-b"),
            vec![Uuid("GPU-a".into()), Mig("MIG-b".into())]
        );
    }

    #[test]
    fn mixed_lists_stop_at_the_first_change_of_form() {
        assert_eq!(parse("0,GPU-abc,1"), vec![Index(0)]);
        assert_eq!(parse("GPU-abc,1"), vec![Uuid("GPU-abc".into())]);
        assert_eq!(parse("MIG-abc,0"), vec![Mig("MIG-abc".into())]);
    }

    fn dev(index: u32, uuid: &str, bus: &str, name: &str) -> Device {
        Device {
            index,
            uuid: Some(uuid.into()),
            pci_bus_id: Some(bus.into()),
            name: Some(name.into()),
            ..Device::default()
        }
    }

    fn four() -> Vec<Device> {
        vec![
            dev(0, "GPU-aaaa1111-0000", "00000000:17:00.0", "A100"),
            dev(1, "GPU-aaaa2222-0000", "00000000:31:00.0", "A100"),
            dev(2, "GPU-bbbb3333-0000", "00000000:B1:00.0", "A100"),
            dev(3, "GPU-cccc4444-0000", "00000000:CA:00.0", "A100"),
        ]
    }

    fn resolve(env: Option<&str>, devices: &[Device]) -> Vec<(usize, Option<usize>)> {
        let selectors = env.map(parse_cuda_visible_devices);
        resolve_visible_devices(selectors.as_deref(), CudaDeviceOrder::default(), devices)
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                assert_eq!(r.cuda_index as usize, i);
                (r.device, r.mig)
            })
            .collect()
    }

    #[test]
    fn unset_is_every_device_empty_is_none() {
        let d = four();
        assert_eq!(
            resolve(None, &d),
            vec![(0, None), (1, None), (2, None), (3, None)]
        );
        assert_eq!(resolve(Some(""), &d), vec![]);
    }

    #[test]
    fn indices_select_in_list_order_and_out_of_range_truncates() {
        let d = four();
        assert_eq!(resolve(Some("2,0"), &d), vec![(2, None), (0, None)]);
        assert_eq!(resolve(Some("1,4,2"), &d), vec![(1, None)]);
        assert_eq!(resolve(Some("4"), &d), vec![]);
    }

    #[test]
    fn uuid_prefixes_must_be_unique() {
        let d = four();
        assert_eq!(resolve(Some("GPU-bbbb"), &d), vec![(2, None)]);
        assert_eq!(resolve(Some("GPU-AAAA2"), &d), vec![(1, None)]);
        assert_eq!(resolve(Some("GPU-cccc4444-0000"), &d), vec![(3, None)]);
        // Ambiguous: matches devices 0 and 1.
        assert_eq!(
            resolve(Some("GPU-bbbb,GPU-aaaa,GPU-cccc"), &d),
            vec![(2, None)]
        );
        // "GPU-" alone matches everything, so it is ambiguous.
        assert_eq!(resolve(Some("GPU-"), &d), vec![]);
        assert_eq!(resolve(Some("GPU-dddd,GPU-bbbb"), &d), vec![]);
    }

    #[test]
    fn two_spellings_of_one_device_leave_none() {
        let d = four();
        assert_eq!(resolve(Some("GPU-bbbb,GPU-bbbb3333"), &d), vec![]);
    }

    #[test]
    fn mig_devices_by_uuid_and_by_old_form() {
        let mut d = four();
        d[1].mig = Some(MigState {
            enabled: true,
            pending: true,
            instances: vec![
                MigInstance {
                    index: 0,
                    uuid: Some("MIG-11111111-aaaa".into()),
                    gpu_instance_id: Some(1),
                    compute_instance_id: Some(0),
                    ..MigInstance::default()
                },
                MigInstance {
                    index: 1,
                    uuid: Some("MIG-22222222-bbbb".into()),
                    gpu_instance_id: Some(2),
                    compute_instance_id: Some(0),
                    ..MigInstance::default()
                },
            ],
        });
        assert_eq!(
            resolve(Some("MIG-22222222-bbbb,MIG-1111"), &d),
            vec![(1, Some(1)), (1, Some(0))]
        );
        assert_eq!(
            resolve(Some("MIG-GPU-aaaa2222-0000/1/0"), &d),
            vec![(1, Some(0))]
        );
        assert_eq!(resolve(Some("MIG-GPU-aaaa2222-0000/3/0"), &d), vec![]);
        assert_eq!(resolve(Some("MIG-GPU-aaaa2222-0000/1"), &d), vec![]);
        assert_eq!(resolve(Some("MIG-3333"), &d), vec![]);
        // A GPU uuid and a MIG device on it are different devices.
        assert_eq!(
            resolve(Some("GPU-aaaa2222,MIG-1111"), &d),
            vec![(1, None), (1, Some(0))]
        );
    }

    #[test]
    fn indices_follow_pci_bus_order() {
        // NVML lists the devices in another order than their bus ids (as a simulator might).
        let mut d = four();
        d.swap(0, 3);
        assert_eq!(resolve(Some("0"), &d), vec![(3, None)]);
        assert_eq!(resolve(None, &d)[0], (3, None));
    }

    fn node(minors: &[u32]) -> Vec<Device> {
        let mut d = four();
        for (dev, &m) in d.iter_mut().zip(minors) {
            dev.minor_number = Some(m);
        }
        d
    }

    fn in_slurm(cvd: &str, slurm: &[u32], devices: &[Device]) -> Vec<usize> {
        let selectors = parse_cuda_visible_devices(cvd);
        slurm_visible_devices(
            Some(&selectors),
            Some(slurm),
            CudaDeviceOrder::default(),
            devices,
        )
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            assert_eq!((r.cuda_index as usize, r.mig), (i, None));
            r.device
        })
        .collect()
    }

    #[test]
    fn slurm_gpu_lists_are_numbers_only() {
        assert_eq!(parse_slurm_gpus("2,3"), Some(vec![2, 3]));
        assert_eq!(parse_slurm_gpus(" 0 "), Some(vec![0]));
        for bad in ["", "2,", "gpu:2", "-1", "2,x", "1 2", "99999999999"] {
            assert_eq!(parse_slurm_gpus(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn unconfined_jobs_name_the_nodes_gpus() {
        // No confinement: CUDA_VISIBLE_DEVICES holds the node's numbers, as Slurm's list does.
        let d = node(&[0, 1, 2, 3]);
        assert_eq!(in_slurm("2,3", &[2, 3], &d), vec![2, 3]);
        assert_eq!(in_slurm("0,1", &[0, 1], &d), vec![0, 1]);
    }

    #[test]
    fn confined_jobs_read_against_their_own_enumeration() {
        // The driver lists only the job's GPUs (2 and 3 of the node), numbered from 0.
        let d: Vec<Device> = node(&[0, 1, 2, 3])[2..]
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, mut dev)| {
                dev.index = i as u32;
                dev
            })
            .collect();
        assert_eq!(in_slurm("0,1", &[2, 3], &d), vec![0, 1]);
        assert_eq!(in_slurm("0", &[3], &d[1..]), vec![0]);
    }

    #[test]
    fn renumbered_lists_over_a_whole_node_follow_slurms_numbers() {
        // Slurm renumbered (confined job) but the enumeration lists every GPU of the node.
        let d = node(&[0, 1, 2, 3]);
        assert_eq!(in_slurm("0,1", &[2, 3], &d), vec![2, 3]);
        assert_eq!(in_slurm("0", &[1], &d), vec![1]);
        assert_eq!(
            in_slurm("0,1", &[3, 0], &d),
            vec![0, 3],
            "ascending, as Slurm numbers"
        );
        // By minor number, which need not follow PCI order.
        let d = node(&[3, 2, 1, 0]);
        assert_eq!(in_slurm("0,1", &[2, 3], &d), vec![1, 0]);
        // Without minor numbers, Slurm's numbers are NVML indices.
        assert_eq!(in_slurm("0,1", &[2, 3], &four()), vec![2, 3]);
    }

    #[test]
    fn other_lists_are_read_as_cuda_does() {
        let d = node(&[0, 1, 2, 3]);
        // Not Slurm's renumbering: a subset the user chose, another order, other lengths.
        assert_eq!(in_slurm("1", &[2, 3], &d), vec![1]);
        assert_eq!(in_slurm("1,0", &[2, 3], &d), vec![1, 0]);
        assert_eq!(in_slurm("0,1,2", &[2, 3], &d), vec![0, 1, 2]);
        // UUIDs name their devices whatever Slurm says.
        assert_eq!(in_slurm("GPU-cccc,GPU-bbbb", &[0, 1], &d), vec![3, 2]);
        // A GPU Slurm names that is not here, or named twice: as CUDA reads the list.
        assert_eq!(in_slurm("0,1", &[2, 9], &d), vec![0, 1]);
        assert_eq!(in_slurm("0,1", &[2, 2], &d), vec![0, 1]);
        // Unset stays every device.
        let all = slurm_visible_devices(None, Some(&[2, 3]), CudaDeviceOrder::default(), &d);
        assert_eq!(all.len(), 4);
    }

    #[test]
    fn devices_nvml_refuses_are_not_cudas() {
        // A driver that lists the node's GPUs but refuses those outside the job's cgroup:
        // CUDA numbers the two it may open, so "0,1" is them, Slurm or not.
        let mut d = node(&[0, 1, 2, 3]);
        for dev in &mut d[..2] {
            dev.uuid = None;
            dev.minor_number = None;
            dev.error = Some(super::super::types::DeviceFault {
                kind: GpuErrorKind::PermissionDenied,
                message: "denied".into(),
            });
        }
        assert_eq!(in_slurm("0,1", &[2, 3], &d), vec![2, 3]);
        assert_eq!(resolve(Some("0,1"), &d), vec![(2, None), (3, None)]);
        assert_eq!(resolve(None, &d), vec![(2, None), (3, None)]);
    }

    #[test]
    fn device_order_env() {
        assert_eq!(CudaDeviceOrder::parse(None), CudaDeviceOrder::FastestFirst);
        assert_eq!(
            CudaDeviceOrder::parse(Some("PCI_BUS_ID")),
            CudaDeviceOrder::PciBusId
        );
        assert_eq!(
            CudaDeviceOrder::parse(Some("FASTEST_FIRST")),
            CudaDeviceOrder::FastestFirst
        );
        assert_eq!(
            CudaDeviceOrder::parse(Some("bogus")),
            CudaDeviceOrder::FastestFirst
        );
        let mut d = four();
        assert!(order_is_exact(CudaDeviceOrder::FastestFirst, &d));
        d[2].name = Some("T4".into());
        assert!(!order_is_exact(CudaDeviceOrder::FastestFirst, &d));
        assert!(order_is_exact(CudaDeviceOrder::PciBusId, &d));
    }
}
