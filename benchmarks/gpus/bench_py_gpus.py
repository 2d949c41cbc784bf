"""Python side of bench_py_gpus: one full GPU snapshot from Python, per library.

Usage: bench_py_gpus.py ITERATIONS
Prints one JSON object: for each library, seconds per snapshot (mean and median) and how many
devices and processes it saw. Run by bench_py_gpus with the simulator's 8-GPU scenario as
libnvidia-ml and a stand-in nvidia-smi (for GPUtil) first on PATH.

- gpuproc.snapshot(): every device with its processes joined to /proc (user, command line,
  CPU, RSS);
- gpustat.new_query(): the same (it sleeps 0.1 s per GPU to sample CPU use; also timed with
  that sleep patched out, its own work only);
- GPUtil.getGPUs(): runs nvidia-smi --query-gpu and parses its CSV (no processes);
- nvitop: Device.all(), each device's snapshot, and its processes' snapshots (host data
  through psutil), as nvitop's own monitor gathers them.
"""
import json
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)  # GPUtil imports distutils

import GPUtil  # noqa: E402
import gpustat  # noqa: E402
import gpuproc  # noqa: E402
from nvitop import Device, GpuProcess  # noqa: E402


def timed(f, iterations):
    """Seconds per call (mean, median) after one uncounted warm-up call, and its result."""
    result = f()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        f()
        samples.append(time.perf_counter() - start)
    return {
        "mean": statistics.fmean(samples),
        "p50": statistics.median(samples),
        "iterations": iterations,
    }, result


def gpuproc_snapshot():
    snap = gpuproc.snapshot()
    return len(snap.devices), sum(len(d.processes or []) for d in snap.devices)


def gpustat_query():
    q = gpustat.new_query()
    return len(q.gpus), sum(len(g.processes or []) for g in q.gpus)


def gputil_query():
    return len(GPUtil.getGPUs()), 0


def nvitop_query():
    devices = Device.all()
    processes = 0
    for device in devices:
        device.as_snapshot()
        snaps = GpuProcess.take_snapshots(device.processes().values(), failsafe=True)
        processes += len(snaps)
    return len(devices), processes


def main():
    n = int(sys.argv[1])
    out = {}
    for name, f, iterations in [
        ("gpuproc.snapshot()", gpuproc_snapshot, n),
        ("GPUtil.getGPUs()", gputil_query, max(n // 50, 10)),
        ("nvitop Device.all() + processes", nvitop_query, max(n // 10, 20)),
        ("gpustat.new_query()", gpustat_query, 3),
    ]:
        times, (devices, processes) = timed(f, iterations)
        out[name] = {**times, "devices": devices, "processes": processes}
    # Its own work, without the CPU-sampling sleep (0.1 s per GPU).
    gpustat.core.time.sleep = lambda _seconds: None
    times, (devices, processes) = timed(gpustat_query, max(n // 10, 20))
    out["gpustat.new_query(), sleep patched out"] = {
        **times,
        "devices": devices,
        "processes": processes,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
