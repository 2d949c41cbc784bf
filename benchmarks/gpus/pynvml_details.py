"""Prints the detailed fields that NVIDIA's nvidia-ml-py (pynvml) reads, as JSON, for
gpuproc's cross-check of `gpuproc gpus --json`: PCIe link and throughput, BAR1, encoder and
decoder utilisation, energy, clock event reasons, remapped rows, NVLink link states and the
per-process utilisation samples (all of the driver's buffer, newest per process, figures over
100% dropped). A query the device does not support is null.
"""
import json

import pynvml


def query(fn, *args):
    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


def nvlink(h):
    links = []
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        state = query(pynvml.nvmlDeviceGetNvLinkState, h, link)
        if state is None:
            break
        links.append(bool(state))
    return links or None


def process_utilization(h):
    samples = query(pynvml.nvmlDeviceGetProcessUtilization, h, 0) or []
    newest = {}
    for s in sorted(samples, key=lambda s: s.timeStamp):
        newest[s.pid] = s
    pct = lambda v: v if v <= 100 else None
    return {
        str(pid): {"sm": pct(s.smUtil), "memory": pct(s.memUtil),
                   "encoder": pct(s.encUtil), "decoder": pct(s.decUtil)}
        for pid, s in newest.items()
    }


def main():
    pynvml.nvmlInit()
    devices = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        bar1 = query(pynvml.nvmlDeviceGetBAR1MemoryInfo, h)
        enc = query(pynvml.nvmlDeviceGetEncoderUtilization, h)
        dec = query(pynvml.nvmlDeviceGetDecoderUtilization, h)
        rows = query(pynvml.nvmlDeviceGetRemappedRows, h)
        devices.append({
            "pcie": {
                "generation": query(pynvml.nvmlDeviceGetCurrPcieLinkGeneration, h),
                "max_generation": query(pynvml.nvmlDeviceGetMaxPcieLinkGeneration, h),
                "width": query(pynvml.nvmlDeviceGetCurrPcieLinkWidth, h),
                "max_width": query(pynvml.nvmlDeviceGetMaxPcieLinkWidth, h),
                "tx_kib_per_s": query(pynvml.nvmlDeviceGetPcieThroughput, h,
                                      pynvml.NVML_PCIE_UTIL_TX_BYTES),
                "rx_kib_per_s": query(pynvml.nvmlDeviceGetPcieThroughput, h,
                                      pynvml.NVML_PCIE_UTIL_RX_BYTES),
            },
            "bar1_total": bar1.bar1Total if bar1 else None,
            "bar1_used": bar1.bar1Used if bar1 else None,
            "encoder_utilization": enc[0] if enc else None,
            "decoder_utilization": dec[0] if dec else None,
            "total_energy_mj": query(pynvml.nvmlDeviceGetTotalEnergyConsumption, h),
            "clock_event_reasons": query(pynvml.nvmlDeviceGetCurrentClocksEventReasons, h),
            "remapped_rows": list(rows) if rows else None,
            "nvlink": nvlink(h),
            "process_utilization": process_utilization(h),
        })
    print(json.dumps({"devices": devices}))
    pynvml.nvmlShutdown()


if __name__ == "__main__":
    main()
