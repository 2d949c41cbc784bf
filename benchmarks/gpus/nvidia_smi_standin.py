"""A stand-in for `nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits`, reading
whatever libnvidia-ml is loaded (the simulator, in bench_py_gpus) through pynvml, for GPUtil.

It answers only the form of query GPUtil makes; it starts faster than NVIDIA's nvidia-smi (a
Python start-up and a pynvml import, no driver round trips of its own), so GPUtil's time
measured through it is a lower bound of its time on a real machine.
"""
import sys

import pynvml as N


def text(v):
    return v.decode() if isinstance(v, bytes) else v


def field(h, name):
    mib = 1024 * 1024
    if name == "index":
        return N.nvmlDeviceGetIndex(h)
    if name == "uuid":
        return text(N.nvmlDeviceGetUUID(h))
    if name == "utilization.gpu":
        return N.nvmlDeviceGetUtilizationRates(h).gpu
    if name in ("memory.total", "memory.used", "memory.free"):
        m = N.nvmlDeviceGetMemoryInfo(h)
        return getattr(m, name.split(".")[1]) // mib
    if name == "driver_version":
        return text(N.nvmlSystemGetDriverVersion())
    if name == "name":
        return text(N.nvmlDeviceGetName(h))
    if name == "gpu_serial":
        return text(N.nvmlDeviceGetSerial(h))
    if name in ("display_active", "display_mode"):
        return "Disabled"
    if name == "temperature.gpu":
        return N.nvmlDeviceGetTemperature(h, N.NVML_TEMPERATURE_GPU)
    return "[N/A]"


def main():
    query = [a for a in sys.argv[1:] if a.startswith("--query-gpu=")]
    if not query or "--format=csv,noheader,nounits" not in sys.argv[1:]:
        sys.exit("nvidia-smi stand-in: only --query-gpu=... --format=csv,noheader,nounits")
    names = query[0].split("=", 1)[1].split(",")
    N.nvmlInit()
    lines = []
    for i in range(N.nvmlDeviceGetCount()):
        h = N.nvmlDeviceGetHandleByIndex(i)
        lines.append(", ".join(str(field(h, n)) for n in names))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
