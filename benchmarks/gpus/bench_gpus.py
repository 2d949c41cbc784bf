"""Python side of bench_gpus: times full GPU snapshots with gpustat, a pynvml loop and nvitop.

Usage: bench_gpus.py ITERATIONS
Prints one JSON object: seconds per snapshot for gpustat.new_query() (in process; also with
its 0.1 s-per-GPU CPU-sampling sleep patched out), for a pynvml loop reading the same fields
gpuproc reads, with processes joined to psutil host data, and for nvitop's `Device.all()`
with each device's snapshot, the detailed fields of gpuproc's snapshot (PCIe link,
throughput, BAR1, NVLink, clock event reasons, remapped rows, energy, encoder and decoder)
and its processes' snapshots (per-process SM utilisation and host data).
"""
import json
import sys
import time

import gpustat
import psutil
import pynvml
from nvitop import Device, GpuProcess
from nvitop.api import libnvml


def pynvml_snapshot():
    def opt(f, *args):
        try:
            return f(*args)
        except pynvml.NVMLError:
            return None

    out = {
        "driver": opt(pynvml.nvmlSystemGetDriverVersion),
        "cuda": opt(pynvml.nvmlSystemGetCudaDriverVersion),
        "nvml": opt(pynvml.nvmlSystemGetNVMLVersion),
        "devices": [],
    }
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        d = {
            "index": i,
            "name": opt(pynvml.nvmlDeviceGetName, h),
            "uuid": opt(pynvml.nvmlDeviceGetUUID, h),
            "pci": opt(pynvml.nvmlDeviceGetPciInfo, h),
            "memory": opt(pynvml.nvmlDeviceGetMemoryInfo, h),
            "util": opt(pynvml.nvmlDeviceGetUtilizationRates, h),
            "temp": opt(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU),
            "power": opt(pynvml.nvmlDeviceGetPowerUsage, h),
            "limit": opt(pynvml.nvmlDeviceGetEnforcedPowerLimit, h),
            "fan": opt(pynvml.nvmlDeviceGetFanSpeed, h),
            "clocks": [opt(pynvml.nvmlDeviceGetClockInfo, h, c) for c in (0, 1, 2)],
            "pstate": opt(pynvml.nvmlDeviceGetPerformanceState, h),
            "compute_mode": opt(pynvml.nvmlDeviceGetComputeMode, h),
            "mig": opt(pynvml.nvmlDeviceGetMigMode, h),
            "processes": [],
        }
        procs = (opt(pynvml.nvmlDeviceGetComputeRunningProcesses, h) or []) + (
            opt(pynvml.nvmlDeviceGetGraphicsRunningProcesses, h) or [])
        for p in procs:
            entry = {"pid": p.pid, "used": p.usedGpuMemory}
            try:
                ps = psutil.Process(p.pid)
                with ps.oneshot():
                    entry.update(user=ps.username(), cmdline=ps.cmdline(),
                                 cpu=ps.cpu_percent(), rss=ps.memory_info().rss)
            except psutil.Error:
                pass
            d["processes"].append(entry)
        out["devices"].append(d)
    return out


def nvitop_snapshot():
    query = libnvml.nvmlQuery
    out = []
    for device in Device.all():
        with device.oneshot():
            snap = device.as_snapshot()
            h = device.handle
            extra = {
                "pcie": [query(f, h) for f in (
                    "nvmlDeviceGetCurrPcieLinkGeneration", "nvmlDeviceGetMaxPcieLinkGeneration",
                    "nvmlDeviceGetCurrPcieLinkWidth", "nvmlDeviceGetMaxPcieLinkWidth")],
                "bar1": device.bar1_memory_info(),
                "nvlink": [query("nvmlDeviceGetNvLinkState", h, link)
                           for link in range(device.nvlink_link_count())],
                "reasons": query("nvmlDeviceGetCurrentClocksEventReasons", h),
                "remapped": query("nvmlDeviceGetRemappedRows", h),
                "energy": query("nvmlDeviceGetTotalEnergyConsumption", h),
            }
        processes = GpuProcess.take_snapshots(device.processes().values(), failsafe=True)
        out.append((snap, extra, processes))
    return out


def per_call(f, iterations):
    f()  # warm up: imports, first NVML calls, psutil caches
    start = time.perf_counter()
    for _ in range(iterations):
        f()
    return (time.perf_counter() - start) / iterations


def main():
    iterations = int(sys.argv[1])
    pynvml.nvmlInit()
    result = {
        "gpustat_new_query": per_call(gpustat.new_query, iterations),
        "pynvml_loop": per_call(pynvml_snapshot, iterations),
        "nvitop_loop": per_call(nvitop_snapshot, iterations),
    }
    # gpustat sleeps 0.1 s per GPU to sample CPU use; without it, its own work remains.
    gpustat.core.time.sleep = lambda _seconds: None
    result["gpustat_new_query_no_sleep"] = per_call(gpustat.new_query, iterations)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
