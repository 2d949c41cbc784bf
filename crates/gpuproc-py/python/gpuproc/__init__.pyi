"""Type stubs of the gpuproc package (the extension module gpuproc._native).

Sizes are bytes, power milliwatts, clocks MHz, temperatures degrees Celsius, utilization
percent. A field a device does not support is None.
"""

from types import TracebackType
from typing import Any, Iterable, Optional, Union

__version__: str

# ---- exceptions ---------------------------------------------------------------------------

class GpuError(Exception):
    """A GPU query, pick or lease failed. The base of every gpuproc exception. Its message
    is the Rust error's, causes included (what the gpuproc command prints)."""

    kind: Optional[str]
    """The GPU layer's kind of failure when NVML failed ("no_library",
    "driver_not_loaded", "missing_function", "gpu_lost", "permission_denied",
    "not_supported", "not_found", "nvml"), else None."""

class NoDriver(GpuError):
    """There is no NVIDIA driver (or NVML library) on this machine."""

class NoneFree(GpuError):
    """Too few GPUs qualified for a pick (after waiting, when asked to wait)."""

    needed: int
    """How many GPUs were asked for."""
    reasons: list[Verdict]
    """Every GPU's verdict, in NVML order."""
    waited: Optional[float]
    """How long the pick waited, seconds; None when it was not asked to wait."""
    impossible: bool
    """Whether waiting cannot help (fewer GPUs could ever qualify than needed)."""

class InvalidRequest(GpuError):
    """A request that can never be met as asked: zero GPUs, a share limit of zero, a device
    list naming an unknown GPU or one twice; or a call on a released lease."""

class LeaseError(GpuError):
    """The lease table in the runtime directory could not be read, written or locked."""

# ---- data classes -------------------------------------------------------------------------
# Frozen: attributes are read-only. Built from their fields, like dataclasses; to_dict()
# gives plain data (the keys and values of `gpuproc gpus --json`); == compares the values;
# they pickle (a pool worker can return a snapshot).

class Snapshot:
    """Every GPU on this machine at one moment, with the processes using them."""

    hostname: str
    timestamp_ms: int
    """When the snapshot was taken, milliseconds since the Unix epoch."""
    driver_version: Optional[str]
    cuda_driver_version: Optional[CudaVersion]
    """The newest CUDA version the driver supports."""
    nvml_version: Optional[str]
    devices: list[Device]
    """The devices in NVML order (PCI bus order, as nvidia-smi numbers them)."""
    def __init__(self, hostname: str, timestamp_ms: int, driver_version: Optional[str], cuda_driver_version: Optional[CudaVersion], nvml_version: Optional[str], devices: list[Device]) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class CudaVersion:
    """A CUDA version such as 12.4."""

    major: int
    minor: int
    def __init__(self, major: int, minor: int) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class Device:
    """One physical GPU."""

    index: int
    """NVML's index (PCI bus order; see visible() for CUDA's order)."""
    name: Optional[str]
    uuid: Optional[str]
    """"GPU-" followed by 36 characters."""
    pci_bus_id: Optional[str]
    memory: Optional[Memory]
    utilization: Optional[Utilization]
    temperature_c: Optional[int]
    power_draw_mw: Optional[int]
    power_limit_mw: Optional[int]
    fan_speed_percent: Optional[int]
    clocks: Clocks
    performance_state: Optional[int]
    """0 (P0, fastest) to 15 (P15, slowest)."""
    compute_mode: Optional[str]
    """"default", "exclusive_thread", "prohibited" or "exclusive_process"."""
    mig: Optional[Mig]
    ecc_errors: Optional[EccErrors]
    encoder_utilization: Optional[int]
    decoder_utilization: Optional[int]
    pcie: Optional[dict[str, Any]]
    """PCIe link generation and width (current and max) and throughput, as in the JSON output."""
    nvlink: Optional[dict[str, Any]]
    bar1_memory: Optional[Memory]
    clock_event_reasons: Optional[dict[str, Any]]
    retired_pages: Optional[dict[str, Any]]
    remapped_rows: Optional[dict[str, Any]]
    total_energy_mj: Optional[int]
    processes: Optional[list[GpuProcess]]
    """None where the driver does not say (and from devices(processes=False))."""
    error: Optional[DeviceFault]
    """Set when the device could not be read (lost, permission denied)."""
    minor_number: Optional[int]
    """N in /dev/nvidiaN: the number Slurm's SLURM_STEP_GPUS gives this GPU."""
    def __init__(self, index: int, name: Optional[str], uuid: Optional[str], pci_bus_id: Optional[str], memory: Optional[Memory], utilization: Optional[Utilization], temperature_c: Optional[int], power_draw_mw: Optional[int], power_limit_mw: Optional[int], fan_speed_percent: Optional[int], clocks: Clocks, performance_state: Optional[int], compute_mode: Optional[str], mig: Optional[Mig], ecc_errors: Optional[EccErrors], encoder_utilization: Optional[int], decoder_utilization: Optional[int], pcie: Optional[dict[str, Any]], nvlink: Optional[dict[str, Any]], bar1_memory: Optional[Memory], clock_event_reasons: Optional[dict[str, Any]], retired_pages: Optional[dict[str, Any]], remapped_rows: Optional[dict[str, Any]], total_energy_mj: Optional[int], processes: Optional[list[GpuProcess]], error: Optional[DeviceFault], minor_number: Optional[int]) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class DeviceFault:
    """Why a device could not be read."""

    kind: str
    message: str
    def __init__(self, kind: str, message: str) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class Memory:
    """Frame-buffer memory, bytes."""

    total: int
    used: int
    free: int
    def __init__(self, total: int, used: int, free: int) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class Utilization:
    """Utilization in percent over the driver's sample period."""

    gpu: int
    memory: int
    def __init__(self, gpu: int, memory: int) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class Clocks:
    """Clock speeds in MHz."""

    graphics_mhz: Optional[int]
    sm_mhz: Optional[int]
    memory_mhz: Optional[int]
    max_graphics_mhz: Optional[int]
    max_memory_mhz: Optional[int]
    def __init__(self, graphics_mhz: Optional[int], sm_mhz: Optional[int], memory_mhz: Optional[int], max_graphics_mhz: Optional[int], max_memory_mhz: Optional[int]) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class Mig:
    """MIG (multi-instance GPU) state of a device."""

    enabled: bool
    pending: bool
    instances: list[MigInstance]
    def __init__(self, enabled: bool, pending: bool, instances: list[MigInstance]) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class MigInstance:
    """One MIG device."""

    index: int
    uuid: Optional[str]
    """"MIG-...", as CUDA_VISIBLE_DEVICES accepts it."""
    name: Optional[str]
    gpu_instance_id: Optional[int]
    compute_instance_id: Optional[int]
    memory: Optional[Memory]
    def __init__(self, index: int, uuid: Optional[str], name: Optional[str], gpu_instance_id: Optional[int], compute_instance_id: Optional[int], memory: Optional[Memory]) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class EccErrors:
    """ECC error counts (memory errors, all locations)."""

    volatile_corrected: Optional[int]
    volatile_uncorrected: Optional[int]
    aggregate_corrected: Optional[int]
    aggregate_uncorrected: Optional[int]
    def __init__(self, volatile_corrected: Optional[int], volatile_uncorrected: Optional[int], aggregate_corrected: Optional[int], aggregate_uncorrected: Optional[int]) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class GpuProcess:
    """A process with a context on a device."""

    pid: Optional[int]
    """The PID in this process's PID namespace, when visible from here."""
    nvml_pid: int
    """The PID as NVML reports it (usually the host's)."""
    used_memory: Optional[int]
    kind: str
    """"compute", "graphics" or "compute_and_graphics"."""
    gpu_instance_id: Optional[int]
    compute_instance_id: Optional[int]
    host: Optional[HostProcess]
    utilization: Optional[dict[str, Any]]
    """Its share of the GPU's SM, memory bandwidth, encoder and decoder in the last sample interval."""
    def __init__(self, pid: Optional[int], nvml_pid: int, used_memory: Optional[int], kind: str, gpu_instance_id: Optional[int], compute_instance_id: Optional[int], host: Optional[HostProcess], utilization: Optional[dict[str, Any]]) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class HostProcess:
    """A process as /proc describes it."""

    uid: Optional[int]
    user: Optional[str]
    name: str
    cmdline: list[str]
    cpu_percent: Optional[float]
    rss_bytes: Optional[int]
    ppid: Optional[int]
    started_ms: Optional[int]
    """When it started, milliseconds since the Unix epoch."""
    def __init__(self, uid: Optional[int], user: Optional[str], name: str, cmdline: list[str], cpu_percent: Optional[float], rss_bytes: Optional[int], ppid: Optional[int], started_ms: Optional[int]) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class ProcessUsage:
    """How much GPU memory one process (and possibly its descendants) uses, per device."""

    pid: int
    pids: list[int]
    """The processes counted: pid, then its descendants when they were included."""
    devices: list[DeviceUsage]
    total_memory: int
    """GPU memory used on all devices together, bytes."""
    def __init__(self, pid: int, pids: list[int], devices: list[DeviceUsage], total_memory: int) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class DeviceUsage:
    """One device's share of a ProcessUsage."""

    index: int
    uuid: Optional[str]
    used_memory: int
    pids: list[int]
    def __init__(self, index: int, uuid: Optional[str], used_memory: int, pids: list[int]) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class VisibleDevices:
    """The devices this process may use, as CUDA numbers them."""

    hostname: str
    """The node these devices are on."""
    cuda_visible_devices: Optional[str]
    """The CUDA_VISIBLE_DEVICES value used; None when unset (every device is visible)."""
    order: str
    """The CUDA_DEVICE_ORDER used: "fastest_first" or "pci_bus_id" (as the JSON output)."""
    order_is_exact: bool
    """False when CUDA may number the devices otherwise (FASTEST_FIRST with mixed models):
    set CUDA_DEVICE_ORDER=PCI_BUS_ID."""
    devices: list[VisibleDevice]
    def __init__(self, hostname: str, cuda_visible_devices: Optional[str], order: str, order_is_exact: bool, devices: list[VisibleDevice]) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class VisibleDevice:
    """A device visible to CUDA."""

    cuda_index: int
    """The CUDA ordinal this process sees (cuda:N)."""
    device: Device
    mig: Optional[MigInstance]
    def __init__(self, cuda_index: int, device: Device, mig: Optional[MigInstance]) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class PickedDevice:
    """A GPU handed out by a pick."""

    index: int
    uuid: str
    name: Optional[str]
    def __init__(self, index: int, uuid: str, name: Optional[str]) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class Verdict:
    """What one device looked like to a pick that failed (NoneFree.reasons)."""

    index: int
    uuid: Optional[str]
    reason: Optional[str]
    """Why it did not qualify, in words ("16 GiB free, 20 GiB needed"); None when it did."""
    kind: Optional[str]
    """"not_visible", "not_listed", "unreadable", "no_uuid", "mig_enabled",
    "memory_unknown", "low_memory", "utilization_unknown", "busy", "processes_unknown",
    "foreign_processes" or "leased"; None when it qualified."""
    permanent: bool
    """Whether waiting cannot change the reason."""
    def __init__(self, index: int, uuid: Optional[str], reason: Optional[str], kind: Optional[str], permanent: bool) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

class LeaseInfo:
    """A lease in the machine's lease table."""

    id: str
    holders: list[int]
    """The PIDs holding it; it lasts while any of them runs."""
    max_per_gpu: int
    created_ms: int
    devices: list[PickedDevice]
    def __init__(self, id: str, holders: list[int], max_per_gpu: int, created_ms: int, devices: list[PickedDevice]) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def to_dict(self) -> dict: ...

# ---- leases -------------------------------------------------------------------------------

class Lease:
    """GPUs leased to this process by pick() or worker_gpus().

    Recorded in the machine's lease table until released: by release(), at the end of a
    ``with`` block, when the object is garbage collected, or when this process dies,
    however it dies. A copy inherited by a forked child holds nothing: releasing it there
    only forgets it.
    """

    @property
    def id(self) -> str: ...
    @property
    def devices(self) -> list[PickedDevice]:
        """The GPUs, in the order CUDA_VISIBLE_DEVICES lists them (cuda:0 first)."""
    @property
    def indices(self) -> list[int]:
        """Their NVML indices."""
    @property
    def uuids(self) -> list[str]: ...
    @property
    def cuda_visible_devices(self) -> str:
        """Full UUIDs, comma-separated."""
    @property
    def released(self) -> bool: ...
    def env(self) -> dict[str, str]:
        """CUDA_VISIBLE_DEVICES and NVIDIA_VISIBLE_DEVICES for a child process."""
    def apply(self) -> Lease:
        """Sets env() in os.environ (before anything initialises CUDA). Releasing puts
        back the previous values of the variables that still hold what it set."""
    def share_with(self, pid: int) -> None:
        """Adds process pid as a holder: the lease lasts while this process or pid runs."""
    def release(self) -> None:
        """Releases the GPUs now; twice does nothing."""
    def __enter__(self) -> Lease: ...
    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

DeviceIds = Union[str, Iterable[Union[int, str]]]
"""GPU indices and UUIDs (or unique UUID prefixes), or one comma-separated string."""

def snapshot() -> Snapshot:
    """Every GPU on this machine with its processes. Raises NoDriver without a driver."""

def devices(processes: bool = True) -> list[Device]:
    """Every GPU, in NVML order; processes=False skips the processes (quicker)."""

def device_count() -> int:
    """The number of GPUs NVML sees."""

def usage_of(pid: int, descendants: bool = True) -> ProcessUsage:
    """Which GPUs process pid (and its descendants) uses, and how much memory."""

def visible() -> VisibleDevices:
    """The devices this process may use, per CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER,
    in CUDA's numbering, with live figures (no processes)."""

def assigned() -> VisibleDevices:
    """The GPUs given to this process (through CUDA_VISIBLE_DEVICES): as visible()."""

def leases() -> list[LeaseInfo]:
    """The leases in force on this machine (in this runtime directory)."""

def runtime_dir() -> str:
    """The directory of the lease table: $GPUPROC_RUNTIME_DIR, else
    $XDG_RUNTIME_DIR/gpuproc, else /tmp/gpuproc-<uid>."""

def pick(
    n: Optional[int] = None,
    *,
    min_free: Union[int, str, None] = None,
    max_utilization: Optional[int] = None,
    no_foreign: bool = False,
    max_per_gpu: int = 1,
    order: str = "most-free",
    devices: Optional[DeviceIds] = None,
    wait: Optional[float] = None,
    within_visible: bool = True,
) -> Lease:
    """Picks GPUs that meet the conditions and leases them to this process.

    n: how many (default 1, or the length of devices). min_free: bytes or "10GiB" (as
    gpuproc pick --min-free). max_utilization: percent. no_foreign: only GPUs no other
    process uses. max_per_gpu: leases allowed per GPU (1: exclusive). order: "most-free",
    "lowest-index" or "round-robin". wait: seconds to wait for GPUs (None: fail at once;
    float("inf"): for ever); Ctrl-C interrupts it. within_visible: only among this
    process's CUDA_VISIBLE_DEVICES.

    Raises NoneFree, NoDriver, InvalidRequest, LeaseError; ValueError or TypeError for
    arguments of the wrong form.
    """

def worker_gpus(
    n: int = 1,
    *,
    min_free: Union[int, str, None] = None,
    max_utilization: Optional[int] = None,
    no_foreign: bool = False,
    max_per_gpu: int = 1,
    order: str = "most-free",
    devices: Optional[DeviceIds] = None,
    wait: Optional[float] = None,
    within_visible: bool = True,
    apply: bool = True,
) -> Lease:
    """Leases GPUs for this worker process for its whole life and (apply=True) sets
    CUDA_VISIBLE_DEVICES in os.environ: the initializer of a process pool.

        Pool(8, initializer=gpuproc.worker_gpus, initargs=(1,))
        ProcessPoolExecutor(8, initializer=gpuproc.worker_gpus, initargs=(1,))
        Pool(8, initializer=functools.partial(gpuproc.worker_gpus, 1, max_per_gpu=2))

        def main(rank, world_size):   # torch.multiprocessing.spawn(main, args=(4,), nprocs=4)
            gpuproc.worker_gpus(1)    # before any CUDA call: the GPU is this rank's cuda:0

    Later calls in the same process return the same lease (InvalidRequest if they ask for
    another number of GPUs). The lease ends when the worker exits, however it exits.
    """

def worker_lease() -> Optional[Lease]:
    """The lease worker_gpus() took in this process, or None."""

def find_gpuproc_bin() -> str:
    """The path of the gpuproc command installed with this package."""
