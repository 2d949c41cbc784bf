"""Dump what pynvml sees as JSON (used by nvml-sim's cross-check test).

Run with LD_LIBRARY_PATH pointing at a directory holding libnvidia-ml.so.1 -> libnvml_sim.so.
"""
import json
import os

import pynvml as N


def procs(fn, handle):
    return [{"pid": p.pid, "used": p.usedGpuMemory} for p in fn(handle)]


def text(v):
    return v.decode() if isinstance(v, bytes) else v


def memory(handle):
    m = N.nvmlDeviceGetMemoryInfo(handle, version=N.nvmlMemory_v2)
    return {"total": m.total, "reserved": m.reserved, "used": m.used, "free": m.free}


def main():
    try:
        N.nvmlInit()
    except N.NVMLError as e:
        print(json.dumps({"init_error": e.value, "message": str(e)}))
        return
    out = {"pid": os.getpid(), "driver": text(N.nvmlSystemGetDriverVersion()), "devices": []}
    for i in range(N.nvmlDeviceGetCount()):
        h = N.nvmlDeviceGetHandleByIndex(i)
        d = {
            "index": N.nvmlDeviceGetIndex(h),
            "name": text(N.nvmlDeviceGetName(h)),
            "uuid": text(N.nvmlDeviceGetUUID(h)),
            "bus_id": text(N.nvmlDeviceGetPciInfo(h).busId),
            "memory": memory(h),
            "compute": procs(N.nvmlDeviceGetComputeRunningProcesses, h),
            "graphics": procs(N.nvmlDeviceGetGraphicsRunningProcesses, h),
            "mig_mode": N.nvmlDeviceGetMigMode(h)[0],
            "mig": [],
        }
        if d["mig_mode"]:
            for j in range(N.nvmlDeviceGetMaxMigDeviceCount(h)):
                try:
                    m = N.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
                except N.NVMLError_NotFound:
                    continue
                d["mig"].append({
                    "uuid": text(N.nvmlDeviceGetUUID(m)),
                    "gi": N.nvmlDeviceGetGpuInstanceId(m),
                    "ci": N.nvmlDeviceGetComputeInstanceId(m),
                    "memory": memory(m),
                    "compute": procs(N.nvmlDeviceGetComputeRunningProcesses, m),
                })
        out["devices"].append(d)
    N.nvmlShutdown()
    print(json.dumps(out))


main()
