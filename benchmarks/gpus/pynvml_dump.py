"""Prints what NVIDIA's nvidia-ml-py (pynvml) sees, as JSON, for gpuproc's cross-check.

Devices (index, name, uuid, memory) and compute/graphics processes (pid, used memory), plus
this interpreter's pid so the caller can recognise a scenario's "self" process.
"""
import json
import os

import pynvml


def processes(handle):
    out = {}
    for query in (pynvml.nvmlDeviceGetComputeRunningProcesses,
                  pynvml.nvmlDeviceGetGraphicsRunningProcesses):
        try:
            for p in query(handle):
                out[p.pid] = p.usedGpuMemory
        except pynvml.NVMLError_NotSupported:
            pass
    return [{"pid": pid, "used_memory": mem} for pid, mem in sorted(out.items())]


def main():
    pynvml.nvmlInit()
    devices = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        # Version 2 reports used memory without the driver's reservation, as gpustat does.
        mem = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
        devices.append({
            "index": index,
            "name": pynvml.nvmlDeviceGetName(h),
            "uuid": pynvml.nvmlDeviceGetUUID(h),
            "memory": {"total": mem.total, "used": mem.used, "free": mem.free},
            "processes": processes(h),
        })
    print(json.dumps({
        "self_pid": os.getpid(),
        "driver_version": pynvml.nvmlSystemGetDriverVersion(),
        "devices": devices,
    }))
    pynvml.nvmlShutdown()


if __name__ == "__main__":
    main()
