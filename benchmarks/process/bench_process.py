#!/usr/bin/env python3
"""Process start+join latency in Python's multiprocessing, per start method.

The anchor for benchmarks/src/bin/bench_process.rs: for each context (fork, forkserver,
spawn) it times `Process(target=noop, args=(i,)).start(); .join()` after a warm-up (the
fork server starts on first use and is not counted), and prints one JSON object on stdout:

    {"python": "3.11.7", "results": [{"method": "fork", "iterations": N,
                                       "samples_us": [...]}, ...]}

Usage: bench_process.py [--fork N] [--forkserver N] [--spawn N] [--warmup N]
A count of 0 skips that method.
"""

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time


def noop(x):
    return x


def measure(method, iterations, warmup):
    ctx = mp.get_context(method)
    for i in range(warmup):
        p = ctx.Process(target=noop, args=(i,))
        p.start()
        p.join()
    samples = []
    for i in range(iterations):
        t0 = time.perf_counter_ns()
        p = ctx.Process(target=noop, args=(i,))
        p.start()
        p.join()
        samples.append((time.perf_counter_ns() - t0) / 1000.0)
        if p.exitcode != 0:
            raise SystemExit(f"{method}: child exited with {p.exitcode}")
    return {"method": method, "iterations": iterations, "samples_us": samples}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fork", type=int, default=200)
    ap.add_argument("--forkserver", type=int, default=50)
    ap.add_argument("--spawn", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    results = []
    for method in ("fork", "forkserver", "spawn"):
        n = getattr(args, method)
        if n > 0 and method in mp.get_all_start_methods():
            results.append(measure(method, n, args.warmup))
    json.dump({"python": platform.python_version(), "results": results}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
