"""GPU information, GPU leases and per-worker GPUs for Python programs.

gpuproc reads the GPUs through NVML (never CUDA: no context is created, so it is safe
before ``fork`` and cheap in every worker) and records the GPUs it hands out in a lease
table shared by every gpuproc picker on the machine (Python, Rust and the ``gpuproc``
command), so two launchers never take the same GPU.

    >>> import gpuproc
    >>> for d in gpuproc.snapshot().devices:
    ...     print(d.index, d.name, d.memory.free >> 30, "GiB free")
    >>> with gpuproc.pick(min_free="10GiB") as lease:
    ...     lease.apply()          # CUDA_VISIBLE_DEVICES, before CUDA starts
    ...     train()

Process pools: ``multiprocessing.Pool(8, initializer=gpuproc.worker_gpus, initargs=(1,))``
gives each worker a GPU of its own for its life. See the README's "From Python" section.

``GPUPROC_NVML_LIB`` names another libnvidia-ml to load (the simulator, in tests);
``GPUPROC_RUNTIME_DIR`` the directory of the lease table.
"""

from ._native import (
    Clocks,
    CudaVersion,
    Device,
    DeviceFault,
    DeviceUsage,
    EccErrors,
    GpuError,
    GpuProcess,
    HostProcess,
    InvalidRequest,
    Lease,
    LeaseError,
    LeaseInfo,
    Memory,
    Mig,
    MigInstance,
    NoDriver,
    NoneFree,
    PickedDevice,
    ProcessUsage,
    Snapshot,
    Utilization,
    Verdict,
    VisibleDevice,
    VisibleDevices,
    __version__,
    assigned,
    device_count,
    devices,
    leases,
    pick,
    runtime_dir,
    snapshot,
    usage_of,
    visible,
    worker_gpus,
    worker_lease,
)
from ._cli import find_gpuproc_bin

__all__ = [
    "Clocks",
    "CudaVersion",
    "Device",
    "DeviceFault",
    "DeviceUsage",
    "EccErrors",
    "GpuError",
    "GpuProcess",
    "HostProcess",
    "InvalidRequest",
    "Lease",
    "LeaseError",
    "LeaseInfo",
    "Memory",
    "Mig",
    "MigInstance",
    "NoDriver",
    "NoneFree",
    "PickedDevice",
    "ProcessUsage",
    "Snapshot",
    "Utilization",
    "Verdict",
    "VisibleDevice",
    "VisibleDevices",
    "__version__",
    "assigned",
    "device_count",
    "devices",
    "find_gpuproc_bin",
    "leases",
    "pick",
    "runtime_dir",
    "snapshot",
    "usage_of",
    "visible",
    "worker_gpus",
    "worker_lease",
]
